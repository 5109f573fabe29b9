"""Video reading: probe a file, sample frames by interval or target fps, decode in a background thread.

A frame id is a decode index: the n-th frame the decoder gives is frame n, and ``ts_ms`` is its presentation
time, kept increasing where the file's times go back (recordings joined end to end: see ``_FrameClock``). Sampled
frame ids are the multiples of ``frame_interval`` (0, n, 2n, ...), independent of how the video is split into
ranges, so ranges ``[a, b)`` that tile ``[0, frame_count)`` process every sampled frame exactly once. Frames in
between are skipped with sequential ``grab()`` (no per-frame seeking). A range may seek once, to its start, and
only in a video whose frame n is shown at n / fps (``VideoInfo.constant_rate``, from the MP4 index): OpenCV seeks
by time, so in a variable-frame-rate video it would land on another frame. Other ranges walk from frame 0. The
container's frame count is an estimate: decoding that ends cleanly near the container's duration is the end of
the video, not an error.

Example:
    >>> from crowd.video import FrameReader
    >>> reader = FrameReader("clip.mp4", frame_interval=10)       # doctest: +SKIP
    >>> for frame in reader:                                         # doctest: +SKIP
    ...     print(frame.frame_id, frame.ts_ms, frame.image.shape)
    >>> reader.error                                                 # doctest: +SKIP
    None
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import hashlib
import logging
import os
import queue
import stat
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

logger = logging.getLogger(__name__)

MAX_FPS = 1000.0
MAX_DIMENSION = 8192
# Frames an MP4 index may list for its timing to be used (77 h at 30 fps; ~0.3 GB of per-frame arrays at most).
MAX_INDEXED_FRAMES = 1 << 23
#: The presentation times kept from an MP4 index for its first frames (see ``VideoInfo.head_times_s``).
HEAD_TIMES = 8192
#: An MP4 edit list longer than this is not read (the file is read whole, as one without timing).
MAX_EDITS = 10_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class VideoErrorReason(str, enum.Enum):
    """Machine-readable cause of a :class:`VideoError` (stored in the database / messages as its value)."""

    MISSING = "missing"
    DIRECTORY = "directory"
    UNREADABLE = "unreadable"
    EMPTY = "empty"
    NOT_VIDEO = "not_video"
    BAD_FPS = "bad_fps"
    BAD_SIZE = "bad_size"
    CORRUPT = "corrupt"
    BAD_ARGUMENT = "bad_argument"
    BAD_NAME = "bad_name"


class VideoError(Exception):
    """A video source cannot be (fully) read. ``reason`` says why, ``path`` which file.

    The message reads like ``cannot open 'x.mp4': not a video container (read 0 frames)``.
    """

    reason: VideoErrorReason = VideoErrorReason.NOT_VIDEO
    verb = "cannot open"

    def __init__(self, path: str | os.PathLike[str] | int, detail: str, *, frame_id: int | None = None) -> None:
        self.path = public_source(path)  # a stream URL without its credentials: errors are printed and logged
        self.detail = detail
        self.frame_id = frame_id
        super().__init__(f"{self.verb} {self.path!r}: {detail}")


class VideoNotFoundError(VideoError):
    reason = VideoErrorReason.MISSING


class VideoIsDirectoryError(VideoError):
    reason = VideoErrorReason.DIRECTORY


class VideoPermissionError(VideoError):
    reason = VideoErrorReason.UNREADABLE


class EmptyVideoError(VideoError):
    reason = VideoErrorReason.EMPTY


class NotAVideoError(VideoError):
    reason = VideoErrorReason.NOT_VIDEO


class BadFpsError(VideoError):
    reason = VideoErrorReason.BAD_FPS


class BadDimensionsError(VideoError):
    reason = VideoErrorReason.BAD_SIZE


class CorruptVideoError(VideoError):
    """Decoding stopped before the end; ``frame_id`` is the first frame that could not be read."""

    reason = VideoErrorReason.CORRUPT
    verb = "cannot read"


class BadFileNameError(VideoError):
    """The file's name is not valid UTF-8 (Python keeps the odd bytes as lone surrogates); rename the file."""

    reason = VideoErrorReason.BAD_NAME


def check_name(path: str | os.PathLike[str]) -> str:
    """``path`` as text, if it can be handed to OpenCV and stored as text: valid UTF-8.

    OpenCV's Python binding crashes the whole process (segmentation fault) on a name that is not.

    Raises:
        BadFileNameError: the name holds bytes that are not UTF-8 (e.g. Latin-1 from an old camera or share).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = os.fsencode(text).decode("utf-8", "backslashreplace")  # the odd bytes as \xNN
        except UnicodeEncodeError:  # a lone surrogate that no bytes stand for (JSON "\ud800" in a run's conf)
            shown = text.encode("utf-8", "backslashreplace").decode("ascii")
        raise BadFileNameError(shown, "its name is not valid UTF-8: rename the file (e.g. with convmv)") from None
    return text


class VideoArgumentError(VideoError, ValueError):
    reason = VideoErrorReason.BAD_ARGUMENT
    verb = "bad request for"


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a source.

    ``frame_count`` is an estimate (the MP4 index's count of shown frames, else what FFmpeg reports, which may
    be the duration times the frame rate); ``None`` for live sources and streams that do not say (a raw H.264
    stream). ``constant_rate`` is True when the MP4 index shows frame n at n / fps for every n: only then can a
    frame range seek to its start. ``index_duration_s`` is the duration from the MP4 index, when read.
    """

    source: str
    fps: float
    frame_count: int | None
    width: int
    height: int
    is_live: bool = False
    constant_rate: bool = False
    index_duration_s: float | None = None
    #: when the first (up to ``HEAD_TIMES``) frames are shown, in seconds from the first, from the MP4 index; ()
    #: when not read. Names the first frame a decoder gives when the file starts with frames it cannot decode.
    head_times_s: tuple[float, ...] = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def exact_frame_count(self) -> int | None:
        """The frame count when it comes from the MP4 index (the frames it lists), else ``None``: FFmpeg's count of
        other containers is an estimate (duration times the nominal rate), too low for a variable rate above it."""
        return self.frame_count if self.index_duration_s is not None else None

    @property
    def duration_s(self) -> float | None:
        """Duration in seconds, or ``None`` when the frame count is unknown."""
        if self.index_duration_s is not None:
            return self.index_duration_s
        return None if self.frame_count is None else self.frame_count / self.fps


@dataclass(frozen=True)
class Frame:
    """One sampled frame: ``frame_id`` is its decode index in the video, ``ts_ms`` its presentation time.

    ``ts_ms`` comes from the container (relative to the video's start); a stream without timestamps (raw H.264)
    gets the nominal ``frame_id * 1000 / fps``. It increases frame after frame: where the container's times go
    back (two recordings joined end to end), the later frames continue one frame after the earlier ones.
    """

    frame_id: int
    ts_ms: float
    image: np.ndarray
    prepared: Any = None


def is_live_source(source: str | os.PathLike[str] | int) -> bool:
    """True for camera indexes (``0`` or ``"0"``) and stream URLs (``rtsp://...``, ``http://...``)."""
    if isinstance(source, int):
        return True
    text = str(source)
    return text.isdigit() or "://" in text


def _without_userinfo(source: str | os.PathLike[str] | int) -> tuple[str, urllib.parse.SplitResult | None]:
    text = str(source)
    if "://" not in text:
        return text, None
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # not a URL after all: shown as it is
        return text, None
    parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])
    return urllib.parse.urlunsplit(parts), parts


def public_source(source: str | os.PathLike[str] | int) -> str:
    """``source`` as it may be shown, logged and published: a stream URL without its user name and password, and
    without its query, where cameras take tokens and passwords too (``?...`` says there was one).

    Example:
        >>> public_source("rtsp://admin:secret@10.0.0.5:554/stream1")
        'rtsp://10.0.0.5:554/stream1'
        >>> public_source("http://cam.local/video.cgi?user=admin&pwd=secret")
        'http://cam.local/video.cgi?...'
    """
    text, parts = _without_userinfo(source)
    if parts is None or not parts.query:
        return text
    return urllib.parse.urlunsplit(parts._replace(query="", fragment="")) + "?..."


def live_source_id(source: str | os.PathLike[str] | int, started_at: datetime) -> str:
    """The video id of one capture session of a live source (a camera index or a stream URL, whose content has no
    hash): ``live-``, a hash of the URL without its user name and password (its query kept: ``?channel=2`` is
    another stream), and the session's start (UTC, to the millisecond): a valid id (no ``/`` or ``:``), without
    credentials, the same prefix whoever logs in. Each session is a video of its own: its frame ids start at 0
    again, so one id for every session had a session's frames replace the previous one's in storage."""
    stamp = started_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    return "live-" + hashlib.sha256(_without_userinfo(source)[0].encode()).hexdigest()[:32] + "-" + stamp


def content_hash(
    path: str | os.PathLike[str], *, length: int = 32, chunk_size: int = 1 << 20, progress_every_s: float = 10.0
) -> str:
    """Stable id of a file: the first ``length`` hex characters of the SHA-256 of its content.

    The file is streamed in 1 MiB chunks, so large videos do not need memory. Renaming or moving the file
    keeps its id; any change of content changes it. A read that takes longer than ``progress_every_s`` logs how
    far it got every that many seconds (a file of many GB on a share: minutes without a line before).

    Example:
        >>> content_hash("clip.mp4")  # doctest: +SKIP
        '9f2c0e...'
    """
    check_file(path)
    digest = hashlib.sha256()
    started = last = time.monotonic()
    done = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
            done += len(block)
            if (now := time.monotonic()) - last >= progress_every_s:
                last = now
                size = os.fstat(handle.fileno()).st_size
                logger.info("hashing %s: %.0f of %.0f MB read in %.0f s", path, done / 1e6, size / 1e6, now - started)
    return digest.hexdigest()[:length]


class PinnedFile(os.PathLike):
    """A video file opened once and then read through its descriptor (``/proc/self/fd/N``, Linux): every later
    open (OpenCV, the MP4 index) reads the file that was opened and checked, even if its name is made to point
    elsewhere meanwhile (a symlink swapped). ``os.fspath()`` gives the descriptor's path, ``str()`` the name it
    was opened by (what messages, logs and errors show), :attr:`real` where that name led when it was opened.
    """

    def __init__(self, name: str | os.PathLike[str]) -> None:
        self.name = str(name)
        try:  # O_NONBLOCK: a FIFO put in the file's place must not hang the open
            self.fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise VideoNotFoundError(name, "no such file") from None
        except PermissionError:
            raise VideoPermissionError(
                name, "permission denied (cannot read the file; check its mode and owner)"
            ) from None
        except OSError as exc:
            raise VideoPermissionError(name, f"cannot open the file: {exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise NotAVideoError(name, "not a regular file")
            self.real = Path(os.readlink(os.fspath(self)))
        except BaseException:
            os.close(self.fd)
            raise

    def __fspath__(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"PinnedFile({self.name!r}, fd={self.fd}, real={str(self.real)!r})"

    def close(self) -> None:
        """Close the descriptor (once)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_file(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a :class:`Path` if it is a readable, non-empty regular file, else raise a VideoError."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise VideoNotFoundError(path, "no such file") from None
    except PermissionError:
        raise VideoPermissionError(path, "permission denied (cannot stat the file)") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoIsDirectoryError(path, "is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):
        raise NotAVideoError(path, "not a regular file")
    if st.st_size == 0:
        raise EmptyVideoError(path, "file is empty (0 bytes)")
    try:
        with open(p, "rb") as handle:
            handle.read(1)
    except PermissionError:
        raise VideoPermissionError(path, "permission denied (cannot read the file; check its mode and owner)") from None
    except OSError as exc:
        raise VideoPermissionError(path, f"cannot read the file: {exc.strerror or exc}") from None
    return p


# FFmpeg decoder threads of the background reader. ``None`` = FFmpeg's default (one per core). Inference
# already keeps both cores of a small worker busy; one decoder thread costs less CPU per frame (no threading
# overhead) and competes less with it (see bench/detect.py).
DECODER_THREADS: int | None = 1


def _open_capture(source: str | os.PathLike[str] | int, *, threads: int | None = None) -> cv2.VideoCapture:
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return cv2.VideoCapture(int(source))
    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, int(threads)]
    return cv2.VideoCapture(check_name(source), cv2.CAP_FFMPEG, params)


def _info_from_capture(source: str | os.PathLike[str] | int, cap: cv2.VideoCapture, live: bool) -> VideoInfo:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    if not (0 < fps <= MAX_FPS) or fps != fps:
        if live:
            fps = 25.0  # cameras often report 0; timestamps are then nominal
        else:
            raise BadFpsError(
                source, f"frame rate metadata {fps:g} fps is not in (0, {MAX_FPS:g}]; re-encode the video"
            )
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise BadDimensionsError(
            source, f"frame size {width}x{height} is outside 1..{MAX_DIMENSION} pixels per side; re-encode the video"
        )
    return VideoInfo(
        source=str(source),
        fps=fps,
        frame_count=count if count > 0 and not live else None,
        width=width,
        height=height,
        is_live=live,
    )


# The first bytes of still-image (and animated-image) files. Whole signatures, so no video starts with one: a BMP's
# reserved bytes 6-9 are zero where an MP4 or QuickTime file has a box type, "GIF87a"/"GIF89a" in full.
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF87a": "a GIF image",
    b"GIF89a": "a GIF image",
}


def _image_kind(path: str | os.PathLike[str] | int) -> str | None:
    """``"it is a GIF image, not a video"`` when the file starts as an image format does, else ``None`` (one read
    of 10 bytes)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(10)
    except OSError:  # gone or unreadable since it was checked: no diagnosis
        return None
    if head.startswith(b"BM") and head[6:10] == bytes(4):
        return "it is a BMP image, not a video"
    for magic, kind in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return f"it is {kind}, not a video"
    return None


# Track handler types of ISO base media files (MP4, MOV) -> what the track holds.
_TRACK_KINDS = {
    b"vide": "video", b"soun": "sound", b"text": "text", b"sbtl": "subtitles", b"subt": "subtitles",
    b"tmcd": "timecode", b"hint": "hint", b"meta": "metadata",
}  # fmt: skip
_MAX_INDEX_BYTES = 64 << 20  # a moov box (the index) is kilobytes to a few MB; read no more than this of it
_MAX_BOXES = 100_000


class _DamagedBoxes(ValueError):
    """A box of an MP4 file has an impossible size."""


class _IndexCutShort(_DamagedBoxes):
    """The index (``moov`` box) of an MP4 file runs past the end of the file: the file was cut (copied partway)."""


def _top_level_boxes(handle: BinaryIO) -> Iterator[tuple[bytes, int, int]]:
    """``(type, offset, size)`` of the top-level boxes of an open MP4 file, reading their headers only.

    Raises:
        _DamagedBoxes: a box is smaller than its header.
    """
    end = os.fstat(handle.fileno()).st_size
    pos = 0
    for _ in range(_MAX_BOXES):
        if pos + 8 > end:
            return
        handle.seek(pos)
        header = handle.read(16)
        size, kind = struct.unpack_from(">I4s", header)
        if size == 1 and len(header) == 16:  # 64-bit size follows the type
            size = struct.unpack_from(">Q", header, 8)[0]
        elif size == 0:  # the box runs to the end of the file
            size = end - pos
        if size < 8:
            raise _DamagedBoxes(f"box {kind!r} at byte {pos} has size {size}")
        yield kind, pos, size
        pos += size


def _mp4_index(path: str | os.PathLike[str] | int) -> bytes | None:
    """The index (``moov`` box) of an ISO base media file (MP4, MOV), ``b""`` if it has none.

    ``None`` when the file is not MP4 (no ``ftyp`` box first) or cannot be read. Walks the top-level boxes only,
    reading no more than ``_MAX_INDEX_BYTES`` of the index.

    Raises:
        _DamagedBoxes: a top-level box is smaller than its header.
        _IndexCutShort: the index runs past the end of the file.
    """
    if isinstance(path, int):
        return None
    try:
        with open(path, "rb") as handle:
            if handle.read(8)[4:8] != b"ftyp":
                return None
            for kind, pos, size in _top_level_boxes(handle):
                if kind == b"moov":
                    if pos + size > os.fstat(handle.fileno()).st_size:
                        raise _IndexCutShort(f"the index at byte {pos} needs {size} bytes")
                    handle.seek(pos)
                    return handle.read(min(size, _MAX_INDEX_BYTES))
    except OSError:  # gone or unreadable since it was checked
        return None
    return b""


def _moov(path: str | os.PathLike[str] | int) -> bytes | None:
    """The payload of an MP4 file's index (``moov`` box); ``None`` when it has none or is not MP4."""
    try:
        index = _mp4_index(path)
    except _DamagedBoxes:
        return None
    return next((p for k, p in _boxes(index) if k == b"moov"), None) if index else None


def _video_track(moov: bytes) -> bytes | None:
    """The payload of the first video track (``trak`` box whose handler is ``vide``) of an index."""
    return next(
        (t for k, t in _boxes(moov) if k == b"trak" and (_child(t, b"mdia", b"hdlr") or b"")[8:12] == b"vide"), None
    )


def _fragmented_frame_count(path: str | os.PathLike[str] | int, moov: bytes) -> int | None:
    """Frames of the first video track of a fragmented MP4 (its index ``moov`` has an ``mvex`` box): those the
    index lists plus those of every fragment's ``trun`` boxes (ISO/IEC 14496-12, 8.8). ``None`` when the file is
    not a fragmented MP4 or its boxes cannot be read. FFmpeg's count of such a file covers its first fragment at
    best.
    """
    try:
        if _child(moov, b"mvex") is None:
            return None
        trak = _video_track(moov)
        tkhd = trak and _child(trak, b"tkhd")
        stbl = trak and _child(trak, b"mdia", b"minf", b"stbl")
        if not tkhd or stbl is None:
            return None
        track_id = struct.unpack_from(">I", tkhd, 20 if tkhd[0] == 1 else 12)[0]
        frames = _sample_count(stbl) or 0
        walked = 0
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            for kind, pos, size in _top_level_boxes(handle):
                walked = pos + size
                if kind != b"moof":
                    continue
                handle.seek(pos)
                moof = handle.read(min(size, _MAX_INDEX_BYTES))
                for part, traf in _boxes(moof, 16 if struct.unpack_from(">I", moof)[0] == 1 else 8):
                    tfhd = _child(traf, b"tfhd") if part == b"traf" else None
                    if tfhd is None or struct.unpack_from(">I", tfhd, 4)[0] != track_id:
                        continue
                    frames += sum(struct.unpack_from(">I", run, 4)[0] for k, run in _boxes(traf) if k == b"trun")
                if frames > MAX_INDEXED_FRAMES:
                    return None
        # more boxes than the walk reads (a day of 1 s fragments): a part of the count is no count
        return frames if walked + 8 > file_size else None
    except (OSError, _DamagedBoxes, struct.error):
        return None


def _mp4_problem(path: str | os.PathLike[str]) -> str | None:
    """Why an MP4 file OpenCV cannot play has no video to read, from its boxes (ISO/IEC 14496-12).

    Only a diagnosis for the error message: walks the top-level boxes to the index (``moov``) and lists its
    tracks' handler types. ``None`` when the file is not MP4 (no ``ftyp`` box first), cannot be read, or has a
    video track (the cause is then in the data or the codec).
    """
    try:
        index = _mp4_index(path)
    except _IndexCutShort:
        return "an MP4 file whose index (the moov box) is cut short: truncated (copied partway), or still being written"
    except _DamagedBoxes:
        return "an MP4 file whose box structure is damaged"
    if index is None:
        return None
    if not index:
        return "an MP4 file without its index (the moov box): truncated, or still being written"
    tracks: list[str] = []
    at = index.find(b"hdlr")
    while at != -1:
        handler = index[at + 12 : at + 16]  # after version/flags and pre_defined (QuickTime: component type)
        if handler in _TRACK_KINDS and _TRACK_KINDS[handler] not in tracks:
            tracks.append(_TRACK_KINDS[handler])
        at = index.find(b"hdlr", at + 4)
    if "video" in tracks:
        return None
    return f"an MP4 file with no video track (its tracks: {', '.join(tracks) or 'none'})"


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """The ``(type, payload)`` of the boxes in ``data[start:end]``; stops at the first one that does not fit."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, data[pos + header : pos + size]
        pos += size


def _child(payload: bytes, *path: bytes) -> bytes | None:
    """The payload of the first box along ``path`` (e.g. ``b"mdia", b"minf"``) inside ``payload``."""
    for kind in path:
        payload = next((p for k, p in _boxes(payload) if k == kind), None)  # type: ignore[assignment]
        if payload is None:
            return None
    return payload


def _timescale(header_box: bytes) -> int:
    """The timescale of an ``mvhd`` or ``mdhd`` payload (version 0: 32-bit times, version 1: 64-bit)."""
    return struct.unpack_from(">I", header_box, 20 if header_box[0] == 1 else 12)[0]


@dataclass(frozen=True)
class _Timing:
    """When the frames of an MP4 video track are shown, from its index: no decoding needed."""

    frames: int  # frames presented (inside the edit list), in presentation order
    duration_s: float  # from the first presented frame to the end of the last one
    constant_rate_at: Callable[[float], bool]  # fps -> is frame n shown at n / fps for every n
    exact: bool = True  # False: counted over several edits, which players join their own way (an estimate)
    head_s: tuple[float, ...] = ()  # the first HEAD_TIMES frames' times, in seconds from the first


def _mp4_timing(moov: bytes) -> _Timing | None:
    """Frame count, duration and frame-rate regularity of the first video track of an MP4 index (``moov``), from
    its sample tables.

    Reads ``stts`` (decoding times), ``ctts`` (presentation offsets) and ``elst`` (the edit list of a trimmed
    file: samples outside it are decoded but not shown). ``None`` when the file is fragmented (the samples are
    listed in ``moof`` boxes, not in the index), its edits change the speed, or its tables do not agree
    (several edits: an estimate, see :func:`_edited_timing`).
    """
    mvhd = _child(moov, b"mvhd")
    if not mvhd or len(mvhd) < 24:
        return None
    if _child(moov, b"mvex") is not None:
        # fragmented: more samples follow in moof boxes (ffmpeg's frag_keyframe lists the first fragment's in the
        # index, and its count would end the read there); the video is read to where decoding ends
        return None
    trak = _video_track(moov)
    if trak is None:
        return None
    try:
        return _track_timing(trak, _timescale(mvhd))
    except (struct.error, ValueError, ZeroDivisionError, MemoryError):  # tables that do not fit: no timing
        return None


def _sample_count(stbl: bytes) -> int | None:
    """The track's sample count from its sample size table (``stsz``, or the compact ``stz2``)."""
    sizes = _child(stbl, b"stsz") or _child(stbl, b"stz2")
    return struct.unpack_from(">I", sizes, 8)[0] if sizes is not None and len(sizes) >= 12 else None


def _track_timing(trak: bytes, movie_scale: int) -> _Timing | None:
    mdhd, stbl = _child(trak, b"mdia", b"mdhd"), _child(trak, b"mdia", b"minf", b"stbl")
    stts = stbl and _child(stbl, b"stts")
    if not mdhd or not stts:
        return None
    scale = _timescale(mdhd)
    table = np.frombuffer(stts, ">u4", count=2 * struct.unpack_from(">I", stts, 4)[0], offset=8).reshape(-1, 2)
    samples = int(table[:, 0].astype(np.int64).sum())
    # A damaged stts can claim billions of samples in a few bytes: its count must be the sample size table's,
    # and the per-sample arrays made of it stay bounded (beyond the bound the video is read whole, unsplit).
    if samples > MAX_INDEXED_FRAMES or samples != _sample_count(stbl):
        return None
    deltas = np.repeat(table[:, 1].astype(np.int64), table[:, 0].astype(np.int64))
    if not len(deltas) or not scale:
        return None  # fragmented: the samples are in moof boxes
    pts = np.concatenate(([0], np.cumsum(deltas)[:-1]))
    ctts = _child(stbl, b"ctts")
    if ctts:
        table = np.frombuffer(ctts, ">i4", count=2 * struct.unpack_from(">I", ctts, 4)[0], offset=8).reshape(-1, 2)
        counts = table[:, 0].astype(np.int64) & 0xFFFFFFFF  # unsigned in the file
        if int(counts.sum()) != len(pts):  # checked before expanding: a damaged count would claim gigabytes
            return None
        pts = pts + np.repeat(table[:, 1].astype(np.int64), counts)
    elst = _child(trak, b"edts", b"elst")
    if elst:
        wide = elst[0] == 1
        entry = struct.Struct(">Qqi" if wide else ">Iii")  # duration, media time, media rate (16.16)
        count = struct.unpack_from(">I", elst, 4)[0]
        if count > MAX_EDITS:  # a cut-editing tool makes a few; a damaged or hostile count would take minutes
            return None
        edits = [entry.unpack_from(elst, 8 + i * entry.size) for i in range(count)]
        if any(rate != 0x10000 for _, start, rate in edits if start != -1):
            return None  # a dwell (rate 0) or speed change: frames shown are not the ones listed
        edits = [(length, start) for length, start, _ in edits if start != -1]  # -1: an empty edit (a delay)
        if len(edits) > 1:
            return _edited_timing(pts, edits, scale, movie_scale)
        if edits:
            length, start = edits[0]
            stop = start + length * scale / movie_scale if length else np.inf
            pts = pts[(pts >= start) & (pts < stop)]
    if not len(pts):
        return None
    pts = np.sort(pts)
    end = pts[-1] + (deltas[-1] if len(deltas) else 0)
    seconds = (pts - pts[0]) / scale

    def constant_rate_at(fps: float) -> bool:
        # OpenCV seeks to frame n at time n / fps: exact when every frame is within a quarter frame of it
        return bool(np.abs(seconds * fps - np.arange(len(seconds))).max() <= 0.25)

    return _Timing(
        frames=len(pts), duration_s=float(end - pts[0]) / scale, constant_rate_at=constant_rate_at,
        head_s=tuple(seconds[:HEAD_TIMES].tolist()),
    )  # fmt: skip


def _edited_timing(pts: np.ndarray, edits: list[tuple[int, int]], scale: int, movie_scale: int) -> _Timing:
    """The frames of a file cut by several edits (``(duration, media time)`` each; a cut-editing tool's output):
    each edit shows the samples inside its window, one edit after the other. An estimate (``exact=False``): how a
    player joins the edits (a frame across a cut, a window ending mid-frame) may differ by a frame, so the end
    of decoding is taken as the end, and the file is read whole (no frame n at n / fps to seek to)."""
    # each edit's frames by binary searches, all in one call: a pass over every frame per edit took minutes
    times = np.sort(pts).astype(np.float64)
    starts = np.array([start for _, start in edits], np.float64)
    stops = np.array([start + length * scale / movie_scale if length else np.inf for length, start in edits])
    frames = int((np.searchsorted(times, stops, "left") - np.searchsorted(times, starts, "left")).sum())
    duration_s = sum(length for length, _ in edits) / movie_scale
    return _Timing(frames=frames, duration_s=duration_s, constant_rate_at=lambda fps: False, exact=False)


def probe_video(source: str | os.PathLike[str] | int) -> VideoInfo:
    """Open ``source``, check it and return its :class:`VideoInfo`; the file is closed again.

    Checks, in order: exists, not a directory, readable, not empty, not an image (PNG, JPEG, GIF, BMP: an
    animated GIF renamed ``.mp4`` is not taken for a video), OpenCV can open it, fps in (0, 1000],
    size in 1..8192 per side, and the first frame decodes. An MP4 file's frame count, duration and frame-rate
    regularity come from its index (see :func:`_mp4_timing`); a stream whose length is unknown (a raw H.264 or
    MPEG-4 stream named ``.mp4``) has ``frame_count=None`` and is read to its end.

    Raises:
        VideoError: a subclass naming the file and the cause (see :class:`VideoErrorReason`).
    """
    live = is_live_source(source)
    if not live:
        check_file(source)
        # an image renamed .mp4 is refused whatever OpenCV makes of it: FFmpeg plays an animated GIF as a video
        if kind := _image_kind(source):
            raise NotAVideoError(source, f"not a video container ({kind})")
    cap = _open_capture(source)
    try:
        if not cap.isOpened():
            raise NotAVideoError(
                source,
                (not live and _mp4_problem(source)) or "not a video container (OpenCV cannot open it, read 0 frames)",
            )
        info = _info_from_capture(source, cap, live)
        if live:
            return info
        # unknown length: a raw stream (read to its end), or an MP4 file with no video to read
        if info.frame_count is None and (problem := _mp4_problem(source)):
            raise NotAVideoError(source, problem)
        moov = _moov(source)  # the index is read once: its timing, or a fragmented file's frame count
        timing = _mp4_timing(moov) if moov else None
        if timing is not None and not timing.exact:
            info = dataclasses.replace(info, frame_count=timing.frames)  # shown frames, estimated: not split
        elif timing is not None:
            info = dataclasses.replace(
                info, frame_count=timing.frames, index_duration_s=timing.duration_s,
                constant_rate=timing.constant_rate_at(info.fps), head_times_s=timing.head_s,
            )  # fmt: skip
        elif moov and (fragmented := _fragmented_frame_count(source, moov)) is not None:
            info = dataclasses.replace(info, frame_count=fragmented)  # still an estimate: no edit list, not split
        if not cap.grab():
            raise NotAVideoError(source, _mp4_problem(source) or "not a video container (read 0 frames)")
        return info
    finally:
        cap.release()


def frame_interval_for(fps: float, frame_interval: int | None = None, target_fps: float | None = None) -> int:
    """Sampling step in frames.

    ``frame_interval`` wins if given; else ``target_fps`` gives ``round(fps / target_fps)``; else the seed's
    default ``int(fps / 3)`` (about 3 frames per second). Always at least 1.

    Example:
        >>> frame_interval_for(30.0)
        10
        >>> frame_interval_for(30.0, target_fps=5)
        6
    """
    if frame_interval is not None:
        if int(frame_interval) < 1:
            raise ValueError(f"frame_interval={frame_interval} must be >= 1 (1 = every frame)")
        return int(frame_interval)
    if target_fps is not None:
        if target_fps <= 0:
            raise ValueError(f"target_fps={target_fps} must be > 0")
        return max(1, round(fps / target_fps))
    return max(1, int(fps / 3))


def sampled_frame_ids(
    frame_count: int, frame_interval: int, frame_range: tuple[int, int | None] | None = None
) -> range:
    """Frame ids processed for a video of ``frame_count`` frames: multiples of the interval in ``[start, stop)``.

    Example:
        >>> list(sampled_frame_ids(30, 10))
        [0, 10, 20]
        >>> list(sampled_frame_ids(30, 10, (5, 21)))
        [10, 20]
    """
    start, stop = _normalise_range(frame_range, frame_count)
    first = -(-start // frame_interval) * frame_interval
    return range(first, stop, frame_interval)


def split_ranges(frame_count: int, frames_per_task: int) -> list[tuple[int, int]]:
    """Split ``[0, frame_count)`` into consecutive ranges of at most ``frames_per_task`` frames.

    Example:
        >>> split_ranges(2500, 1000)
        [(0, 1000), (1000, 2000), (2000, 2500)]
    """
    if frames_per_task < 1:
        raise ValueError(f"frames_per_task={frames_per_task} must be >= 1")
    return [(a, min(a + frames_per_task, frame_count)) for a in range(0, frame_count, frames_per_task)]


_TO_THE_END = 2**62  # the stop of a range read until decoding ends


def _normalise_range(frame_range: tuple[int, int | None] | None, frame_count: int | None) -> tuple[int, int]:
    big = frame_count if frame_count is not None else _TO_THE_END
    if frame_range is None:
        return 0, big
    start, stop = frame_range
    if frame_count is not None and start > frame_count:
        raise ValueError(f"frame_range={frame_range} starts past the video's {frame_count} frames")
    stop = big if stop is None else min(int(stop), big)
    if start < 0 or stop < start:
        raise ValueError(f"frame_range={frame_range} must satisfy 0 <= start <= stop")
    return int(start), stop


_END = object()


class _FrameClock:
    """The times of a video's frames, fed every decoded frame in order: the container's, kept increasing.

    Recordings joined end to end (``cat a.ts b.ts``, each starting at time 0) or a clock set back mid-file make the
    container's times go back. A frame shown at or before the previous frame is put one nominal frame
    (``1000 / fps`` ms) after it, and every later frame is moved on by as much: the second recording continues
    after the first, and a span (last time minus first) covers both. Equal times (a duplicated timestamp) are
    moved the same way. The first jump is logged (once per reader). Frames before any frame had a time (frame 0,
    every frame of a raw stream or a live source) get their nominal time ``frame_id * 1000 / fps``; a later frame
    at exactly 0 (OpenCV's reading of "no time") one frame after the previous one, moving no other frame.

    A read from frame 0 meets every jump, whatever its range or interval, so a part gives the whole read's times;
    a part that seeks (a constant-rate MP4 only, whose index times increase frame after frame) starts at its first
    frame's own time, which is the whole read's too.
    """

    __slots__ = ("source", "frame_ms", "offset", "last", "timed", "warned")

    def __init__(self, source: str | os.PathLike[str] | int, fps: float) -> None:
        self.source = source
        self.frame_ms = 1000.0 / fps
        self.offset = 0.0  # added to the container's times: the sum of the jumps back so far
        self.last: float | None = None  # the previous frame's time
        self.timed = False  # a frame had a time (> 0): a time <= 0 after it is a time, not "none"
        self.warned = False  # of a jump back: once per reader

    def ts_ms(self, frame_id: int, time_ms: float | None) -> float:
        """The time of frame ``frame_id``, from the container's ``time_ms`` (``None``: a live source)."""
        if time_ms is None or (time_ms <= 0 and not self.timed):
            ts = frame_id * self.frame_ms
        elif time_ms == 0 and self.last is not None:  # no time (FFmpeg's "none" reads 0): one frame on, no jump
            ts = self.last + self.frame_ms  # a joined recording's first frame; a lone frame without one is not a jump
        else:
            self.timed = True
            ts = time_ms + self.offset
        last = self.last
        if last is not None and ts <= last:
            moved = last + self.frame_ms - ts
            if not self.warned:
                self.warned = True
                logger.warning(
                    "%s: frame %d is at %.3f s in the file, not after frame %d at %.3f s: its times go back "
                    "(recordings joined end to end, or a clock set back). It is put one frame later, at %.3f s, and "
                    "the frames after it are moved on by %.3f s as well (a later jump is moved the same way, without "
                    "another warning)",
                    self.source, frame_id, (time_ms or 0.0) / 1000.0, frame_id - 1, last / 1000.0,
                    (last + self.frame_ms) / 1000.0, moved / 1000.0,
                )  # fmt: skip
            self.offset += moved
            ts = last + self.frame_ms
        self.last = ts
        return ts


class FrameReader:
    """Iterate the sampled frames of a video, decoding in a background thread.

    After iteration ends, ``error`` is ``None`` if the range was read to its end (or to the video's: decoding
    that ends cleanly at the container's duration is complete, whatever the frame count said), else a
    :class:`CorruptVideoError` saying where decoding stopped (the good frames before it were yielded);
    ``stopped_early`` is the same as ``error is not None``. Opening problems raise at construction.
    With ``raise_on_error=True`` the error is raised after the last good frame instead.

    Args:
        source: a file path, a camera index or a stream URL.
        frame_interval: process every n-th frame (default: seed rule ``int(fps/3)``).
        target_fps: alternative to ``frame_interval``: about this many frames per second of video.
        frame_range: ``(start, stop)`` frame ids, stop exclusive (``None`` = to the end). A range seeks to its
            start when ``info.constant_rate`` (and checks where it landed), else it decodes from frame 0.
        queue_size: decoded frames buffered ahead of the consumer.
        prepare: optional per-frame pre-processing run on the decoding thread, overlapped with the consumer's
            work (e.g. :meth:`crowd.detection.Detector.prepare`); its result is ``Frame.prepared``. If it
            raises, ``prepared`` is ``None`` and the consumer meets the same error when it does the work itself.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | int,
        *,
        frame_interval: int | None = None,
        target_fps: float | None = None,
        frame_range: tuple[int, int | None] | None = None,
        queue_size: int = 4,
        raise_on_error: bool = False,
        prepare: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.source = source
        self.prepare = prepare
        self.info = probe_video(source)
        self.frame_interval = frame_interval_for(self.info.fps, frame_interval, target_fps)
        try:
            # a range without a stop reads to the end: the listed frames, or where decoding ends for an estimate
            self.start, self.stop = _normalise_range(frame_range, self.info.exact_frame_count)
        except ValueError as exc:
            raise VideoArgumentError(source, str(exc)) from None
        self.raise_on_error = raise_on_error
        self.error: VideoError | None = None
        self.frames_yielded = 0
        self.last_frame_id: int | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, queue_size))
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopped_early(self) -> bool:
        """True if decoding failed before the end of the requested range."""
        return self.error is not None

    @property
    def stop_frame(self) -> int | None:
        """End of the range read (exclusive), or ``None``: until decoding ends."""
        return None if self.stop >= _TO_THE_END else self.stop

    @property
    def expected_frames(self) -> int | None:
        """How many frames this reader should yield (from FFmpeg's estimate when the index does not list them), or
        ``None`` for live sources and ranges starting past the estimate."""
        count = self.info.frame_count
        if count is None or self.start > count:
            return None
        return len(sampled_frame_ids(count, self.frame_interval, (self.start, self.stop)))

    def _put(self, item: object) -> bool:
        while not self._stop_event.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cap: cv2.VideoCapture | None = None
        try:
            cap = self._open()
            if cap is None:
                return
            first = -(-self.start // self.frame_interval) * self.frame_interval
            pos = 0  # decode index of the frame the next grab() gives
            landing: float | None = None  # after a seek: the time of frame 0, to check where the seek landed
            if first > 0 and self.info.constant_rate and not self.info.is_live and cap.grab():
                ms = self._ms(cap) or 0.0
                skipped = self._undecodable_start(ms)
                if skipped < first:
                    landing = ms - self._frame_ms(skipped)  # the time of frame 0, which a decoder may not give
                    # OpenCV counts frames from the first one it decoded
                    cap.set(cv2.CAP_PROP_POS_FRAMES, float(first - skipped))
                    pos = first
                else:  # the range starts among the frames no decoder gives: read from the start
                    cap.release()
                    cap = self._open()
                    if cap is None:
                        return
            elif first > 0 and not self.info.is_live:
                logger.info(
                    "%s: frame rate not known to be constant: walking to frame %d from the start (no seek)",
                    self.source, first,
                )  # fmt: skip
            fps = self.info.fps
            target = first
            last_ms: float | None = None  # time of the last frame grabbed
            gap_ms = 1000.0 / fps  # between the last two frames grabbed
            clock = _FrameClock(self.source, fps)
            while target < self.stop and not self._stop_event.is_set():
                grabbed = cap.grab()
                time_ms = self._pos_ms(cap) if grabbed else None
                ms = time_ms if time_ms is not None and time_ms > 0 else None  # frame 0 is at 0 either way
                if landing is not None:  # the first grab after a seek: was it the frame asked for?
                    if not (grabbed and self._landed_at(pos, None if ms is None else ms - landing)):
                        if not grabbed:  # a file starting without a keyframe can make the seek itself fail
                            logger.warning("%s: seeking to frame %d gave no frame: reading from the start instead",
                                           self.source, pos)  # fmt: skip
                        cap.release()  # read from the start instead: slower, but the right frames
                        cap, pos, last_ms, landing = self._open(), 0, None, None
                        clock = _FrameClock(self.source, fps)
                        if cap is None:
                            return
                        continue
                    landing = None
                if not grabbed:
                    self._put(self._early_end(pos, last_ms, gap_ms))
                    return
                if pos == 0 and ms is not None and (skipped := self._undecodable_start(ms)):
                    pos = skipped  # the decoder gave the first frame it could decode: number frames by their time
                    target = max(target, -(-pos // self.frame_interval) * self.frame_interval)
                    if target >= self.stop:
                        return
                if ms is not None and last_ms is not None and ms > last_ms:
                    gap_ms = ms - last_ms
                last_ms = ms if ms is not None else last_ms
                ts_ms = clock.ts_ms(pos, time_ms)  # every frame: a jump back between samples moves the next ones
                if pos == target:
                    ok, image = cap.retrieve()
                    if not ok or image is None:
                        self._put(self._early_end(pos, last_ms, gap_ms))
                        return
                    prepared = self._prepare(image) if self.prepare is not None else None
                    if not self._put(Frame(frame_id=target, ts_ms=round(ts_ms, 3), image=image, prepared=prepared)):
                        return
                    target += self.frame_interval
                pos += 1
        except Exception as exc:  # noqa: BLE001 - surface any decoder failure to the consumer
            self._put(CorruptVideoError(self.source, f"decoder failed: {exc}"))
        finally:
            if cap is not None:
                cap.release()
            self._put(_END)

    def _open(self) -> cv2.VideoCapture | None:
        """The capture the frames are read from, or ``None`` after queueing why it cannot be opened."""
        cap = _open_capture(self.source, threads=DECODER_THREADS)
        if cap.isOpened():
            return cap
        cap.release()
        why = (not self.info.is_live and _mp4_problem(self.source)) or "not a video container (OpenCV cannot open it)"
        self._put(NotAVideoError(self.source, why))
        return None

    def _pos_ms(self, cap: cv2.VideoCapture) -> float | None:
        """Presentation time of the frame just grabbed, in ms from the stream's start as FFmpeg gives it: 0 where the
        stream has none (raw H.264), below 0 for a frame before the start; ``None`` for a live source."""
        return None if self.info.is_live else float(cap.get(cv2.CAP_PROP_POS_MSEC))

    def _ms(self, cap: cv2.VideoCapture) -> float | None:
        """Presentation time of the frame just grabbed, or ``None`` where the stream has none (raw H.264 says 0)."""
        ms = self._pos_ms(cap)
        return ms if ms is not None and ms > 0 else None  # frame 0 is at 0 either way

    def _undecodable_start(self, first_ms: float) -> int:
        """How many frames the decoder left out before its first frame, at ``first_ms`` (0 for a whole video).

        A file cut out of a longer recording without re-encoding can start with frames that refer to frames before
        the cut (no keyframe first): H.264 decoders drop them and begin at the first keyframe, whose time says how
        many were dropped. Those frames are lost with the cut; the rest are numbered as the index lists them (the
        first decodable one is not frame 0), so a range or a part still reads the frames it names. The time is
        looked up in the MP4 index's frame times (B-frames cut in decode order leave holes among the first
        frames' times, so the frame rate is not constant there); without them only at a constant frame rate,
        where a frame's time gives its number.
        """
        if self.info.is_live or first_ms <= 0:
            return 0
        times, fps = self.info.head_times_s, self.info.fps
        seconds = first_ms / 1000.0
        k = bisect.bisect_left(times, seconds)
        nearest = min(
            (i for i in (k - 1, k) if 0 <= i < len(times)), key=lambda i: abs(times[i] - seconds), default=None
        )
        if nearest is not None and abs(times[nearest] - seconds) <= 0.5 / fps:
            skipped = nearest
        elif self.info.constant_rate and k >= len(times):
            skipped = round(seconds * fps)
        else:
            return 0  # not a time the index lists: the frames are numbered as decoded
        if skipped > 0:
            logger.warning(
                "%s: the first %d frames cannot be decoded (the file starts without a keyframe, e.g. cut from a "
                "longer recording, or its first frames are damaged); they are left out, reading from frame %d at %.3f s",
                self.source, skipped, skipped, seconds,
            )  # fmt: skip
        return skipped

    def _frame_ms(self, frame_id: int) -> float:
        """When frame ``frame_id`` is shown, in ms from the first frame: from the index where it says."""
        times = self.info.head_times_s
        return times[frame_id] * 1000.0 if frame_id < len(times) else frame_id * 1000.0 / self.info.fps

    def _landed_at(self, first: int, ms_after_frame0: float | None) -> bool:
        """True if the frame a seek to ``first`` gave is frame ``first``; else log why the range walks instead."""
        at = None if ms_after_frame0 is None else ms_after_frame0 * self.info.fps / 1000.0
        if at is not None and abs(at - first) < 0.5:
            return True
        logger.warning(
            "%s: seeking to frame %d landed at %s ms, frame %s by time: reading from the start instead",
            self.source, first, ms_after_frame0, "?" if at is None else f"{at:.2f}",
        )  # fmt: skip
        return False

    def _prepare(self, image: np.ndarray) -> Any:
        assert self.prepare is not None
        try:
            return self.prepare(image)
        except Exception:  # noqa: BLE001 - the consumer repeats the work and raises in its own thread
            logger.debug("prepare failed on the decoding thread; the consumer will redo it", exc_info=True)
            return None

    def _early_end(self, pos: int, last_ms: float | None, gap_ms: float) -> VideoError | object:
        """End of the range or an error, when frame ``pos`` cannot be read.

        The frame count is an estimate: the decoder running out of frames is the end of the video when it stopped
        within a frame of the count, or when the last frame read ends within a frame of the container's duration
        (a trimmed MP4, or a variable-frame-rate stream whose count is its duration times the frame rate). A
        video of unknown length ends where decoding ends. Else the data is truncated or corrupt.
        """
        count, duration_s, fps = self.info.frame_count, self.info.duration_s, self.info.fps
        if self.info.is_live or count is None:
            return _END
        if self.info.exact_frame_count is not None:
            # the MP4 index lists every frame: one missing, even the last, is data lost (the slack below is for
            # FFmpeg's estimates)
            if pos >= count:
                return _END
        elif pos >= count - 1 and pos >= self.start:
            # containers sometimes over-count by one frame; reading to within one frame of the end is complete
            return _END
        reached_s = None if last_ms is None else (last_ms + gap_ms) / 1000.0
        if (
            self.info.exact_frame_count is None
            and reached_s is not None
            and duration_s is not None
            and reached_s + 1.0 / fps >= duration_s
        ):
            return _END
        at = "" if reached_s is None else f" ({reached_s:.2f} s of {duration_s:.2f} s)"
        return CorruptVideoError(
            self.source,
            f"decoding stopped at frame {pos} of about {count}{at} (truncated or corrupt data); frames before it "
            "were read. Repair or re-encode the file (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4) to process the rest",
            frame_id=pos,
        )

    def __iter__(self) -> Iterator[Frame]:
        if self._thread is not None:
            raise RuntimeError("a FrameReader can be iterated only once; create a new one")
        self._thread = threading.Thread(
            target=self._run, name=f"crowd-decode-{Path(str(self.source)).name}", daemon=True
        )
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    break
                if isinstance(item, VideoError):
                    self.error = item
                    logger.warning("%s", item)
                    continue
                assert isinstance(item, Frame)
                self.frames_yielded += 1
                self.last_frame_id = item.frame_id
                yield item
        finally:
            self.close()
        if self.error is not None and self.raise_on_error:
            raise self.error

    def close(self) -> None:
        """Stop the decoding thread (safe to call more than once)."""
        self._stop_event.set()
        if self._thread is not None and self._thread.is_alive():
            while True:  # drain so a blocked put() wakes up
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a still image as BGR, with the same typed errors as videos."""
    check_file(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NotAVideoError(path, "not an image OpenCV can decode")
    h, w = image.shape[:2]
    if not (0 < w <= MAX_DIMENSION and 0 < h <= MAX_DIMENSION):
        raise BadDimensionsError(path, f"image size {w}x{h} is outside 1..{MAX_DIMENSION} pixels per side")
    return image


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True if the suffix is a still-image format (``.jpg``, ``.png``, ...)."""
    return Path(str(path)).suffix.lower() in IMAGE_SUFFIXES
