"""The ingest DAG: integrity, a ``dag.test()`` run into a fresh schema, and the Kafka-triggered path end to end."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dev.standalone import airflow, dag_runs, free_port, running_standalone, standalone_env, wait_for_dag
from tests.crowd.test_ingest import encode, frame_dict

ROOT = Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "dags" / "crowd_faces_ingest.py"
DAG_ID = "crowd_faces_ingest"


def _publish(topic: str, n: int, video_id: str = "dag-video") -> None:
    from crowd.kafka import DeliveryTracker, reliable_producer

    producer = reliable_producer("kafka_default", timeout_s=30)
    tracker = DeliveryTracker()
    for i in range(n):
        producer.produce(
            topic, key=video_id.encode(), value=encode(frame_dict(video_id, i, i % 3)), on_delivery=tracker.callback
        )
    assert tracker.wait(producer, timeout_s=30) == n


def _frames(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM frames").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def _load_dag():
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}, bag.import_errors
    return bag.get_dag(DAG_ID)


@pytest.mark.airflow
def test_dag_is_triggered_by_a_kafka_watcher_in_its_own_group(airflow_db: Path) -> None:
    from airflow.providers.common.compat.module_loading import import_string

    dag = _load_dag()
    assert {"crowd", "kafka", "ingest"} <= set(dag.tags)
    assert dag.max_active_runs == 1 and dag.doc_md and "AwaitMessageSensor" in dag.doc_md
    assert [t.task_id for t in dag.tasks] == ["drain_faces"]
    task = dag.get_task("drain_faces")
    assert task.owner == "crowd" and task.retries >= 1

    (asset,) = dag.timetable.asset_condition.objects
    assert asset.name == "crowd_faces_topic"
    (watcher,) = asset.watchers
    trigger = watcher.trigger
    kwargs = trigger.kwargs
    assert kwargs["topics"] == [os.environ.get("CROWD_FACES_TOPIC", "Faces")]
    assert kwargs["kafka_config_id"] != "kafka_default", "the watcher must not share the drain's consumer group"
    from airflow.sdk import BaseHook

    from crowd.config import load_settings

    watch_group = BaseHook.get_connection(kafka_config_id := kwargs["kafka_config_id"]).extra_dejson["group.id"]
    drain_group = load_settings().ingest_group
    assert watch_group and watch_group != drain_group, f"{kafka_config_id} reads in the drain's group {drain_group}"
    assert kwargs["apply_function_kwargs"]["group_id"] == drain_group, "faces_pending must compare the drain's offsets"
    from crowd.ingest import faces_pending

    assert import_string(kwargs["apply_function"]) is faces_pending


@pytest.mark.services
@pytest.mark.airflow
def test_dag_test_drains_a_fresh_topic_into_a_fresh_schema(airflow_db: Path, faces_topic: str, pg_schema: str) -> None:
    _publish(faces_topic, 120)
    dag = _load_dag()

    run = dag.test(run_conf={"alert_threshold": 2, "alert_min_duration_s": 0.0, "idle_timeout_s": 3})

    assert str(run.state) == "success", run.state
    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    assert _frames(dsn) == 120
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT sum(next_offset) FROM kafka_offsets").fetchone()[0] == 120
        # frames with 2 faces are every third frame: 40 one-frame episodes
        assert conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 40
        row = conn.execute("SELECT frames, max_faces FROM video_summary WHERE video_id = 'dag-video'").fetchone()
    assert row == (120, 2)


def test_a_run_that_finds_messages_deleted_before_they_were_stored_ends_failed(
    airflow_db: Path, faces_topic: str, pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain records the lost range, stores what follows and fails; its retry (30 s later) found nothing lost
    and succeeded, so the run ended green and the loss showed only as an earlier failed try. It fails the run."""
    from confluent_kafka import TopicPartition

    from crowd.ingest import drain

    group = f"crowd-ingest-lost-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("CROWD_INGEST_GROUP", group)
    _publish(faces_topic, 30)  # one key: one partition
    first = drain("kafka_default", "crowd_postgres", faces_topic, group, batch_size=10, max_batches=1)
    (partition,) = [p for p, offset in first.next_offsets.items() if offset == 10]
    for future in kafka_admin.delete_records([TopicPartition(faces_topic, partition, 20)]).values():
        future.result(timeout=30)
    dag = _load_dag()

    run = dag.test(run_conf={"idle_timeout_s": 3})

    assert str(run.state) == "failed", run.state
    (task,) = run.get_task_instances()
    assert task.try_number == 1 and str(task.state) == "failed"  # not retried
    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 20  # 0-9 and 20-29
        (reason,) = conn.execute("SELECT reason FROM rejected_messages").fetchone()
    assert reason.startswith("lost: offsets 10..19 (10 messages)")


@pytest.fixture
def airflow_logging() -> None:
    """Airflow loaded before the test's logs are caught: loading it sets up its logging, which drops pytest's
    handler."""
    import airflow.configuration  # noqa: F401


@pytest.mark.services
def test_rejected_messages_are_counted_by_kind_and_warned_about(
    airflow_logging: None,
    faces_topic: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer sending a broken format left every run green with a lone INFO count: the drain task warns, by kind
    of rejection with the first one's place and reason, and says where the messages are kept."""
    import logging

    from crowd.ingest import drain_task
    from crowd.kafka import DeliveryTracker, reliable_producer

    monkeypatch.setenv("CROWD_INGEST_GROUP", f"crowd-ingest-rejects-{uuid.uuid4().hex[:6]}")
    producer = reliable_producer("kafka_default", timeout_s=30)
    tracker = DeliveryTracker()
    bad_schema = json.dumps({**frame_dict("rejects", 9, 0), "total_faces": 3}).encode()
    values = [encode(frame_dict("rejects", i, 1)) for i in range(4)] + [b"<xml/>"] * 3 + [bad_schema]
    for value in values:  # one key: one partition, in this order
        producer.produce(faces_topic, key=b"rejects", value=value, on_delivery=tracker.callback)
    assert tracker.wait(producer, timeout_s=30) == len(values)

    with caplog.at_level(logging.INFO, logger="crowd.ingest"):
        summary = drain_task(topic=faces_topic, group_id=os.environ["CROWD_INGEST_GROUP"], idle_timeout_s=3)

    assert (summary["frames"], summary["rejected"]) == (4, 4)
    assert summary["rejected_by_code"] == {"not_json": 3, "schema": 1}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("4 message(s) rejected (of 8 read)") and "rejected_messages" in warning
    assert "not_json x3, first at partition" in warning and " offset 4: not_json" in warning
    assert "schema x1, first at partition" in warning and "total_faces=3" in warning


# --- the trigger path: scheduler + triggerer + dag-processor, nobody triggers the DAG by hand ------------------


@pytest.fixture
def airflow_services(
    request: pytest.FixtureRequest, tmp_path: Path, faces_topic: str, pg_schema: str
) -> Iterator[dict[str, str]]:
    """Airflow standalone (scheduler, triggerer, dag-processor, api-server) in a temp home, torn down by group.

    Param ``"watcher"`` (default): the asset watcher alone starts runs (no sweep). ``"sweep"``: a sweep every
    minute, and a watcher whose connection reaches no broker, so that only the sweep can start a run.
    """
    mode = getattr(request, "param", "watcher")
    kafka_extra = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]
    watch_extra = {**kafka_extra, "group.id": f"crowd-ingest-watch-{uuid.uuid4().hex[:6]}"}
    sweep = "none"
    if mode == "sweep":
        watch_extra["bootstrap.servers"] = f"127.0.0.1:{free_port()}"
        sweep = "* * * * *"
    env = standalone_env(
        tmp_path / "airflow",
        ROOT / "dags",
        AIRFLOW_CONN_KAFKA_WATCH=json.dumps({"conn_type": "kafka", "extra": watch_extra}),
        CROWD_INGEST_SWEEP_SCHEDULE=sweep,
    )
    with running_standalone(env, tmp_path / "standalone.log"):
        yield env


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.airflow
def test_a_published_message_reaches_postgres_without_a_manual_trigger(
    airflow_services: dict[str, str], faces_topic: str
) -> None:
    env = airflow_services
    wait_for_dag(env, DAG_ID, timeout_s=120)
    airflow(env, "dags", "unpause", DAG_ID)

    time.sleep(5)  # let the triggerer pick up the watcher
    _publish(faces_topic, 25, video_id="triggered-video")

    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and _frames(dsn) < 25:
        time.sleep(2)
    runs = dag_runs(env, DAG_ID)
    assert _frames(dsn) == 25, f"frames never arrived; runs: {runs}"
    # nobody triggered it by hand: every run id says what created it
    assert runs and all(r["run_id"].startswith("asset_triggered__") for r in runs), runs


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.airflow
@pytest.mark.parametrize("airflow_services", ["sweep"], indirect=True)
def test_the_sweep_drains_messages_no_asset_event_announced(airflow_services: dict[str, str], faces_topic: str) -> None:
    """What a failed run leaves behind once its asset events are used up: no event will come for it."""
    env = airflow_services
    wait_for_dag(env, DAG_ID, timeout_s=120)
    _publish(faces_topic, 10, video_id="swept-video")
    airflow(env, "dags", "unpause", DAG_ID)

    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    deadline = time.monotonic() + 180  # the next minute, the scheduler's loop, the task's start
    while time.monotonic() < deadline and _frames(dsn) < 10:
        time.sleep(2)
    runs = dag_runs(env, DAG_ID)
    assert _frames(dsn) == 10, f"the sweep did not drain; runs: {runs}"
    assert runs and all(r["run_id"].startswith("scheduled__") for r in runs), runs
