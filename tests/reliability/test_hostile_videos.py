"""Hostile video files at the pipeline level: the scan's planning plus one detection task per work item.

One folder holds a good video next to ~20 kinds of bad files. The scan (``crowd.jobs.find_new_videos``, what
``crowd_video_scan`` runs) plans them, every work item runs ``crowd.jobs.detect_and_publish`` (what each mapped
task runs) and ``finish_videos`` closes the run. Each bad file must fail its own item with a clear reason in
``videos.error`` (or be left out of the plan with a logged reason), and the good videos must be published.
The same folder then goes through one ``dag.test()`` of ``crowd_video_scan`` (a mapped task per planned file).
Reader-level behaviour is in tests/crowd/test_video.py; this checks what reaches the registry and Kafka.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import psycopg
import pytest

from crowd import storage
from tests.crowd._helpers import CARPHONE, GRACE_HOPPER, read_frames, write_mp4_with_sound
from tests.reliability.conftest import report

pytestmark = [pytest.mark.services, pytest.mark.reliability]


def clip(dst: Path, frames: int, start: int = 0) -> Path:
    """Frames ``start``.. of carphone (a face in each) re-encoded with mp4v (moov at the end, like cv2 writes)."""
    cap = cv2.VideoCapture(str(CARPHONE))
    fps = cap.get(cv2.CAP_PROP_FPS)
    out = None
    index = 0
    while True:
        ok, image = cap.read()
        if not ok or index >= start + frames:
            break
        if index >= start:
            if out is None:
                out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (image.shape[1], image.shape[0]))
            out.write(image)
        index += 1
    assert out is not None
    out.release()
    cap.release()
    return dst


def patched(src: Path, dst: Path, patch) -> Path:
    raw = bytearray(src.read_bytes())
    patch(raw)
    dst.write_bytes(bytes(raw))
    return dst


def _box(raw: bytearray, kind: bytes) -> int:
    pos = raw.find(kind)
    assert pos > 0, kind
    return pos


def huge_dimensions(raw: bytearray) -> None:
    """Claim 65535x65535 in the track header and in the mp4v sample entry."""
    entry = _box(raw, b"mp4v")
    struct.pack_into(">HH", raw, entry + 28, 65535, 65535)
    tkhd = _box(raw, b"tkhd")
    size = struct.unpack_from(">I", raw, tkhd - 4)[0]
    struct.pack_into(">II", raw, tkhd - 4 + size - 8, 65535 << 16, 65535 << 16)


def zero_timescale(raw: bytearray) -> None:
    """Media timescale 0 in the track's mdhd (version 0): no frame rate can be derived."""
    mdhd = _box(raw, b"mdhd")
    struct.pack_into(">I", raw, mdhd + 16, 0)


def audio_only(raw: bytearray) -> None:
    """The only track relabelled as a sound track (handler 'soun', sample entry 'mp4a'): no video stream."""
    hdlr = _box(raw, b"hdlr")
    raw[hdlr + 12 : hdlr + 16] = b"soun"
    entry = _box(raw, b"mp4v")
    raw[entry : entry + 4] = b"mp4a"
    vmhd = _box(raw, b"vmhd")
    raw[vmhd : vmhd + 4] = b"smhd"


def garbage_middle(raw: bytearray) -> None:
    """Random bytes over the middle third of the media data."""
    rng = np.random.default_rng(7)
    a, b = len(raw) // 3, 2 * len(raw) // 3
    raw[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()


def image_bytes(ext: str) -> bytes:
    image = cv2.imread(str(GRACE_HOPPER))
    ok, buf = cv2.imencode(ext, cv2.resize(image, (64, 64)))
    assert ok
    return buf.tobytes()


def animated_gif(dst: Path) -> Path:
    """Ten carphone frames as an animated GIF (Pillow, which matplotlib brings): FFmpeg plays it as a 10 fps video."""
    from PIL import Image

    images = [Image.fromarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)) for f in read_frames(CARPHONE, 10, start=20)]
    images[0].save(dst, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return dst


def joined_recordings(dst: Path, tmp: Path) -> Path:
    """Two MPEG-TS recordings of 15 carphone frames at 30 fps (FFmpeg via PyAV), joined as ``cat a.ts b.ts > x.mp4``
    does: each has its own clock from 0, so the file's times go back to 0 at frame 15."""
    import av  # FFmpeg's encoders; a test dependency only

    parts = []
    for k, start in enumerate((70, 100)):
        part = tmp / f"recording-{k}.ts"
        with av.open(str(part), "w", format="mpegts") as out:
            stream = out.add_stream("libx264", rate=30, options={"bf": "0"})
            stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
            for i, image in enumerate(read_frames(CARPHONE, 15, start=start)):
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts = i
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        parts.append(part.read_bytes())
    dst.write_bytes(b"".join(parts))
    return dst


_OPENCV_REFUSES = r"not a video container \(OpenCV cannot open it, read 0 frames\)"
_NO_INDEX = r"an MP4 file without its index \(the moov box\): truncated, or still being written"

# name -> (file name, builder(root, tmp, good) -> path, expected) ; expected: ("failed", regex) | ("done", None)
# | ("unplanned", regex): left out of the scan's plan (and refused when given directly, the reason matching regex).
CASES: dict[str, tuple] = {
    "zero-bytes": (
        "zero.mp4",
        lambda r, t, g: _write(r / "zero.mp4", b""),
        ("unplanned", r"file is empty \(0 bytes\)"),
    ),  # skipped until it has content
    "text": (
        "notes.mp4",
        lambda r, t, g: _write(r / "notes.mp4", b"just some text\n" * 100),
        ("failed", _OPENCV_REFUSES),
    ),
    "png-renamed": (
        "png.mp4",
        lambda r, t, g: _write(r / "png.mp4", image_bytes(".png")),
        ("failed", r"not a video container \(it is a PNG image, not a video\)"),
    ),
    "jpeg-renamed": (
        "jpeg.mp4",
        lambda r, t, g: _write(r / "jpeg.mp4", image_bytes(".jpg")),
        ("failed", r"not a video container \(it is a JPEG image, not a video\)"),
    ),
    "animated-gif-renamed": (  # FFmpeg opens it and decodes its 10 frames: it was processed as a video
        "gif.mp4",
        lambda r, t, g: animated_gif(r / "gif.mp4"),
        ("failed", r"not a video container \(it is a GIF image, not a video\)"),
    ),
    "random-bytes": (
        "random.mp4",
        lambda r, t, g: _write(r / "random.mp4", np.random.default_rng(1).bytes(256 * 1024)),
        ("failed", _OPENCV_REFUSES),
    ),
    "ftyp-box-only": (
        "ftyp.mp4",
        lambda r, t, g: _write(r / "ftyp.mp4", struct.pack(">I", 24) + b"ftypisom\0\0\2\0isomiso2"),
        ("failed", _NO_INDEX),
    ),
    "truncated-to-2k": (
        "head.mp4",
        lambda r, t, g: _write(r / "head.mp4", g.read_bytes()[:2048]),
        ("failed", _NO_INDEX),
    ),
    "truncated-half": (
        "half.mp4",
        lambda r, t, g: _write(r / "half.mp4", g.read_bytes()[: g.stat().st_size // 2]),
        ("failed", _NO_INDEX),  # cv2 writes the index (moov) last: half a file has none
    ),
    "garbage-in-the-middle": (
        "garbage.mp4",
        lambda r, t, g: patched(g, r / "garbage.mp4", garbage_middle),
        ("failed", r"decoding stopped at frame 10 of about 30 \(0\.33 s of 1\.00 s\) \(truncated or corrupt data"),
    ),
    "huge-dimensions-header": (
        "huge.mp4",
        lambda r, t, g: patched(g, r / "huge.mp4", huge_dimensions),
        ("done", None),  # FFmpeg takes the frame size from the stream, not the container's claim: 176x144 frames
    ),
    "zero-fps": (
        "zerofps.mp4",
        lambda r, t, g: patched(g, r / "zerofps.mp4", zero_timescale),
        ("failed", r"decoding stopped at frame 1 of about 30 \(truncated or corrupt data\)"),  # FFmpeg decodes frame 0
    ),
    "audio-only": (
        "audio.mp4",
        lambda r, t, g: patched(g, r / "audio.mp4", audio_only),
        ("failed", r"no video track \(its tracks: sound\)"),
    ),
    "sound-only-aac": (  # made by FFmpeg (PyAV): an AAC tone in an MP4, like a voice memo
        "memo.mp4",
        lambda r, t, g: write_mp4_with_sound(r / "memo.mp4"),
        ("failed", r"no video track \(its tracks: sound\)"),
    ),
    "video-with-sound-track": (  # a camera recording: MPEG-4 video and an AAC track, made by FFmpeg (PyAV)
        "camera.mp4",
        lambda r, t, g: write_mp4_with_sound(
            r / "camera.mp4", read_frames(CARPHONE, 20, start=30), fps=15, seconds=1.5
        ),
        ("done", None),
    ),
    "joined-recordings": (  # two MPEG-TS recordings joined end to end: times back to 0 at frame 15
        "joined.mp4",
        lambda r, t, g: joined_recordings(r / "joined.mp4", t),
        ("done", None),
    ),
    "one-frame": ("one.mp4", lambda r, t, g: clip(r / "one.mp4", 1, start=50), ("done", None)),
    "unicode-and-spaces-name": (
        "café crowd ☃ 1.mp4",
        lambda r, t, g: clip(r / "café crowd ☃ 1.mp4", 12, start=60),
        ("done", None),
    ),
    "directory-named-mp4": ("dir.mp4", lambda r, t, g: _mkdir(r / "dir.mp4"), ("unplanned", "is not a regular file")),
    "symlink-out-of-roots": (
        "escape.mp4",
        lambda r, t, g: _symlink(r / "escape.mp4", clip(t / "outside.mp4", 5, start=90)),
        ("unplanned", r"resolves to '.*/outside\.mp4', outside the video roots"),
    ),
    "dangling-symlink": (
        "dangling.mp4",
        lambda r, t, g: _symlink(r / "dangling.mp4", r / "nowhere"),
        ("unplanned", "does not exist"),
    ),
    "symlink-loop": (
        "loop.mp4",
        lambda r, t, g: _symlink(r / "loop.mp4", r / "loop.mp4"),
        ("unplanned", "cannot be resolved: Symlink loop"),
    ),
    "fifo-named-mp4": ("fifo.mp4", lambda r, t, g: _mkfifo(r / "fifo.mp4"), ("unplanned", "is not a regular file")),
    "still-being-written": (
        "growing.mp4",
        lambda r, t, g: _write(r / "growing.mp4", g.read_bytes()[: int(g.stat().st_size * 0.4)]),
        ("failed", _NO_INDEX),  # once complete its hash changes and the next scan takes it
    ),
}


# The frames each planned file publishes (frame ids; every fps/3-th frame is sampled), and their size: the clips of
# carphone at 29.97 fps give frames 0, 9, 18, 27, the camera recording at 15 fps every 5th of its 20. A file not
# listed publishes nothing (refused when opened).
PUBLISHED: dict[str, list[int]] = {
    "garbage-in-the-middle": [0, 9],  # the frames before decoding stopped at frame 10
    "zero-fps": [0],  # FFmpeg decodes frame 0, then stops
    "huge-dimensions-header": [0, 9, 18, 27],  # 4 frames, at 176x144 (not the container's 65535x65535)
    "video-with-sound-track": [0, 5, 10, 15],  # the same frames as the video track alone (its 20, at 15 fps)
    "joined-recordings": [0, 10, 20],  # 30 frames at 30 fps
    "one-frame": [0],
    "unicode-and-spaces-name": [0, 9],  # 12 frames
}
FRAME_SIZE = (176, 144)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "inner.txt").write_text("x")
    return path


def _symlink(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@contextmanager
def pipeline_env(
    kafka_admin, postgres_admin_dsn: str, root: Path, results: Path, name: str
) -> Iterator[dict[str, str]]:
    """A fresh Faces topic and a fresh schema of the test database for one pipeline run, dropped afterwards.

    Sets (and yields) the environment that points crowd at them, at the video folder ``root`` and at ``results``;
    restored on exit.
    """
    from tests.conftest import create_topic

    topic = create_topic(kafka_admin, f"rel-{name}-{uuid.uuid4().hex[:8]}")
    schema = f"rel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    conn_json = {
        "conn_type": "postgres", "host": "127.0.0.1", "port": int(os.environ.get("CROWD_PG_PORT", "5433")),
        "login": "crowd", "password": os.environ.get("CROWD_PG_PASSWORD", "crowd"), "schema": "crowd_test",
        "extra": {"options": f"-csearch_path={schema}"},
    }  # fmt: skip
    env = {
        "AIRFLOW_CONN_CROWD_POSTGRES": json.dumps(conn_json), "CROWD_FACES_TOPIC": topic,
        "CROWD_VIDEO_ROOTS": str(root), "CROWD_RESULTS_DIR": str(results), "CROWD_DETECTOR": "mtcnn",
        "CROWD_PUBLISH_TIMEOUT_S": "10", "CROWD_SCAN_MIN_AGE_S": "0",
    }  # fmt: skip
    try:
        with pytest.MonkeyPatch.context() as mp:
            for variable, value in env.items():
                mp.setenv(variable, value)
            yield env
    finally:
        kafka_admin.delete_topics([topic])
        with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="module")
def hostile_run(kafka_admin, postgres_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Build the folder, run scan -> detect_and_publish per item -> finish_videos once; yield the outcomes."""
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "videos"
    root.mkdir()
    good = clip(root / "good.mp4", 30)
    paths = {name: build(root, tmp, good) for name, (_, build, _) in CASES.items()}
    with pipeline_env(kafka_admin, postgres_admin_dsn, root, tmp / "results", "hostile") as env:
        from crowd.config import load_settings
        from crowd.jobs import DetectOptions, WorkItem, detect_and_publish, find_new_videos, finish_videos

        settings = load_settings()
        scan: dict = {}

        def run_scan() -> None:  # a FIFO or a loop must not hang the scan: bounded by a join timeout
            try:
                scan["items"] = find_new_videos(settings)
            except BaseException as exc:  # noqa: BLE001
                scan["error"] = exc

        thread = threading.Thread(target=run_scan, daemon=True)
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), "the scan hangs on one of the hostile files"
        assert "error" not in scan, f"one hostile file broke the whole scan: {scan['error']!r}"
        items = scan["items"]
        outcomes: dict[str, object] = {}
        results = []
        for item in items:
            try:
                result = detect_and_publish(item, DetectOptions(), settings)
                results.append(result)
                outcomes[item.path] = result
            except Exception as exc:  # noqa: BLE001 - each item fails on its own
                results.append(None)
                outcomes[item.path] = exc
        finish = finish_videos(items, results, settings)
        direct: dict[str, object] = {}  # unplanned files handed to a task directly (a crafted work item)
        for name, (_, _, (kind, _)) in CASES.items():
            if kind == "unplanned":
                try:
                    detect_and_publish(WorkItem(str(paths[name]), f"direct-{name}"), DetectOptions(), settings)
                    direct[name] = "accepted"
                except Exception as exc:  # noqa: BLE001
                    direct[name] = exc
        with storage.connect("crowd_postgres") as conn:
            rows = {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT path, status, error, id FROM videos")}
            ids = {r[0]: r[1] for r in conn.execute("SELECT path, id FROM videos")}
        from tests.dags.test_detection_dags import _consume_all

        bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
        keys: dict[str, int] = {}
        published: dict[str, list[dict]] = {}  # video id -> its messages, in topic order
        for m in _consume_all(env["CROWD_FACES_TOPIC"], bootstrap):
            keys[m.key().decode()] = keys.get(m.key().decode(), 0) + 1
            published.setdefault(m.key().decode(), []).append(json.loads(m.value()))
        yield {
            "root": root, "paths": paths, "good": good, "items": items, "outcomes": outcomes, "rows": rows, "ids": ids,
            "keys": keys, "published": published, "finish": finish, "direct": direct,
        }  # fmt: skip
        if os.path.exists(root / "fifo.mp4"):
            os.unlink(root / "fifo.mp4")


def _row(run: dict, path: Path) -> tuple | None:
    return run["rows"].get(str(path)) or run["rows"].get(str(path.resolve()))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_fails_alone_with_a_clear_reason(hostile_run: dict, name: str) -> None:
    """Each file ends as RELIABILITY.md says: left out of the plan, failed with its reason, or done; and publishes
    exactly the frames listed in ``PUBLISHED`` (none when refused when opened), each once, at the stream's size."""
    import re

    _, _, (kind, reason) = CASES[name]
    path = hostile_run["paths"][name]
    planned = [i for i in hostile_run["items"] if Path(i.path) == path]
    if kind == "unplanned":
        assert not planned, f"{name} should not be planned: {planned}"
        outcome = hostile_run["direct"][name]
        assert isinstance(outcome, Exception), f"a task given {name} directly accepted it"
        assert re.search(reason, str(outcome), re.I), str(outcome)
        return
    assert planned, f"{name} was not planned at all"
    row = _row(hostile_run, path)
    assert row is not None, f"no videos row for {name}"
    status, error, video_id = row
    published = hostile_run["published"].get(video_id, [])
    assert [m["frame_id"] for m in published] == PUBLISHED.get(name, []), [m["frame_id"] for m in published]
    assert all((m["frame_width"], m["frame_height"]) == FRAME_SIZE for m in published), published[:1]
    if name == "video-with-sound-track":  # the video track's own frames and times (15 fps), as without sound
        assert [m["frame_ts_ms"] for m in published] == pytest.approx([i * 1000 / 15 for i in (0, 5, 10, 15)])
    if name == "joined-recordings":  # frame 20 (the second recording's 6th) after frame 10: the times go on
        assert [m["frame_ts_ms"] for m in published] == pytest.approx([i * 1000 / 30 for i in (0, 10, 20)], abs=0.01)
    if kind == "done":
        assert status == "done", (status, error)
        return
    outcome = hostile_run["outcomes"][str(path)]
    assert isinstance(outcome, Exception), f"{name} was processed: {outcome}"
    assert status == "failed", (status, error)
    assert error and path.name in error and re.search(reason, error.replace(str(path), ""), re.I), error


def test_the_good_video_next_to_them_is_published_and_done(hostile_run: dict) -> None:
    status, error, video_id = _row(hostile_run, hostile_run["good"])
    assert status == "done", error
    published = hostile_run["outcomes"][str(hostile_run["good"])]
    assert hostile_run["keys"][video_id] == published["messages"] == published["frames"] == 4  # frames 0, 9, 18, 27
    report("hostile videos (pipeline level)", {
        "files": len(CASES) + 1, "planned_items": len(hostile_run["items"]),
        "failed": sorted(Path(s).name for s, (st, _, _) in hostile_run["rows"].items() if st == "failed"),
        "done": sorted(Path(s).name for s, (st, _, _) in hostile_run["rows"].items() if st == "done"),
        "unplanned": sorted(n for n, c in CASES.items() if c[2][0] == "unplanned"),
        "messages_per_video": {Path(s).name: hostile_run["keys"].get(r[2], 0) for s, r in hostile_run["rows"].items()},
        "errors": {Path(s).name: (r[1] or "")[:160] for s, r in hostile_run["rows"].items() if r[1]},
    })  # fmt: skip


def test_unreadable_file(kafka_admin, postgres_admin_dsn: str, tmp_path: Path) -> None:
    """A video no one may read (mode 000) next to a good one, in a process file modes apply to (also as root).

    The scan plans the good video and leaves the locked one out with the reason in its log; a task given the
    locked file directly fails with "permission denied" naming it; once the file is readable, the next scan
    plans it: nothing is lost.
    """
    import ast

    from tests.crowd._helpers import call_where_file_modes_apply

    root = tmp_path / "videos"
    root.mkdir()
    good, locked = clip(root / "good.mp4", 10), clip(root / "locked.mp4", 10, start=40)
    locked.chmod(0)
    setup = f"""
import logging
from crowd.jobs import DetectOptions, WorkItem, detect_and_publish, find_new_videos

logging.basicConfig(level=logging.INFO, force=True)  # the scan's log lines to stderr, read below

def scan_then_direct():
    planned = sorted({{item.path for item in find_new_videos()}})
    try:
        detect_and_publish(WorkItem({str(locked)!r}, "direct-locked"), DetectOptions())
        return planned, "accepted"
    except Exception as exc:
        return planned, f"{{type(exc).__name__}}: {{exc}}"
"""
    with pipeline_env(kafka_admin, postgres_admin_dsn, root, tmp_path / "results", "locked") as env:
        outcome = call_where_file_modes_apply(setup, "scan_then_direct()", env=env)
        assert "returned" in outcome, outcome
        planned, direct = ast.literal_eval(outcome["returned"])
        assert planned == [str(good)], planned
        log = outcome["log"]
        assert f"cannot read {locked}" in log and "permission denied" in log, log[-2000:]
        assert "permission denied" in direct and str(locked) in direct, direct

        locked.chmod(0o644)
        from crowd.jobs import find_new_videos

        assert {item.path for item in find_new_videos()} == {str(good), str(locked)}


@pytest.mark.airflow
@pytest.mark.slow
def test_the_scan_dag_over_the_hostile_folder(kafka_admin, postgres_admin_dsn: str, airflow_db, tmp_path: Path) -> None:
    """The same folder through one ``dag.test()`` of ``crowd_video_scan``: one mapped task per planned file.

    Each bad file fails its own mapped task (no retry: ``AirflowFailException``), labelled with its file name,
    while the good videos' tasks succeed; ``finish_videos`` still runs (the good videos are ``done``) and fails the
    run; the registry and the topic hold what the ``crowd.jobs`` run above found.
    """
    import re

    from crowd.messages import FaceMessage
    from tests.dags.test_detection_dags import _consume_all, _dag

    root = tmp_path / "videos"
    root.mkdir()
    good = clip(root / "good.mp4", 30)
    paths = {name: build(root, tmp_path, good) for name, (_, build, _) in CASES.items()}
    expected = {name: kind for name, (_, _, (kind, _)) in CASES.items()}
    with pipeline_env(kafka_admin, postgres_admin_dsn, root, tmp_path / "results", "scan-dag") as env:
        try:
            run = _dag("crowd_video_scan").test()
        finally:
            os.unlink(root / "fifo.mp4")
        tasks = {(ti.task_id, ti.rendered_map_index): str(ti.state) for ti in run.get_task_instances()}
        tries = {ti.rendered_map_index: ti.try_number for ti in run.get_task_instances()
                 if ti.task_id == "detect_and_publish"}  # fmt: skip
        with storage.connect("crowd_postgres") as conn:
            rows = {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT path, status, error, id FROM videos")}
        bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
        published: dict[str, list[int]] = {}  # frame ids per video, in publish order
        for m in _consume_all(env["CROWD_FACES_TOPIC"], bootstrap):
            message = FaceMessage.from_json(m.value())
            assert m.key().decode() == message.video_id, (m.key(), message.video_id)
            published.setdefault(message.video_id, []).append(message.frame_id)

    detect = {label: state for (task, label), state in tasks.items() if task == "detect_and_publish"}
    planned = {name for name, kind in expected.items() if kind != "unplanned"}
    want = {CASES[name][0]: ("failed" if expected[name] == "failed" else "success") for name in planned}
    assert detect == {**want, "good.mp4": "success"}, detect  # labels are the file names: one task each
    assert set(tries.values()) == {1}, f"retried (a bad file must fail at once, a good one pass at once): {tries}"
    assert tasks[("finish_videos", None)] == "failed" and str(run.state) == "failed", tasks

    for name in planned | {"good"}:
        path = good if name == "good" else paths[name]
        status, error, video_id = rows[str(path)]
        # exactly the frames the crowd.jobs run above published (none when refused when opened), each once
        frames = [0, 9, 18, 27] if name == "good" else PUBLISHED.get(name, [])
        assert published.get(video_id, []) == frames, (name, published.get(video_id))
        if name == "good" or expected[name] == "done":
            assert status == "done", (name, status, error)
        else:
            assert status == "failed" and path.name in error, (name, status, error)
            assert re.search(CASES[name][2][1], error.replace(str(path), ""), re.I), error
    assert set(published) <= {rows[str(p)][2] for p in [good, *(paths[n] for n in planned)]}, "another video's frames"
    assert len(rows) == len(planned) + 1  # the unplanned files left no trace in the registry
    report("hostile videos (scan DAG, dag.test)", {
        "mapped_tasks": len(detect), "failed": sorted(k for k, v in detect.items() if v == "failed"),
        "success": sorted(k for k, v in detect.items() if v == "success"),
        "messages": sum(len(ids) for ids in published.values()),
    })  # fmt: skip
