"""crowd.jobs.find_new_videos reads each video file whole once: later scans know it by its size, times and inode."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crowd import storage
from crowd.config import load_settings
from crowd.video import content_hash
from tests.crowd._helpers import CARPHONE, write_clip

pytestmark = pytest.mark.services


@pytest.fixture
def scan(pg_schema, video_root: Path, monkeypatch: pytest.MonkeyPatch):
    """``scan()``: run the scan; returns ({file name: video id planned}, [names of the files hashed])."""
    from crowd import jobs

    hashed: list[str] = []

    def counting_hash(path, *args, **kwargs) -> str:
        hashed.append(Path(str(path)).name)  # str: the name of a crowd.video.PinnedFile
        return content_hash(path, *args, **kwargs)

    monkeypatch.setattr(jobs, "content_hash", counting_hash)

    def run() -> tuple[dict[str, str], list[str]]:
        hashed.clear()
        planned = {Path(item.path).name: item.video_id for item in jobs.find_new_videos()}
        return planned, sorted(hashed)

    return run


def _remembered() -> dict[str, str]:
    with storage.connect("crowd_postgres") as conn:
        return {Path(p).name: v for p, v in conn.execute("SELECT path, video_id FROM scanned_files")}


def test_a_file_is_hashed_once_until_it_changes(scan, video_root: Path) -> None:
    a = write_clip(CARPHONE, video_root / "a.mp4", 20)
    b = write_clip(CARPHONE, video_root / "b.mp4", 30)
    ids = {"a.mp4": content_hash(a), "b.mp4": content_hash(b)}

    assert scan() == (ids, ["a.mp4", "b.mp4"])
    assert scan() == (ids, []), "an unchanged file was read again"
    assert _remembered() == ids

    # b rewritten in place, same size, its modification time put back: the change time still tells
    stat = b.stat()
    data = bytearray(b.read_bytes())
    data[len(data) // 2] ^= 0xFF
    b.write_bytes(bytes(data))
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert b.stat().st_size == stat.st_size and b.stat().st_mtime_ns == stat.st_mtime_ns
    ids["b.mp4"] = content_hash(b)
    assert scan() == (ids, ["b.mp4"])

    # renamed: read once under its new name (same id), the old name forgotten; touched: read again, same id
    a.rename(video_root / "renamed.mp4")
    ids["renamed.mp4"] = ids.pop("a.mp4")
    assert scan() == (ids, ["renamed.mp4"])
    assert _remembered() == ids
    os.utime(video_root / "renamed.mp4")
    assert scan() == (ids, ["renamed.mp4"])

    # deleted: forgotten; a copy of known content elsewhere under the root: read, same id as its original
    b.unlink()
    (video_root / "sub").mkdir()
    shutil.copy(video_root / "renamed.mp4", video_root / "sub" / "copy.mp4")
    del ids["b.mp4"]
    planned, hashed = scan()
    assert hashed == ["copy.mp4"] and set(planned.values()) == {ids["renamed.mp4"]}  # one content, planned once
    assert _remembered() == {**ids, "copy.mp4": ids["renamed.mp4"]}


def test_video_files_are_found_whatever_the_case_of_their_suffix(scan, video_root: Path) -> None:
    names = ["a.mp4", "GOPR0001.MP4", "phone.Mp4"]  # cameras write .MP4
    for n, name in enumerate(names):
        write_clip(CARPHONE, video_root / name, 20 + n)
    (video_root / "notes.txt").write_text("not a video")
    (video_root / "mp4").mkdir()
    planned, hashed = scan()
    assert sorted(planned) == sorted(hashed) == sorted(names)


def test_a_root_that_is_gone_for_a_while_keeps_what_was_remembered_under_it(scan, video_root: Path) -> None:
    write_clip(CARPHONE, video_root / "a.mp4", 20)
    assert scan()[1] == ["a.mp4"]
    away = video_root.with_name(video_root.name + "-unmounted")
    video_root.rename(away)  # a share that is not mounted for one scan
    assert scan() == ({}, [])
    away.rename(video_root)
    planned, hashed = scan()
    assert list(planned) == ["a.mp4"] and hashed == [], "the file was read whole again after its root came back"


def test_a_scan_maps_no_more_tasks_than_airflow_allows(
    pg_schema, video_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Airflow fails a task returning more than ``[core] max_map_length`` items: a backlog must not stop every scan."""
    from crowd import jobs

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "7")
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "10")
    assert load_settings().max_tasks_per_run == 7  # (Airflow's configuration loaded before the logs are caught)
    clips = {
        name: write_clip(CARPHONE, video_root / name, frames)
        for name, frames in [("a.mp4", 28), ("b.mp4", 29), ("c.mp4", 30)]
    }

    def parts(items) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for item in items:
            out.setdefault(Path(item.path).name, []).append((item.start, item.stop))
        return out

    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        first = jobs.find_new_videos()
    assert parts(first) == {"a.mp4": [(0, 10), (10, 20), (20, 28)], "b.mp4": [(0, 10), (10, 20), (20, 29)]}
    assert "1 more new video(s) left for the next scan" in caplog.text
    with storage.connect("crowd_postgres") as conn:  # the first run's videos are over
        for item in first:
            storage.mark_video_failed(conn, item.video_id, item.path, "over")
    assert parts(jobs.find_new_videos()) == {"c.mp4": [(0, 10), (10, 20), (20, 30)]}

    # one video longer than 7 tasks alone: 7 longer parts, every frame in one of them
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "4")
    assert parts(jobs.find_new_videos()) == {"c.mp4": [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)]}
    manual = jobs.plan_requested_video(str(clips["c.mp4"]))
    assert [(i.start, i.stop, i.part, i.parts) for i in manual][-1] == (25, 30, 5, 6)


def test_a_processed_video_is_skipped_without_reading_it(scan, video_root: Path) -> None:
    video = write_clip(CARPHONE, video_root / "done.mp4", 20)
    assert scan() == ({"done.mp4": content_hash(video)}, ["done.mp4"])
    with storage.connect("crowd_postgres") as conn:
        storage.mark_video_failed(conn, content_hash(video), str(video), "recorded by the test")
        conn.commit()
    assert scan() == ({}, [])


def _latin1_copy(folder: Path) -> Path:
    """A copy of a video named ``latin1-café.mp4`` in Latin-1, as an old camera or share may write it."""
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/latin1-caf\xe9.mp4"))
    shutil.copy(CARPHONE, odd)
    return odd


def test_a_file_name_that_is_not_utf8_is_left_out_with_a_warning(scan, video_root: Path, caplog) -> None:
    """OpenCV's binding crashes the process (segmentation fault) on such a name and PostgreSQL text cannot hold
    it: the scan leaves the file out, saying why, and goes on with the others."""
    good = write_clip(CARPHONE, video_root / "good.mp4", 20)
    _latin1_copy(video_root)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        assert scan() == ({"good.mp4": content_hash(good)}, ["good.mp4"])
    assert "latin1-caf\\\\xe9.mp4': its name is not valid UTF-8: rename the file" in caplog.text


def test_a_manual_path_that_is_not_utf8_is_refused_with_the_reason(video_root: Path) -> None:
    from crowd.config import ConfigError, load_settings

    odd = _latin1_copy(video_root)
    with pytest.raises(ConfigError, match=r"latin1-caf\\\\xe9\.mp4' is not valid UTF-8: rename the file"):
        load_settings().check_video_path(odd)
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings().check_video_path(str(odd))


def test_opening_a_name_that_is_not_utf8_is_a_video_error_not_a_crash(tmp_path: Path) -> None:
    """In a child process: a segmentation fault there fails this test instead of ending the test run."""
    odd = _latin1_copy(tmp_path)
    code = (
        "import sys\nfrom crowd.video import BadFileNameError, probe_video\n"
        "try:\n    probe_video(sys.argv[1])\nexcept BadFileNameError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "plugins")}
    child = subprocess.run(
        [sys.executable, "-c", code, os.fsencode(odd)], env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert "latin1-caf\\\\xe9.mp4': its name is not valid UTF-8" in child.stdout, child.stdout


def _swap_for_symlink(video: Path, target: Path) -> None:
    """Replace ``video`` by a symlink to ``target`` in one rename, as an attacker writing in the root would."""
    swap = video.parent / ".swap"
    swap.symlink_to(target)
    swap.replace(video)


def test_no_transaction_is_left_open_while_files_are_hashed(scan, video_root: Path, monkeypatch) -> None:
    """Hashing a backlog takes minutes: the scan's connection must not sit "idle in transaction" meanwhile (it held
    back vacuum, kept the row lock of a video it had marked failed, and an idle-in-transaction timeout killed it)."""
    from crowd import jobs

    for name, frames in (("a.mp4", 8), ("b.mp4", 9)):
        write_clip(CARPHONE, video_root / name, frames)
    content_hash = jobs.content_hash
    seen: list[list] = []

    def hash_and_look(path, *args, **kwargs) -> str:
        with storage.connect("crowd_postgres") as conn:
            seen.append(conn.execute(
                "SELECT pid, left(query, 60) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
            ).fetchall())  # fmt: skip
        return content_hash(path, *args, **kwargs)

    monkeypatch.setattr(jobs, "content_hash", hash_and_look)
    assert len(jobs.find_new_videos()) == 2
    assert seen == [[], []]


def test_a_file_swapped_after_it_was_hashed_is_not_probed_outside_the_roots(scan, video_root: Path, tmp_path: Path,
                                                                            monkeypatch, caplog) -> None:  # fmt: skip
    """Replaced by a symlink leading outside the roots between its hashing and its planning: the outside video's
    metadata is not read (before, the frame count was probed by name: the outside video's 60 frames were split
    into 6 parts planned under the name inside)."""
    from crowd import jobs

    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "10")
    video = write_clip(CARPHONE, video_root / "camera.mp4", 8)
    secret = write_clip(CARPHONE, tmp_path / "secret.mp4", 60)
    identify_video = jobs.identify_video

    def identify_then_swap(*args, **kwargs):
        identified = identify_video(*args, **kwargs)
        _swap_for_symlink(video, secret)
        return identified

    monkeypatch.setattr(jobs, "identify_video", identify_then_swap)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        items = jobs.find_new_videos()
    assert [(Path(item.path).name, item.parts) for item in items] == [("camera.mp4", 1)]
    assert "camera.mp4 cannot be probed" in caplog.text and "outside the video roots" in caplog.text


def test_a_file_swapped_for_a_symlink_out_of_the_roots_is_not_hashed(scan, video_root: Path, tmp_path: Path,
                                                                     monkeypatch, caplog) -> None:  # fmt: skip
    """Replaced by a symlink leading outside the roots after the scan listed it: nothing outside is read (before,
    the file was hashed by name: the outside file was read and planned under the name inside)."""
    from crowd import jobs

    video = write_clip(CARPHONE, video_root / "camera.mp4", 12)
    secret = write_clip(CARPHONE, tmp_path / "secret.mp4", 20)
    list_videos = jobs.list_videos

    def list_then_swap(roots):
        listed = list_videos(roots)
        _swap_for_symlink(video, secret)
        return listed

    monkeypatch.setattr(jobs, "list_videos", list_then_swap)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        assert scan() == ({}, [])
    assert "camera.mp4" in caplog.text and "outside the video roots" in caplog.text
