"""File-system faults during a detection task: the video changes under the reader, the results folder is unusable."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from crowd import storage
from crowd.ingest import drain
from tests.crowd._helpers import CARPHONE, read_frames
from tests.dags.test_detection_dags import _consume_all
from tests.reliability.conftest import pg_counts, report
from tests.reliability.test_kafka_faults import long_face_video

pytestmark = [pytest.mark.services, pytest.mark.reliability]


@pytest.fixture
def env(faces_topic: str, pg_schema: str, kafka_bootstrap: str, video_root: Path):
    from crowd.config import load_settings

    return {"root": video_root, "topic": faces_topic, "bootstrap": kafka_bootstrap, "settings": load_settings}


def _status(video_id: str) -> tuple[str | None, str | None]:
    with storage.connect("crowd_postgres") as conn:
        row = conn.execute("SELECT status, error FROM videos WHERE id = %s", (video_id,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


@contextmanager
def _after_messages(n: int, action):
    """Within the block, run ``action`` once right after the n-th message of a task was handed to Kafka."""
    from crowd import jobs

    original = jobs._Publisher.__call__
    state = {"done": False}

    def call(self, message) -> None:
        original(self, message)
        if self.sent == n and not state["done"]:
            state["done"] = True
            action()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs._Publisher, "__call__", call)
        yield


# --- 5. a video truncated or deleted while it is read -------------------------------------------------------------


@pytest.mark.parametrize("change", ["truncate", "delete"])
def test_video_changed_while_read_fails_alone_and_the_next_one_finishes(env: dict, change: str, tmp_path: Path) -> None:
    """Truncated while read, the victim was failed as corrupt: its content, known by hash, was then skipped for
    good, also when found intact under another name. The task now sees the file changed under it: the run records
    that the file went away, and the intact content found again is planned again."""
    from crowd.jobs import (
        FILE_WENT_AWAY,
        DetectOptions,
        VideoChangedError,
        detect_and_publish,
        find_new_videos,
        finish_videos,
        plan_requested_video,
    )

    settings = env["settings"]()
    victim = long_face_video(env["root"] / "victim.mp4", repeats=4)  # 480 frames, ~1 MB
    intact = shutil.copy2(victim, tmp_path / "intact.mp4")
    other = long_face_video(env["root"] / "other.mp4", repeats=1)
    (victim_item,) = plan_requested_video(str(victim), settings)
    (other_item,) = plan_requested_video(str(other), settings)
    size = victim.stat().st_size

    def hit() -> None:
        if change == "truncate":
            os.truncate(victim, size // 10)
        else:
            victim.unlink()

    options = DetectOptions(frame_interval=1)
    outcome: object
    with _after_messages(20, hit):
        try:
            outcome = detect_and_publish(victim_item, options, settings)
        except VideoChangedError as exc:
            outcome = exc
    other_result = detect_and_publish(other_item, options, settings)
    finish = finish_videos([victim_item, other_item], [None if isinstance(outcome, Exception) else outcome,
                                                       other_result], settings)  # fmt: skip
    status, error = _status(victim_item.video_id)
    keys = [m.key().decode() for m in _consume_all(env["topic"], env["bootstrap"])]
    published_victim = keys.count(victim_item.video_id)
    assert other_result["messages"] == 120 and keys.count(other_item.video_id) == 120
    assert other_item.video_id in finish["done"]
    if change == "truncate":
        assert isinstance(outcome, VideoChangedError) and "changed while it was read (size" in str(outcome), outcome
        assert status == "failed" and error.startswith(FILE_WENT_AWAY) and "victim.mp4" in error, error
        assert 20 <= published_victim < 480
        victim.unlink()
        shutil.copy2(intact, env["root"] / "archive-copy.mp4")  # the intact content, found again elsewhere
        assert [item.video_id for item in find_new_videos(settings)] == [victim_item.video_id]
    else:  # the open file keeps its data on Linux: the whole video is read and published
        assert not victim.exists(), "the file was not deleted during the read"
        assert not isinstance(outcome, Exception) and outcome["messages"] == 480, outcome
        assert status == "done" and published_victim == 480
    report(f"fault-5 video {change}d while read", {
        "victim_frames": 480, "changed_after_message": 20,
        "victim_outcome": f"{type(outcome).__name__}: {str(outcome)[:200]}" if isinstance(outcome, Exception)
        else f"success, {outcome['messages']} messages",
        "victim_status": status, "victim_error": (error or "")[:200], "victim_messages_published": published_victim,
        "other_video": f"done, {other_result['messages']} messages",
    })  # fmt: skip


# --- 6. the results folder cannot be written ---------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs (root only), unmounted afterwards; call it with ``free`` to fill it up to that many bytes.

    Returns the ``results`` folder inside it.
    """
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tiny tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")

    def fill(free: int = 0) -> Path:
        (mnt / "results").mkdir()
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
            f.truncate(max(0, f.tell() - free))  # tmpfs counts whole pages: free is rounded to 4 KiB
        return mnt / "results"

    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_pictures_on_a_full_disk_fail_naming_the_file(small_tmpfs) -> None:
    """A full disk raises, naming the picture (``cv2.imwrite`` alone would only return False), and leaves no file
    behind: neither a partial picture nor the temporary file it was written to."""
    from crowd.detection import Detection
    from crowd.pictures import PictureAccumulator

    results = small_tmpfs(free=0)
    pictures = PictureAccumulator(width=176, height=144)
    (frame,) = read_frames(CARPHONE, 1)
    pictures.add(0, 0.0, frame, [Detection(60, 30, 50, 60, 0.9)])
    with pytest.raises(OSError, match=r"(?i)cannot write .*annotated\.jpg.*no space left"):
        pictures.write(results)
    assert list(results.iterdir()) == []


_REWRITE_FOREVER = """
import sys
import numpy as np
from crowd.pictures import save_image
images = [np.random.default_rng(seed).integers(0, 256, (1500, 1500, 3), np.uint8) for seed in (1, 2)]
save_image(sys.argv[1], images[0])
print("written", flush=True)
turn = 0
while True:
    turn += 1
    save_image(sys.argv[1], images[turn % 2])
"""


def test_a_process_killed_while_writing_a_picture_leaves_a_whole_one(tmp_path: Path) -> None:
    """kill -9 at random moments of a process rewriting a 6.75 MB PNG over and over (two pictures in turn):
    each time the file decodes whole, as one of the two pictures, never a truncated one (written in place, it
    would be truncated nearly all the time), and whatever temporary file is left is hidden from the API."""
    import random
    import re
    import signal
    import sys
    import time

    import cv2
    import numpy as np

    from crowd.api import IMAGE_NAME_PATTERN

    images = [np.random.default_rng(seed).integers(0, 256, (1500, 1500, 3), np.uint8) for seed in (1, 2)]
    picture = tmp_path / "heatmap.png"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "plugins")}
    rng = random.Random(7)
    seen = []
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", _REWRITE_FOREVER, str(picture)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert writer.stdout.readline().strip() == "written"
            time.sleep(rng.uniform(0.05, 1.5))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(30)
            writer.stdout.close()
        on_disk = cv2.imread(str(picture), cv2.IMREAD_COLOR)
        assert on_disk is not None, "the picture on disk is not a whole PNG"
        matches = [i for i, image in enumerate(images) if np.array_equal(on_disk, image)]
        assert len(matches) == 1, "the picture on disk is neither of the two written"
        seen.append(matches[0])
    left = sorted(p.name for p in tmp_path.iterdir() if p != picture)
    assert all(name.startswith(".") and not re.match(IMAGE_NAME_PATTERN, name) for name in left), left
    report(
        "fault-6 picture writer killed", {"kills": len(seen), "picture_after_each": seen, "temporary_files_left": left}
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        pytest.param("enotdir", "results folder .* cannot be written", id="enotdir"),
        pytest.param("enospc", "results folder .* cannot be written", id="enospc"),
        # room for the up-front check (4 KiB), not for the pictures: the task fails when it writes them
        pytest.param("enospc-late", r"writing results to .* failed \(cannot write .*annotated\.jpg", id="enospc-late"),
    ],
)
def test_unusable_results_folder_fails_the_task_clearly_and_leaves_kafka_and_postgres_intact(
    env: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, expected: str, request: pytest.FixtureRequest
) -> None:
    """An unusable results folder fails the task with ``ResultsFolderError`` naming it and leaves the video
    ``processing`` (not ``failed``: the video is fine); a rerun with a good folder stores each frame once."""
    from crowd.jobs import DetectOptions, ResultsFolderError, detect_and_publish, finish_videos, plan_requested_video

    if kind == "enotdir":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        results = blocker / "results"  # every path under a regular file fails with ENOTDIR, even for root
    else:
        results = request.getfixturevalue("small_tmpfs")(free=8192 if kind == "enospc-late" else 0)
    monkeypatch.setenv("CROWD_RESULTS_DIR", str(results))
    settings = env["settings"]()
    video = long_face_video(env["root"] / "clip.mp4", repeats=1)
    (item,) = plan_requested_video(str(video), settings)
    options = DetectOptions(frame_interval=3)

    with pytest.raises(ResultsFolderError, match=expected) as failure:
        detect_and_publish(item, options, settings)
    error = failure.value
    status, reason = _status(item.video_id)
    # the folder is at fault, not the video: neither done nor failed, so the retry (or the next scan) processes it
    assert status == "processing", (status, reason)

    # PostgreSQL and Kafka are intact: what reached the topic drains cleanly, and a rerun with a usable folder
    # completes the video with each frame stored once.
    monkeypatch.setenv("CROWD_RESULTS_DIR", str(tmp_path / "good-results"))
    settings = env["settings"]()
    rerun = detect_and_publish(item, options, settings)
    assert finish_videos([item], [rerun], settings)["done"] == [item.video_id]
    summary = drain("kafka_default", "crowd_postgres", env["topic"], "rel-results", batch_wait_s=0.2, idle_timeout_s=3)
    counts = pg_counts()
    assert counts["frames"] == counts["consistent_frames"] == 40 and counts["rejected"] == 0, counts
    if kind == "enospc-late":  # the failed task had published every frame (delivered before it failed)
        assert summary.messages == 80, "the failed task's messages were not all delivered before it failed"
    else:
        assert summary.messages == 40, "the failed task published before failing"
    assert counts["offsets"] == summary.messages
    report(f"fault-6 results folder {kind}", {
        "task_error": f"{type(error).__name__}: {str(error)[:240]}", "status_after_failure": status,
        "messages_in_topic": summary.messages, "frames_stored": counts["frames"], "expected_frames": 40,
        "lost": 40 - counts["frames"], "inconsistent": counts["frames"] - counts["consistent_frames"],
    })  # fmt: skip
