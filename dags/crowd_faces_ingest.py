"""Drain the Kafka ``Faces`` topic into PostgreSQL, triggered by the messages themselves.

Thin by design: the work is in :mod:`crowd.ingest` and :mod:`crowd.storage`; nothing connects at parse time.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

from crowd.assets import faces_ingest_schedule
from crowd.config import load_settings

settings = load_settings()

DOC = f"""
### crowd_faces_ingest

Moves every face-detection message of Kafka topic `{settings.faces_topic}` into PostgreSQL
(`frames`, `faces`, `rejected_messages`, `alerts`; connection `{settings.postgres_conn_id}`), exactly once.

**Trigger: event-driven scheduling.** The DAG is scheduled on the asset `crowd_faces_topic`, whose
`AssetWatcher` runs a Kafka `MessageQueueTrigger` in the triggerer (connection `{settings.kafka_watch_conn_id}`, its own consumer
group, e.g. `crowd-ingest-watch`). Its `apply_function` (`crowd.ingest.faces_pending`) fires only for a message
the drain has not stored yet (offset >= the drain's stored offset), so a backlog being drained does not queue a
run per message. Chosen over a continuous DAG with a deferrable `AwaitMessageSensor` because no run sits open
while the topic is quiet, the asset shows in the UI as the link between the publish DAG and this one, and
asset events queued during a run collapse into one follow-up run (`max_active_runs=1`). A sweep run on
`{settings.ingest_sweep_schedule}` (`CROWD_INGEST_SWEEP_SCHEDULE`, UTC; `none` turns it off) drains whatever a
failed run left behind once its asset events were used up. A caught-up run keeps
reading until nothing new came for `linger_s` (`CROWD_INGEST_LINGER_S`), so a detection job's stream of messages
is stored by one run instead of one run per message.

**Exactly once.** The drain (`crowd.ingest.drain`) keeps its offsets in PostgreSQL (`kafka_offsets`, group
`{settings.ingest_group}`), written in the same transaction as each batch of rows; a crash replays at most the
uncommitted batch and replays overwrite the same keys. Bad messages go to `rejected_messages` with the reason.
Manual runs are always safe (idempotent) and take the params below.

**Alerts.** With `alert_threshold` set, a run of frames with at least that many faces lasting
`alert_min_duration_s` becomes one `alerts` row and a message on `{settings.alerts_topic}`; frames that come late or
are replaced can change an alert (published again with the next `revision`) or end it (a `crowd_alert_withdrawn`
message).
"""


@dag(
    dag_id="crowd_faces_ingest",
    schedule=faces_ingest_schedule(settings),
    catchup=False,
    max_active_runs=1,
    tags=["crowd", "kafka", "postgres", "ingest"],
    doc_md=DOC,
    default_args={
        "owner": "crowd",
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
    },
    params={
        "batch_size": Param(2000, type="integer", minimum=1, maximum=100_000, description="messages per transaction"),
        "max_seconds": Param(
            600, type="number", minimum=1, maximum=1080, description="stop after this long; the next run goes on"
        ),
        "idle_timeout_s": Param(10, type="number", minimum=0.5, description="stop after this long without messages"),
        "linger_s": Param(
            settings.ingest_linger_s,
            type="number",
            minimum=0,
            description="once caught up, wait this long for more (idle_timeout_s does not cut it short)",
        ),
        "alert_threshold": Param(
            settings.alert_threshold, type=["null", "integer"], minimum=1, description="faces per frame; null: off"
        ),
        "alert_min_duration_s": Param(
            settings.alert_min_duration_s, type="number", minimum=0, description="how long the crowd must last"
        ),
    },
)
def crowd_faces_ingest():
    @task(execution_timeout=timedelta(minutes=20), multiple_outputs=False)  # > max_seconds' maximum + start
    def drain_faces(params: dict | None = None, dag_run=None) -> dict:
        """Drain the Faces topic into PostgreSQL; returns the drain summary."""
        from airflow.sdk.exceptions import AirflowFailException

        from crowd.ingest import MessagesLostError, drain_task

        params = params or {}
        try:
            return drain_task(
                group_id=settings.ingest_group,
                batch_size=params["batch_size"],
                max_seconds=params["max_seconds"],
                idle_timeout_s=params["idle_timeout_s"],
                linger_s=params["linger_s"],
                alert_threshold=params["alert_threshold"],
                alert_min_duration_s=params["alert_min_duration_s"],
                run_started_at=dag_run.start_date if dag_run else None,  # losses an earlier try recorded fail it too
            )
        except MessagesLostError as exc:  # recorded and past: a retry would find nothing lost and end the run green
            raise AirflowFailException(str(exc)) from exc

    drain_faces()


crowd_faces_ingest()
