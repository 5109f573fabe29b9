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


@pytest.fixture
def airflow_logging() -> None:
    """Airflow loaded before the test's logs are caught: loading it sets up its logging, which drops pytest's
    handler (a test checking a warning then passes only after another test loaded Airflow)."""
    import airflow.configuration  # noqa: F401


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


@pytest.mark.parametrize("left_behind", ["nothing", "empty-mount-point"])
def test_a_root_that_is_gone_for_a_while_keeps_what_was_remembered_under_it(
    scan, video_root: Path, left_behind: str
) -> None:
    write_clip(CARPHONE, video_root / "a.mp4", 20)
    assert scan()[1] == ["a.mp4"]
    away = video_root.with_name(video_root.name + "-unmounted")
    video_root.rename(away)  # a share that is not mounted for one scan
    if left_behind == "empty-mount-point":  # its mount point stays, an empty folder
        video_root.mkdir()
    assert scan() == ({}, [])
    if left_behind == "empty-mount-point":
        video_root.rmdir()
    away.rename(video_root)
    planned, hashed = scan()
    assert list(planned) == ["a.mp4"] and hashed == [], "the file was read whole again after its root came back"


def test_a_scan_maps_no_more_tasks_than_airflow_allows(
    pg_schema, airflow_logging, video_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
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
    # a run's JSON conf can spell a lone surrogate, which no file name's bytes decode to: UnicodeEncodeError, and
    # the task retried on a traceback
    with pytest.raises(ConfigError, match=r"x\\\\ud800\.mp4' is not valid UTF-8"):
        load_settings().check_video_path(str(video_root / "x\ud800.mp4"))


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

    def list_then_swap(roots, **kwargs):
        listed = list_videos(roots, **kwargs)
        _swap_for_symlink(video, secret)
        return listed

    monkeypatch.setattr(jobs, "list_videos", list_then_swap)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        assert scan() == ({}, [])
    assert "camera.mp4" in caplog.text and "outside the video roots" in caplog.text


def _aged(video: Path, age_s: float) -> Path:
    """``video`` with its modification time put ``age_s`` seconds in the past (as if recorded then)."""
    when = video.stat().st_mtime - age_s
    os.utime(video, (when, when))
    return video


def _parts(items) -> dict[str, int]:
    return {Path(item.path).name: item.parts for item in items}


def _over(items) -> None:
    """The run that got ``items`` is over with them (a stand-in for done: the scan skips failed content too)."""
    with storage.connect("crowd_postgres") as conn:
        for item in items:
            storage.mark_video_failed(conn, item.video_id, item.path, "over")


def test_a_long_video_is_not_deferred_for_ever_by_newer_ones(
    pg_schema, airflow_logging, video_root: Path, monkeypatch, caplog
) -> None:
    """A run maps at most max_map_length tasks. A camera adds a short clip before each scan, under names that sort
    before an older upload needing more room: the upload must get its turn (before, candidates went in path order
    and a video that did not fit was skipped while the smaller ones after it filled the run: it waited for ever)."""
    from crowd import jobs

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "4")
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "10")
    assert load_settings().max_tasks_per_run == 4
    _aged(write_clip(CARPHONE, video_root / "uploads-long.mp4", 30), 1000)  # 3 tasks, there first
    planned_in: dict[str, int] = {}
    for scan in range(1, 4):  # one clip (2 tasks) per scan period, newer than everything before it
        _aged(write_clip(CARPHONE, video_root / f"cam-{scan:03d}.mp4", 10 + scan), 1000 - scan)
        with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
            items = jobs.find_new_videos()
        assert len(items) <= 4
        for name in _parts(items):
            planned_in.setdefault(name, scan)
        _over(items)
    assert planned_in.get("uploads-long.mp4") == 1, f"the oldest video was deferred: {planned_in}"
    assert planned_in == {"uploads-long.mp4": 1, "cam-001.mp4": 2, "cam-002.mp4": 2, "cam-003.mp4": 3}
    assert "cam-001.mp4 needs 2 task(s) and this run has 3 of the 4 a run maps" in caplog.text


def test_a_video_that_does_not_fit_is_not_overtaken_by_smaller_newer_ones(
    pg_schema, airflow_logging, video_root: Path, monkeypatch, caplog
) -> None:
    """The first video that does not fit ends the run's planning: it is planned first by the next scan. A smaller,
    newer video after it waits too (before, it filled the run in its place, and the next such one again)."""
    from crowd import jobs

    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "4")
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "10")
    assert load_settings().max_tasks_per_run == 4
    for age, (name, frames) in zip((300, 200, 100), [("a.mp4", 20), ("b.mp4", 30), ("c.mp4", 8)], strict=True):
        _aged(write_clip(CARPHONE, video_root / name, frames), age)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        first = jobs.find_new_videos()
    assert _parts(first) == {"a.mp4": 2}, "a newer video overtook one that did not fit"
    assert "1 more new video(s) left for the next scan, and 1 new or changed file(s) not read yet" in caplog.text
    assert "b.mp4 needs 3 task(s) and this run has 2 of the 4 a run maps" in caplog.text
    _over(first)
    assert _parts(jobs.find_new_videos()) == {"b.mp4": 3, "c.mp4": 1}


class _Stopped(BaseException):
    """What stops a scan task from outside: Airflow's execution timeout (``AirflowTaskTimeout``), a kill."""


def _backlog(video_root: Path, count: int) -> list[str]:
    """``count`` new videos ``v0.mp4``... (distinct contents), the oldest first in name order."""
    names = [f"v{n}.mp4" for n in range(count)]
    for n, name in enumerate(names):
        _aged(write_clip(CARPHONE, video_root / name, 8 + n), 100 - n)
    return names


def test_a_scan_stopped_while_hashing_keeps_the_hashes_it_computed(scan, video_root: Path, monkeypatch) -> None:
    """A backlog takes longer to hash than the scan's execution timeout: each try must keep what it read, so the
    next one goes on from there (before, the hashes were stored at the end only: every try read the same files
    again and was stopped again, for ever)."""
    from crowd import jobs

    names = _backlog(video_root, 5)
    counting = jobs.content_hash  # the scan fixture's
    calls: list[str] = []

    def stopped_on_the_fourth(path, *args, **kwargs) -> str:
        calls.append(Path(str(path)).name)
        if len(calls) == 4:
            raise _Stopped("execution timeout while hashing the fourth file")
        return counting(path, *args, **kwargs)

    monkeypatch.setattr(jobs, "content_hash", stopped_on_the_fourth)
    with pytest.raises(_Stopped):
        jobs.find_new_videos()
    assert sorted(_remembered()) == names[:3], "the hashes computed before the scan was stopped were lost"
    monkeypatch.setattr(jobs, "content_hash", counting)
    planned, hashed = scan()
    assert hashed == names[3:] and sorted(planned) == names
    assert sorted(_remembered()) == names


def test_a_full_run_reads_no_more_new_files(scan, airflow_logging, video_root: Path, monkeypatch, caplog) -> None:
    """Once the run has as many tasks as it maps, the other new files are left unread for the next scans (before,
    the whole backlog was hashed at every scan for a run that could take one video of it)."""
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "1")
    assert load_settings().max_tasks_per_run == 1
    names = _backlog(video_root, 4)
    with caplog.at_level(logging.WARNING, logger="crowd.jobs"):
        planned, hashed = scan()
    assert (list(planned), hashed) == (names[:1], names[:1]), "files were read for a run that was full"
    assert "0 more new video(s) left for the next scan, and 3 new or changed file(s) not read yet" in caplog.text
    assert "this run has 1 tasks, the most a run maps" in caplog.text
    with storage.connect("crowd_postgres") as conn:  # the first run is over with it
        storage.mark_video_failed(conn, planned["v0.mp4"], str(video_root / "v0.mp4"), "over")
    planned, hashed = scan()
    assert (list(planned), hashed) == (names[1:2], names[1:2])


def test_a_folder_that_cannot_be_entered_leaves_out_its_videos_only(tmp_path: Path) -> None:
    """A folder that can be listed but not entered (mode 0644) raised PermissionError from the check of its first
    video, which stopped the scan of every video under every root, at every scan. In a process file modes apply to."""
    from tests.crowd._helpers import call_where_file_modes_apply

    root = tmp_path / "videos"
    for folder, name in (("good", "a.mp4"), ("locked", "b.mp4")):
        (root / folder).mkdir(parents=True)
        write_clip(CARPHONE, root / folder / name, 12)
    (root / "locked").chmod(0o644)
    try:
        setup = f"from pathlib import Path\nfrom crowd.jobs import list_videos\nroot = Path({str(root)!r})\n"
        call = "(lambda gaps: ([p.name for p in list_videos([root], incomplete=gaps)], sorted(map(str, gaps))))(set())"
        outcome = call_where_file_modes_apply(setup, call)
    finally:
        (root / "locked").chmod(0o755)
    assert outcome.get("returned") == repr((["a.mp4"], [str(root)])), outcome  # b.mp4 left out, the root noted


def test_a_folder_moved_while_the_scan_walks_keeps_what_was_remembered_under_its_root(
    scan, video_root: Path, monkeypatch
) -> None:
    """A folder moved away after its parent was listed (an archive job) stopped the walk with FileNotFoundError:
    the scan failed. Its videos now wait for a later scan, and the hashes remembered under that root are kept."""
    from crowd import jobs

    for frames, folder in enumerate(("day1", "day2"), start=12):
        (video_root / folder).mkdir()
        write_clip(CARPHONE, video_root / folder / f"{folder}.mp4", frames)
    first, _ = scan()
    assert sorted(first) == ["day1.mp4", "day2.mp4"]
    moved: list[str] = []
    real_check = jobs.check_name

    def move_the_other_folder(path):  # while one folder is walked, the other one goes
        if not moved:
            other = "day2" if Path(path).parent.name == "day1" else "day1"
            (video_root / other).rename(video_root.parent / other)
            moved.append(other)
        return real_check(path)

    monkeypatch.setattr(jobs, "check_name", move_the_other_folder)
    planned, _ = scan()
    assert sorted(planned) == sorted(first.keys() - {f"{moved[0]}.mp4"})
    assert sorted(_remembered()) == ["day1.mp4", "day2.mp4"]  # the root was not read whole: nothing forgotten
