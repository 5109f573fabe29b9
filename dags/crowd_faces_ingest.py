"""Drain the Kafka ``Faces`` topic into PostgreSQL, triggered by the messages themselves.

Thin by design: the work is in :mod:`crowd.ingest` and :mod:`crowd.storage`; nothing connects at parse time.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import Asset, AssetWatcher, Param, dag, task

from crowd.config import load_settings

settings = load_settings()

# The watcher reads with its own Airflow connection, whose group.id must differ from the drain's group
# (the trigger commits what it reads). Define it like kafka_default with "group.id": "crowd-ingest-watch".
WATCH_CONN_ID = os.environ.get("CROWD_KAFKA_WATCH_CONN_ID", "kafka_watch")
DRAIN_GROUP = "crowd-ingest"

faces_topic = Asset(
    name="crowd_faces_topic",
    uri=f"kafka://{settings.kafka_conn_id}/{settings.faces_topic}",
    group="crowd",
    watchers=[
        AssetWatcher(
            name="crowd_faces_watcher",
            trigger=MessageQueueTrigger(
                scheme="kafka",
                topics=[settings.faces_topic],
                kafka_config_id=WATCH_CONN_ID,
                apply_function="crowd.ingest.faces_pending",
                apply_function_kwargs={"postgres_conn_id": settings.postgres_conn_id, "group_id": DRAIN_GROUP},
                poll_timeout=1,
                poll_interval=0,
                commit_offset=True,
            ),
        )
    ],
)

DOC = f"""
### crowd_faces_ingest

Moves every face-detection message of Kafka topic `{settings.faces_topic}` into PostgreSQL
(`frames`, `faces`, `rejected_messages`, `alerts`; connection `{settings.postgres_conn_id}`), exactly once.

**Trigger: event-driven scheduling.** The DAG is scheduled on the asset `crowd_faces_topic`, whose
`AssetWatcher` runs a Kafka `MessageQueueTrigger` in the triggerer (connection `{WATCH_CONN_ID}`, its own consumer
group, e.g. `crowd-ingest-watch`). Its `apply_function` (`crowd.ingest.faces_pending`) fires only for a message
the drain has not stored yet (offset >= the drain's stored offset), so a backlog being drained does not queue a
run per message. Chosen over a continuous DAG with a deferrable `AwaitMessageSensor` because no run sits open
while the topic is quiet, the asset shows in the UI as the link between the publish DAG and this one, and
asset events queued during a run collapse into one follow-up run (`max_active_runs=1`).

**Exactly once.** The drain (`crowd.ingest.drain`) keeps its offsets in PostgreSQL (`kafka_offsets`, group
`{DRAIN_GROUP}`), written in the same transaction as each batch of rows; a crash replays at most the
uncommitted batch and replays overwrite the same keys. Bad messages go to `rejected_messages` with the reason.
Manual runs are always safe (idempotent) and take the params below.

**Alerts.** With `alert_threshold` set, a run of frames with at least that many faces lasting
`alert_min_duration_s` becomes one `alerts` row and one message on `{settings.alerts_topic}`.
"""


@dag(
    dag_id="crowd_faces_ingest",
    schedule=[faces_topic],
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
        "max_seconds": Param(600, type="number", minimum=1, description="stop after this long; the next run goes on"),
        "idle_timeout_s": Param(10, type="number", minimum=0.5, description="stop after this long without messages"),
        "alert_threshold": Param(10, type=["null", "integer"], minimum=1, description="faces per frame; null: off"),
        "alert_min_duration_s": Param(2.0, type="number", minimum=0, description="how long the crowd must last"),
    },
)
def crowd_faces_ingest():
    @task(execution_timeout=timedelta(minutes=20), multiple_outputs=False)
    def drain_faces(params: dict | None = None) -> dict:
        """Drain the Faces topic into PostgreSQL; returns the drain summary."""
        from crowd.ingest import drain_task

        params = params or {}
        return drain_task(
            group_id=DRAIN_GROUP,
            batch_size=params["batch_size"],
            max_seconds=params["max_seconds"],
            idle_timeout_s=params["idle_timeout_s"],
            alert_threshold=params["alert_threshold"],
            alert_min_duration_s=params["alert_min_duration_s"],
        )

    drain_faces()


crowd_faces_ingest()
