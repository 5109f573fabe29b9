"""A run's claim on the video it processes: scans leave a claimed video alone, and a video whose runs keep ending
without a word (the task process killed) is failed after ``CROWD_MAX_SILENT_RUNS`` runs instead of every scan
planning it again for ever."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crowd import storage
from crowd.jobs import DetectOptions, WorkItem, detect_and_publish, find_new_videos, plan_requested_video
from tests.crowd._helpers import CARPHONE, write_clip

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]

# detect_and_publish in a child process, as a Celery worker's task process runs it: killed there, it ends silently
_CHILD = """
import json, sys
from datetime import datetime
from crowd import storage
from crowd.jobs import DetectOptions, WorkItem, detect_and_publish
run = storage.RunStamp(sys.argv[2], datetime.fromisoformat(sys.argv[3]))
detect_and_publish(WorkItem(**json.loads(sys.argv[1])), DetectOptions(frame_interval=1, model="mtcnn"), run=run)
"""


@pytest.fixture
def airflow_logging() -> None:
    """Airflow loaded before the test's logs are caught: loading it sets up its logging, which drops pytest's
    handler (a test checking a warning then passes only after another test loaded Airflow)."""
    import airflow.configuration  # noqa: F401


def _state(video_id: str) -> storage.VideoState | None:
    with storage.connect("crowd_postgres") as conn:
        return storage.get_video_state(conn, video_id)


def _planned() -> list[str]:
    return [item.video_id for item in find_new_videos()]


def _run(run_id: str) -> storage.RunStamp:
    return storage.RunStamp(run_id, datetime.now(UTC))


def _wait_lapsed(video_id: str, timeout_s: float) -> None:
    """Until the claim on ``video_id`` has had no sign of life for ``timeout_s``."""
    deadline = time.monotonic() + 30
    while (state := _state(video_id)) and state.alive_s_ago is not None and state.alive_s_ago < timeout_s:
        assert time.monotonic() < deadline, f"the claim was still renewed: {state}"
        time.sleep(0.1)


def _kill_mid_run(item: WorkItem, run: storage.RunStamp) -> None:
    """Start the task for ``item`` in a child process and ``kill -9`` it once it has claimed the video and is
    processing frames (it must still be running then)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    args = [json.dumps(item.to_dict()), run.run_id, run.started_at.isoformat()]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((state := _state(item.video_id)) and state.run_id == run.run_id):
            assert child.poll() is None, f"the task ended before it claimed the video: {child.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the task did not claim the video within 120 s"
            time.sleep(0.1)
        time.sleep(0.3)  # into the frames
        assert child.poll() is None, f"the task ended before the kill (exit {child.returncode}): use a longer clip"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        child.stderr.close()


def test_a_video_another_run_is_processing_is_left_to_it(pg_schema, video_root, monkeypatch, caplog) -> None:
    """A manual run has claimed the video: the scan leaves it (planning it would compute it twice); once that claim
    has had no sign of life for CROWD_VIDEO_CLAIM_TIMEOUT_S, the scan plans it again."""
    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1")
    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (video_id,) = _planned()
    with storage.connect("crowd_postgres") as conn:
        storage.mark_video_processing(conn, video_id, str(video), fps=None, frame_count=None, width=None,
                                      height=None, size_bytes=None, model="m", run=_run("manual__1"))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="crowd.jobs"):
        assert _planned() == []
    assert f"video {video_id} is being processed by run manual__1" in caplog.text
    assert "0 failed, 1 being processed by another run" in caplog.text

    _wait_lapsed(video_id, 1)
    assert _planned() == [video_id]
    assert _state(video_id).runs_ended_silently() == 1


def test_a_manual_run_claims_its_video_when_it_is_planned(pg_schema, video_root) -> None:
    """A manual run claimed its video only when its first detection task started: a scan in between (the run's
    tasks queued behind other work) planned the video again, and it was computed twice. The plan claims it now;
    what the registry knew of a video processed before is kept until the run's task probes it again."""
    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (video_id,) = {item.video_id for item in plan_requested_video(str(video))}  # no run: nothing claimed
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        assert storage.get_video_state(conn, video_id) is None
        storage.mark_video_processing(conn, video_id, str(video), fps=25.0, frame_count=12, width=176, height=144,
                                      size_bytes=1, model="m", run=_run("scheduled__0"))  # fmt: skip
        conn.execute(
            "UPDATE videos SET status = 'done', alive_at = now() - interval '1 day' WHERE id = %s", (video_id,)
        )
        conn.commit()
    items = plan_requested_video(str(video), run=_run("manual__2"))
    assert {item.video_id for item in items} == {video_id}
    state = _state(video_id)
    assert state.status == "processing" and state.run_id == "manual__2" and state.claimed(600)
    assert _planned() == []  # the scan leaves it to the manual run
    with storage.connect("crowd_postgres") as conn:
        kept = conn.execute("SELECT fps, frame_count, width, height, model FROM videos WHERE id = %s", (video_id,))
        assert kept.fetchone() == (25.0, 12, 176, 144, "m")


def test_a_run_keeps_its_claim_while_it_makes_progress(pg_schema, faces_topic, video_root, monkeypatch) -> None:
    """A task running longer than the claim timeout renews the claim while it works: a scan in the middle
    leaves the video to it. (The timeout is 3 s here, not 1 s as in the other tests: the pictures, made after the
    last frame, take 1-2 s on a busy machine; in a deployment the timeout is minutes.)"""
    from crowd import jobs
    from crowd.detection import build_detector

    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "3")  # renewed every 0.75 s

    class Slow:  # the real detector, 0.1 s slower a frame: a 60-frame run lasts over 2 claim timeouts
        def __init__(self, detector) -> None:
            self.detector, self.name = detector, detector.name

        def prepare(self, frame):
            return self.detector.prepare(frame)

        def detect_prepared(self, frame, prepared):
            time.sleep(0.1)
            return self.detector.detect_prepared(frame, prepared)

    monkeypatch.setattr(jobs, "build_detector", lambda *a, **k: Slow(build_detector(*a, **k)))
    write_clip(CARPHONE, video_root / "long.mp4", 60)
    (item,) = find_new_videos()
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            detect_and_publish(item, DetectOptions(frame_interval=1, model="mtcnn"), run=_run("scheduled__1"))
        ),  # fmt: skip
    )
    started = time.monotonic()
    worker.start()
    oldest_sign, scans = 0.0, []
    while worker.is_alive():
        state = _state(item.video_id)
        if state is not None and time.monotonic() - started > 3.5:
            oldest_sign = max(oldest_sign, state.alive_s_ago)
            scans.append(_planned())
        time.sleep(0.2)
    worker.join()
    assert result.get("frames") == 60, result
    assert time.monotonic() - started > 6, "the run was too short to outlast the claim timeout twice"
    assert scans and all(planned == [] for planned in scans), scans
    assert oldest_sign < 3, f"the claim went {oldest_sign:.2f} s without a sign of life"


def test_a_video_whose_runs_are_killed_is_failed_after_the_limit(pg_schema, faces_topic, video_root, monkeypatch,
                                                                 caplog) -> None:  # fmt: skip
    """The task process killed (kill -9) in three runs in a row: the first two lapsed claims are planned again,
    the third makes the scan mark the video failed with the reason. A run of the manual DAG starts it over."""
    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1")
    monkeypatch.setenv("CROWD_MAX_SILENT_RUNS", "3")
    video = write_clip(CARPHONE, video_root / "crashes.mp4", 120)
    (item,) = find_new_videos()
    for n in (1, 2, 3):
        _kill_mid_run(item, _run(f"scheduled__{n}"))
        state = _state(item.video_id)
        assert (state.status, state.run_id, state.silent_runs) == ("processing", f"scheduled__{n}", n - 1)
        _wait_lapsed(item.video_id, 1)
        with caplog.at_level(logging.INFO, logger="crowd.jobs"):
            planned = _planned()
        if n < 3:
            assert planned == [item.video_id]
    assert planned == []
    state = _state(item.video_id)
    assert state.status == "failed"
    with storage.connect("crowd_postgres") as conn:
        (error,) = conn.execute("SELECT error FROM videos WHERE id = %s", (item.video_id,)).fetchone()
    assert error.startswith("3 runs in a row ended without finishing this video or giving a reason"), error
    assert "the last one scheduled__3" in error
    assert f"video {video} ({item.video_id}) marked failed: 3 runs in a row" in caplog.text
    assert _planned() == [], "a failed video is planned again"

    with storage.connect("crowd_postgres") as conn:  # the manual DAG: its run claims it afresh
        storage.mark_video_processing(conn, item.video_id, str(video), fps=None, frame_count=None, width=None,
                                      height=None, size_bytes=None, model="m", run=_run("manual__1"))  # fmt: skip
    assert _state(item.video_id).silent_runs == 0


def test_runs_that_fail_on_kafka_are_not_counted_as_silent(pg_schema, video_root, monkeypatch) -> None:
    """Kafka down for longer than three runs: each try fails with PublishError and says so (releasing its claim), so
    the video is planned again by the next scan, never failed for it (it would be lost to the outage)."""
    from crowd.kafka import PublishError

    monkeypatch.setenv("CROWD_MAX_SILENT_RUNS", "2")
    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:9", "socket.timeout.ms": 1000}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(dead))
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "1")
    write_clip(CARPHONE, video_root / "outage.mp4", 10)
    (item,) = find_new_videos()
    for n in (1, 2, 3):
        with pytest.raises(PublishError):
            detect_and_publish(item, DetectOptions(frame_interval=5, model="mtcnn"), run=_run(f"scheduled__{n}"))
        state = _state(item.video_id)
        assert (state.status, state.reason_given, state.silent_runs) == ("processing", True, 0)
        assert state.alive_s_ago is None, "the failed try still holds its claim"
        assert _planned() == [item.video_id]


def test_a_part_on_a_worker_without_the_runs_model_is_not_counted_as_silent(
    pg_schema, video_root, tmp_path, monkeypatch
) -> None:
    """Part 0 claimed the video on a worker with the run's model; part 2 lands on a worker without its files and
    fails saying so. That is a reason (the worker's set-up), not a silent death: three such runs must not get the
    video failed as 'killed' (it would be skipped for good)."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from crowd import tasks

    monkeypatch.setenv("CROWD_MAX_SILENT_RUNS", "2")
    monkeypatch.setenv("CROWD_MODEL_DIR", str(tmp_path / "no-face-weights"))
    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (item,) = find_new_videos()
    part = WorkItem(item.path, item.video_id, 6, 12, 1, 2, model="yolov3", file_signature=item.file_signature)
    for n in (1, 2, 3):
        run = _run(f"scheduled__{n}")
        with storage.connect("crowd_postgres") as conn:  # part 0, on the other worker
            storage.mark_video_processing(conn, item.video_id, str(video), fps=None, frame_count=None, width=None,
                                          height=None, size_bytes=None, model="yolov3", run=run)  # fmt: skip
        context = {"params": {}, "dag_run": SimpleNamespace(run_id=run.run_id, start_date=run.started_at)}
        monkeypatch.setattr(tasks, "get_current_context", lambda context=context: context)
        with pytest.raises(AirflowFailException, match="model not usable"):
            tasks.detect_and_publish.function(part.to_dict())
        state = _state(item.video_id)
        assert (state.status, state.reason_given, state.runs_ended_silently()) == ("processing", True, 0), state
        # part 0 may still be working: the failed part leaves the run's claim (it released it, and a scan
        # planned the video again under the live part)
        assert state.alive_s_ago is not None and _planned() == [], state
    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1")
    _wait_lapsed(item.video_id, 1)  # part 0 is gone too
    assert _planned() == [item.video_id], "planned again, not failed"


def test_a_run_that_ends_without_finishing_the_video_releases_it(pg_schema, video_root) -> None:
    """A part failed (or its task was lost): the run's last task releases the claim, so the next scan plans the
    video at once instead of waiting CROWD_VIDEO_CLAIM_TIMEOUT_S (10 minutes) for it to lapse."""
    from crowd.jobs import finish_videos

    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (item,) = find_new_videos()
    run = _run("scheduled__1")
    with storage.connect("crowd_postgres") as conn:
        storage.mark_video_processing(conn, item.video_id, str(video), fps=None, frame_count=None, width=None,
                                      height=None, size_bytes=None, model="m", run=run)  # fmt: skip
    assert _planned() == []
    outcome = finish_videos([item], [None], run=run)
    assert outcome == {"done": [], "incomplete": [item.video_id], "superseded": [], "gone": []}
    assert _planned() == [item.video_id]


def test_a_run_taken_over_while_alive_is_not_counted_as_silent(pg_schema, video_root) -> None:
    """A manual run claims a video a scheduled run is processing (its claim alive): the scheduled run is superseded,
    not dead, so it does not count towards CROWD_MAX_SILENT_RUNS; a run whose claim had lapsed does."""
    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (video_id,) = _planned()
    meta = {"fps": None, "frame_count": None, "width": None, "height": None, "size_bytes": None, "model": "m"}

    def claim(run: storage.RunStamp, timeout_s: float) -> None:
        with storage.connect("crowd_postgres") as conn:
            assert storage.mark_video_processing(conn, video_id, str(video), **meta, run=run, claim_timeout_s=timeout_s)

    scheduled = _run("scheduled__1")
    claim(scheduled, 600)
    claim(_run("manual__1"), 600)  # the scheduled run's claim is seconds old
    assert _state(video_id).silent_runs == 0
    with storage.connect("crowd_postgres") as conn:
        assert not storage.keep_video_claim(conn, video_id, scheduled), "the superseded run still holds the claim"

    _wait_lapsed(video_id, 1)  # the manual run ends without a word
    claim(_run("scheduled__2"), 1)
    assert _state(video_id).silent_runs == 1


def test_a_part_that_cannot_reach_its_video_gives_the_reason(pg_schema, video_root) -> None:
    """The run's first part claimed the video, then the file was moved away: a later part fails with the reason
    (retried, not recorded failed), so the run is not counted among those that ended silently."""
    from crowd.jobs import VideoUnreachableError

    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (item,) = find_new_videos()
    run = _run("scheduled__1")
    with storage.connect("crowd_postgres") as conn:  # part 0 has claimed it
        storage.mark_video_processing(conn, item.video_id, str(video), fps=None, frame_count=None, width=None,
                                      height=None, size_bytes=None, model="m", run=run)  # fmt: skip
    video.rename(video_root.parent / "moved.mp4")
    part = WorkItem(item.path, item.video_id, 6, 12, 1, 2)
    with pytest.raises(VideoUnreachableError, match="cannot be reached"):
        detect_and_publish(part, DetectOptions(frame_interval=5, model="mtcnn"), run=run)
    state = _state(item.video_id)
    assert (state.status, state.reason_given, state.runs_ended_silently()) == ("processing", True, 0)


def test_a_run_keeps_its_claim_through_a_long_stretch_without_messages(
    pg_schema, faces_topic, video_root, monkeypatch
) -> None:
    """A part publishes nothing for longer than the claim timeout (a large frame_interval on a slow decode, a part
    reading from frame 0 up to its range): the task is alive, so a scan meanwhile leaves the video to it, even one
    that cannot ask Airflow whether the run is active. Before, the claim was renewed only when a message was
    published: it lapsed, and the scan planned the video again under the live task."""
    from crowd import jobs
    from crowd.detection import build_detector

    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "4")  # renewed every 1 s: 3 s of margin on a busy box
    stalled, go_on = threading.Event(), threading.Event()

    class SlowRead:  # the real detector; the reader is held on the second sampled frame until the test has scanned
        def __init__(self, detector) -> None:
            self.detector, self.name, self.frames = detector, detector.name, 0

        def prepare(self, frame):  # called by the frame reader's thread, for each sampled frame
            self.frames += 1
            if self.frames == 2:
                stalled.set()
                go_on.wait(timeout=120)
            return self.detector.prepare(frame)

        def detect_prepared(self, frame, prepared):
            return self.detector.detect_prepared(frame, prepared)

    monkeypatch.setattr(jobs, "build_detector", lambda *a, **k: SlowRead(build_detector(*a, **k)))
    write_clip(CARPHONE, video_root / "long.mp4", 40)
    (item,) = find_new_videos()
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            detect_and_publish(item, DetectOptions(frame_interval=20, model="mtcnn"), run=_run("scheduled__1"))
        ),  # fmt: skip
    )
    worker.start()
    try:
        assert stalled.wait(timeout=120), "the task did not reach its second sampled frame"
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 12:  # three claim timeouts without a message
            time.sleep(0.1)
        state = _state(item.video_id)
        planned = [i.video_id for i in find_new_videos(run_is_active=lambda run_id: False)]
    finally:
        go_on.set()
        worker.join(timeout=120)
    assert not worker.is_alive()
    assert result.get("frames") == 2, result
    assert planned == [], "a scan planned the video again while its task was alive"
    assert state.claimed(4), f"the claim lapsed while the task was alive: {state}"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("crowd-claim-")], "renewals go on"


def test_a_superseded_run_does_not_report_the_video_done(pg_schema, airflow_logging, video_root, caplog) -> None:
    """A manual run took the video over while the scheduled run was publishing it: the scheduled run's finish
    leaves the video to the manual run and says so. Before, it reported the video done while its row stayed
    'processing' (by the manual run); it is not incomplete either, so the superseded run does not fail for it."""
    from crowd.jobs import finish_videos

    video = write_clip(CARPHONE, video_root / "a.mp4", 12)
    (item,) = find_new_videos()
    meta = {"fps": None, "frame_count": None, "width": None, "height": None, "size_bytes": None, "model": "m"}
    scheduled, manual = _run("scheduled__1"), _run("manual__1")  # the manual run started later
    with storage.connect("crowd_postgres") as conn:
        assert storage.mark_video_processing(conn, item.video_id, str(video), **meta, run=scheduled)
        assert storage.mark_video_processing(conn, item.video_id, str(video), **meta, run=manual)
    published = {**item.to_dict(), "frames": 4, "faces": 4, "max_faces": 1, "messages": 4}  # every part
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        outcome = finish_videos([item], [published], run=scheduled)
    assert outcome == {"done": [], "incomplete": [], "superseded": [item.video_id], "gone": []}
    assert f"video {item.video_id}: every part was published, but a later run owns its status" in caplog.text
    state = _state(item.video_id)
    assert (state.status, state.run_id) == ("processing", "manual__1")
    assert state.claimed(600), "the later run's claim was released"
