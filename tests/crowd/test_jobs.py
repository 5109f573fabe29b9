"""crowd.jobs publishing: every message acknowledged or the task fails, also with failure-only delivery reports."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import string
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic

from crowd.jobs import _Publisher
from crowd.kafka import PublishError
from crowd.messages import FaceMessage

pytestmark = pytest.mark.services


def _message(frame_id: int, source: str = "s.mp4") -> FaceMessage:
    return FaceMessage(video_id="v", source=source, frame_id=frame_id, frame_ts_ms=frame_id * 40.0, frame_width=64,
                       frame_height=48, model="m", total_faces=0, faces=[])  # fmt: skip


def _publisher(kind: str, topic: str, **overrides: object) -> _Publisher:
    """``errors-only`` as detect_and_publish makes it; ``every-report``: a Python call per acknowledged message."""
    return _Publisher.create("kafka_default", topic, timeout_s=20, errors_only=kind == "errors-only", **overrides)


def _messages_in(topic: str, bootstrap: str) -> int:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{uuid.uuid4().hex[:6]}"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(3))
    finally:
        consumer.close()


@pytest.mark.parametrize(
    "kind", [pytest.param("errors-only", id="create"), pytest.param("every-report", id="every-report")]
)
def test_publisher_survives_a_full_local_queue(kind: str, faces_topic: str, kafka_bootstrap: str) -> None:
    publisher = _publisher(kind, faces_topic, queue_buffering_max_messages=5, linger_ms=50)
    for frame_id in range(200):  # 40x the queue: produce() raises BufferError many times
        publisher(_message(frame_id))
    assert publisher.wait(timeout_s=20) == 200
    assert publisher.sent == 200 and publisher.tracker.failed == 0
    assert _messages_in(faces_topic, kafka_bootstrap) == 200


@pytest.mark.parametrize(
    "kind", [pytest.param("errors-only", id="create"), pytest.param("every-report", id="every-report")]
)
def test_a_message_the_broker_rejects_fails_the_publish(kind: str, kafka_admin, kafka_bootstrap: str) -> None:
    """A real broker-side failure (record batch above the topic's max.message.bytes) must raise, in both modes."""
    topic = f"test-small-{uuid.uuid4().hex[:10]}"
    futures = kafka_admin.create_topics([NewTopic(topic, 3, 1, config={"max.message.bytes": "1000"})])
    futures[topic].result(timeout=30)
    try:
        publisher = _publisher(kind, topic)
        rng = random.Random(1)
        noise = "".join(rng.choice(string.ascii_letters) for _ in range(4000))  # lz4 cannot shrink it below 1000
        with pytest.raises(PublishError, match=r"of 3 message\(s\) failed delivery.*too large"):
            for frame_id, source in enumerate(["a.mp4", noise, "b.mp4"]):
                publisher(_message(frame_id, source))
            publisher.wait(timeout_s=20)
    finally:
        kafka_admin.delete_topics([topic])


def _librdkafka_threads() -> int:
    """Threads of this process that librdkafka started (named ``rdk:main``, ``rdk:broker...``)."""
    names = [Path(f"/proc/self/task/{t}/comm").read_text() for t in os.listdir("/proc/self/task")]
    return sum(name.startswith("rdk:") for name in names)


def test_a_task_that_fails_to_publish_releases_its_producer(pg_schema, video_root, monkeypatch) -> None:
    """A dead broker fails the task with PublishError and leaves no producer behind.

    Before, the failed task's producer lived on in the exception's traceback and went on retrying its broker (the
    "Connect to 127.0.0.1:9 failed" lines for the rest of a test session); now its librdkafka threads are gone.
    """
    from crowd.config import load_settings
    from crowd.jobs import DetectOptions, detect_and_publish, plan_requested_video
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "dead-broker.mp4", 10)
    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:9", "socket.timeout.ms": 1000}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(dead))
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "2")
    settings = load_settings()
    (item,) = plan_requested_video(str(video), settings)
    before = _librdkafka_threads()
    # the exception (and the frames in its traceback) stays held here while the threads are counted, as a caller
    # of the task would hold it
    with pytest.raises(PublishError, match="unacknowledged") as failed:
        detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"), settings)
    assert _librdkafka_threads() <= before, f"the failed task's producer is still running ({failed.value})"


def test_a_part_slower_than_its_timeout_allows_warns_once_early(
    pg_schema, faces_topic, video_root, monkeypatch, caplog
) -> None:
    """A part whose speed so far makes it end past the task's execution timeout warns once, early, saying what to
    change: before, nothing was said until the timeout stopped it (6 h), and again at each of its retries."""
    import dataclasses

    import crowd.jobs
    from crowd.config import load_settings
    from crowd.detection import MtcnnDetector
    from crowd.jobs import DetectOptions, detect_and_publish, plan_video
    from crowd.video import content_hash
    from tests.crowd._helpers import CARPHONE, write_clip

    class Slow(MtcnnDetector):  # about 30 frames in 3 s: 3x the timeout below
        def detect_prepared(self, image, prepared):
            time.sleep(0.1)
            return super().detect_prepared(image, prepared)

    monkeypatch.setattr(crowd.jobs, "build_detector", lambda *a, **k: Slow())
    monkeypatch.setattr(crowd.jobs, "PROGRESS_EVERY_S", 0.2)
    settings = dataclasses.replace(load_settings(), faces_topic=faces_topic, detect_task_timeout_s=1)
    video = write_clip(CARPHONE, video_root / "slow.mp4", 30)
    (item,) = plan_video(video, content_hash(video), settings)
    with caplog.at_level(logging.INFO, logger="crowd"):
        detect_and_publish(item, DetectOptions(frame_interval=1, model="mtcnn"), settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "timeout" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert re.search(r"slow\.mp4 part 1/1: at [\d.]+ frames/s this part needs about \ds, past the task's "
                     r"execution timeout of 1s \(CROWD_DETECT_TASK_TIMEOUT_S\).*Lower CROWD_FRAMES_PER_TASK",
                     warnings[0]), warnings[0]  # fmt: skip
    progress = [r for r in caplog.records if r.getMessage().startswith("frame ") and "frames/s" in r.getMessage()]
    assert progress, "the progress lines are still logged"
    caplog.clear()
    # a video longer than a task's share, in one part: read whole (not split), so splitting finer does not help
    whole = dataclasses.replace(settings, frames_per_task=10)
    detect_and_publish(item, DetectOptions(frame_interval=1, model="mtcnn"), whole)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "timeout" in r.getMessage()]
    assert len(warnings) == 1 and "It is read whole" in warnings[0], warnings
    assert "Lower CROWD_FRAMES_PER_TASK" not in warnings[0], warnings[0]
    caplog.clear()
    fast = dataclasses.replace(settings, detect_task_timeout_s=3600)
    detect_and_publish(item, DetectOptions(frame_interval=1, model="mtcnn"), fast)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "timeout" in r.getMessage()]


def test_an_empty_requested_video_fails_at_once(pg_schema, video_root, monkeypatch) -> None:
    """An empty .mp4 given to the manual DAG: BadVideoError, and the task fails without its useless retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from crowd import tasks
    from crowd.config import load_settings
    from crowd.jobs import BadVideoError, plan_requested_video

    empty = video_root / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(BadVideoError, match=r"empty\.mp4 cannot be read to identify it: .*0 bytes"):
        plan_requested_video(str(empty), load_settings())
    run = SimpleNamespace(run_id="manual__empty", start_date=datetime.now(UTC), run_after=None)
    context = {"params": {"video_path": str(empty)}, "dag_run": run}
    monkeypatch.setattr(tasks, "get_current_context", lambda: context)
    with pytest.raises(AirflowFailException, match="0 bytes") as failure:
        tasks.plan_requested_video.function()
    assert failure.value.__cause__ is None, "an expected failure logs its reason, not a chain of tracebacks"


def test_a_video_moved_after_the_scan_is_not_recorded_as_failed(pg_schema, video_root, monkeypatch) -> None:
    """Moved (archived, renamed) between the scan and its task: the task fails, but the content is not marked
    failed (that would skip it under every name for good), and the next scan takes it at its new place."""
    from crowd import storage, tasks
    from crowd.jobs import DetectOptions, VideoUnreachableError, detect_and_publish, find_new_videos
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (item,) = find_new_videos()
    (video_root / "archive").mkdir()
    moved = video.rename(video_root / "archive" / "a.mp4")
    with pytest.raises(VideoUnreachableError, match="a.mp4 .* does not exist"):
        detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"))
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_status(conn, item.video_id) is None
    assert [(i.path, i.video_id) for i in find_new_videos()] == [(str(moved), item.video_id)]

    # in Airflow: an ordinary failure, retried (not AirflowFailException, which skips the retries)
    context = {"params": {}, "dag_run": None}
    monkeypatch.setattr(tasks, "get_current_context", lambda: context)
    monkeypatch.setattr(tasks, "_run_stamp", lambda: None)
    with pytest.raises(VideoUnreachableError):
        tasks.detect_and_publish.function(item.to_dict())


@pytest.mark.parametrize("change", ["replaced", "rewritten-in-place"])
def test_a_file_changed_after_the_scan_is_not_published_under_the_old_id(
    change: str, pg_schema, faces_topic, video_root, kafka_bootstrap, monkeypatch
) -> None:
    """A camera rewriting a fixed name, an upload replacing a file: the queued task finds another file under the
    path. It publishes nothing (its frames are not the scanned content's), fails without retries and records no
    failure (the old content stays good); the next scan identifies the file again."""
    from airflow.sdk.exceptions import AirflowFailException

    from crowd import storage, tasks
    from crowd.jobs import DetectOptions, VideoChangedError, detect_and_publish, find_new_videos
    from crowd.video import content_hash
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "cam1.mp4", 12)
    (item,) = find_new_videos()
    if change == "replaced":
        os.replace(write_clip(CARPHONE, video_root.parent / "other.mp4", 8), video)
    else:  # the same inode cut short: what a camera overwriting its file leaves while it writes
        data = video.read_bytes()
        with open(video, "r+b") as handle:
            handle.truncate(len(data) // 2)
    with pytest.raises(VideoChangedError, match=r"cam1\.mp4 .* not the file identified .*size \d+ -> \d+ bytes"):
        detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"))
    assert _messages_in(faces_topic, kafka_bootstrap) == 0
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_status(conn, item.video_id) is None

    context = {"params": {}, "dag_run": None}
    monkeypatch.setattr(tasks, "get_current_context", lambda: context)
    monkeypatch.setattr(tasks, "_run_stamp", lambda: None)
    with pytest.raises(AirflowFailException, match="not the file identified") as failure:
        tasks.detect_and_publish.function(item.to_dict())
    assert failure.value.__cause__ is None, "an expected failure logs its reason, not a chain of tracebacks"

    (again,) = find_new_videos()
    assert again.video_id == content_hash(video) != item.video_id
    assert again.file_signature is not None and again.file_signature != item.file_signature


def test_a_file_whose_permissions_changed_after_the_scan_is_processed(
    pg_schema, faces_topic, video_root, kafka_bootstrap
) -> None:
    """chmod (or chown, a hard link, a relabelling tool) moves the file's change time, not its content: the task
    hashes it again and goes on (a share whose inode numbers differ between workers looks the same)."""
    from crowd.jobs import DetectOptions, detect_and_publish, find_new_videos
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "cam1.mp4", 12)
    (item,) = find_new_videos()
    video.chmod(0o640)
    result = detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"))
    assert result["frames"] == 3 and _messages_in(faces_topic, kafka_bootstrap) == 3


def test_a_file_that_changes_while_it_is_identified_is_left_for_later(pg_schema, video_root, monkeypatch) -> None:
    """Still being written while it is hashed: the hash is of no content. The scan leaves the file for a later scan,
    the manual DAG refuses the path with the reason (nothing is remembered or planned)."""
    from crowd import jobs
    from crowd.config import ConfigError, load_settings
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "growing.mp4", 12)
    real_hash = jobs.content_hash

    def hash_while_it_grows(pinned, *args, **kwargs) -> str:
        digest = real_hash(pinned, *args, **kwargs)
        with open(video, "ab") as handle:
            handle.write(b"\0" * 100)
        return digest

    monkeypatch.setattr(jobs, "content_hash", hash_while_it_grows)
    assert jobs.find_new_videos() == []
    with pytest.raises(ConfigError, match=r"growing\.mp4 changed while it was read"):
        jobs.plan_requested_video(str(video), load_settings())
    monkeypatch.setattr(jobs, "content_hash", real_hash)
    assert [i.path for i in jobs.find_new_videos()] == [str(video)]


def test_the_pictures_of_a_split_video_are_where_the_api_lists_them(pg_schema, faces_topic, video_root) -> None:
    """Each part writes its own set, named after it, into the video's folder (the API lists no sub-folder)."""
    import dataclasses
    import re

    from crowd.api import IMAGE_NAME_PATTERN
    from crowd.config import load_settings
    from crowd.jobs import DetectOptions, detect_and_publish, plan_video
    from crowd.video import content_hash
    from tests.crowd._helpers import CARPHONE, write_clip

    settings = dataclasses.replace(load_settings(), frames_per_task=30)
    video = write_clip(CARPHONE, video_root / "split.mp4", 60)
    items = plan_video(video, content_hash(video), settings)
    assert [(i.start, i.stop) for i in items] == [(0, 30), (30, 60)]
    for item in items:
        detect_and_publish(item, DetectOptions(frame_interval=10, model="mtcnn"), settings)
    folder = settings.results_dir / items[0].video_id
    listed = sorted(p.name for p in folder.iterdir() if p.is_file() and re.match(IMAGE_NAME_PATTERN, p.name))
    assert listed == sorted(
        f"part-{n:04d}-{kind}" for n in (1, 2) for kind in ("annotated.jpg", "faces_over_time.png", "heatmap.png")
    ), sorted(p.name for p in folder.rglob("*"))


def test_a_video_that_vanishes_before_its_probe_does_not_fail_the_scan(video_root, monkeypatch) -> None:
    """Deleted between hashing and probing: one work item whose task records the failure, not a failed scan."""
    import crowd.jobs
    from crowd.config import load_settings
    from crowd.jobs import WorkItem, plan_video
    from crowd.video import _image_kind

    gone = video_root / "gone.mp4"
    assert _image_kind(gone) is None  # the probe's diagnosis of a file that is not there any more

    def vanished(path: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(crowd.jobs, "probe_video", vanished)
    assert plan_video(gone, "v1", load_settings()) == [WorkItem(str(gone), "v1")]


def test_only_constant_rate_videos_are_split(video_root) -> None:
    """A part seeks to its start; OpenCV seeks by time, so a variable-frame-rate video is read whole."""
    import dataclasses

    import numpy as np

    from crowd.config import load_settings
    from crowd.jobs import plan_video
    from tests.crowd._helpers import write_numbered

    settings = dataclasses.replace(load_settings(), frames_per_task=40)
    cfr = write_numbered(video_root / "cfr.mp4", [round(i * 1000 / 30) for i in range(100)])
    steps = np.where(np.random.default_rng(1).random(100) < 0.3, 66, 33)
    vfr = write_numbered(video_root / "vfr.mp4", [0, *np.cumsum(steps[:-1]).tolist()])
    assert [(i.start, i.stop) for i in plan_video(cfr, "c", settings)] == [(0, 40), (40, 80), (80, 100)]
    assert [(i.start, i.stop, i.parts) for i in plan_video(vfr, "v", settings)] == [(0, None, 1)]


@pytest.mark.parametrize(
    ("swapped_in", "refusal"),
    [
        pytest.param("symlink", r"led to '.*secret\.mp4' when it was opened, outside the video roots", id="symlink"),
        pytest.param("fifo", r"camera\.mp4' is not a regular file", id="fifo"),
    ],
)
def test_a_symlink_swapped_in_after_the_check_does_not_lead_out_of_the_roots(
    swapped_in, refusal, pg_schema, faces_topic, kafka_bootstrap, video_root, tmp_path, monkeypatch
) -> None:
    """Someone able to write in a video root replaces a checked video by a symlink leading outside the roots (or
    by a FIFO), between the task's check and its open: the task opens the file, checks what it opened, and reads
    nothing; the video's content is not recorded as failed (it is where it is that changed)."""
    from crowd import storage
    from crowd.config import Settings
    from crowd.jobs import DetectOptions, VideoUnreachableError, detect_and_publish, plan_requested_video
    from tests.crowd._helpers import CARPHONE, write_clip

    video = write_clip(CARPHONE, video_root / "camera.mp4", 12)
    (tmp_path / "private").mkdir()
    secret = write_clip(CARPHONE, tmp_path / "private" / "secret.mp4", 20)
    (item,) = plan_requested_video(str(video))
    check = Settings.check_video_path

    def check_then_swap(self, path):
        checked = check(self, path)
        swap = video_root / ".swap.mp4"
        if swapped_in == "symlink":
            swap.symlink_to(secret)
        else:
            os.mkfifo(swap)
        swap.replace(video)
        return checked

    monkeypatch.setattr(Settings, "check_video_path", check_then_swap)
    with pytest.raises(VideoUnreachableError, match=refusal):
        detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"))
    assert _messages_in(faces_topic, kafka_bootstrap) == 0
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_status(conn, item.video_id) is None


def test_a_whole_frame_interval_sent_as_a_float_is_taken() -> None:
    """The DAG's param schema accepts 5.0 as an "integer" (a REST or CLI trigger may send it): the run then failed
    its first task on it. 2.5 stays refused (by the form too)."""
    from crowd.config import ConfigError
    from crowd.jobs import DetectOptions

    options = DetectOptions.from_params({"frame_interval": 5.0})
    assert options.frame_interval == 5 and isinstance(options.frame_interval, int)
    for bad in (2.5, 0.0, float("nan"), True):
        with pytest.raises(ConfigError, match="frame_interval"):
            DetectOptions.from_params({"frame_interval": bad})
