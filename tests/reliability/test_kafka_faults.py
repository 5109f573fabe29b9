"""Kafka faults on a private broker: kill -9 mid-publish, restart mid-drain, /receive consumer across a restart."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import pytest

from crowd import storage
from crowd.ingest import drain
from tests.crowd._helpers import CARPHONE
from tests.crowd.test_ingest import backlog_with_garbage
from tests.reliability.conftest import PrivateKafka, loss_figures, pg_counts, report, stored_offsets_sum

pytestmark = [pytest.mark.services, pytest.mark.reliability, pytest.mark.slow]

GROUP = "crowd-ingest-rel"


def long_face_video(dst: Path, repeats: int) -> Path:
    """carphone_pristine.mp4 (a face in every frame) played ``repeats`` times: 120 * repeats frames."""
    frames = []
    cap = cv2.VideoCapture(str(CARPHONE))
    fps = cap.get(cv2.CAP_PROP_FPS)
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for _ in range(repeats):
        for image in frames:
            out.write(image)
    out.release()
    return dst


def publish_private(topic: str, items: list[tuple[bytes | None, bytes | None]]) -> None:
    from crowd.kafka import DeliveryTracker, reliable_producer

    producer = reliable_producer("kafka_default", timeout_s=60)
    tracker = DeliveryTracker()
    for key, value in items:
        producer.produce(topic, key=key, value=value, on_delivery=tracker.callback)
        producer.poll(0)
    assert tracker.wait(producer, timeout_s=90) == len(items)


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def drain_in_background(topic: str, total: int, *, until: float, before: str) -> tuple[threading.Thread, dict]:
    """The drain (batches of 500, idle timeout 40 s) in a thread, returned once ``until`` of the ``total`` offsets
    are committed (the moment to inject a fault ``before`` names)."""
    thread, out = _in_thread(
        drain, "kafka_default", "crowd_postgres", topic, GROUP,
        batch_size=500, batch_wait_s=0.2, idle_timeout_s=40, max_seconds=150,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while stored_offsets_sum() < until * total and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), f"drain ended before the {before}: {out}"
    return thread, out


def wait_for_stored_offsets_to_stall(steady_s: float, timeout_s: float) -> int:
    """The sum of the stored offsets once it has not grown for ``steady_s`` (a drain whose broker is gone has
    stored what it had fetched before)."""
    deadline = time.monotonic() + timeout_s
    value, since = stored_offsets_sum(), time.monotonic()
    while time.monotonic() - since < steady_s:
        assert time.monotonic() < deadline, f"the stored offsets still grow after {timeout_s} s (now {value})"
        time.sleep(0.1)
        if (now := stored_offsets_sum()) != value:
            value, since = now, time.monotonic()
    return value


def assert_each_frame_stored_once_as_last_published(topic: str, bootstrap: str, frames: int) -> None:
    """Frames 0..``frames``-1 are stored, each once, with the columns and faces of the last message published for it
    (the one the sink keeps of duplicates: a rerun's replaces the failed try's), and nothing else is. "Last" is the
    highest (partition, offset): publish order, as a video's frames share its key, so one partition (the drain
    rejects a frame under another key)."""
    from tests.dags.test_detection_dags import _consume_all

    last: dict[tuple[str, int], tuple[int, int, dict]] = {}
    for message in _consume_all(topic, bootstrap):
        value = json.loads(message.value())
        key = (value["video_id"], value["frame_id"])
        if key not in last or last[key][:2] < (message.partition(), message.offset()):
            last[key] = (message.partition(), message.offset(), value)
    with storage.connect("crowd_postgres") as conn:
        stored = {
            (v, f): rest
            for v, f, *rest in conn.execute(
                "SELECT video_id, frame_id, kafka_partition, kafka_offset, frame_ts_ms, total_faces, frame_width, "
                "frame_height, source, model FROM frames"
            )
        }
        faces = {
            (v, f, i): (x, y, w, h, round(c, 4))
            for v, f, i, x, y, w, h, c in conn.execute(
                "SELECT video_id, frame_id, face_id, x, y, width, height, confidence FROM faces"
            )
        }
    assert sorted(f for _, f in stored) == list(range(frames))  # every frame, once
    assert stored == {
        key: [p, o, *(m[c] for c in ("frame_ts_ms", "total_faces", "frame_width", "frame_height", "source", "model"))]
        for key, (p, o, m) in last.items()
    }
    assert faces == {
        (m["video_id"], m["frame_id"], f["face_id"]): (
            *(f["bounding_box"][k] for k in ("x", "y", "width", "height")),
            round(f["confidence"], 4),
        )
        for _, _, m in last.values()
        for f in m["faces"]
    }


def assert_backlog_stored_once(messages: list[dict], n_bad: int, total: int) -> dict[str, int]:
    """Every valid message of the backlog is one frame (faces exact), every bad one a rejection, every offset
    stored; the counts."""
    counts = pg_counts()
    assert counts["frames"] == counts["consistent_frames"] == len(messages), counts
    assert counts["rejected"] == n_bad
    assert counts["offsets"] == total == counts["frames"] + counts["rejected"]
    assert counts["faces"] == sum(m["total_faces"] for m in messages)
    return counts


# --- 1. broker killed while a detection task publishes ---------------------------------------------------------


def test_broker_killed_mid_publish_fails_the_task_and_the_rerun_stores_each_frame_once(
    private_faces: str, kafka_up: PrivateKafka, pg_schema: str, video_root: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The broker killed after 100 of 600 messages: the task fails with ``PublishError``, the video stays
    ``processing``. The failed try's messages are drained first (the deployment's drain runs as they arrive), then
    the rerun publishes all 600 again and a second drain meets frames already stored: each frame ends stored once,
    as the rerun's message says, none lost."""
    from crowd.config import load_settings
    from crowd.jobs import DetectOptions, detect_and_publish, finish_videos, plan_requested_video
    from crowd.kafka import PublishError

    root = video_root
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "5")
    video = long_face_video(root / "long.mp4", repeats=5)  # 600 frames
    settings = load_settings()
    (item,) = plan_requested_video(str(video), settings)
    options = DetectOptions(frame_interval=1, model="mtcnn")
    expected = 600

    thread, out = _in_thread(detect_and_publish, item, options, settings)
    deadline = time.monotonic() + 60
    published_before_kill = 0
    while time.monotonic() < deadline and thread.is_alive():
        published_before_kill = kafka_up.high_watermarks(private_faces)
        if published_before_kill >= 100:
            break
        time.sleep(0.05)
    assert thread.is_alive(), f"the task ended before the kill: {out}"
    kafka_up.kill9()
    killed_at = time.monotonic()
    thread.join(60)
    assert not thread.is_alive(), "the task hangs with the broker dead"
    failed_after_s = time.monotonic() - killed_at
    assert isinstance(out.get("error"), PublishError), out  # a retryable failure, not a success
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_status(conn, item.video_id) == "processing"  # not done, not failed: retried

    restart_s = kafka_up.start()
    # the failed try's messages are stored before the rerun, so the rerun's duplicates meet them in the table (not
    # only in one batch)
    from_failed_try = kafka_up.high_watermarks(private_faces)
    first = drain("kafka_default", "crowd_postgres", private_faces, GROUP, batch_wait_s=0.2, idle_timeout_s=5)
    stored_first = pg_counts()
    assert (first.messages, first.lag_left) == (from_failed_try, 0), first
    assert 0 < stored_first["frames"] == stored_first["consistent_frames"] == from_failed_try < expected, stored_first

    rerun = detect_and_publish(item, options, settings)  # what Airflow's retry runs
    assert rerun["messages"] == expected
    assert finish_videos([item], [rerun], settings)["done"] == [item.video_id]
    in_topic = kafka_up.high_watermarks(private_faces)

    second = drain("kafka_default", "crowd_postgres", private_faces, GROUP, batch_wait_s=0.2, idle_timeout_s=5)
    counts = pg_counts()
    assert (second.messages, second.lag_left) == (in_topic - from_failed_try, 0) == (expected, 0), second
    assert counts["frames"] == counts["consistent_frames"] == expected, counts
    assert counts["rejected"] == 0 and counts["offsets"] == in_topic
    assert_each_frame_stored_once_as_last_published(private_faces, kafka_up.bootstrap, expected)
    figures = {
        "frames_expected": expected, "in_topic_before_kill": published_before_kill,
        "task_failed_after_kill_s": round(failed_after_s, 1), "error": str(out["error"])[:200],
        "broker_restart_s": round(restart_s, 1), "stored_from_the_failed_try": stored_first["frames"],
        "messages_in_topic": in_topic, "frames_stored": counts["frames"], "drains": 2,
        "lost": expected - counts["frames"], "duplicates_in_topic_absorbed": in_topic - expected,
    }  # fmt: skip
    report("fault-1 broker kill -9 mid-publish", figures)


# --- 2. broker restarted while the drain runs ------------------------------------------------------------------


def test_broker_restart_mid_drain_loses_nothing_and_doubles_nothing(
    private_faces: str, kafka_up: PrivateKafka, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the broker at a fifth of the backlog: the drain stores what it had fetched, then stalls while the
    broker is down; with an idle timeout of 40 s (longer than the outage; the DAG's default is 10 s) the same call
    goes on after the restart and stores every message once."""
    n_videos, per_video = 6, 5000
    messages, items = backlog_with_garbage(n_videos, per_video, faces_every=4, garbage_every=500, garbage=b"not json")
    publish_private(private_faces, items)
    total, n_bad = len(items), len(items) - len(messages)
    # Small fetches and a small local queue, or librdkafka prefetches the whole backlog before the kill
    # and the drain never meets the outage.
    small = {"queued.max.messages.kbytes": 256, "max.partition.fetch.bytes": 65536}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", kafka_up.conn("crowd-ingest", **small))

    thread, out = drain_in_background(private_faces, total, until=0.2, before="restart")
    at_kill = stored_offsets_sum()
    kafka_up.kill9()
    time.sleep(3)  # the drain sees a dead broker for a while
    # progress stalls: what was fetched before the kill is stored, then nothing more until the broker is back
    at_restart = wait_for_stored_offsets_to_stall(steady_s=2, timeout_s=20)
    assert at_restart < total, "the drain had everything prefetched: the outage was not met"
    assert thread.is_alive(), f"the drain ended during the outage: {out}"
    restart_s = kafka_up.start()
    thread.join(180)
    assert not thread.is_alive()
    # the same drain call rides through the outage: no error, no second run needed
    assert "error" not in out, out["error"]
    first = out["result"]
    assert (first.messages, first.lag_left) == (total, 0), first
    counts = assert_backlog_stored_once(messages, n_bad, total)
    figures = {
        "messages": total, "bad": n_bad, "stored_offsets_at_kill": at_kill, "stored_offsets_while_down": at_restart,
        "broker_restart_s": round(restart_s, 1),
        "first_drain": f"{first.stopped_because}, {first.messages} msgs, lag {first.lag_left}", "drain_runs": 1,
        "frames_stored": counts["frames"], "rejected": counts["rejected"],
        **loss_figures(counts, len(messages), sum(m["total_faces"] for m in messages)),
    }  # fmt: skip
    report("fault-2 broker restart mid-drain", figures)


# --- 7. the /receive consumer survives a broker restart -------------------------------------------------------


def test_receive_consumer_survives_a_broker_restart(kafka_up: PrivateKafka) -> None:
    from confluent_kafka import Producer

    from crowd.receiver import MessageReceiver

    topic = kafka_up.create_topic("rel-messages", partitions=1)
    receiver = MessageReceiver(kafka_up.bootstrap, topic, group_id=f"rel-recv-{time.time_ns()}", max_queue=100)
    receiver.start()

    def send(values: list[str]) -> None:
        producer = Producer({"bootstrap.servers": kafka_up.bootstrap, "compression.type": "lz4", "acks": "all"})
        for v in values:
            producer.produce(topic, value=json.dumps({"content": v}).encode())
        assert producer.flush(30) == 0

    def receive(n: int, timeout_s: float) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            got += [m.value["content"] for m in receiver.take(100)]
            time.sleep(0.1)
        return got

    try:
        send(["before-1", "before-2"])
        assert receive(2, 30) == ["before-1", "before-2"]
        kafka_up.kill9()
        time.sleep(3)
        assert receiver.running, "the receiver thread died with the broker"
        restart_s = kafka_up.start()
        restarted = time.monotonic()
        send([f"after-{i}" for i in range(5)])
        got = receive(5, 60)
        first_after_s = time.monotonic() - restarted
        stats = receiver.stats()
    finally:
        receiver.stop()
    assert got == [f"after-{i}" for i in range(5)], (got, stats)
    figures = {"sent_after_restart": 5, "received": len(got), "broker_restart_s": round(restart_s, 1),
               "received_within_s": round(first_after_s, 1), "receiver_errors": stats.errors,
               "reconnects": stats.reconnects}  # fmt: skip
    report("fault-7 receiver across broker restart", figures)
