"""The Faces drain against the real broker and PostgreSQL: exactly-once storage, replays, crashes, bad messages."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import crowd.ingest
from crowd.alerts import AlertRule
from crowd.ingest import DRAIN_LOCK_KEY_SQL, IngestError, MessagesLostError, drain, drain_task
from crowd.messages import FaceMessage

pytestmark = pytest.mark.services

GROUP = "crowd-ingest-test"
WORKER = Path(__file__).with_name("ingest_worker.py")


# --- helpers --------------------------------------------------------------------------------------------------


def frame_dict(video_id: str, frame_id: int, n_faces: int, *, fps: float = 10.0, seed: int = 0) -> dict:
    """A valid Faces message as a plain dict (frame 640x480, ``n_faces`` boxes)."""
    rng = random.Random(hash((video_id, frame_id, seed)))
    faces = [
        {
            "face_id": i,
            "bounding_box": {"x": rng.randint(0, 500), "y": rng.randint(0, 380), "width": 40, "height": 50},
            "confidence": round(rng.uniform(0.5, 1.0), 4),
        }
        for i in range(n_faces)
    ]
    return {
        "schema_version": 1,
        "video_id": video_id,
        "source": f"/videos/{video_id}.mp4",
        "frame_id": frame_id,
        "frame_ts_ms": round(frame_id * 1000 / fps, 3),
        "frame_width": 640,
        "frame_height": 480,
        "model": "yolov3-face@416",
        "total_faces": n_faces,
        "faces": faces,
    }


def encode(message: dict) -> bytes:
    """Validate through the real message model, then serialise (what the detection DAG publishes)."""
    return FaceMessage.from_dict(message).to_json()


def backlog_with_garbage(
    n_videos: int, per_video: int, *, faces_every: int, garbage_every: int, garbage: bytes
) -> tuple[list[dict], list[tuple[bytes, bytes]]]:
    """Valid messages (frame ``i`` has ``i % faces_every`` faces) and the items to publish: each keyed by its
    video, with ``garbage + b" <index>"`` (key ``video-0``) inserted every ``garbage_every`` items."""
    messages = [frame_dict(f"video-{v}", i, i % faces_every) for v in range(n_videos) for i in range(per_video)]
    items = [(m["video_id"].encode(), encode(m)) for m in messages]
    for k in range(0, len(items), garbage_every):
        items.insert(k, (b"video-0", garbage + b" %d" % k))
    return messages, items


def new_topic(admin, prefix: str, partitions: int = 3, config: dict[str, str] | None = None) -> str:
    from confluent_kafka.admin import NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    for future in admin.create_topics([topic]).values():
        future.result(timeout=30)
    return name


def make_topic_again(admin, topic: str, partitions: int = 3) -> None:
    """Delete ``topic`` and create it again under the same name (a new topic id, offsets from 0)."""
    from confluent_kafka.admin import NewTopic

    for future in admin.delete_topics([topic]).values():
        future.result(timeout=30)
    deadline = time.monotonic() + 60
    while True:  # the broker may still be deleting it
        try:
            for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
                future.result(timeout=30)
            return
        except Exception:
            assert time.monotonic() < deadline, "the topic could not be made again"
            time.sleep(1)


def publish(topic: str, items: list[tuple[bytes | None, bytes | None]]) -> None:
    from crowd.kafka import DeliveryTracker, reliable_producer

    producer = reliable_producer("kafka_default", timeout_s=30, message_max_bytes=4 * 1024 * 1024)
    tracker = DeliveryTracker()
    for key, value in items:
        producer.produce(topic, key=key, value=value, on_delivery=tracker.callback)
        producer.poll(0)
    assert tracker.wait(producer, timeout_s=60) == len(items)


def publish_frames(topic: str, messages: list[dict]) -> None:
    publish(topic, [(m["video_id"].encode(), encode(m)) for m in messages])


def end_offsets(topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import TopicPartition

    from crowd.kafka import manual_commit_consumer

    consumer = manual_commit_consumer("kafka_default", group_id="test-end-offsets")
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()


def pg() -> psycopg.Connection:
    return psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True)


def scalar(sql: str, params: tuple = ()) -> int:
    with pg() as conn:
        return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]


def quick_drain(topic: str, **kwargs) -> object:
    kwargs.setdefault("batch_wait_s", 0.2)
    kwargs.setdefault("idle_timeout_s", 5)
    return drain("kafka_default", "crowd_postgres", topic, GROUP, **kwargs)


def two_videos(n_a: int = 150, n_b: int = 150) -> list[dict]:
    return [frame_dict("video-a", i, i % 4) for i in range(n_a)] + [frame_dict("video-b", i, i % 3) for i in range(n_b)]


# --- happy path, replay, duplicates ---------------------------------------------------------------------------


def test_drain_stores_exactly_every_frame_and_face(faces_topic: str, pg_schema: str) -> None:
    messages = two_videos()
    publish_frames(faces_topic, messages)

    summary = quick_drain(faces_topic, batch_size=64)

    assert (summary.messages, summary.frames, summary.rejected, summary.lag_left) == (300, 300, 0, 0)
    assert summary.batches >= 300 // 64
    assert summary.faces == sum(m["total_faces"] for m in messages)
    with pg() as conn:
        frames = {
            (v, f): (ts, n, w, h, src, model)
            for v, f, ts, n, w, h, src, model in conn.execute(
                "SELECT video_id, frame_id, frame_ts_ms, total_faces, frame_width, frame_height, source, model "
                "FROM frames"
            )
        }
        faces = {
            (v, f, i): (x, y, w, h, round(c, 4))
            for v, f, i, x, y, w, h, c in conn.execute(
                "SELECT video_id, frame_id, face_id, x, y, width, height, confidence FROM faces"
            )
        }
        offsets = dict(
            conn.execute("SELECT partition, next_offset FROM kafka_offsets WHERE consumer_group = %s", (GROUP,))
        )
    assert frames == {
        (m["video_id"], m["frame_id"]): (
            m["frame_ts_ms"],
            m["total_faces"],
            640,
            480,
            m["source"],
            m["model"],
        )
        for m in messages
    }
    assert faces == {
        (m["video_id"], m["frame_id"], f["face_id"]): (
            *(f["bounding_box"][k] for k in ("x", "y", "width", "height")),
            f["confidence"],
        )
        for m in messages
        for f in m["faces"]
    }
    assert sum(offsets.values()) == 300 and offsets == summary.next_offsets


def test_replay_from_offset_zero_stores_nothing_twice(faces_topic: str, pg_schema: str) -> None:
    messages = two_videos(80, 70)
    publish_frames(faces_topic, messages)
    quick_drain(faces_topic, batch_size=50)
    before = (scalar("SELECT count(*) FROM frames"), scalar("SELECT count(*) FROM faces"))

    scalar("WITH d AS (DELETE FROM kafka_offsets RETURNING 1) SELECT count(*) FROM d")
    replay = quick_drain(faces_topic, batch_size=50)

    assert replay.messages == 150, "the replay must have read the whole topic again"
    assert (
        (scalar("SELECT count(*) FROM frames"), scalar("SELECT count(*) FROM faces"))
        == before
        == (150, sum(m["total_faces"] for m in messages))
    )
    again = quick_drain(faces_topic)
    assert again.messages == 0 and again.stopped_because == "caught up"


def test_rows_and_offsets_are_committed_together(faces_topic: str, pg_schema: str) -> None:
    """An offset write that fails takes its batch's rows with it: no frame is stored without its offset (a crash
    between the two would otherwise leave rows whose messages are read again, or offsets past rows never written).
    Once the offset table takes writes again, the next drain stores every frame once."""
    quick_drain(faces_topic)  # migrates the schema
    with pg() as conn:
        conn.execute(
            "CREATE FUNCTION refuse_offsets() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'offsets refused by the test'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_offsets BEFORE INSERT OR UPDATE ON kafka_offsets "
            "FOR EACH ROW EXECUTE FUNCTION refuse_offsets()"
        )
    messages = two_videos(60, 40)
    publish_frames(faces_topic, messages)

    with pytest.raises(psycopg.errors.RaiseException, match="offsets refused by the test"):
        quick_drain(faces_topic, batch_size=30)
    assert scalar("SELECT count(*) FROM frames") == 0
    assert scalar("SELECT count(*) FROM faces") == 0
    assert scalar("SELECT count(*) FROM kafka_offsets") == 0

    with pg() as conn:
        conn.execute("DROP TRIGGER refuse_offsets ON kafka_offsets")
    summary = quick_drain(faces_topic, batch_size=30)
    assert (summary.messages, summary.frames) == (100, 100)
    assert scalar("SELECT count(*) FROM frames") == 100
    assert scalar("SELECT count(*) FROM faces") == sum(m["total_faces"] for m in messages)
    assert scalar("SELECT sum(next_offset) FROM kafka_offsets") == 100


def test_a_frames_write_that_fails_moves_no_offset(faces_topic: str, pg_schema: str) -> None:
    """The other order: rows that cannot be written take their batch's offsets with them, in PostgreSQL and in
    Kafka (offsets committed before their rows would skip those messages for good once the rows fail). Once the
    frames table takes writes again, the next drain reads the batch again and stores every frame once."""
    from confluent_kafka import TopicPartition

    from crowd.kafka import manual_commit_consumer

    quick_drain(faces_topic)  # migrates the schema
    with pg() as conn:
        conn.execute(
            "CREATE FUNCTION refuse_frames() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'frames refused by the test'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_frames BEFORE INSERT OR UPDATE ON frames "
            "FOR EACH ROW EXECUTE FUNCTION refuse_frames()"
        )
    messages = two_videos(60, 40)
    publish_frames(faces_topic, messages)

    with pytest.raises(psycopg.errors.RaiseException, match="frames refused by the test"):
        quick_drain(faces_topic, batch_size=30)
    assert scalar("SELECT count(*) FROM frames") == 0
    assert scalar("SELECT count(*) FROM faces") == 0
    assert scalar("SELECT count(*) FROM kafka_offsets") == 0
    consumer = manual_commit_consumer("kafka_default", group_id=GROUP)
    try:
        committed = consumer.committed([TopicPartition(faces_topic, p) for p in range(3)], timeout=10)
    finally:
        consumer.close()
    assert all(tp.offset < 0 for tp in committed), committed  # none committed to Kafka either

    with pg() as conn:
        conn.execute("DROP TRIGGER refuse_frames ON frames")
    summary = quick_drain(faces_topic, batch_size=30)
    assert (summary.messages, summary.frames) == (100, 100)
    with pg() as conn:
        stored = sorted(conn.execute("SELECT video_id, frame_id FROM frames").fetchall())
    assert stored == sorted((m["video_id"], m["frame_id"]) for m in messages)  # every frame, once
    assert scalar("SELECT count(*) FROM faces") == sum(m["total_faces"] for m in messages)
    assert scalar("SELECT sum(next_offset) FROM kafka_offsets") == 100


class _BrokerFallsSilent:
    """A real consumer whose broker stops answering after ``batches`` fetches that gave messages (what librdkafka
    shows while every broker is down: no message, no end-of-partition event, no error)."""

    def __init__(self, consumer, batches: int) -> None:
        self._consumer, self._left = consumer, batches

    def consume(self, num_messages: int = 1, timeout: float = -1):
        if self._left <= 0:
            time.sleep(timeout)
            return []
        messages = self._consumer.consume(num_messages=num_messages, timeout=timeout)
        self._left -= any(m.error() is None for m in messages)
        return messages

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)


def test_a_drain_cut_off_by_a_silent_broker_fails_and_its_retry_stores_the_rest(
    faces_topic: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping on ``idle_timeout_s`` with messages left in the topic is not success: the run's asset events are
    used up, so a green run would leave them to the sweep (or to nobody when the sweep is off)."""
    import crowd.kafka

    messages = two_videos(300, 300)
    publish_frames(faces_topic, messages)
    real = crowd.kafka.manual_commit_consumer
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", lambda *a, **k: _BrokerFallsSilent(real(*a, **k), 2))
    with pytest.raises(IngestError, match=r"nothing for 2 s with \d+ messages of .* not stored yet"):
        drain_task(topic=faces_topic, group_id=GROUP, batch_size=100, idle_timeout_s=2)
    assert 0 < scalar("SELECT count(*) FROM frames") < 600

    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", real)
    summary = drain_task(topic=faces_topic, group_id=GROUP, batch_size=100, idle_timeout_s=2)
    assert summary["lag_left"] == 0 and summary["stopped_because"] == "caught up"
    assert scalar("SELECT count(*) FROM frames") == 600
    assert scalar("SELECT count(*) FROM faces") == sum(m["total_faces"] for m in messages)


def test_a_caught_up_drain_lingers_for_linger_s_even_past_idle_timeout_s(kafka_admin, pg_schema: str) -> None:
    """``idle_timeout_s`` (10 s in the DAG) is for a broker that gives nothing; it cut a caught-up drain's
    ``linger_s`` short (CROWD_INGEST_LINGER_S=30 waited 10 s), so a trickling stream got a DAG run every 10 s.
    A message published while the drain lingers past its idle timeout is stored by the same drain."""
    import threading

    topic = new_topic(kafka_admin, "test-linger", partitions=1)
    publish_frames(topic, [frame_dict("video-a", 0, 1)])
    late = threading.Timer(2.0, publish_frames, (topic, [frame_dict("video-a", 1, 1)]))
    late.start()
    try:
        summary = quick_drain(topic, idle_timeout_s=1, linger_s=4)
    finally:
        late.join()
    assert summary.stopped_because == "caught up, nothing new for 4 s", summary.stopped_because
    assert summary.frames == 2


@pytest.mark.parametrize("deleted_to", [20, 30], ids=["some-left-after", "nothing-left-after"])
def test_messages_deleted_before_they_were_stored_are_recorded_as_lost_and_fail_the_run(
    pg_schema: str, kafka_admin, deleted_to: int
) -> None:
    """Retention shorter than an outage (or kafka-delete-records) removes messages the drain had not stored yet. The
    consumer would quietly start at the log's new start: the drain records the lost range and fails the run, once;
    everything after the gap is stored. Also when nothing was written after the range (no message shows the gap)."""
    from confluent_kafka import TopicPartition

    topic = new_topic(kafka_admin, "test-lost", partitions=1)
    messages = [frame_dict("video-a", i, i % 3) for i in range(30)]
    publish_frames(topic, messages)
    first = quick_drain(topic, batch_size=10, max_batches=1)
    assert first.next_offsets == {0: 10}
    for future in kafka_admin.delete_records([TopicPartition(topic, 0, deleted_to)]).values():
        future.result(timeout=30)

    n = deleted_to - 10
    with pytest.raises(IngestError, match=rf"{n} messages of .* were deleted from the broker before they were stored"):
        drain_task(topic=topic, group_id=GROUP, idle_timeout_s=5)
    with pg() as conn:
        lost = conn.execute('SELECT partition, "offset", raw, reason FROM rejected_messages').fetchall()
        frame_ids = [r[0] for r in conn.execute("SELECT frame_id FROM frames ORDER BY frame_id")]
        stored = conn.execute("SELECT next_offset FROM kafka_offsets").fetchall()
    assert [(p, o, raw) for p, o, raw, _ in lost] == [(0, 10, None)]
    assert lost[0][3].startswith(f"lost: offsets 10..{deleted_to - 1} ({n} messages)")
    assert frame_ids == [*range(10), *range(deleted_to, 30)]
    assert stored == [(30,)]

    again = drain_task(topic=topic, group_id=GROUP, idle_timeout_s=5)
    assert (again["messages"], again["lost"]) == (0, 0)


def test_a_loss_fails_the_run_whatever_else_the_drain_met(
    pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain that records lost messages and then meets another error (a silent broker, PostgreSQL restarting)
    raised the retryable error: its retry found nothing lost and the run ended green. The loss comes first, and a
    retry of the run finds the ranges an earlier try recorded since the run started."""
    from datetime import UTC, datetime

    from confluent_kafka import TopicPartition

    import crowd.ingest
    import crowd.kafka

    topic = new_topic(kafka_admin, "test-lost-then", partitions=1)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(60)])
    assert quick_drain(topic, batch_size=10, max_batches=1).next_offsets == {0: 10}
    for future in kafka_admin.delete_records([TopicPartition(topic, 0, 20)]).values():
        future.result(timeout=30)
    run_started_at = datetime.now(UTC)
    real = crowd.kafka.manual_commit_consumer  # the broker falls silent after one batch: 30 messages left
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", lambda *a, **k: _BrokerFallsSilent(real(*a, **k), 1))
    with pytest.raises(MessagesLostError, match=r"10 messages of .* deleted .* but for \d+ messages the broker"):
        drain_task(topic=topic, group_id=GROUP, batch_size=10, idle_timeout_s=2, run_started_at=run_started_at)
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", real)

    for future in kafka_admin.delete_records([TopicPartition(topic, 0, 40)]).values():
        future.result(timeout=30)  # more is lost; the next try dies after recording it (PostgreSQL restarting)
    real_run = crowd.ingest._run

    def restarting(*args, **kwargs):
        raise psycopg.OperationalError("the database system is shutting down")

    monkeypatch.setattr(crowd.ingest, "_run", restarting)
    with pytest.raises(psycopg.OperationalError, match="shutting down"):
        drain_task(topic=topic, group_id=GROUP, idle_timeout_s=2, run_started_at=run_started_at)
    monkeypatch.setattr(crowd.ingest, "_run", real_run)
    with pytest.raises(MessagesLostError, match=r"2 ranges of messages \(by an earlier try\)"):  # the retry
        drain_task(topic=topic, group_id=GROUP, idle_timeout_s=2, run_started_at=run_started_at)
    with pg() as conn:
        frame_ids = [r[0] for r in conn.execute("SELECT frame_id FROM frames ORDER BY frame_id")]
    assert frame_ids == [*range(10), *range(20, 30), *range(40, 60)]  # all that was not lost, each once
    assert drain_task(topic=topic, group_id=GROUP, idle_timeout_s=2)["lost"] == 0  # the next run: nothing lost


def test_a_loss_another_group_recorded_does_not_fail_this_group_s_run(pg_schema: str, kafka_admin) -> None:
    """A group started on a topic whose log start has moved on (a replay, a changed CROWD_INGEST_GROUP) records the
    deleted start as lost, for itself. A run of the group that had stored those messages long before counted that
    row as its own loss and failed, without a retry; now it counts its group's losses only."""
    from datetime import UTC, datetime

    from confluent_kafka import TopicPartition

    topic = new_topic(kafka_admin, "test-lost-other", partitions=1)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(20)])
    assert drain_task(topic=topic, group_id=GROUP, idle_timeout_s=2)["lost"] == 0  # all 20 stored
    for future in kafka_admin.delete_records([TopicPartition(topic, 0, 10)]).values():
        future.result(timeout=30)
    run_started_at = datetime.now(UTC)
    with pytest.raises(MessagesLostError, match="10 messages"):  # the new group never had the first 10
        drain_task(topic=topic, group_id="test-replay", idle_timeout_s=2, run_started_at=run_started_at)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(20, 25)])
    summary = drain_task(topic=topic, group_id=GROUP, idle_timeout_s=2, run_started_at=run_started_at)
    assert summary["lost"] == 0 and summary["frames"] == 5, summary
    with pg() as conn:
        assert conn.execute("SELECT consumer_group FROM rejected_messages").fetchall() == [("test-replay",)]


class _LogStartUnknown:
    """A real consumer whose broker does not answer for the log start (watermarks time out)."""

    def __init__(self, consumer) -> None:
        self._consumer = consumer

    def get_watermark_offsets(self, *args, **kwargs):
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "watermarks timed out (test)"))

    def __getattr__(self, name: str):
        return getattr(self._consumer, name)


def test_the_drain_log_says_when_the_lag_left_is_unknown(
    pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker did not answer for the watermarks at the end: the log said 'lag left 0' beside a summary that
    knew it could not tell."""
    import crowd.kafka

    topic = new_topic(kafka_admin, "test-lag-unknown", partitions=1)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(5)])
    real = crowd.kafka.manual_commit_consumer
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", lambda *a, **k: _LogStartUnknown(real(*a, **k)))
    with caplog.at_level(logging.INFO, logger="crowd.ingest"):
        summary = quick_drain(topic, idle_timeout_s=2)
    assert summary.messages == 5 and not summary.lag_known
    assert "lag left unknown (at least 0: the broker did not answer)" in caplog.text, caplog.text


def test_a_gap_whose_cause_cannot_be_read_is_not_stored_past(
    pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages deleted while the broker did not answer for the log start: the drain warned and stored past the
    gap, and the loss was never recorded (the run green). Now that try fails before the gap; the next finds it."""
    from confluent_kafka import TopicPartition

    import crowd.kafka

    topic = new_topic(kafka_admin, "test-gap-unknown", partitions=1)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(30)])
    assert quick_drain(topic, batch_size=10, max_batches=1).next_offsets == {0: 10}
    for future in kafka_admin.delete_records([TopicPartition(topic, 0, 20)]).values():
        future.result(timeout=30)
    real = crowd.kafka.manual_commit_consumer
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", lambda *a, **k: _LogStartUnknown(real(*a, **k)))
    with pytest.raises(IngestError, match=r"offsets 10\.\.19 were skipped and the log start cannot be read"):
        quick_drain(topic)
    assert scalar("SELECT count(*) FROM frames") == 10  # nothing stored past the gap
    monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", real)
    with pytest.raises(MessagesLostError, match="10 messages"):
        drain_task(topic=topic, group_id=GROUP, idle_timeout_s=3)
    assert scalar("SELECT count(*) FROM frames") == 20


@pytest.mark.parametrize("log_start", ["read", "unknown-at-first"])
def test_messages_deleted_before_a_partition_was_ever_stored_are_recorded_lost(
    pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch, log_start: str
) -> None:
    """Only partitions with stored offsets were checked: a first drain (a new deployment, a partition added)
    started at the log's new start and the deleted messages went unrecorded, the run green. The same when the
    broker did not answer for the log start: a partition never stored expected no offset, so no gap was seen."""
    from confluent_kafka import TopicPartition

    import crowd.kafka

    topic = new_topic(kafka_admin, "test-lost-first", partitions=2)
    publish_frames(topic, [frame_dict("video-a", i, 1) for i in range(10)])
    (partition,) = {p for p, high in end_offsets(topic, 2).items() if high == 10}
    for future in kafka_admin.delete_records([TopicPartition(topic, partition, 6)]).values():
        future.result(timeout=30)

    if log_start == "unknown-at-first":
        real = crowd.kafka.manual_commit_consumer
        monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", lambda *a, **k: _LogStartUnknown(real(*a, **k)))
        with pytest.raises(IngestError, match=r"offsets 0\.\.5 were skipped and the log start cannot be read"):
            drain_task(topic=topic, group_id=GROUP, idle_timeout_s=3)
        assert scalar("SELECT count(*) FROM frames") == 0  # nothing stored past the gap
        monkeypatch.setattr(crowd.kafka, "manual_commit_consumer", real)
    with pytest.raises(MessagesLostError, match="6 messages"):
        drain_task(topic=topic, group_id=GROUP, idle_timeout_s=3)
    with pg() as conn:
        lost = conn.execute('SELECT partition, "offset", reason FROM rejected_messages').fetchall()
        frame_ids = [r[0] for r in conn.execute("SELECT frame_id FROM frames ORDER BY frame_id")]
    assert [(p, o) for p, o, _ in lost] == [(partition, 0)] and lost[0][2].startswith("lost: offsets 0..5")
    assert frame_ids == [6, 7, 8, 9]


def test_a_batch_of_large_messages_ends_at_its_byte_budget(faces_topic: str, pg_schema: str) -> None:
    """Memory per batch is bounded by bytes, not only by count: 2000 messages of 1 MiB (valid ones can carry ~10,000
    faces) held at once took gigabytes and got the worker killed, and every retry died on the same batch."""
    big = [frame_dict("video-big", i, 2) for i in range(12)]
    items = [(b"video-big", encode(m) + b" " * 300_000) for m in big]  # valid JSON, padded to ~300 kB each
    publish(faces_topic, items)

    summary = quick_drain(faces_topic, batch_size=1000, max_batch_bytes=1_000_000)

    assert (summary.messages, summary.frames, summary.rejected) == (12, 12, 0)
    # a batch ends with the message that takes it to 1 MB: 4 of ~300 kB (not one batch of 3.6 MB, nor 2 of 1.8 MB)
    assert summary.batches == 3, summary
    assert scalar("SELECT count(*) FROM frames") == 12


def test_linger_keeps_a_caught_up_drain_reading_a_trickle(faces_topic: str, pg_schema: str) -> None:
    import threading

    messages = [frame_dict("video-trickle", i, i % 3) for i in range(12)]
    publish_frames(faces_topic, messages[:6])
    result: dict[str, object] = {}
    runner = threading.Thread(target=lambda: result.update(s=quick_drain(faces_topic, linger_s=8, idle_timeout_s=30)))
    runner.start()

    def stored() -> int:
        try:
            return scalar("SELECT count(*) FROM frames")
        except psycopg.errors.UndefinedTable:  # the drain has not migrated the fresh schema yet
            return 0

    deadline = time.monotonic() + 60
    while stored() < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stored() == 6, "the drain did not catch up with the first messages"
    assert runner.is_alive(), "the drain stopped at the end of the partitions despite linger_s"
    publish_frames(faces_topic, messages[6:])  # arrives while the drain lingers: the same run stores it
    runner.join(timeout=60)
    summary = result["s"]
    assert summary.messages == 12 and summary.stopped_because == "caught up, nothing new for 8 s", summary
    assert scalar("SELECT count(*) FROM frames") == 12

    publish_frames(faces_topic, [frame_dict("video-trickle", 99, 1)])
    assert quick_drain(faces_topic).stopped_because == "caught up"  # linger_s=0: stops at the end at once


def test_same_frame_twice_in_one_batch_last_one_wins(faces_topic: str, pg_schema: str) -> None:
    first, second = frame_dict("video-dup", 7, 3), frame_dict("video-dup", 7, 1, seed=1)
    publish_frames(faces_topic, [first, frame_dict("video-dup", 8, 2), second])

    summary = quick_drain(faces_topic, batch_size=100)

    assert (summary.messages, summary.frames, summary.duplicates_in_batch) == (3, 2, 1)
    assert scalar("SELECT total_faces FROM frames WHERE video_id = 'video-dup' AND frame_id = 7") == 1
    assert scalar("SELECT count(*) FROM faces WHERE video_id = 'video-dup' AND frame_id = 7") == 1


def test_replayed_frame_with_fewer_faces_replaces_its_faces(faces_topic: str, pg_schema: str) -> None:
    publish_frames(faces_topic, [frame_dict("video-r", 1, 4)])
    quick_drain(faces_topic)
    publish_frames(faces_topic, [frame_dict("video-r", 1, 2, seed=5)])
    quick_drain(faces_topic)
    assert scalar("SELECT count(*) FROM faces WHERE video_id = 'video-r'") == 2
    assert scalar("SELECT total_faces FROM frames WHERE video_id = 'video-r'") == 2


def test_a_rejection_stored_again_at_its_offset_keeps_the_new_bytes(faces_topic: str, pg_schema: str) -> None:
    """A row at the same (topic, partition, offset) with other bytes (a topic deleted and made again under the
    same name, with the old rows kept) is replaced whole, not only its reason."""
    publish(faces_topic, [(b"new-key", b"new bytes")])
    quick_drain(faces_topic)
    with pg() as conn:
        conn.execute("UPDATE rejected_messages SET key = 'old-key', raw = 'old bytes', reason = 'not_json: old'")
        conn.execute("DELETE FROM kafka_offsets")  # read the topic again from its start
    quick_drain(faces_topic)
    with pg() as conn:
        rows = conn.execute("SELECT key, raw, reason FROM rejected_messages").fetchall()
    assert [(bytes(k), bytes(r), reason[:9]) for k, r, reason in rows] == [(b"new-key", b"new bytes", "not_json:")]


@pytest.mark.parametrize("first_id_unknown", [False, True], ids=["id-known", "first-drain-without-the-id"])
def test_a_topic_made_again_under_the_same_name_is_read_from_its_start(
    faces_topic: str, pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch, first_id_unknown: bool
) -> None:
    """Offsets stored while the topic's id could not be read (no DESCRIBE right, a timeout) take the id of the next
    drain that reads it, new messages or not (before: a partition with nothing new kept no id, and its old offset
    skipped as many messages of the topic made again)."""

    import crowd.kafka

    publish_frames(faces_topic, [frame_dict("video-old", i, 1) for i in range(30)])
    with monkeypatch.context() as patch:
        if first_id_unknown:
            patch.setattr(crowd.kafka, "topic_id", lambda *args, **kwargs: None)
        assert quick_drain(faces_topic).frames == 30
    if first_id_unknown:
        assert scalar("SELECT count(*) FROM kafka_offsets WHERE topic_id IS NULL") > 0
        assert quick_drain(faces_topic).messages == 0  # the id is known now; nothing new to read
    make_topic_again(kafka_admin, faces_topic)
    publish_frames(faces_topic, [frame_dict("video-new", i, 1) for i in range(60)])  # more than the old offsets
    summary = quick_drain(faces_topic)
    assert scalar("SELECT count(*) FROM frames WHERE video_id = 'video-new'") == 60, summary
    assert scalar("SELECT count(DISTINCT topic_id) FROM kafka_offsets") == 1


def _messages_of(topic: str, n: int) -> list:
    """The first ``n`` messages of ``topic``, as a Kafka consumer (the watcher's trigger) gets them."""
    from confluent_kafka import Consumer

    from tests.conftest import KAFKA_BOOTSTRAP

    settings = {"bootstrap.servers": KAFKA_BOOTSTRAP, "group.id": f"read-{uuid.uuid4().hex[:8]}"}
    consumer = Consumer({**settings, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got, deadline = [], time.monotonic() + 30
    try:
        while len(got) < n and time.monotonic() < deadline:
            got += [m for m in consumer.consume(n - len(got), timeout=0.5) if m.error() is None]
    finally:
        consumer.close()
    assert len(got) == n, f"{len(got)} of {n} messages read"
    return got


def test_the_watcher_fires_for_a_topic_made_again_below_the_old_offsets(
    faces_topic: str, pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain starts a topic made again under the same name from its beginning; what starts the drain must
    see it too: the new topic's messages sit below the offsets stored for the old one, and used to be skipped as
    already stored (no run for them until the sweep, or ever with the sweep off)."""

    import crowd.ingest

    monkeypatch.setattr(crowd.ingest, "_topic_ids", {})
    monkeypatch.setattr(crowd.ingest, "_TOPIC_ID_TTL_S", 0.0)

    def fires(message) -> bool:
        return crowd.ingest.faces_pending(message, "crowd_postgres", GROUP, kafka_conn_id="kafka_default") is not None

    publish_frames(faces_topic, [frame_dict("video-old", i, 1) for i in range(30)])
    assert quick_drain(faces_topic).frames == 30
    assert not any(fires(m) for m in _messages_of(faces_topic, 30)), "stored messages must not fire"
    make_topic_again(kafka_admin, faces_topic)
    publish_frames(faces_topic, [frame_dict("video-new", i, 1) for i in range(10)])
    assert all(fires(m) for m in _messages_of(faces_topic, 10))


def test_the_watcher_asks_the_database_once_for_a_run_of_stored_messages(
    faces_topic: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher reading a topic the drain has stored (its first unpause, a new watcher group) asked PostgreSQL once
    per message, on the triggerer's thread; now once per partition within a few seconds. New messages still fire."""
    import crowd.ingest
    from crowd import storage

    monkeypatch.setattr(crowd.ingest, "_stored_next", {})
    publish_frames(faces_topic, [frame_dict("video-w", i, 1) for i in range(200)])  # one partition
    assert quick_drain(faces_topic).frames == 200
    queries = []

    class Counting:  # the watcher's connection, counting what it is asked
        def __init__(self, conn: psycopg.Connection) -> None:
            self.conn, self.closed = conn, False

        def execute(self, *args: object, **kwargs: object) -> object:
            queries.append(args[0])
            return self.conn.execute(*args, **kwargs)  # type: ignore[arg-type]

    with storage.connect("crowd_postgres") as conn:
        conn.autocommit = True
        monkeypatch.setattr(crowd.ingest, "_watch_conns", {"crowd_postgres": Counting(conn)})
        messages = _messages_of(faces_topic, 200)
        fired = [crowd.ingest.faces_pending(m, "crowd_postgres", GROUP) for m in messages]
        assert fired == [None] * 200, "stored messages must not fire"
        assert len(queries) == 1, f"{len(queries)} queries for 200 stored messages"
        publish_frames(faces_topic, [frame_dict("video-w", 200, 1)])
        assert crowd.ingest.faces_pending(_messages_of(faces_topic, 201)[-1], "crowd_postgres", GROUP) is not None
        assert len(queries) == 2, "a message past the stored offsets must be asked about"


def test_the_watcher_asks_each_database_through_its_own_connection(
    faces_topic: str, pg_schema: str, postgres_admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two watchers in one triggerer with other PostgreSQL connections (another deployment's schema): the first
    one's connection answered for both, so a message the second had not stored was skipped."""
    import json

    import crowd.ingest
    from crowd import storage

    monkeypatch.setattr(crowd.ingest, "_stored_next", {})
    monkeypatch.setattr(crowd.ingest, "_watch_conns", {})
    publish_frames(faces_topic, [frame_dict("video-two", 0, 1)])
    other = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{other}"')
    conn_b = json.loads(os.environ["AIRFLOW_CONN_CROWD_POSTGRES"])
    conn_b["extra"] = {**conn_b.get("extra", {}), "options": f"-csearch_path={other}"}
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES_B", json.dumps(conn_b))
    try:
        for conn_id in ("crowd_postgres", "crowd_postgres_b"):
            with storage.connect(conn_id) as conn:
                storage.migrate(conn)
                conn.commit()
        (message,) = _messages_of(faces_topic, 1)
        with storage.connect("crowd_postgres_b") as conn:  # B stored everything
            conn.execute(
                "INSERT INTO kafka_offsets (consumer_group, topic, partition, next_offset) VALUES (%s, %s, %s, 1000)",
                (GROUP, faces_topic, message.partition()),
            )
            conn.commit()
        assert crowd.ingest.faces_pending(message, "crowd_postgres_b", GROUP) is None
        assert crowd.ingest.faces_pending(message, "crowd_postgres", GROUP) is not None, "A has not stored it"
    finally:
        for conn in crowd.ingest._watch_conns.values():
            conn.close()
        with psycopg.connect(postgres_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{other}" CASCADE')


def test_a_topic_made_again_keeps_the_rejections_of_the_old_one(faces_topic: str, pg_schema: str, kafka_admin) -> None:
    """A rejected row is the only copy of a bad message once its topic is deleted: a bad message at the same
    offset of a topic made again under the name must be stored beside it, not over it."""

    publish(faces_topic, [(b"k", b"OLD bad bytes")])
    assert quick_drain(faces_topic).rejected == 1
    make_topic_again(kafka_admin, faces_topic)
    publish(faces_topic, [(b"k", b"NEW bad bytes")])
    assert quick_drain(faces_topic).rejected == 1
    with pg() as conn:
        rows = conn.execute('SELECT "offset", raw, topic_id FROM rejected_messages ORDER BY rejected_at').fetchall()
    assert [(o, bytes(raw)) for o, raw, _ in rows] == [(0, b"OLD bad bytes"), (0, b"NEW bad bytes")]
    assert rows[0][2] and rows[1][2] and rows[0][2] != rows[1][2], "each row names its topic's id"


def test_a_second_drain_of_the_same_group_backs_off(faces_topic: str, pg_schema: str) -> None:
    publish_frames(faces_topic, [frame_dict("video-l", 0, 1)])
    quick_drain(faces_topic)  # creates the schema
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as holder:
        holder.execute(f"SELECT pg_advisory_lock({DRAIN_LOCK_KEY_SQL})", (GROUP, faces_topic))
        summary = quick_drain(faces_topic)
        with pytest.raises(IngestError, match="holds its lock"):  # the DAG's task fails (and retries)
            drain_task(topic=faces_topic, group_id=GROUP, idle_timeout_s=1)
    assert summary.stopped_because == "another drain is running" and summary.messages == 0


def test_a_drain_releases_its_lock_before_its_connection_closes(
    faces_topic: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed connection's session (and its lock) ends on the server a moment later: a retry started at once
    found the lock held ("another drain holds its lock", seen in CI). The drain gives the lock back itself, also when
    it fails."""
    import crowd.ingest
    import crowd.storage

    publish_frames(faces_topic, [frame_dict("video-l3", 0, 1)])
    lock_free_at_close: list[bool] = []
    real_connect = crowd.storage.connect

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        real_close = conn.close

        def close() -> None:
            with pg() as other:
                free = other.execute(f"SELECT pg_try_advisory_lock({DRAIN_LOCK_KEY_SQL})", (GROUP, faces_topic))
                lock_free_at_close.append(free.fetchone()[0])
            real_close()

        conn.close = close  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(crowd.storage, "connect", connect)
    assert quick_drain(faces_topic).messages == 1
    monkeypatch.setattr(crowd.ingest, "_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mid-drain")))
    with pytest.raises(RuntimeError, match="mid-drain"):
        quick_drain(faces_topic)
    assert lock_free_at_close == [True, True]


def test_a_drain_of_another_group_and_topic_is_not_held_by_one_that_spells_alike(
    faces_topic: str, pg_schema: str
) -> None:
    publish_frames(faces_topic, [frame_dict("video-l2", 0, 1)])
    quick_drain(faces_topic)  # creates the schema
    publish_frames(faces_topic, [frame_dict("video-l2", 1, 1)])
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as holder:
        # the drain of topic "st-faces-..." by group GROUP + "te": the same characters in a row as this pair
        holder.execute(f"SELECT pg_advisory_lock({DRAIN_LOCK_KEY_SQL})", (GROUP + faces_topic[:2], faces_topic[2:]))
        summary = quick_drain(faces_topic)
    assert summary.messages == 1 and summary.stopped_because != "another drain is running", summary


def test_missing_topic_names_the_topic(pg_schema: str, kafka_bootstrap: str) -> None:

    with pytest.raises(IngestError, match="no-such-topic"):
        drain("kafka_default", "crowd_postgres", f"no-such-topic-{uuid.uuid4().hex[:6]}", GROUP)


# --- bad messages ---------------------------------------------------------------------------------------------


def _bad(**changes) -> bytes:
    message = frame_dict("video-bad", 999, 2)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = message
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return json.dumps(message).encode()


_DROP = object()

BAD_MESSAGES = [
    pytest.param(b"this is not json", "not_json", id="not-json"),
    pytest.param(b'{"video_id": "\xff\xfe broken"}', "not_utf8", id="not-utf8"),
    pytest.param(b"[1, 2, 3]", "schema", id="json-array"),
    pytest.param(None, "tombstone", id="tombstone"),
    pytest.param(b'{"pad": "' + b"x" * (1024 * 1024 + 10) + b'"}', "oversize", id="oversize"),
    pytest.param(_bad(frame_id=_DROP), "schema", id="missing-frame-id"),
    pytest.param(_bad(frame_id="seven"), "schema", id="frame-id-not-int"),
    pytest.param(_bad(frame_id=-1), "schema", id="negative-frame-id"),
    pytest.param(_bad(schema_version=2), "schema", id="wrong-schema-version"),
    pytest.param(_bad(total_faces=5), "schema", id="total-faces-mismatch"),
    pytest.param(_bad(faces__0__bounding_box__x=-3), "schema", id="negative-box"),
    pytest.param(_bad(faces__1__confidence=1.5), "schema", id="confidence-above-1"),
    pytest.param(_bad(surprise="field"), "schema", id="unknown-field"),
    pytest.param(_bad(frame_id=2**63), "schema", id="frame-id-overflows-bigint"),
    # was stored: JavaScript reads it rounded, and a client paging by after_frame_id got the same frame again
    pytest.param(_bad(frame_id=2**53), "schema", id="frame-id-past-javascript-s-integers"),
    # was stored, and exported to CSV: a spreadsheet splitting on ';' or tabs read "=1+1" as a formula
    pytest.param(_bad(model="x;=1+1"), "schema", id="model-with-a-separator"),
    pytest.param(_bad(model="y\t=2+2"), "schema", id="model-with-a-tab"),
    pytest.param(_bad(frame_width=2**31), "out_of_range", id="frame-width-overflows-int"),
    pytest.param(_bad(frame_ts_ms=123.25).replace(b"123.25", b"1e400"), "schema", id="timestamp-overflows-float"),
    pytest.param(_bad(video_id="nul\x00byte"), "schema", id="nul-in-text"),
    pytest.param(_bad(**{"nul\x00name": 1}), "schema", id="nul-in-field-name"),
    pytest.param(_bad(frame_ts_ms=1e308), "schema", id="timestamp-past-100-years"),  # was stored
    # valid, under a key that is not its video_id: its partition, and so its order, is not its video's (was stored)
    pytest.param(_bad(), "wrong_key", id="key-not-video-id"),
]


@pytest.fixture(scope="module")
def bad_run(kafka_admin, postgres_admin_dsn: str) -> Iterator[dict]:
    """One topic with every bad message between good ones, drained once; yields what the test modules need."""
    topic = new_topic(kafka_admin, "test-faces-bad", config={"max.message.bytes": str(4 * 1024 * 1024)})
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    conn_json = {
        "conn_type": "postgres",
        "host": "127.0.0.1",
        "port": int(os.environ.get("CROWD_PG_PORT", "5433")),
        "login": "crowd",
        "password": os.environ.get("CROWD_PG_PASSWORD", "crowd"),
        "schema": "crowd_test",
        "extra": {"options": f"-csearch_path={schema}"},
    }
    items: list[tuple[bytes | None, bytes | None]] = []
    expected: dict[str, str] = {}
    for i, case in enumerate(BAD_MESSAGES):
        value, _code = case.values
        items.append((b"video-good", encode(frame_dict("video-good", 2 * i, 1))))
        items.append((f"bad-{case.id}".encode(), value))
        expected[case.id] = f"bad-{case.id}"
    items.append((b"video-good", encode(frame_dict("video-good", 1000, 1))))
    publish(topic, items)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn_json))
        summary = drain("kafka_default", "crowd_postgres", topic, GROUP, batch_size=7, batch_wait_s=0.2)
    with psycopg.connect(f"{postgres_admin_dsn}?options=-csearch_path%3D{schema}", autocommit=True) as conn:
        rejected = {
            bytes(key).decode(): (reason, None if raw is None else bytes(raw), partition, offset)
            for key, reason, raw, partition, offset in conn.execute(
                'SELECT key, reason, raw, partition, "offset" FROM rejected_messages'
            )
        }
        good = conn.execute("SELECT count(*) FROM frames WHERE video_id = 'video-good'").fetchone()[0]
        offsets = conn.execute("SELECT sum(next_offset) FROM kafka_offsets").fetchone()[0]
    yield {"summary": summary, "rejected": rejected, "good": good, "offsets": offsets, "total": len(items)}
    kafka_admin.delete_topics([topic])
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.parametrize(("value", "code"), BAD_MESSAGES)
def test_bad_message_is_rejected_with_its_reason_and_raw_bytes(
    bad_run: dict, value: bytes | None, code: str, request: pytest.FixtureRequest
) -> None:
    case_id = request.node.callspec.id
    reason, raw, _partition, _offset = bad_run["rejected"][f"bad-{case_id}"]
    assert reason.startswith(f"{code}: "), reason
    assert raw == value


def test_a_message_without_a_key_or_under_another_is_rejected_as_wrong_key() -> None:
    from crowd.ingest import Rejected, check_key

    check_key(b"video-a", "video-a")
    for key, shown in ((None, "no key"), (b"video-b", "key b'video-b'"), (b"", "key b''")):
        with pytest.raises(Rejected, match=f"wrong_key: {shown}, .*video_id 'video-a'") as refused:
            check_key(key, "video-a")
        assert refused.value.code == "wrong_key"


def test_good_messages_around_bad_ones_are_stored_and_every_offset_is_accounted_for(bad_run: dict) -> None:
    assert bad_run["good"] == len(BAD_MESSAGES) + 1
    assert len(bad_run["rejected"]) == len(BAD_MESSAGES)
    assert bad_run["offsets"] == bad_run["total"] == bad_run["good"] + len(bad_run["rejected"])
    assert bad_run["summary"].rejected == len(BAD_MESSAGES)


def test_a_damaged_record_batch_holds_its_partition_back_and_fails_the_drain_loudly(
    pg_schema: str, kafka_admin, kafka_bootstrap: str
) -> None:
    """A record batch damaged on the broker's disk (its lz4 data overwritten in the segment file): the client fetches
    that offset again and again. The drain stores the other partitions and the messages before the batch, holds
    that partition back (nothing after it skipped), and fails naming it (before: a warning per fetch, "retrying",
    and a drain idle until its timeout, every run). Once the damaged records are deleted, the rest is stored once."""
    from confluent_kafka import Producer, TopicPartition

    topic = new_topic(kafka_admin, "test-damaged", partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "compression.type": "lz4", "linger.ms": 100})
    for part, frames in ((0, range(0, 5)), (0, range(5, 10)), (0, range(10, 15)), (1, range(0, 6))):
        for i in frames:
            producer.produce(topic, encode(frame_dict(f"video-p{part}", i, 2)), f"video-p{part}", partition=part)
        assert producer.flush(30) == 0  # one record batch each
    segment = (
        Path(os.environ.get("CROWD_STATE", Path(__file__).parents[2] / ".local"))
        / "kafka"
        / "data"
        / f"{topic}-0"
        / "00000000000000000000.log"
    )
    data = segment.read_bytes()
    position = 0
    while int.from_bytes(data[position : position + 8], "big") != 5:  # the batch holding offsets 5-9
        position += 12 + int.from_bytes(data[position + 8 : position + 12], "big")
    with segment.open("r+b") as f:  # 61 bytes of batch header, then the lz4 frame: overwrite its magic number
        f.seek(position + 61)
        f.write(b"\0\0\0\0")

    for _ in range(2):  # a second drain finds the same: nothing stored twice
        with pytest.raises(IngestError, match=r"partition 0 at offset 5: .*Decompression.*nothing skipped"):
            quick_drain(topic, batch_size=100)
        assert scalar("SELECT count(*) FROM frames WHERE video_id = 'video-p0'") == 5
        assert scalar("SELECT count(*) FROM frames WHERE video_id = 'video-p1'") == 6
        assert scalar("SELECT next_offset FROM kafka_offsets WHERE topic = %s AND partition = 0", (topic,)) == 5

    kafka_admin.delete_records([TopicPartition(topic, 0, 10)])[TopicPartition(topic, 0, 10)].result(30)
    summary = quick_drain(topic, batch_size=100)
    assert summary.messages == 5 and not summary.unreadable
    ids = [row[0] for row in pg().execute("SELECT frame_id FROM frames WHERE video_id = 'video-p0' ORDER BY 1")]
    assert ids == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    kafka_admin.delete_topics([topic])


# --- alerts ---------------------------------------------------------------------------------------------------


def _read_to_end(topic: str, timeout_s: float = 30) -> list[dict]:
    """Every message of ``topic`` in order, read until each partition reports its end (fails otherwise)."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer(
        {
            "bootstrap.servers": json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"],
            "group.id": f"alerts-reader-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    consumer.subscribe([topic])
    out: list[dict] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            assigned = {tp.partition for tp in consumer.assignment()}
            if msg is not None and msg.error() is None:
                out.append(json.loads(msg.value()))
            elif msg is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
            if assigned and at_end >= assigned:
                return out
    finally:
        consumer.close()
    raise AssertionError(f"{topic} not read to its end in {timeout_s:g} s")


def _as_a_consumer_holds_them(messages: list[dict]) -> dict[int, tuple]:
    """The alerts a consumer holds after applying ``messages`` in order: the highest revision per alert_id, less the
    withdrawn ones."""
    held: dict[int, dict] = {}
    for m in messages:
        if m["type"] == "crowd_alert_withdrawn":
            held.pop(m["alert_id"], None)
        elif m["alert_id"] not in held or m["revision"] >= held[m["alert_id"]]["revision"]:
            held[m["alert_id"]] = m
    fields = ("started_frame_id", "ended_frame_id", "started_ts_ms", "ended_ts_ms", "peak_count", "revision")
    return {i: tuple(m[f] for f in fields) for i, m in held.items()}


def test_crowd_alert_once_per_episode_even_on_replay(faces_topic: str, pg_schema: str, kafka_admin) -> None:
    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    # 10 fps: faces per frame. Episode 1: frames 10-39 (3 s, >= 5 faces); a 0.5 s blip at 60-64 (too short);
    # episode 2: frames 100-129. Threshold 5 sustained for 2 s.
    counts = [1] * 150
    for i in list(range(10, 40)) + list(range(60, 65)) + list(range(100, 130)):
        counts[i] = 5 + (i % 3)
    counts[25] = 9  # the peak of episode 1
    publish_frames(faces_topic, [frame_dict("video-crowd", i, n) for i, n in enumerate(counts)])
    rule = AlertRule(threshold=5, min_duration_s=2.0)

    first = quick_drain(faces_topic, batch_size=40, alert_rule=rule, alerts_topic=alerts_topic)
    scalar("WITH d AS (DELETE FROM kafka_offsets RETURNING 1) SELECT count(*) FROM d")
    replay = quick_drain(faces_topic, batch_size=40, alert_rule=rule, alerts_topic=alerts_topic)

    with pg() as conn:
        rows = conn.execute(
            "SELECT started_frame_id, ended_frame_id, started_ts_ms, ended_ts_ms, peak_count, peak_frame_id, "
            "threshold, published_at IS NOT NULL FROM alerts ORDER BY started_frame_id"
        ).fetchall()
    assert rows == [
        (10, 39, 1000.0, 3900.0, 9, 25, 5, True),
        (100, 129, 10000.0, 12900.0, 7, 101, 5, True),
    ]
    assert (first.new_alerts, first.alerts_published, replay.new_alerts, replay.alerts_published) == (2, 2, 0, 0)
    published = _read_to_end(alerts_topic)
    assert sorted((m["video_id"], m["started_frame_id"], m["peak_count"]) for m in published) == [
        ("video-crowd", 10, 9),
        ("video-crowd", 100, 7),
    ]
    kafka_admin.delete_topics([alerts_topic])


def _crowd(frames: range, *hot: range) -> list[tuple[int, int]]:
    """(frame_id, faces) for ``frames``: 7 faces in the ``hot`` ranges, else 1."""
    return [(i, 7 if any(i in h for h in hot) else 1) for i in frames]


def _frames(*ranges: range) -> list[int]:
    return [i for r in ranges for i in r]


@pytest.mark.parametrize(
    ("rounds", "episodes", "expected_published"),
    [
        # a crowd over frames 40-109 of a video split at 75, published by parallel tasks: the second part first
        pytest.param(
            [_crowd(range(75, 150), range(40, 110)), _crowd(range(75), range(40, 110))], [(40, 109)], 1,
            id="grows-at-its-front",
        ),
        # two crowds 20-49 and 100-129; a re-run with a better model finds the crowd in 50-99 too: one episode
        pytest.param(
            [_crowd(range(150), range(20, 50), range(100, 130)), _crowd(range(50, 100), range(50, 100))],
            [(20, 129)], 2,
            id="joins-two-alerts",
        ),
        # a re-run finds 1 face where the crowd began (frames 10-14): the episode starts later, still one alert
        pytest.param([_crowd(range(60), range(10, 40)), _crowd(range(10, 15))], [(15, 39)], 1, id="starts-later"),
        # crowds 40-55 (1.5 s: too short) and 60-109 of a video split at 75; part 2 before the end of part 1 made
        # 40-100 look like one episode (before: it stayed, and 60-109 got a second alert)
        pytest.param(
            [_crowd(_frames(range(51), range(75, 101)), range(40, 56), range(60, 110)),
             _crowd(range(51, 75), range(40, 56), range(60, 110)),
             _crowd(range(101, 150), range(60, 110))],
            [(60, 109)], 1,
            id="shrinks-when-the-gap-fills",
        ),
        # the frames that fill the gap have no crowd: they split 40-109 into two episodes of 3 s (before: the
        # batch had no frame at the threshold, so nothing was recomputed and 40-109 stayed)
        pytest.param(
            [_crowd(_frames(range(70), range(80, 150)), range(40, 110)), _crowd(range(70, 80))],
            [(40, 69), (80, 109)], 2,
            id="split-by-quiet-frames",
        ),
        # a re-run finds no crowd at all: the alert row goes, and its message is withdrawn
        pytest.param([_crowd(range(60), range(10, 40)), _crowd(range(10, 40))], [], 1, id="withdrawn"),
    ],
)  # fmt: skip
def test_alert_rows_are_the_episodes_of_the_frames_stored_whatever_their_order(
    faces_topic: str, pg_schema: str, kafka_admin, rounds: list, episodes: list, expected_published: int
) -> None:
    """Frames arrive out of order across the parts of a split video (or are replaced by a re-run): the alert rows
    end as the episodes of all frames stored at once would be, a crowd seen in pieces keeping its first alert_id,
    and a consumer of the alerts topic ends holding exactly those rows (changes published again, deletions
    withdrawn; before, the first message of each alert stayed the only one)."""
    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    for frames in rounds:
        publish_frames(faces_topic, [frame_dict("video-split", i, n) for i, n in frames])
        quick_drain(faces_topic, batch_size=200, alert_rule=rule, alerts_topic=alerts_topic)
    with pg() as conn:
        rows = conn.execute(
            "SELECT id, started_frame_id, ended_frame_id, started_ts_ms, ended_ts_ms, peak_count, revision"
            " FROM alerts ORDER BY started_frame_id"
        ).fetchall()
        pending = conn.execute(
            "SELECT (SELECT count(*) FROM alerts WHERE published_at IS NULL)"
            " + (SELECT count(*) FROM alert_withdrawals WHERE published_at IS NULL)"
        ).fetchone()[0]
    assert [row[1:6] for row in rows] == [(a, b, a * 100.0, b * 100.0, 7) for a, b in episodes]
    assert pending == 0
    published = _read_to_end(alerts_topic)
    assert _as_a_consumer_holds_them(published) == {row[0]: row[1:] for row in rows}
    assert len({m["alert_id"] for m in published if m["type"] == "crowd_alert"}) == expected_published
    if rows:
        assert rows[0][0] == min(m["alert_id"] for m in published), "the alert consumers know first is not kept"
    for withdrawal in (m for m in published if m["type"] == "crowd_alert_withdrawn"):
        assert withdrawal["merged_into"] is None or withdrawal["merged_into"] in {row[0] for row in rows}, withdrawal
    kafka_admin.delete_topics([alerts_topic])


def test_a_batch_recomputes_only_the_stretch_its_frames_can_change(faces_topic: str, pg_schema: str) -> None:
    """Each batch recomputed the episodes of its videos from every stored frame: a long video or live source with
    one alert paid a pass over all its frames per batch. Now only the stretch between the nearest frames below the
    threshold around the batch's frames: the rows outside it stay as they were, the rows inside follow the frames."""
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    publish_frames(
        faces_topic, [frame_dict("video-long", i, n) for i, n in _crowd(range(300), range(10, 40), range(200, 240))]
    )
    quick_drain(faces_topic, batch_size=1000, alert_rule=rule)
    with pg() as conn:
        before = conn.execute("SELECT id, started_frame_id, ended_frame_id, revision FROM alerts ORDER BY 2").fetchall()
    assert [row[1:] for row in before] == [(10, 39, 1), (200, 239, 1)]
    # frame 450, and 500-539 with a crowd, written by hand: a writer outside the drain, which the rule never saw (a
    # drain with alerts off would forget the video's rule, and the next batch would recompute it whole)
    with pg() as conn:
        conn.execute(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height,"
            " source) SELECT 'video-long', i, i * 100.0, CASE WHEN i < 500 THEN 1 ELSE 7 END, 'm', 640, 480, 's'"
            " FROM generate_series(450, 539) i WHERE i = 450 OR i >= 500"
        )
        conn.commit()
    # frames 300-399 (a crowd at 320-359), and 230-239 replaced with quiet frames (the second crowd ends at 229)
    publish_frames(faces_topic, [frame_dict("video-long", i, n) for i, n in _crowd(range(300, 400), range(320, 360))])
    publish_frames(faces_topic, [frame_dict("video-long", i, 1) for i in range(230, 240)])
    quick_drain(faces_topic, batch_size=1000, alert_rule=rule)
    with pg() as conn:
        after = conn.execute("SELECT id, started_frame_id, ended_frame_id, revision FROM alerts ORDER BY 2").fetchall()
    # 500-539 lies past the stretch (frame 450, below the threshold, ends it): not read, so no row (whole: a row)
    assert [row[1:] for row in after] == [(10, 39, 1), (200, 229, 2), (320, 359, 1)]
    assert [row[0] for row in after[:2]] == [row[0] for row in before]


def test_rows_made_under_another_rule_are_recomputed_whole(faces_topic: str, pg_schema: str) -> None:
    """The threshold changed between drains: a batch far from the video's earlier crowds still brings every row of
    the video to the new rule (only the stretch around its frames would leave the old rows under the old one)."""
    publish_frames(faces_topic, [frame_dict("video-r", i, n) for i, n in _crowd(range(100), range(10, 40))])
    quick_drain(faces_topic, batch_size=1000, alert_rule=AlertRule(threshold=5, min_duration_s=2.0))
    publish_frames(faces_topic, [frame_dict("video-r", i, 8) for i in range(200, 240)])  # far away: 8 faces
    quick_drain(faces_topic, batch_size=1000, alert_rule=AlertRule(threshold=8, min_duration_s=2.0))
    with pg() as conn:
        rows = conn.execute("SELECT started_frame_id, ended_frame_id, threshold FROM alerts ORDER BY 1").fetchall()
    assert rows == [(200, 239, 8)]  # the crowd of 7 faces at 10-39 is none under a threshold of 8


def _episodes_of_stored_frames(rule: AlertRule) -> list[tuple[str, int, int, int]]:
    """(video_id, first frame, last frame, peak) of every episode of the stored frames, computed here from scratch."""
    with pg() as conn:
        frames = conn.execute(
            "SELECT video_id, frame_id, frame_ts_ms, total_faces FROM frames ORDER BY 1, 2"
        ).fetchall()
    episodes, run = [], []
    for i, (video, frame_id, ts, faces) in enumerate(frames):
        if faces >= rule.threshold:
            run.append((frame_id, ts, faces))
        if run and (faces < rule.threshold or i + 1 == len(frames) or frames[i + 1][0] != video):
            if max(r[1] for r in run) - min(r[1] for r in run) >= rule.min_duration_ms:
                episodes.append((video, run[0][0], run[-1][0], max(r[2] for r in run)))
            run = []
    return episodes


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_every_batch_the_alert_rows_are_the_episodes_of_every_stored_frame(
    faces_topic: str, pg_schema: str, seed: int
) -> None:
    """Batches recompute stretches, not videos: after each one the rows must still equal the episodes of all stored
    frames, whatever the batches hold (two videos, frames far apart in one batch, crowds growing, splitting and
    ending as frames are replaced with other counts)."""
    rng = random.Random(seed)
    rule = AlertRule(threshold=5, min_duration_s=0.5)
    for _ in range(6):
        batch = {}
        for _ in range(rng.randint(1, 4)):  # a few runs of frames, anywhere in two videos of ~6,000 frame ids
            video, start = rng.choice(["video-p", "video-q"]), rng.randrange(0, 6000)
            faces = rng.choice([1, 7])
            for frame_id in range(start, start + rng.randint(1, 80)):
                batch[video, frame_id] = faces if rng.random() > 0.1 else 8 - faces
        publish_frames(faces_topic, [frame_dict(v, f, n) for (v, f), n in batch.items()])
        quick_drain(faces_topic, batch_size=1000, alert_rule=rule, idle_timeout_s=2)
        with pg() as conn:
            rows = conn.execute(
                "SELECT video_id, started_frame_id, ended_frame_id, peak_count FROM alerts ORDER BY 1, 2"
            ).fetchall()
        assert rows == _episodes_of_stored_frames(rule)


def test_a_changed_rule_recomputes_a_video_without_alert_rows_whole(faces_topic: str, pg_schema: str) -> None:
    """A crowd too short under the old minimum duration is an alert under the new one: the video had no rows, so
    nothing told a batch far from it that the rule had changed (the stretch alone was recomputed)."""
    publish_frames(faces_topic, [frame_dict("video-n", i, n) for i, n in _crowd(range(100), range(10, 15))])
    quick_drain(faces_topic, batch_size=1000, alert_rule=AlertRule(threshold=5, min_duration_s=2.0))
    assert scalar("SELECT count(*) FROM alerts") == 0  # 0.4 s: too short
    publish_frames(faces_topic, [frame_dict("video-n", i, 7) for i in range(200, 240)])
    quick_drain(faces_topic, batch_size=1000, alert_rule=AlertRule(threshold=5, min_duration_s=0.0))
    with pg() as conn:
        rows = conn.execute("SELECT started_frame_id, ended_frame_id FROM alerts ORDER BY 1").fetchall()
    assert rows == [(10, 14), (200, 239)]


def test_frames_stored_while_alerts_were_off_are_seen_when_they_are_on_again(faces_topic: str, pg_schema: str) -> None:
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    publish_frames(faces_topic, [frame_dict("video-o", i, 1) for i in range(100)])
    quick_drain(faces_topic, batch_size=1000, alert_rule=rule)
    publish_frames(faces_topic, [frame_dict("video-o", i, 7 if i < 140 else 1) for i in range(100, 141)])
    quick_drain(faces_topic, batch_size=1000, alert_rule=None)  # alerts off (CROWD_ALERT_THRESHOLD=0)
    publish_frames(faces_topic, [frame_dict("video-o", i, 1) for i in range(300, 310)])  # far away, no crowd
    quick_drain(faces_topic, batch_size=1000, alert_rule=rule)
    with pg() as conn:
        rows = conn.execute("SELECT started_frame_id, ended_frame_id FROM alerts ORDER BY 1").fetchall()
    assert rows == [(100, 139)]


def test_the_last_frame_id_there_is_can_be_an_alert(faces_topic: str, pg_schema: str) -> None:
    """2^63-1 stood for "no bound" in the stretch's query: a crowd ending on that frame id lost its last frame. The
    largest frame id is 2^53-1 now (:data:`~crowd.messages.MAX_FRAME_ID`): a crowd ending there keeps it too."""
    from crowd.messages import MAX_FRAME_ID

    last = MAX_FRAME_ID
    frames = [frame_dict("video-max", f, 7) for f in range(last - 4, last + 1)]
    for i, message in enumerate(frames):
        message["frame_ts_ms"] = 1000.0 * i
    publish_frames(faces_topic, frames)
    quick_drain(faces_topic, batch_size=1000, alert_rule=AlertRule(threshold=5, min_duration_s=1.0))
    with pg() as conn:
        assert conn.execute("SELECT started_frame_id, ended_frame_id FROM alerts").fetchall() == [(last - 4, last)]


def test_an_alert_whose_times_alone_change_is_a_new_revision(faces_topic: str, pg_schema: str, kafka_admin) -> None:
    """The same frames published again with other timestamps (a re-run after a timing fix, another frame rate):
    the row kept its old times and revision (only frame ids and counts were compared), and nothing was sent."""
    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    for fps in (10.0, 5.0):
        publish_frames(faces_topic, [frame_dict("video-t", i, n, fps=fps) for i, n in _crowd(range(60), range(10, 40))])
        quick_drain(faces_topic, batch_size=200, alert_rule=rule, alerts_topic=alerts_topic)
    with pg() as conn:
        rows = conn.execute("SELECT id, started_ts_ms, ended_ts_ms, revision FROM alerts").fetchall()
    assert [row[1:] for row in rows] == [(2000.0, 7800.0, 2)]
    assert _as_a_consumer_holds_them(_read_to_end(alerts_topic)) == {rows[0][0]: (10, 39, 2000.0, 7800.0, 7, 2)}
    kafka_admin.delete_topics([alerts_topic])


def test_an_alert_sent_then_changed_then_ended_before_the_change_was_sent_is_withdrawn(
    faces_topic: str, pg_schema: str, kafka_admin
) -> None:
    """Revision 1 sent; a change (revision 2) not sent yet (a publish failed, the drain tries no more); then a re-run
    ends the episode: consumers hold revision 1, so it must be withdrawn (a change resets ``published_at``: taken as
    never sent, it was deleted without a word)."""
    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    rounds = [
        (_crowd(range(60), range(10, 40)), alerts_topic),  # revision 1, sent
        (_crowd(range(40, 50), range(40, 50)), None),  # the crowd lasts to frame 49: revision 2, not sent
        (_crowd(range(10, 50)), None),  # a re-run finds no crowd: the row goes
        ([], alerts_topic),  # the next drain sends what is pending
    ]
    for frames, topic in rounds:
        publish_frames(faces_topic, [frame_dict("video-ended", i, n) for i, n in frames])
        quick_drain(faces_topic, alert_rule=rule, alerts_topic=topic)
    assert scalar("SELECT count(*) FROM alerts") == 0
    published = _read_to_end(alerts_topic)
    assert [(m["type"], m.get("revision")) for m in published] == [("crowd_alert", 1), ("crowd_alert_withdrawn", None)]
    assert _as_a_consumer_holds_them(published) == {}
    kafka_admin.delete_topics([alerts_topic])


def test_a_change_made_while_the_publisher_sends_the_row_is_sent_after_it(
    faces_topic: str, pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher holds the rows it sends until it marks them sent: a drain that changes one meanwhile waits, and
    its revision is pending after the mark (without the hold, the mark covered a revision that was never sent)."""
    import threading

    import crowd.kafka
    from crowd.alerts import publish_pending_alerts

    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    publish_frames(faces_topic, [frame_dict("video-held", i, n) for i, n in _crowd(range(60), range(10, 40))])
    quick_drain(faces_topic, alert_rule=rule, alerts_topic=None)  # revision 1, pending

    publish_frames(faces_topic, [frame_dict("video-held", i, n) for i, n in _crowd(range(40, 50), range(40, 50))])
    sending, go = threading.Event(), threading.Event()
    wait = crowd.kafka.DeliveryTracker.wait

    def slow_wait(self, producer, timeout_s):  # the publisher's messages are out; it waits for their acks
        if threading.current_thread().name == "alerts-publisher":
            sending.set()
            assert go.wait(60)
        return wait(self, producer, timeout_s=timeout_s)

    monkeypatch.setattr(crowd.kafka.DeliveryTracker, "wait", slow_wait)

    def publish() -> None:
        with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"]) as conn:
            publish_pending_alerts(conn, "kafka_default", alerts_topic)

    publisher = threading.Thread(target=publish, name="alerts-publisher")
    publisher.start()
    assert sending.wait(60)
    drain = threading.Thread(target=quick_drain, args=(faces_topic,), kwargs={"alert_rule": rule})
    drain.start()
    deadline = time.monotonic() + 60
    while drain.is_alive() and not scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s", ("%UPDATE alerts%",)
    ):
        assert time.monotonic() < deadline, "the drain neither finished nor waited"
        time.sleep(0.1)
    go.set()
    publisher.join(60)
    drain.join(60)
    assert not publisher.is_alive() and not drain.is_alive()
    monkeypatch.setattr(crowd.kafka.DeliveryTracker, "wait", wait)
    quick_drain(faces_topic, alert_rule=rule, alerts_topic=alerts_topic)  # sends what is pending

    with pg() as conn:
        rows = conn.execute(
            "SELECT id, started_frame_id, ended_frame_id, started_ts_ms, ended_ts_ms, peak_count, revision FROM alerts"
        ).fetchall()
    assert [row[1:3] + row[6:] for row in rows] == [(10, 49, 2)]
    published = _read_to_end(alerts_topic)
    assert [m["revision"] for m in published] == [1, 2]
    assert _as_a_consumer_holds_them(published) == {row[0]: row[1:] for row in rows}
    kafka_admin.delete_topics([alerts_topic])


def test_alerts_that_cannot_be_published_stop_neither_the_frames_nor_the_next_run(
    faces_topic: str, pg_schema: str, kafka_admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = [1] * 10 + [6] * 30 + [1] * 60  # one episode of 3 s at 10 fps
    publish_frames(faces_topic, [frame_dict("video-alert", i, n) for i, n in enumerate(counts)])
    rule = AlertRule(threshold=5, min_duration_s=2.0)
    # a name the broker refuses: every alert publish fails
    failed = quick_drain(faces_topic, batch_size=20, alert_rule=rule, alerts_topic="no such topic!")
    assert failed.frames == len(counts), "frames not stored because of the alerts"
    assert failed.alerts_error and failed.alerts_published == 0, failed
    assert scalar("SELECT count(*) FROM alerts WHERE published_at IS NULL") == 1
    monkeypatch.setenv("CROWD_ALERTS_TOPIC", "no such topic!")
    with pytest.raises(IngestError, match="frames stored, but crowd alerts could not be published"):
        drain_task(topic=faces_topic, group_id=GROUP, idle_timeout_s=1, alert_threshold=5, alert_min_duration_s=2)

    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    retried = quick_drain(faces_topic, alert_rule=rule, alerts_topic=alerts_topic)
    assert retried.alerts_error is None and retried.alerts_published == 1, retried
    assert scalar("SELECT count(*) FROM alerts WHERE published_at IS NULL") == 0
    assert [a["peak_count"] for a in _read_to_end(alerts_topic)] == [6]


def test_after_one_failed_alert_publish_a_drain_tries_no_more_and_closes_its_producer(
    faces_topic: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try may wait out the publish timeout: one failure per drain, the next episodes' alerts stay pending."""
    counts = [1] * 10 + [6] * 30 + [1] * 60 + [7] * 30 + [1] * 60  # two episodes, batches apart
    publish_frames(faces_topic, [frame_dict("video-alerts", i, n) for i, n in enumerate(counts)])
    tries: list[str] = []
    threads_left: list[int] = []  # OS threads (librdkafka's too) more than before the try, while its error is held
    publish = crowd.ingest.publish_pending_alerts

    def counting(*args, **kwargs):
        threads = len(os.listdir("/proc/self/task"))
        try:
            published = publish(*args, **kwargs)
        except Exception as exc:
            threads_left.append(len(os.listdir("/proc/self/task")) - threads)
            tries.append(type(exc).__name__)
            raise
        tries.append(f"published {published}")
        return published

    monkeypatch.setattr(crowd.ingest, "publish_pending_alerts", counting)
    summary = quick_drain(
        faces_topic, batch_size=20, alert_rule=AlertRule(threshold=5, min_duration_s=2.0), alerts_topic="no such topic!"
    )
    assert summary.frames == len(counts) and summary.new_alerts == 2, summary
    failures = [t for t in tries if not t.startswith("published")]
    assert len(failures) == 1 and tries[-1] == failures[0], tries  # the first failure was the last try
    assert threads_left == [0], "the failed try's producer still runs (not closed; its error holds it)"
    assert scalar("SELECT count(*) FROM alerts WHERE published_at IS NULL") == 2


def test_alert_rule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="threshold 0"):
        AlertRule(threshold=0)


# --- crash ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.reliability
def test_kill_minus_9_mid_drain_loses_nothing_and_stores_nothing_twice(faces_topic: str, pg_schema: str) -> None:
    """20k messages (some bad), a drain killed with SIGKILL at 5 points, then a clean run: exactly once."""
    n_videos, per_video = 8, 2500
    messages = [frame_dict(f"video-{v}", i, i % 5) for v in range(n_videos) for i in range(per_video)]
    items = [(m["video_id"].encode(), encode(m)) for m in messages]
    for k in range(0, len(items), 997):  # a bad message every ~1000
        items.insert(k, (b"video-0", b"garbage %d" % k))
    publish(faces_topic, items)
    total, n_bad = len(items), len(items) - len(messages)

    def progress() -> int:
        try:
            return scalar("SELECT coalesce(sum(next_offset), 0)::bigint FROM kafka_offsets")
        except psycopg.errors.UndefinedTable:
            return 0

    kills = 0
    for target in (0.08, 0.25, 0.45, 0.65, 0.85):
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), faces_topic, GROUP, "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while progress() < target * total and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.uniform(0, 0.05))  # land anywhere inside a batch
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            kills += 1
        worker.wait(timeout=30)
        assert progress() < total, "the drain finished before it could be killed; make the backlog bigger"
    assert kills == 5

    final = subprocess.run(
        [sys.executable, str(WORKER), faces_topic, GROUP, "300"], capture_output=True, text=True, timeout=180
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    with pg() as conn:
        frames = conn.execute("SELECT count(*), count(DISTINCT video_id) FROM frames").fetchone()
        faces = conn.execute("SELECT count(*) FROM faces").fetchone()[0]
        rejected = conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0]
        stored = conn.execute("SELECT sum(next_offset) FROM kafka_offsets").fetchone()[0]
        # every offset is either a frame or a rejection, and none is both
        both = conn.execute(
            "SELECT count(*) FROM frames f JOIN rejected_messages r ON r.partition = f.kafka_partition "
            'AND r."offset" = f.kafka_offset'
        ).fetchone()[0]
    assert frames == (len(messages), n_videos)
    assert faces == sum(m["total_faces"] for m in messages)
    assert rejected == n_bad
    assert stored == total == frames[0] + rejected
    assert both == 0
