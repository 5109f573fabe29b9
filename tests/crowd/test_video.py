from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from crowd import video as video_module
from crowd.messages import VIDEO_ID_PATTERN
from crowd.video import (
    BadFpsError,
    CorruptVideoError,
    EmptyVideoError,
    FrameReader,
    NotAVideoError,
    VideoArgumentError,
    VideoError,
    VideoErrorReason,
    VideoIsDirectoryError,
    VideoNotFoundError,
    VideoPermissionError,
    _info_from_capture,
    content_hash,
    frame_interval_for,
    live_source_id,
    probe_video,
    public_source,
    sampled_frame_ids,
    split_ranges,
)
from tests.crowd._helpers import (
    CARPHONE,
    _numbered,
    call_where_file_modes_apply,
    cut_mp4,
    drop_leading_packets,
    frame_index,
    read_frames,
    trim_mp4,
    write_mp4_with_sound,
    write_numbered,
    write_video,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 60)


@pytest.mark.parametrize(
    ("fps", "interval", "target", "expected"),
    [
        pytest.param(30.0, None, None, 10, id="seed-default-30fps"),
        pytest.param(29.97, None, None, 9, id="seed-default-29.97fps"),
        pytest.param(2.0, None, None, 1, id="slow-video-at-least-1"),
        pytest.param(30.0, 7, None, 7, id="explicit-interval"),
        pytest.param(30.0, None, 5.0, 6, id="target-fps"),
    ],
)
def test_frame_interval(fps: float, interval: int | None, target: float | None, expected: int) -> None:
    assert frame_interval_for(fps, interval, target) == expected


def test_bad_interval_rejected() -> None:
    with pytest.raises(ValueError, match="frame_interval=0"):
        frame_interval_for(30.0, 0)


def test_ranges_cover_every_sampled_frame_once() -> None:
    whole = list(sampled_frame_ids(1003, 7))
    parts = [i for a, b in split_ranges(1003, 100) for i in sampled_frame_ids(1003, 7, (a, b))]
    assert parts == whole
    assert whole[:3] == [0, 7, 14] and whole[-1] == 1001


def test_ranges_are_bounded_by_the_video_and_checked(clip: Path) -> None:
    assert split_ranges(2500, 1000) == [(0, 1000), (1000, 2000), (2000, 2500)]  # the last one ends at the video's end
    assert split_ranges(0, 10) == []
    with pytest.raises(ValueError, match="frames_per_task=0"):
        split_ranges(10, 0)
    assert list(sampled_frame_ids(30, 10, (5, 21))) == [10, 20]
    assert list(sampled_frame_ids(30, 10, (0, 100))) == [0, 10, 20]  # a stop past the end: to the end
    for bad in [(-1, 10), (10, 5)]:
        with pytest.raises(ValueError, match="0 <= start <= stop"):
            sampled_frame_ids(30, 10, bad)
        with pytest.raises(VideoArgumentError, match="0 <= start <= stop"):
            FrameReader(clip, frame_interval=10, frame_range=bad)
    reader = FrameReader(clip, frame_interval=10, frame_range=(0, 10_000))
    assert reader.expected_frames == len(list(reader)) == len(range(0, reader.info.frame_count, 10))


def test_reader_yields_sampled_ids_and_timestamps(clip: Path) -> None:
    reader = FrameReader(clip, frame_interval=7)
    frames = list(reader)
    assert [f.frame_id for f in frames] == list(range(0, 60, 7))
    assert [f.ts_ms for f in frames] == [pytest.approx(i * 1000 / 30, abs=1e-3) for i in range(0, 60, 7)]
    assert [frame_index(f.image) for f in frames] == [f.frame_id for f in frames]  # the right pixels, not just ids
    assert reader.error is None and not reader.stopped_early
    assert reader.expected_frames == len(frames)


def test_a_sound_track_beside_the_video_changes_nothing(clip: Path, tmp_path: Path) -> None:
    """Cameras record sound: the same frames re-encoded by FFmpeg with an AAC track give the same samples."""
    path = write_mp4_with_sound(tmp_path / "with-sound.mp4", read_frames(clip), seconds=2.5)
    assert probe_video(path).frame_count == 60
    frames = list(FrameReader(path, frame_interval=7))
    assert [f.frame_id for f in frames] == list(range(0, 60, 7))
    assert [frame_index(f.image) for f in frames] == [f.frame_id for f in frames]


def test_split_ranges_read_the_same_frames(clip: Path) -> None:
    parts = [FrameReader(clip, frame_interval=4, frame_range=r) for r in split_ranges(60, 25)]
    got = [(f.frame_id, frame_index(f.image)) for p in parts for f in p]
    assert [g[0] for g in got] == list(range(0, 60, 4))
    assert all(fid == idx for fid, idx in got)


def test_info_and_hash(clip: Path, tmp_path: Path) -> None:
    info = probe_video(CARPHONE)
    assert (info.width, info.height, info.frame_count) == (176, 144, 120)
    assert info.fps == pytest.approx(29.97, abs=0.01) and info.duration_s == pytest.approx(4.004, abs=0.01)
    copy = tmp_path / "renamed.mp4"
    copy.write_bytes(clip.read_bytes())
    assert content_hash(copy) == content_hash(clip) == hashlib.sha256(clip.read_bytes()).hexdigest()[:32]
    assert content_hash(clip, chunk_size=1000) == content_hash(clip)  # read in many chunks: the same digest
    copy.write_bytes(clip.read_bytes() + b"x")
    assert content_hash(copy) != content_hash(clip)


def test_an_index_claiming_billions_of_frames_is_not_expanded(clip: Path, tmp_path: Path) -> None:
    """One damaged count in the MP4 index (stts: 2^31-1 samples, 4 bytes changed; OpenCV still opens the file):
    the probe expanded it into per-frame arrays, a MemoryError (16 GiB) that stopped every scan of the folder, or
    the kernel's OOM killer. Now the index is not used when its tables disagree (stsz lists 60 samples): the probe
    answers, and reading ends with the file named as corrupt after its 60 frames. Run under a 3 GiB address-space
    limit, so the old code fails here instead of taking the machine's memory."""
    import resource
    import struct
    import subprocess
    import sys

    data = bytearray(clip.read_bytes())
    at = data.find(b"stts")
    assert struct.unpack_from(">II", data, at + 8) == (1, 60)  # one entry: 60 samples
    struct.pack_into(">I", data, at + 12, 2**31 - 1)
    damaged = tmp_path / "damaged-index.mp4"
    damaged.write_bytes(bytes(data))
    code = (
        "import sys; from crowd.video import FrameReader, probe_video\n"
        "info = probe_video(sys.argv[1]); reader = FrameReader(sys.argv[1], frame_interval=1)\n"
        "print(info.constant_rate, info.index_duration_s, len(list(reader)), type(reader.error).__name__)"
    )

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    plugins = str(Path(__file__).resolve().parents[2] / "plugins")
    run = subprocess.run(
        [sys.executable, "-c", code, str(damaged)],
        capture_output=True, text=True, timeout=120, preexec_fn=limit_memory, env={**os.environ, "PYTHONPATH": plugins},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "None", "60", "CorruptVideoError"]


def _bad(kind: str, tmp: Path, clip: Path) -> Path:
    p = tmp / "x.mp4"
    good = clip.read_bytes()
    if kind == "missing":
        return tmp / "nope.mp4"
    if kind == "zero":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("hello, I am not a video\n" * 20)
    elif kind == "png":
        cv2.imwrite(str(tmp / "a.png"), np.zeros((40, 40, 3), np.uint8))
        p.write_bytes((tmp / "a.png").read_bytes())
    elif kind == "directory":
        p.mkdir()
    elif kind == "truncated-mp4":
        p.write_bytes(good[: len(good) // 2])
    elif kind == "sound-only":
        write_mp4_with_sound(p)
    elif kind == "unreadable":
        p.write_bytes(good)
        p.chmod(0)
    return p


@pytest.mark.parametrize(
    ("kind", "error", "text"),
    [
        pytest.param("missing", VideoNotFoundError, "no such file", id="missing"),
        pytest.param("zero", EmptyVideoError, "0 bytes", id="zero-bytes"),
        pytest.param("text", NotAVideoError, "not a video container", id="text-file"),
        pytest.param("png", NotAVideoError, "PNG image", id="png-renamed-mp4"),
        pytest.param("directory", VideoIsDirectoryError, "is a directory", id="directory-named-mp4"),
        pytest.param("truncated-mp4", NotAVideoError, "MP4 file without its index", id="truncated-mp4-moov-lost"),
        pytest.param("sound-only", NotAVideoError, r"no video track \(its tracks: sound\)", id="sound-only-mp4"),
        pytest.param("unreadable", VideoPermissionError, "permission denied", id="unreadable-perms"),
    ],
)
def test_bad_inputs(kind: str, error: type[VideoError], text: str, tmp_path: Path, clip: Path) -> None:
    path = _bad(kind, tmp_path, clip)
    if kind == "unreadable":  # in a child process that file modes apply to, also when the tests run as root
        outcome = call_where_file_modes_apply("from crowd.video import FrameReader", f"FrameReader({str(path)!r})")
        assert outcome.get("raised") == error.__name__, outcome
        assert re.search(text, outcome["message"]) and str(path) in outcome["message"], outcome
        return
    with pytest.raises(error, match=text) as info:
        FrameReader(path)
    assert str(path) in str(info.value) and isinstance(info.value.reason, VideoErrorReason)


def _write_gif(path: Path, frames: int) -> Path:
    """An animated GIF (Pillow, which matplotlib brings) of ``frames`` numbered frames, 10 per second."""
    from PIL import Image

    images = [Image.fromarray(_numbered(i, 160, 120)) for i in range(frames)]  # black and white: RGB = BGR
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def test_an_animated_gif_named_mp4_is_refused_like_other_images(tmp_path: Path) -> None:
    """FFmpeg plays an animated GIF as a video: OpenCV opens it, counts its frames and decodes them, so a GIF
    renamed ``.mp4`` was processed as a video while a PNG or JPEG renamed so was refused. An image is now refused
    by its first bytes, whatever OpenCV makes of it."""
    path = _write_gif(tmp_path / "animation.mp4", 12)
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:  # what made it pass for a video
        assert cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 12 and cap.get(cv2.CAP_PROP_FPS) == 10
        decoded = [frame_index(cap.read()[1]) for _ in range(12)]
        assert decoded == list(range(12))
    finally:
        cap.release()
    for call in (probe_video, FrameReader):
        with pytest.raises(NotAVideoError, match=r"not a video container \(it is a GIF image, not a video\)") as info:
            call(path)
        assert str(path) in str(info.value) and info.value.reason is VideoErrorReason.NOT_VIDEO


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        pytest.param(b"GIF89a\x10\x00\x10\x00", "a GIF image", id="gif89a"),
        pytest.param(b"GIF87a\x10\x00\x10\x00", "a GIF image", id="gif87a"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", "a PNG image", id="png"),
        pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF", "a JPEG image", id="jpeg"),
        pytest.param(b"BM6\x0c\x00\x00\x00\x00\x00\x00", "a BMP image", id="bmp"),
        # a QuickTime file may start with its media data: 'BM' there is the first half of a ~1.1 GB box's size
        pytest.param(b"BMx\x00mdat\x00\x00", None, id="mdat-box-of-0x424dxxxx-bytes"),
        pytest.param(b"GIF8\x00\x00\x00\x00\x00\x00", None, id="not-a-whole-gif-signature"),
        pytest.param(b"\x00\x00\x00\x18ftypisom", None, id="mp4"),
    ],
)
def test_images_are_known_by_their_whole_signature(head: bytes, kind: str | None, tmp_path: Path) -> None:
    """The image check runs on every file before OpenCV does: a video must never be taken for an image."""
    path = tmp_path / "x.mp4"
    path.write_bytes(head + bytes(100))
    assert video_module._image_kind(path) == (kind and f"it is {kind}, not a video")


def _box(kind: bytes, payload: bytes = b"", *, size: int | None = None) -> bytes:
    return struct.pack(">I4s", len(payload) + 8 if size is None else size, kind) + payload


_FTYP = _box(b"ftyp", b"isom\0\0\2\0isomiso2")
_SOUND_HANDLER = _box(b"hdlr", bytes(4) + bytes(4) + b"soun" + bytes(12) + b"SoundHandler\0")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        pytest.param(_FTYP + _box(b"free", size=4), "box structure is damaged", id="box-size-below-8"),
        pytest.param(_FTYP + _box(b"mdat", bytes(100), size=10_000), "without its index", id="mdat-past-the-end"),
        pytest.param(
            _FTYP + struct.pack(">I4sQ", 1, b"free", 16 + 50) + bytes(50) + _box(b"moov", size=0) + _SOUND_HANDLER,
            r"no video track \(its tracks: sound\)",
            id="64-bit-box-size-then-moov-to-the-end",
        ),
        pytest.param(_FTYP + _box(b"moov", _box(b"mvhd", bytes(100))), r"\(its tracks: none\)", id="index-no-tracks"),
    ],
)
def test_unplayable_mp4_says_why_from_its_boxes(data: bytes, text: str, tmp_path: Path) -> None:
    path = tmp_path / "crafted.mp4"
    path.write_bytes(data)
    with pytest.raises(NotAVideoError, match=text):
        probe_video(path)


@pytest.mark.parametrize(
    ("fourcc", "ext", "damage"),
    [
        pytest.param("mp4v", "mp4", "garbage", id="mp4-garbage-in-middle"),
        pytest.param("MJPG", "avi", "garbage", id="avi-garbage-in-middle"),
        pytest.param("MJPG", "avi", "truncate", id="avi-truncated"),
    ],
)
def test_corrupt_middle_yields_frames_before_it(fourcc: str, ext: str, damage: str, tmp_path: Path) -> None:
    good = write_video(tmp_path / f"good.{ext}", 60, fourcc=fourcc).read_bytes()
    bad = tmp_path / f"bad.{ext}"
    if damage == "truncate":
        bad.write_bytes(good[: len(good) // 2])
    else:
        mid = len(good) // 2
        junk = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        bad.write_bytes(good[:mid] + (bytes(3000) if fourcc == "MJPG" else junk) + good[mid + 3000 :])
    reader = FrameReader(bad, frame_interval=1)
    frames = list(reader)
    assert 10 < len(frames) < 60
    assert [f.frame_id for f in frames] == list(range(len(frames)))
    assert isinstance(reader.error, CorruptVideoError) and reader.stopped_early
    assert reader.error.frame_id == len(frames) and "bad." in str(reader.error)
    with pytest.raises(CorruptVideoError, match="decoding stopped at frame"):
        list(FrameReader(bad, frame_interval=1, raise_on_error=True))


@pytest.mark.parametrize("cut", [100, 1000], ids=["100-bytes", "1000-bytes"])
def test_an_mp4_whose_index_is_cut_short_says_so(cut: int, tmp_path: Path) -> None:
    """A camera file (index last) copied partway: 'not a video container (read 0 frames)', 'OpenCV cannot open
    it' or 'no video track (its tracks: none)' by where the cut fell, never the cause."""
    full = write_numbered(tmp_path / "full.mp4", [round(i * 1000 / 30) for i in range(30)])
    data = full.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat")  # the index last, as cameras write it
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:-cut])
    with pytest.raises(NotAVideoError, match=r"index \(the moov box\) is cut short: truncated"):
        probe_video(path)


def test_file_cut_after_the_probe_fails_with_the_reason(clip: Path, tmp_path: Path) -> None:
    """The file changes between the probe (constructor) and the read (iteration): the reader says why."""
    path = tmp_path / "replaced.mp4"
    path.write_bytes(clip.read_bytes())
    reader = FrameReader(path, frame_interval=5, raise_on_error=True)
    path.write_bytes(clip.read_bytes()[:4096])
    with pytest.raises(NotAVideoError, match="MP4 file without its index"):
        list(reader)


class _FakeCap:
    def __init__(self, fps: float, w: int, h: int) -> None:
        self.values = {cv2.CAP_PROP_FPS: fps, cv2.CAP_PROP_FRAME_COUNT: 10, cv2.CAP_PROP_FRAME_WIDTH: w,
                       cv2.CAP_PROP_FRAME_HEIGHT: h}  # fmt: skip

    def get(self, prop: int) -> float:
        return self.values[prop]


@pytest.mark.parametrize(
    ("fps", "w", "h", "error"),
    [
        pytest.param(0.0, 640, 480, BadFpsError, id="fps-zero"),
        pytest.param(-5.0, 640, 480, BadFpsError, id="fps-negative"),
        pytest.param(5000.0, 640, 480, BadFpsError, id="fps-absurd"),
        pytest.param(25.0, 0, 480, VideoError, id="width-zero"),
        pytest.param(25.0, 9000, 480, VideoError, id="width-absurd"),
    ],
)
def test_absurd_metadata(fps: float, w: int, h: int, error: type[VideoError]) -> None:
    with pytest.raises(error, match="m.mp4"):
        _info_from_capture("m.mp4", _FakeCap(fps, w, h), live=False)  # type: ignore[arg-type]


def test_reader_prepares_frames_on_its_thread(clip: Path) -> None:
    import threading

    seen_threads: set[str] = set()

    def prepare(image: np.ndarray) -> int:
        seen_threads.add(threading.current_thread().name)
        return frame_index(image)

    frames = list(FrameReader(clip, frame_interval=7, prepare=prepare))
    assert [f.prepared for f in frames] == [f.frame_id for f in frames]
    assert threading.current_thread().name not in seen_threads and len(seen_threads) == 1


def test_reader_prepare_failure_leaves_prepared_empty(clip: Path) -> None:
    def prepare(image: np.ndarray) -> int:
        if frame_index(image) == 14:
            raise ValueError("boom")
        return 1

    frames = list(FrameReader(clip, frame_interval=7, prepare=prepare))
    assert [f.frame_id for f in frames] == list(range(0, 60, 7))  # a failing prepare loses no frame
    assert [f.prepared for f in frames] == [None if f.frame_id == 14 else 1 for f in frames]


def _phone_like_pts(n: int, seed: int = 0) -> list[int]:
    """Presentation times (ms) of a phone recording at 30 fps that drops to 15 fps now and then (VFR)."""
    steps = np.where(np.random.default_rng(seed).random(n) < 0.3, 66, 33)
    return [0, *np.cumsum(steps[:-1]).tolist()]


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    pts = _phone_like_pts(240)
    return write_numbered(tmp_path_factory.mktemp("vfr") / "phone-vfr.mp4", pts), pts


def test_split_vfr_video_parts_carry_the_right_pictures(vfr_clip: tuple[Path, list[int]]) -> None:
    """OpenCV seeks by time (frame n -> n / average fps): in a VFR video a part would start on another frame."""
    path, pts = vfr_clip
    parts = [FrameReader(path, frame_interval=10, frame_range=r) for r in split_ranges(240, 60)]
    got = [f for part in parts for f in part]
    assert all(part.error is None for part in parts)
    assert [f.frame_id for f in got] == list(range(0, 240, 10))
    assert [frame_index(f.image) for f in got] == [f.frame_id for f in got]  # the picture of that decode index
    assert [f.ts_ms for f in got] == [pytest.approx(pts[f.frame_id], abs=1) for f in got]  # real times
    assert not probe_video(path).constant_rate  # so the scan does not split it


def test_cfr_h264_parts_seek_and_match_the_whole_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_numbered(tmp_path / "cfr.mp4", [round(i * 1000 / 30) for i in range(150)])
    assert probe_video(path).constant_rate
    whole = [(f.frame_id, frame_index(f.image), f.ts_ms) for f in FrameReader(path, frame_interval=7)]
    with caplog.at_level("INFO", logger="crowd.video"):
        parts = [(f.frame_id, frame_index(f.image), f.ts_ms)
                 for r in split_ranges(150, 40) for f in FrameReader(path, frame_interval=7, frame_range=r)]  # fmt: skip
    assert parts == whole and [w[1] for w in whole] == list(range(0, 150, 7))
    assert "walking" not in caplog.text and "reading from the start" not in caplog.text  # the seek fast path


def test_vfr_timestamps_are_presentation_times(vfr_clip: tuple[Path, list[int]]) -> None:
    path, pts = vfr_clip
    frames = list(FrameReader(path, frame_interval=30))
    assert [f.ts_ms for f in frames] == [pytest.approx(pts[i], abs=1) for i in range(0, 240, 30)]
    assert frames[3].ts_ms > 90 * 1000 / 30 + 500  # the nominal time would be 3000 ms


def test_trimmed_mp4_with_an_edit_list_is_read_to_its_end(tmp_path: Path) -> None:
    """``ffmpeg -ss 2 -c copy`` (or a phone's Trim) keeps hidden frames: the container counts 150, 90 are shown."""
    full = write_numbered(tmp_path / "full.mp4", [round(i * 1000 / 30) for i in range(150)])
    path = trim_mp4(full, tmp_path / "trimmed.mp4", 2000)
    reader = FrameReader(path, frame_interval=10)
    frames = list(reader)
    assert reader.error is None, reader.error
    assert reader.info.frame_count == 90  # from the index's edit list: parts are planned over shown frames only
    assert [f.frame_id for f in frames] == list(range(0, 90, 10))
    assert [frame_index(f.image) for f in frames] == [60 + f.frame_id for f in frames]  # decode index 0 = shown first
    assert frames[1].ts_ms == pytest.approx(333, abs=1)


def test_an_mp4_cut_by_several_edits_is_read_whole(tmp_path: Path) -> None:
    """A cut-editing tool keeps the samples and lists the windows shown: 120 listed, 101 shown (it was reported
    corrupt, 'decoding stopped at frame 101 of about 120', and the video marked failed)."""
    full = write_numbered(tmp_path / "full.mp4", [round(i * 1000 / 30) for i in range(120)])
    path = cut_mp4(full, tmp_path / "cut.mp4", [(0, 51), (70, 50)])  # frames 51-69 cut out
    reader = FrameReader(path, frame_interval=1)
    frames = list(reader)
    assert reader.error is None, reader.error
    shown = list(range(51)) + list(range(70, 120))
    assert [frame_index(f.image) for f in frames] == shown
    assert [f.frame_id for f in frames] == list(range(101))
    assert reader.info.frame_count == 101 and not reader.info.constant_rate  # an estimate, read whole (not split)
    assert reader.info.exact_frame_count is None


def test_vfr_matroska_named_mp4_ends_cleanly(tmp_path: Path) -> None:
    """Matroska has no frame count: FFmpeg's duration x the 30 fps rate says 238 frames; 120 exist."""
    pts = [round(i * 1000 / 30) for i in range(60)] + [2000 + 100 * k for k in range(60)]
    path = write_numbered(tmp_path / "vfr-mkv.mp4", pts, fmt="matroska")
    reader = FrameReader(path, frame_interval=1)
    frames = list(reader)
    assert reader.error is None, reader.error
    assert [frame_index(f.image) for f in frames] == list(range(120))
    assert frames[-1].ts_ms == pytest.approx(7900, abs=1)
    assert reader.info.frame_count > 150 and not reader.info.constant_rate  # an estimate; not split


def test_a_count_estimated_too_low_does_not_cut_the_video_short(tmp_path: Path) -> None:
    """Matroska again, faster than its nominal 30 fps for most of it: FFmpeg's duration x rate says ~120 frames;
    300 exist. Outside an MP4 index the count is an estimate, so a whole read (or the one work item the plan makes
    of it) goes on to where decoding ends; until the review of session 15 both stopped at the estimate and the
    last 180 frames were never read, without an error."""
    from crowd.config import Settings
    from crowd.jobs import WorkItem, plan_video

    pts = [round(i * 1000 / 30) for i in range(60)] + [2000 + round(k * 1000 / 120) for k in range(240)]
    path = write_numbered(tmp_path / "fast-mkv.mp4", pts, fmt="matroska")
    reader = FrameReader(path, frame_interval=7)
    frames = list(reader)
    assert reader.info.frame_count < 150 and reader.info.exact_frame_count is None, reader.info
    assert reader.error is None and reader.stop_frame is None, reader.error
    assert [f.frame_id for f in frames] == list(range(0, 300, 7))
    assert [frame_index(f.image) for f in frames] == [f.frame_id % 256 for f in frames]  # 8 stripes: 8 bits
    assert frames[-1].ts_ms == pytest.approx(pts[294], abs=1)
    assert plan_video(path, "v", Settings(video_roots=(tmp_path,))) == [WorkItem(str(path), "v")]


def test_raw_h264_stream_named_mp4_is_read_to_its_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A DVR export: an H.264 elementary stream, no container; FFmpeg gives a nonsense count (about -1.9e14)."""
    path = write_numbered(tmp_path / "dvr.mp4", range(80), fmt="h264")
    info = probe_video(path)
    assert info.frame_count is None
    reader = FrameReader(path, frame_interval=10)
    with caplog.at_level("WARNING", logger="crowd.video"):
        frames = list(reader)
    assert "times go back" not in caplog.text  # every frame's time is 0 (none): nominal times, not a jump back
    assert reader.error is None and reader.expected_frames is None
    assert [frame_index(f.image) for f in frames] == [f.frame_id for f in frames] == list(range(0, 80, 10))
    assert [f.ts_ms for f in frames] == [pytest.approx(i * 1000 / info.fps) for i in range(0, 80, 10)]  # nominal


def _recording(path: Path, start_ms: int, frames: int) -> Path:
    """An MPEG-TS recording (as cameras and DVRs write; FFmpeg via PyAV) of ``frames`` numbered frames at 30 fps,
    its times from ``start_ms``; no B-frames, so its first frame's time is ``start_ms`` exactly."""
    return write_numbered(path, [start_ms + round(i * 1000 / 30) for i in range(frames)], fmt="mpegts", b_frames=0)


def _joined(tmp: Path, recordings: tuple[tuple[int, int], ...]) -> Path:
    """``cat a.ts b.ts ... > joined.mp4`` of recordings ``(start_ms, frames)``, each with its own clock."""
    parts = [_recording(tmp / f"part{i}.ts", start, n).read_bytes() for i, (start, n) in enumerate(recordings)]
    path = tmp / "joined.mp4"
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize(
    "recordings",
    [
        pytest.param(((0, 30), (0, 45)), id="second-starts-at-0-again"),
        pytest.param(((0, 30), (967, 45)), id="second-starts-at-the-first-s-last-time"),  # equal times
        pytest.param(((2000, 30), (0, 45)), id="second-starts-before-the-first"),  # before the file's start: < 0
        pytest.param(((0, 30), (0, 45), (0, 30)), id="three-recordings"),
    ],
)
def test_recordings_joined_end_to_end_keep_their_times_increasing(
    recordings: tuple[tuple[int, int], ...], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recordings joined end to end (``cat a.ts b.ts > x.mp4``), each with its own clock: the file's times go back
    where the next one starts. Frames were given those times as they were (frame 31 at 33 ms, after frame 29 at
    967 ms), so a span (latest time minus earliest) came out wrong. Now each recording continues one frame after the
    previous one's last frame, at its own pace, with one warning naming the first frame whose time went back."""
    path = _joined(tmp_path, recordings)
    with caplog.at_level("WARNING", logger="crowd.video"):
        reader = FrameReader(path, frame_interval=1)
        frames = list(reader)
    assert reader.error is None, reader.error
    counts = [n for _, n in recordings]
    assert [frame_index(f.image) for f in frames] == [i for n in counts for i in range(n)]  # every frame, in order
    ts = [f.ts_ms for f in frames]
    assert all(a < b for a, b in zip(ts, ts[1:], strict=False)), ts
    firsts = [sum(counts[:k]) for k in range(len(counts))]
    for first, n in zip(firsts, counts, strict=True):
        own = [round(i * 1000 / 30) for i in range(n)]  # each recording's frames, as far apart as in the file
        # (a recording's first frame at 0 reads as "no time", put one nominal frame on: 33.333, not 33, ms apart)
        assert [t - ts[first] for t in ts[first : first + n]] == [pytest.approx(t, abs=0.5) for t in own]
        if first:  # one frame after the previous recording's last frame
            assert ts[first] == pytest.approx(ts[first - 1] + 1000 / 30, abs=0.01)
    assert ts[-1] - ts[0] == pytest.approx((len(frames) - 1) * 1000 / 30, abs=len(counts))  # (times in whole ms)
    warnings = [r.getMessage() for r in caplog.records if "times go back" in r.getMessage()]
    # the first frame whose time goes back: the second recording's first, or its second when the first is at 0
    jumped = 31 if recordings[1][0] == 0 and recordings[0][0] == 0 else 30
    assert len(warnings) == 1 and f"frame {jumped} is at" in warnings[0], warnings
    assert f"not after frame {jumped - 1} at" in warnings[0], warnings


def test_a_lone_frame_without_a_time_moves_no_other_frame(caplog: pytest.LogCaptureFixture) -> None:
    """OpenCV reads a frame without a time (no pts) as 0: taken as a time, it was a jump back of the whole time
    so far, and every later frame moved on by it. It is put one frame after the previous one, the rest as they are."""
    clock = video_module._FrameClock("v.mp4", 30.0)
    with caplog.at_level("WARNING", logger="crowd.video"):
        got = [clock.ts_ms(i, t) for i, t in enumerate([0.0, 33.0, 67.0, 0.0, 133.0, 167.0])]
    assert got == pytest.approx([0.0, 33.0, 67.0, 100.333, 133.0, 167.0], abs=0.001)
    assert "times go back" not in caplog.text


def test_parts_of_joined_recordings_give_the_whole_read_s_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A range walks from frame 0 (not a constant-rate MP4: no seek) and meets the same jumps as a whole read,
    also those between the frames it samples: each frame gets the same time, whichever part reads it."""
    path = _joined(tmp_path, ((0, 30), (0, 45), (0, 30)))
    whole = {f.frame_id: f.ts_ms for f in FrameReader(path, frame_interval=1)}
    assert len(whole) == 105
    for interval in (1, 7):
        for ranges in ([(0, 20), (20, 40), (40, 80), (80, None)], [(31, 76), (76, None)]):
            got = {
                f.frame_id: f.ts_ms for r in ranges for f in FrameReader(path, frame_interval=interval, frame_range=r)
            }
            first = ranges[0][0]
            assert sorted(got) == list(range(-(-first // interval) * interval, 105, interval)), (interval, ranges)
            assert got == {i: whole[i] for i in got}, (interval, ranges)
    caplog.clear()
    with caplog.at_level("WARNING", logger="crowd.video"):  # a recording alone: its own times, no warning
        alone = [f.ts_ms for f in FrameReader(_recording(tmp_path / "alone.ts", 500, 30), frame_interval=1)]
    assert alone == [pytest.approx(round(i * 1000 / 30), abs=0.01) for i in range(30)]
    assert "times go back" not in caplog.text


def test_an_mp4_cut_without_its_first_keyframe_is_read_from_its_first_decodable_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A recording cut mid-GOP: its first 25 frames refer to a keyframe that is not in the file, and the decoder
    starts at the next keyframe. The reader numbered that frame 0 (every id 25 off its time) and failed the video as
    corrupt short of the index's count (210 of 235), at any interval. Now the frames are numbered as the index lists
    them, the undecodable ones are named in the log, and parts and intervals read the same frames as a whole read."""
    whole = write_numbered(
        tmp_path / "whole.mp4", [round(i * 1000 / 30) for i in range(240)], gop=30, b_frames=0, scene_cuts=False
    )
    cut = drop_leading_packets(whole, tmp_path / "cut.mp4", 5)  # file frame i shows frame i + 5 of the recording
    assert probe_video(cut).exact_frame_count == 235

    def read(**kwargs) -> list:
        reader = FrameReader(cut, **kwargs)
        frames = list(reader)
        assert reader.error is None, reader.error
        assert [frame_index(f.image) for f in frames] == [f.frame_id + 5 for f in frames]
        assert [f.ts_ms for f in frames] == [pytest.approx(f.frame_id * 1000 / 30, abs=1) for f in frames]
        return [f.frame_id for f in frames]

    with caplog.at_level("WARNING", logger="crowd.video"):
        assert read(frame_interval=1) == list(range(25, 235))
        assert "the first 25 frames cannot be decoded" in caplog.text
        assert read(frame_interval=10) == list(range(30, 235, 10))
        caplog.clear()
        assert read(frame_interval=1, frame_range=(0, 120)) + read(frame_interval=1, frame_range=(120, None)) == list(
            range(25, 235)
        )
        assert read(frame_interval=1, frame_range=(0, 20)) == []  # a part wholly before the first keyframe
    # the part at 120 seeks (OpenCV counts frames from the first it decoded): it read every part from frame 0
    assert "reading from the start instead" not in caplog.text


@pytest.mark.parametrize(("dropped", "first"), [(9, 21), (2, 28)])
def test_an_mp4_with_b_frames_cut_in_decode_order_is_numbered_by_its_index(
    tmp_path: Path, dropped: int, first: int
) -> None:
    """B-frames cut in decode order leave holes among the first frames' times, so the index's frame rate is not
    constant: the first decodable frame was numbered 0 (every id off) and the video failed as corrupt. Its number
    comes from the index's frame times."""
    whole = write_numbered(
        tmp_path / "whole.mp4", [round(i * 1000 / 30) for i in range(90)], gop=30, b_frames=3, scene_cuts=False
    )
    cut = drop_leading_packets(whole, tmp_path / "cut.mp4", dropped)
    info = probe_video(cut)
    assert not info.constant_rate  # the holes: read whole, no seek
    reader = FrameReader(cut, frame_interval=1)
    frames = list(reader)
    assert reader.error is None, reader.error
    assert frames[0].frame_id == first and [f.frame_id for f in frames] == list(range(first, info.frame_count))
    shift = {frame_index(f.image) - f.frame_id for f in frames}  # the recording's frame each one shows
    assert len(shift) == 1, shift


def test_edits_are_counted_as_a_pass_over_each_would(tmp_path: Path) -> None:
    """Each edit's frames are counted by binary search (a pass over every frame per edit: 8M frames and 10,000
    edits took minutes in the probe of a 1 MB file); too many edits are not read at all."""
    rng = np.random.default_rng(7)
    pts = rng.permutation(np.arange(0, 30_000, 3, dtype=np.int64))
    edits = [(int(rng.integers(0, 3000)), int(rng.integers(-100, 31_000))) for _ in range(200)] + [(0, 29_000)]
    timing = video_module._edited_timing(pts, edits, 1000, 600)
    brute = 0
    for length, start in edits:
        stop = start + length * 1000 / 600 if length else np.inf
        brute += int(np.count_nonzero((pts >= start) & (pts < stop)))
    assert timing.frames == brute > 0

    full = write_numbered(tmp_path / "full.mp4", [round(i * 1000 / 30) for i in range(120)])
    index = video_module._moov(cut_mp4(full, tmp_path / "cut.mp4", [(k * 10, 5) for k in range(12)]))
    assert video_module._mp4_timing(index) is not None
    original = video_module.MAX_EDITS
    try:
        video_module.MAX_EDITS = 11
        assert video_module._mp4_timing(index) is None  # not read: FFmpeg's estimate, the file read whole
    finally:
        video_module.MAX_EDITS = original


def test_truncated_h264_mp4_still_reports_where_it_stopped(tmp_path: Path) -> None:
    """The index is first (faststart) and complete, the data is cut: a real truncation, not a loose count."""
    fast = write_numbered(tmp_path / "fast.mp4", [round(i * 1000 / 30) for i in range(150)], movflags="faststart")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(fast.read_bytes()[: fast.stat().st_size * 2 // 3])
    reader = FrameReader(cut, frame_interval=1)
    frames = list(reader)
    assert 20 < len(frames) < 140
    assert isinstance(reader.error, CorruptVideoError) and reader.error.frame_id == len(frames)
    assert "decoding stopped at frame" in str(reader.error)  # a guard: the loose count must not hide this


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        pytest.param("rtsp://admin:secret@10.0.0.5:554/stream1", "rtsp://10.0.0.5:554/stream1", id="credentials"),
        pytest.param("rtsp://admin@10.0.0.5/s", "rtsp://10.0.0.5/s", id="user-only"),
        pytest.param("http://cam.local/live", "http://cam.local/live", id="no-userinfo"),
        pytest.param("http://cam.local/video.cgi?user=admin&pwd=secret", "http://cam.local/video.cgi?...", id="query"),
        pytest.param(0, "0", id="camera-index"),
        pytest.param("/videos/a.mp4", "/videos/a.mp4", id="file"),
    ],
)
def test_a_live_source_gets_a_readable_id_and_is_shown_without_credentials(source: object, shown: str) -> None:
    """A live source's id was the URL itself: the API (ids in URL paths, no '/') could not read its frames, and a
    stream's password went into every message, row and log line."""
    assert public_source(source) == shown
    video_id = live_source_id(source, SESSION)
    assert re.fullmatch(VIDEO_ID_PATTERN, video_id) and video_id.startswith("live-")
    assert "secret" not in video_id
    assert video_id == live_source_id(str(source).replace("admin:secret@", "viewer:other@"), SESSION)
    assert "secret" not in str(NotAVideoError(source, "connection refused"))  # errors are printed and logged


SESSION = datetime(2026, 12, 5, 7, 30, 0, 123456, tzinfo=timezone.utc)


def test_streams_that_differ_in_their_query_get_other_ids() -> None:
    assert live_source_id("rtsp://cam/s?channel=1", SESSION) != live_source_id("rtsp://cam/s?channel=2", SESSION)
    assert public_source("rtsp://cam/s?channel=1") == public_source("rtsp://cam/s?channel=2") == "rtsp://cam/s?..."


def test_each_capture_session_of_a_live_source_is_a_video_of_its_own() -> None:
    """Frame ids of a live source start at 0 at every capture session: one id for the source had the second
    session's frames replace the first one's in storage (the same video and frame ids)."""
    first = live_source_id("rtsp://cam/s", SESSION)
    later = live_source_id("rtsp://cam/s", SESSION + timedelta(milliseconds=1))
    assert first != later and first.rsplit("-", 1)[0] == later.rsplit("-", 1)[0]  # one source, two sessions
    assert first.endswith("-20261205T073000.123Z") and re.fullmatch(VIDEO_ID_PATTERN, first)
    in_new_york = SESSION.astimezone(timezone(timedelta(hours=-5)))
    assert live_source_id("rtsp://cam/s", in_new_york) == first  # UTC whatever the host's zone


def test_a_fragmented_mp4_is_read_past_its_first_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``movflags=frag_keyframe`` (streaming cameras, MSE recorders) lists the first fragment's frames in the index
    and the rest in moof boxes after it: the index's count ended the read after 30 of 90 frames, reported as a
    complete video. A fragmented file's count is not exact: it is read to where decoding ends."""
    path = write_numbered(tmp_path / "frag.mp4", [round(i * 1000 / 30) for i in range(90)], movflags="frag_keyframe")
    assert path.read_bytes().count(b"moof") >= 3  # fragments after the index
    index_reads = []
    read_index = video_module._mp4_index
    monkeypatch.setattr(video_module, "_mp4_index", lambda p: index_reads.append(p) or read_index(p))
    info = probe_video(path)
    monkeypatch.undo()
    assert len(index_reads) == 1  # the index is read once, for its timing and the fragments' count
    assert info.exact_frame_count is None and not info.constant_rate  # not split either
    assert info.frame_count == 90  # counted in the fragments (FFmpeg says 4): progress and the end check use it
    reader = FrameReader(path, frame_interval=1)
    frames = list(reader)
    assert reader.error is None
    assert [f.frame_id for f in frames] == list(range(90))
    assert [frame_index(f.image) for f in frames] == list(range(90))
    moov = video_module._moov(path)
    assert moov and video_module._fragmented_frame_count(path, moov) == 90
    monkeypatch.setattr(video_module, "_MAX_BOXES", 5)  # a day of 1 s fragments is more boxes than the walk reads
    assert video_module._fragmented_frame_count(path, moov) is None  # unknown, not the count of the boxes walked
    monkeypatch.undo()
    cut = tmp_path / "cut.mp4"  # a fragment cut short: its frames are counted, not all decoded
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])  # inside the last fragment's data
    reader = FrameReader(cut, frame_interval=1)
    frames = list(reader)
    assert 30 < len(frames) < 89 and isinstance(reader.error, CorruptVideoError)


def test_a_damaged_presentation_offset_count_is_not_expanded(tmp_path: Path) -> None:
    """One ctts entry claiming 10^8 samples (4 bytes changed): the probe expanded it (800 MB and 3 s a probe, at
    every scan and task; a count near the worker's memory had it killed) before checking it against the frame
    count. Now the counts are checked first and the index is not used. Peak memory measured in a subprocess."""
    import subprocess
    import sys

    path = write_numbered(tmp_path / "b.mp4", [round(i * 1000 / 30) for i in range(60)])  # B-frames: a ctts box
    data = bytearray(path.read_bytes())
    at = data.find(b"ctts")
    assert at > 0 and struct.unpack_from(">I", data, at + 8)[0] > 1
    struct.pack_into(">I", data, at + 12, 10**8)
    damaged = tmp_path / "damaged-ctts.mp4"
    damaged.write_bytes(bytes(data))
    code = (  # VmHWM: the peak RSS of this process's memory since exec (ru_maxrss keeps the forking pytest's)
        "import re, sys; from crowd.video import probe_video\n"
        "info = probe_video(sys.argv[1])\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(info.constant_rate, info.index_duration_s, peak)"
    )
    plugins = str(Path(__file__).resolve().parents[2] / "plugins")
    run = subprocess.run(
        [sys.executable, "-c", code, str(damaged)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": plugins},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    constant_rate, duration, peak_kib = run.stdout.split()
    assert (constant_rate, duration) == ("False", "None")
    assert int(peak_kib) < 400 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"  # 10^8 int64 offsets are 763 MiB


@pytest.mark.parametrize("cut", [1, 2], ids=["last-frame", "last-two"])
def test_an_mp4_missing_its_last_frames_is_reported_corrupt(cut: int, tmp_path: Path) -> None:
    """The index lists 90 frames and the file ends before the last one's data: that frame was lost, and with
    every frame sampled it was never processed. The one-frame slack meant for FFmpeg's estimated counts hid it
    (the run was done, 89 frames); an index count is exact."""
    fast = write_numbered(
        tmp_path / "fast.mp4", [round(i * 1000 / 30) for i in range(90)], b_frames=0, movflags="faststart"
    )
    assert fast.read_bytes().find(b"moov") < fast.read_bytes().find(b"mdat")  # the index first, the frames' data last
    data = fast.read_bytes()
    at = data.find(b"stsz")
    count = struct.unpack_from(">I", data, at + 12)[0]
    assert count == 90
    sizes = struct.unpack_from(f">{count}I", data, at + 16)
    cut_file = tmp_path / "cut.mp4"
    cut_file.write_bytes(data[: len(data) - sum(sizes[-cut:])])  # the data of the last frame(s), at the file's end
    assert probe_video(cut_file).exact_frame_count == 90
    reader = FrameReader(cut_file, frame_interval=1)
    frames = list(reader)
    assert [f.frame_id for f in frames] == list(range(90 - cut))
    assert isinstance(reader.error, CorruptVideoError) and reader.error.frame_id == 90 - cut
    whole = FrameReader(fast, frame_interval=1)
    assert len(list(whole)) == 90 and whole.error is None  # the complete file still ends cleanly


def test_expected_frames_of_a_range_past_the_estimated_count_is_unknown(tmp_path: Path) -> None:
    """The count of a fragmented file is an estimate the reader does not cut ranges to: a range starting past it
    raised "must satisfy 0 <= start <= stop" (the CLI's --start/--stop) before any frame was read."""
    path = write_numbered(tmp_path / "frag.mp4", [round(i * 1000 / 30) for i in range(90)], movflags="frag_keyframe")
    reader = FrameReader(path, frame_interval=10, frame_range=(200, 300))
    assert reader.info.exact_frame_count is None and reader.info.frame_count == 90
    assert reader.expected_frames is None
    inside = FrameReader(path, frame_interval=10, frame_range=(0, 50))
    assert inside.expected_frames == 5


def test_decode_thread_that_cannot_open_the_video_ends_the_iteration(clip: Path, monkeypatch) -> None:
    """An exception opening the capture on the decoding thread reaches the consumer instead of hanging it."""
    import crowd.video

    reader = FrameReader(clip, frame_interval=10)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("FFmpeg backend failed to initialise")

    monkeypatch.setattr(crowd.video, "_open_capture", broken)
    done: list[list] = []
    consumer = threading.Thread(target=lambda: done.append(list(reader)), daemon=True)
    consumer.start()
    consumer.join(timeout=10)
    assert not consumer.is_alive(), "the consumer is blocked waiting for frames that never come"
    assert done == [[]] and isinstance(reader.error, CorruptVideoError) and "failed to initialise" in str(reader.error)


def test_a_pinned_file_reads_what_was_opened_after_its_name_is_swapped(tmp_path: Path) -> None:
    """Read through its descriptor, a video stays the file that was opened when its name is made to point at
    another (a symlink swapped); messages and errors still show the name."""
    from crowd.pipeline import process_video
    from crowd.video import PinnedFile
    from tests.crowd._helpers import CARPHONE, write_clip

    opened = write_clip(CARPHONE, tmp_path / "a.mp4", 40)
    other = write_clip(CARPHONE, tmp_path / "b.mp4", 10)
    link = tmp_path / "link.mp4"
    link.symlink_to(opened)
    with PinnedFile(link) as video:
        fd = video.fd
        swap = tmp_path / "swap.mp4"
        swap.symlink_to(other)
        swap.replace(link)  # the name now leads to b.mp4
        assert probe_video(link).frame_count == 10
        assert (str(video), video.real) == (str(link), opened)
        assert probe_video(video).frame_count == 40
        messages: list = []

        class NoFaces:
            name = "none"

            def prepare(self, frame):
                return None

            def detect_prepared(self, frame, prepared):
                return []

        summary = process_video(video, NoFaces(), frame_interval=1, on_message=messages.append, video_id="v")
    assert summary.frames_processed == 40 and {m.source for m in messages} == {str(link)}
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on leaving the block


def test_a_fifo_in_a_video_s_place_is_refused_without_hanging(tmp_path: Path) -> None:
    from crowd.video import PinnedFile

    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    with pytest.raises(NotAVideoError, match="not a regular file"):
        PinnedFile(fifo)


def test_a_long_hash_says_how_far_it_got(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Hashing a file of many GB on a share took minutes without a line in the scan's or the task's log."""
    path = tmp_path / "big.mp4"
    path.write_bytes(os.urandom(3 << 20))
    with caplog.at_level("INFO", logger="crowd.video"):
        digest = content_hash(path, chunk_size=1 << 20, progress_every_s=0)
    assert digest == content_hash(path)  # the same id, with or without the reports
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hashing")]
    assert len(reports) == 3 and reports[-1].startswith(f"hashing {path}: 3 of 3 MB read"), reports
