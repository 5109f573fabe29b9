"""A video file deleted, moved or made unreadable while its run is in progress: the run ends the video ``failed``
with a reason that names the path and says the file went away (before, it stayed ``processing`` for good: no scan
lists a file that is not there), what was published stays stored once, and a scan that finds the same content
again processes it again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crowd import storage
from crowd.jobs import (
    FILE_WENT_AWAY,
    DetectOptions,
    VideoUnreachableError,
    detect_and_publish,
    find_new_videos,
    finish_videos,
)
from tests.crowd._helpers import CARPHONE, write_clip

pytestmark = pytest.mark.services

OPTIONS = DetectOptions(frame_interval=10, model="mtcnn")
WENT_AWAY = FILE_WENT_AWAY  # how the reason starts


def _row(video_id: str) -> tuple[str | None, str | None]:
    with storage.connect("crowd_postgres") as conn:
        row = conn.execute("SELECT status, error FROM videos WHERE id = %s", (video_id,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _run(run_id: str) -> storage.RunStamp:
    return storage.RunStamp(run_id, datetime.now(UTC))


@contextmanager
def _after_messages(n: int, action: Callable[[], None]) -> Iterator[None]:
    """Within the block, run ``action`` once, right after a task handed its n-th message to Kafka (its reader is
    in the middle of the video then)."""
    from crowd import jobs

    original = jobs._Publisher.__call__

    def call(self, message) -> None:
        original(self, message)
        if self.sent == n:
            action()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs._Publisher, "__call__", call)
        yield


def _stored_frames(topic: str, video_id: str) -> list[int]:
    """Drain the topic into PostgreSQL (the real ingest) and return the video's stored frame ids, in order."""
    from crowd.ingest import drain

    drain("kafka_default", "crowd_postgres", topic, "vanished", batch_wait_s=0.2, idle_timeout_s=3)
    with storage.connect("crowd_postgres") as conn:
        rows = conn.execute("SELECT frame_id FROM frames WHERE video_id = %s ORDER BY frame_id", (video_id,))
        return [r[0] for r in rows]


def _vanish(how: str, video: Path) -> Path | None:
    """Make ``video`` go away; returns where it is now (None: nowhere)."""
    if how == "deleted":
        video.unlink()
        return None
    target = video.parent.parent / video.name if how == "moved-out-of-the-roots" else video.with_name("renamed.mp4")
    return video.rename(target)


@pytest.mark.parametrize(
    ("how", "when"),
    [
        pytest.param("deleted", "between-parts", id="deleted-between-parts"),
        pytest.param("moved-out-of-the-roots", "between-parts", id="moved-out-between-parts"),
        pytest.param("deleted", "while-part-1-decodes", id="deleted-while-part-1-decodes"),
        pytest.param("renamed", "while-part-1-decodes", id="renamed-while-part-1-decodes"),
    ],
)
def test_a_split_video_whose_file_goes_away_ends_failed_and_is_processed_again_when_found(
    how: str, when: str, pg_schema, faces_topic, video_root, monkeypatch
) -> None:
    """Part 1 of 2 publishes its frames (the file going away while it decodes does not stop it: it reads through
    the descriptor it opened), part 2 cannot open the file. The run ends the video failed, naming the path and
    saying the file went away; part 1's frames stay stored. A later scan that finds the same content (renamed in
    the roots, or put back) plans it again, and its frames are stored once each."""
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "30")
    video = write_clip(CARPHONE, video_root / "cam.mp4", 60)
    content = video.read_bytes()
    items = find_new_videos()
    assert [(i.start, i.stop) for i in items] == [(0, 30), (30, 60)]
    video_id = items[0].video_id
    run = _run("scheduled__1")
    if when == "while-part-1-decodes":
        with _after_messages(1, lambda: _vanish(how, video)):
            first = detect_and_publish(items[0], OPTIONS, run=run)
    else:
        first = detect_and_publish(items[0], OPTIONS, run=run)
        _vanish(how, video)
    assert not video.exists() and first["messages"] == 3  # frames 0, 10, 20, whatever happened to the file
    with pytest.raises(VideoUnreachableError, match="cannot be reached"):
        detect_and_publish(items[1], OPTIONS, run=run)

    outcome = finish_videos(items, [first, None], run=run)
    status, error = _row(video_id)
    assert status == "failed", f"the video stays {status!r} for good: {error}"
    assert error.startswith(WENT_AWAY) and repr(str(video)) in error and "1 of 2 part(s)" in error, error
    assert outcome["incomplete"] == outcome["gone"] == [video_id], outcome
    assert _stored_frames(faces_topic, video_id) == [0, 10, 20]  # what part 1 published is kept

    if how != "renamed":  # put back under another name in the roots (same content, same id)
        (video_root / "back.mp4").write_bytes(content)
    again = find_new_videos()
    assert [(i.video_id, i.part) for i in again] == [(video_id, 0), (video_id, 1)], "not planned again"
    run = _run("scheduled__2")
    results = [detect_and_publish(item, OPTIONS, run=run) for item in again]
    assert finish_videos(again, results, run=run)["done"] == [video_id]
    assert _row(video_id) == ("done", None)
    assert _stored_frames(faces_topic, video_id) == [0, 10, 20, 30, 40, 50]  # each once (primary key)


@pytest.mark.parametrize(
    ("how", "claimed"),
    [
        pytest.param("deleted", False, id="deleted-before-the-task"),
        pytest.param("moved-out-of-the-roots", False, id="moved-out-before-the-task"),
        pytest.param("deleted", True, id="deleted-before-a-retry"),
    ],
)
def test_a_video_whose_file_goes_away_before_its_task_ends_failed(
    how: str, claimed: bool, pg_schema, video_root, monkeypatch
) -> None:
    """Between the scan and the task (or between a try that claimed the video and its retry): every try fails
    (retried: the file may come back), and the run's last task records why instead of leaving no trace or a
    ``processing`` row. In Airflow the run fails saying so."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from crowd import tasks

    video = write_clip(CARPHONE, video_root / "cam.mp4", 12)
    (item,) = find_new_videos()
    run = _run("scheduled__1")
    if claimed:  # the first try claimed the video, then failed for a reason of its own (Kafka, say)
        with storage.connect("crowd_postgres") as conn:
            storage.mark_video_processing(conn, item.video_id, str(video), fps=None, frame_count=None, width=None,
                                          height=None, size_bytes=None, model="mtcnn", run=run)  # fmt: skip
            storage.note_video_reason(conn, item.video_id, run)
    _vanish(how, video)
    with pytest.raises(VideoUnreachableError):
        detect_and_publish(item, OPTIONS, run=run)

    context = {"params": {}, "dag_run": SimpleNamespace(run_id=run.run_id, start_date=run.started_at)}
    monkeypatch.setattr(tasks, "get_current_context", lambda: context)
    with pytest.raises(AirflowFailException) as failure:
        tasks.finish_videos.function([item.to_dict()], [None])
    status, error = _row(item.video_id)
    assert status == "failed", f"the video stays {status!r}: {error}"
    assert "1 video(s) not completed" in str(failure.value) and "1 of them failed: its file went" in str(failure.value)
    assert f"completed (see the failed detect_and_publish tasks): cam.mp4 ({item.video_id})" in str(failure.value)
    assert error.startswith(WENT_AWAY) and repr(str(video)) in error and "scheduled__1" in error, error
    assert "0 of 1 part(s)" in error, error
    assert find_new_videos() == []  # nowhere in the roots


def test_an_unreadable_file_ends_failed_and_is_processed_again_once_readable(
    pg_schema, faces_topic, video_root
) -> None:
    """Made unreadable (mode 000) between the scan and its task, in a process file modes apply to: failed, saying
    so; readable again, the next scan plans it (its change time moved: hashed again, the same id)."""
    from tests.crowd._helpers import call_where_file_modes_apply

    video = write_clip(CARPHONE, video_root / "locked.mp4", 12)
    (item,) = find_new_videos()
    video.chmod(0)
    setup = f"""
from datetime import datetime
from crowd import storage
from crowd.jobs import DetectOptions, WorkItem, detect_and_publish, finish_videos

item = WorkItem(**{item.to_dict()!r})
run = storage.RunStamp("scheduled__1", datetime.fromisoformat({datetime.now(UTC).isoformat()!r}))

def task_then_finish():
    try:
        detect_and_publish(item, DetectOptions(frame_interval=10, model="mtcnn"), run=run)
        return "published"
    except Exception as exc:
        return type(exc).__name__, finish_videos([item], [None], run=run)
"""
    outcome = call_where_file_modes_apply(setup, "task_then_finish()")
    assert "returned" in outcome, outcome
    assert "VideoUnreachableError" in outcome["returned"] and "'gone': ['" in outcome["returned"], outcome
    status, error = _row(item.video_id)
    assert status == "failed" and error.startswith(WENT_AWAY) and "permission denied" in error, error
    assert repr(str(video)) in error, error

    video.chmod(0o644)
    (again,) = find_new_videos()
    assert again.video_id == item.video_id
    assert detect_and_publish(again, OPTIONS, run=_run("scheduled__2"))["messages"] == 2


def test_a_video_published_whole_before_its_file_went_away_is_done(pg_schema, video_root) -> None:
    """Every part was published: the file is no longer needed, the video is done."""
    video = write_clip(CARPHONE, video_root / "cam.mp4", 12)
    (item,) = find_new_videos()
    run = _run("scheduled__1")
    result = detect_and_publish(item, OPTIONS, run=run)
    video.unlink()
    assert finish_videos([item], [result], run=run)["done"] == [item.video_id]
    assert _row(item.video_id) == ("done", None)


def test_other_failures_keep_their_status_and_reason(pg_schema, video_root, tmp_path) -> None:
    """A corrupt video keeps its reason (and stays skipped under any name) even if its file goes away before the
    run ends; a part that failed while its file is still there leaves the video to the next scan, as before."""
    from crowd.jobs import BadVideoError

    good = write_clip(CARPHONE, tmp_path / "good.mp4", 12)
    corrupt = video_root / "corrupt.mp4"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # no index: refused when opened
    there = write_clip(CARPHONE, video_root / "there.mp4", 10)
    items = find_new_videos()
    by_path = {Path(i.path): i for i in items}
    run = _run("scheduled__1")
    with pytest.raises(BadVideoError):
        detect_and_publish(by_path[corrupt], OPTIONS, run=run)
    with storage.connect("crowd_postgres") as conn:  # the other video's part claimed it, then failed on Kafka
        storage.mark_video_processing(conn, by_path[there].video_id, str(there), fps=None, frame_count=None,
                                      width=None, height=None, size_bytes=None, model="mtcnn", run=run)  # fmt: skip
        storage.note_video_reason(conn, by_path[there].video_id, run)
    content = corrupt.read_bytes()
    corrupt.unlink()

    outcome = finish_videos(items, [None, None], run=run)
    assert outcome["gone"] == [] and sorted(outcome["incomplete"]) == sorted(i.video_id for i in items), outcome
    status, error = _row(by_path[corrupt].video_id)
    assert status == "failed" and "MP4 file without its index" in error and WENT_AWAY not in error, error
    assert _row(by_path[there].video_id)[0] == "processing"
    (video_root / "corrupt-copy.mp4").write_bytes(content)
    assert [i.path for i in find_new_videos()] == [str(there)]  # the corrupt content stays skipped


def test_a_scan_does_not_plan_a_video_whose_file_went_away_until_it_is_found(pg_schema, video_root) -> None:
    """A failed 'went away' row of a content no longer in the roots: nothing to plan (and nothing is planned twice
    when two copies come back)."""
    video = write_clip(CARPHONE, video_root / "cam.mp4", 12)
    (item,) = find_new_videos()
    content = video.read_bytes()
    video.unlink()
    run = _run("scheduled__1")
    with pytest.raises(VideoUnreachableError):
        detect_and_publish(item, OPTIONS, run=run)
    assert finish_videos([item], [None], run=run)["gone"] == [item.video_id]
    assert find_new_videos() == []
    (video_root / "a.mp4").write_bytes(content)
    (video_root / "b.mp4").write_bytes(content)
    assert [(i.path, i.video_id) for i in find_new_videos()] == [(str(video_root / "a.mp4"), item.video_id)]


def _try_failing_on_kafka(item: object, run: storage.RunStamp) -> None:
    """One try of ``item`` whose publishing fails (the broker says no); the file is fine."""
    from crowd import jobs
    from crowd.kafka import PublishError

    def fail(*args: object, **kwargs: object) -> None:
        raise PublishError("the broker said no (simulated)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs, "_detect_and_publish", fail)
        with pytest.raises(PublishError):
            detect_and_publish(item, OPTIONS, run=run)  # type: ignore[arg-type]


def _part_two_fails_on_kafka(video: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, dict, storage.RunStamp]:
    """A two-part video: part 1 publishes, part 2's try fails on Kafka (the file is fine)."""
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "30")
    items = find_new_videos()
    run = _run("scheduled__kafka")
    first = detect_and_publish(items[0], OPTIONS, run=run)
    _try_failing_on_kafka(items[1], run)
    return items, first, run


@pytest.mark.parametrize("seen_from", ["root-unmounted", "other-roots"])
def test_a_finishing_worker_that_cannot_see_the_file_does_not_call_it_gone(
    pg_schema: str, faces_topic: str, video_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seen_from: str
) -> None:
    """A part failed on Kafka, the file is fine, and the worker finishing the run cannot see it (its share unmounted
    for a moment, other roots): the video was marked failed because its file "went away"."""
    from crowd.config import load_settings

    video = write_clip(CARPHONE, video_root / "cam.mp4", 60)
    items, first, run = _part_two_fails_on_kafka(video, monkeypatch)
    offline = video_root.with_name(video_root.name + ".offline")
    if seen_from == "other-roots":
        other = tmp_path / "other-mount"
        other.mkdir()
        (other / "someone-else.mp4").write_bytes(b"x")
        monkeypatch.setenv("CROWD_VIDEO_ROOTS", str(other))
    else:
        video_root.rename(offline)
    try:
        outcome = finish_videos(items, [first, None], load_settings(), run)
    finally:
        if seen_from != "other-roots":
            offline.rename(video_root)
    assert outcome["gone"] == [] and outcome["incomplete"] == [items[0].video_id], outcome
    assert _row(items[0].video_id)[0] == "processing", "a fine video was failed as gone"


def test_a_run_that_does_not_own_the_video_leaves_it_to_its_owner(
    pg_schema: str, faces_topic: str, video_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run X claims the video and waits for a retry (its try failed on Kafka: claim released); a manual run M of a
    copy that is deleted meanwhile finishes: it marked the video failed as gone, over X's live run (X's retry then
    published everything and found itself superseded)."""
    import shutil

    from crowd import jobs

    original = write_clip(CARPHONE, video_root / "cam.mp4", 12)
    copy = video_root / "upload" / "copy.mp4"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    x = _run("scheduled__X")
    x_items = [i for i in find_new_videos() if i.path == str(original)]
    _try_failing_on_kafka(x_items[0], x)
    m = _run("manual__M")
    m_items = jobs.plan_requested_video(str(copy))
    copy.unlink()
    with pytest.raises(VideoUnreachableError):
        detect_and_publish(m_items[0], OPTIONS, run=m)
    assert finish_videos(m_items, [None], run=m)["gone"] == []
    result = detect_and_publish(x_items[0], OPTIONS, run=x)  # X's retry
    assert finish_videos(x_items, [result], run=x)["done"] == [x_items[0].video_id]
    assert _row(x_items[0].video_id)[0] == "done"


def test_a_file_replaced_by_other_content_between_parts_ends_the_old_content_failed(
    pg_schema: str, faces_topic: str, video_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 2 finds other content under the path (a camera rewrote the file): it publishes nothing under the old
    id; the run ends the old content failed as gone (its file holds other content now), and the next scan plans
    the new content under its own id."""
    from crowd.jobs import VideoChangedError

    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "30")
    video = write_clip(CARPHONE, video_root / "cam.mp4", 60)
    items = find_new_videos()
    run = _run("scheduled__1")
    first = detect_and_publish(items[0], OPTIONS, run=run)
    write_clip(CARPHONE, video_root / "cam.mp4", 40)  # another recording under the same name
    with pytest.raises(VideoChangedError):
        detect_and_publish(items[1], OPTIONS, run=run)
    outcome = finish_videos(items, [first, None], run=run)
    status, error = _row(items[0].video_id)
    assert outcome["gone"] == [items[0].video_id] and status == "failed", (outcome, status, error)
    assert error.startswith(FILE_WENT_AWAY) and "holds other content now (size" in error, error
    again = find_new_videos()
    assert {i.video_id for i in again} != {items[0].video_id} and all(i.path == str(video) for i in again)
