"""A network partition between a detection task and Kafka: the broker alive, the link cut (no reset, no answer).

The private broker has a second listener that sends its clients to a :class:`PartitionProxy`; the detection task
publishes through it while the test watches the topic on the broker's own port. A kill (``test_kafka_faults``)
refuses connections at once; a partition leaves requests unanswered, the case where clients hang if nothing
bounds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from crowd import storage
from crowd.ingest import drain
from tests.reliability.conftest import PrivateKafka, loss_figures, pg_counts, report
from tests.reliability.partition_proxy import PartitionProxy
from tests.reliability.test_kafka_faults import (
    GROUP,
    _in_thread,
    assert_each_frame_stored_once_as_last_published,
    long_face_video,
)

pytestmark = [pytest.mark.services, pytest.mark.reliability, pytest.mark.slow]

FRAMES = 600  # long_face_video(repeats=5), every frame


@pytest.fixture
def proxy(kafka_up: PrivateKafka) -> Iterator[PartitionProxy]:
    relay = PartitionProxy(kafka_up.proxy_port, kafka_up.proxied_port)
    try:
        yield relay
    finally:
        relay.close()


def _start_detection_behind(proxy: PartitionProxy, kafka_up: PrivateKafka, root, monkeypatch, publish_timeout_s: int):
    """A detection task (600 frames, every frame, MTCNN) publishing through ``proxy``, in a thread: the thread,
    its outcome (``result`` or ``error``, ``seconds``), the work item, options and settings."""
    from crowd.config import load_settings
    from crowd.jobs import DetectOptions, detect_and_publish, plan_requested_video

    # Requests time out after 5 s (not librdkafka's 30): a partition of 20 s makes the producer retry them.
    behind = kafka_up.conn("crowd-ingest", bootstrap=f"127.0.0.1:{kafka_up.proxy_port}", **{"request.timeout.ms": 5000})
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", behind)
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", str(publish_timeout_s))
    video = long_face_video(root / "partitioned.mp4", repeats=5)
    settings = load_settings()
    (item,) = plan_requested_video(str(video), settings)
    options = DetectOptions(frame_interval=1, model="mtcnn")
    thread, out = _in_thread(detect_and_publish, item, options, settings)
    return thread, out, item, options, settings


def _wait_for_messages(kafka_up: PrivateKafka, topic: str, count: int, thread) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and thread.is_alive():
        in_topic = kafka_up.high_watermarks(topic)
        if in_topic >= count:
            return in_topic
        time.sleep(0.05)
    raise AssertionError(f"the task did not publish {count} messages in time (alive: {thread.is_alive()})")


def _drain_direct(kafka_up: PrivateKafka, topic: str):
    """One drain through the broker's own port (the task's connection, through the proxy, is left as it was)."""
    with pytest.MonkeyPatch.context() as direct:
        direct.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", kafka_up.conn("crowd-ingest"))
        return drain("kafka_default", "crowd_postgres", topic, GROUP, batch_wait_s=0.2, idle_timeout_s=5)


def _drain_and_count(kafka_up: PrivateKafka, topic: str) -> dict[str, int]:
    _drain_direct(kafka_up, topic)
    assert_each_frame_stored_once_as_last_published(topic, kafka_up.bootstrap, FRAMES)
    return pg_counts()


def test_a_partition_that_heals_within_the_publish_timeout_costs_nothing(
    private_faces: str, kafka_up: PrivateKafka, proxy: PartitionProxy, pg_schema: str, video_root, monkeypatch,
) -> None:  # fmt: skip
    """Cut for 20 s once 100 messages are in: the producer's requests time out and are retried; after the heal
    the task ends by itself with every message delivered, and idempotence leaves no duplicate in the topic."""
    from crowd.jobs import finish_videos

    thread, out, item, _, settings = _start_detection_behind(proxy, kafka_up, video_root, monkeypatch, 60)
    before = _wait_for_messages(kafka_up, private_faces, 100, thread)
    proxy.partition()
    time.sleep(2)
    in_topic_cut = kafka_up.high_watermarks(private_faces)  # what crossed before the cut (in flight included)
    time.sleep(18)
    in_topic_at_heal = kafka_up.high_watermarks(private_faces)
    assert thread.is_alive(), f"the task ended during the partition: {out}"
    proxy.heal()
    healed_at = time.monotonic()
    thread.join(180)
    done_after_heal_s = time.monotonic() - healed_at
    assert not thread.is_alive(), "the task hangs after the heal"
    assert "error" not in out, out["error"]
    assert out["result"]["messages"] == FRAMES
    assert in_topic_at_heal == in_topic_cut < FRAMES  # the cut held: nothing arrived while it lasted
    assert finish_videos([item], [out["result"]], settings)["done"] == [item.video_id]
    in_topic = kafka_up.high_watermarks(private_faces)
    assert in_topic == FRAMES  # retried requests, no duplicate: the producer is idempotent
    counts = _drain_and_count(kafka_up, private_faces)
    report("partition-1 20 s partition mid-publish, healed", {
        "frames": FRAMES, "in_topic_when_cut": before, "in_topic_during_cut": in_topic_at_heal,
        "task_done_after_heal_s": round(done_after_heal_s, 1), "task_seconds": round(out["seconds"], 1),
        "messages_in_topic": in_topic,
        "frames_stored": counts["frames"], "duplicates_in_topic": in_topic - FRAMES,
    })  # fmt: skip


def test_a_partition_outlasting_the_publish_timeout_fails_the_task_and_the_rerun_stores_each_frame_once(
    private_faces: str, kafka_up: PrivateKafka, proxy: PartitionProxy, pg_schema: str, video_root, monkeypatch,
) -> None:  # fmt: skip
    """Cut for good once 100 messages are in, publish timeout 10 s: the task fails with ``PublishError`` naming the
    reason (not a hang, not a success), the video stays ``processing``. After the heal the failed try's messages are
    drained first (the deployment's drain runs as they arrive), then the rerun's: each frame ends stored once, as the
    rerun's message says, none lost."""
    from crowd.jobs import detect_and_publish, finish_videos
    from crowd.kafka import PublishError

    thread, out, item, options, settings = _start_detection_behind(proxy, kafka_up, video_root, monkeypatch, 10)
    _wait_for_messages(kafka_up, private_faces, 100, thread)
    proxy.partition()
    cut_at = time.monotonic()
    thread.join(120)
    failed_after_s = time.monotonic() - cut_at
    assert not thread.is_alive(), "the task hangs behind the partition"
    assert isinstance(out.get("error"), PublishError), out
    assert "Message timed out" in str(out["error"]), out["error"]  # the reason, for the task log
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_status(conn, item.video_id) == "processing"  # retried by Airflow, not failed
    in_topic_cut = kafka_up.high_watermarks(private_faces)

    proxy.heal()
    # the failed try's messages are stored before the rerun, so the rerun's duplicates meet them in the table (not
    # only in one batch)
    first = _drain_direct(kafka_up, private_faces)
    stored_first = pg_counts()
    assert first.lag_left == 0 and 0 < stored_first["frames"] == stored_first["consistent_frames"] == first.messages
    assert first.messages < FRAMES, first

    rerun = detect_and_publish(item, options, settings)  # what Airflow's retry runs, through the healed proxy
    assert rerun["messages"] == FRAMES
    assert finish_videos([item], [rerun], settings)["done"] == [item.video_id]
    in_topic = kafka_up.high_watermarks(private_faces)
    second = _drain_direct(kafka_up, private_faces)
    assert (first.messages + second.messages, second.lag_left) == (in_topic, 0), second
    assert_each_frame_stored_once_as_last_published(private_faces, kafka_up.bootstrap, FRAMES)
    counts = pg_counts()
    assert counts["frames"] == counts["consistent_frames"] == FRAMES and counts["offsets"] == in_topic, counts
    assert counts["rejected"] == 0
    report("partition-2 partition outlasting the publish timeout", {
        "frames": FRAMES, "task_failed_after_cut_s": round(failed_after_s, 1), "error": str(out["error"])[:200],
        "in_topic_from_the_failed_try": in_topic_cut, "stored_from_the_failed_try": stored_first["frames"],
        "messages_in_topic": in_topic, "frames_stored": counts["frames"], "drains": 2,
    })  # fmt: skip


def test_a_partition_mid_drain_loses_nothing_and_doubles_nothing(
    private_faces: str, kafka_up: PrivateKafka, proxy: PartitionProxy, pg_schema: str, monkeypatch,
) -> None:  # fmt: skip
    """The drain consumes through the proxy; cut for 20 s once a fifth of the backlog is stored, then healed.
    The drain waits (its idle timeout is longer than the cut) and goes on: every message stored once."""
    from tests.crowd.test_ingest import backlog_with_garbage
    from tests.reliability.conftest import stored_offsets_sum
    from tests.reliability.test_kafka_faults import assert_backlog_stored_once, drain_in_background, publish_private

    messages, items = backlog_with_garbage(4, 5000, faces_every=4, garbage_every=500, garbage=b"not json")
    publish_private(private_faces, items)  # straight to the broker
    total, n_bad = len(items), len(items) - len(messages)
    small = {"queued.max.messages.kbytes": 256, "max.partition.fetch.bytes": 65536, "request.timeout.ms": 5000}
    monkeypatch.setenv(
        "AIRFLOW_CONN_KAFKA_DEFAULT",
        kafka_up.conn("crowd-ingest", bootstrap=f"127.0.0.1:{kafka_up.proxy_port}", **small),
    )
    thread, out = drain_in_background(private_faces, total, until=0.2, before="cut")  # idle timeout 40 s
    proxy.partition()
    time.sleep(20)
    at_heal = stored_offsets_sum()
    assert at_heal < total, "the drain had everything prefetched: the cut was not met"
    proxy.heal()
    thread.join(180)
    assert not thread.is_alive(), "the drain hangs after the heal"
    assert "error" not in out, out["error"]
    summary = out["result"]
    counts = assert_backlog_stored_once(messages, n_bad, total)
    report("partition-3 20 s partition mid-drain, healed", {
        "messages": total, "bad": n_bad, "stored_offsets_at_heal": at_heal, "drain": summary.stopped_because,
        "drain_messages": summary.messages, "lag_left": summary.lag_left, "frames_stored": counts["frames"],
        "rejected": counts["rejected"], **loss_figures(counts, len(messages), sum(m["total_faces"] for m in messages)),
    })  # fmt: skip
