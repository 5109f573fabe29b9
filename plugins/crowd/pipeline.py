"""Video -> sampled frames -> detector -> :class:`~crowd.messages.FaceMessage` per frame -> ``on_message``.

Example:
    >>> from crowd.detection import build_detector
    >>> from crowd.pipeline import process_video
    >>> summary = process_video("clip.mp4", build_detector("mtcnn"), on_message=print)   # doctest: +SKIP
    >>> summary.frames_processed, summary.max_faces                                      # doctest: +SKIP
    (120, 3)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crowd.detection import Detector
from crowd.messages import FaceMessage, build_message
from crowd.pictures import PictureAccumulator, PicturePaths, annotate, save_image
from crowd.video import FrameReader, content_hash, is_live_source, live_source_id, public_source, read_image

logger = logging.getLogger(__name__)

ProgressFn = Callable[["Progress"], None]


@dataclass(frozen=True)
class Progress:
    """Progress report: ``done`` of ``total`` frames (``total`` is ``None`` for live sources)."""

    done: int
    total: int | None
    frames_per_s: float
    eta_s: float | None
    frame_id: int

    def __str__(self) -> str:
        if self.total:
            eta = f", ETA {format_duration(self.eta_s)}" if self.eta_s is not None else ""
            return f"frame {self.done}/{self.total} ({100 * self.done // self.total}%), {self.frames_per_s:.1f} frames/s{eta}"
        return f"frame {self.done} (id {self.frame_id}), {self.frames_per_s:.1f} frames/s"


def format_duration(seconds: float | None) -> str:
    """``"2h05m"``, ``"12m"``, ``"3m07s"``, ``"42s"``; ``"?"`` for ``None``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    return f"{s}s"


@dataclass(frozen=True)
class VideoSummary:
    """Outcome of :func:`process_video`. ``error`` is set (and ``stopped_early``) if decoding failed midway."""

    video_id: str
    source: str
    model: str
    fps: float
    frame_count: int | None
    frame_interval: int
    frame_range: tuple[int, int | None]
    frames_processed: int
    frames_expected: int | None
    faces_total: int
    max_faces: int
    max_faces_frame_id: int | None
    max_faces_ts_ms: float | None
    stopped_early: bool
    error: str | None
    error_reason: str | None
    last_frame_id: int | None
    wall_time_s: float
    frames_per_s: float
    pictures: dict[str, str | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


def process_video(
    source: str | os.PathLike[str] | int,
    detector: Detector,
    *,
    frame_interval: int | None = None,
    target_fps: float | None = None,
    frame_range: tuple[int, int | None] | None = None,
    on_message: Callable[[FaceMessage], None] | None = None,
    progress: ProgressFn | logging.Logger | None = None,
    progress_every_s: float = 5.0,
    pictures_dir: str | os.PathLike[str] | None = None,
    video_id: str | None = None,
    max_frames: int | None = None,
    pictures_prefix: str = "",
    stop: threading.Event | None = None,
) -> VideoSummary:
    """Detect faces on the sampled frames of ``source`` and hand one message per frame to ``on_message``.

    Opening errors (missing file, not a video, absurd metadata, ...) raise :class:`~crowd.video.VideoError`.
    A decode failure in the middle does not raise: the frames before it are processed and published, and the
    summary has ``stopped_early=True`` with the error text and reason.

    Args:
        source: video path, camera index or stream URL.
        detector: any :class:`~crowd.detection.Detector`.
        frame_interval / target_fps / frame_range: frame sampling, see :class:`~crowd.video.FrameReader`.
        on_message: called with every message, in frame order (e.g. the Kafka publisher).
        progress: a callable receiving :class:`Progress`, or a logger (default ``crowd.pipeline``).
        progress_every_s: seconds between progress reports.
        pictures_dir: if given, write the annotated frame, heatmap and timeline there.
        pictures_prefix: put before their file names (a part of a split video: ``part-0002-``).
        video_id: id recorded in messages (default: :func:`~crowd.video.content_hash` of the file, or the
            source string for live sources).
        max_frames: stop after this many processed frames (useful for live sources); at least 1.
        stop: once set, stop after the frame being processed, as at the end of the range (e.g. on Ctrl-C).

    Raises:
        ValueError: ``max_frames`` below 1 (a frame would still be processed).
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames={max_frames!r} must be at least 1 (or None for no limit)")
    started, opened_at = time.perf_counter(), datetime.now(timezone.utc)  # a live session's id says when it began
    reader = FrameReader(
        source, frame_interval=frame_interval, target_fps=target_fps, frame_range=frame_range, prepare=detector.prepare
    )
    info = reader.info
    if video_id is None:
        video_id = live_source_id(source, opened_at) if is_live_source(source) else content_hash(source)  # type: ignore[arg-type]
    shown = public_source(source)  # in messages and logs: a stream URL without its credentials
    total = reader.expected_frames
    report = _progress_sink(progress)
    acc = PictureAccumulator(info.width, info.height) if pictures_dir is not None else None
    done = faces_total = max_faces = 0
    max_frame: int | None = None
    max_ts: float | None = None
    last_report = started
    logger.info(
        "processing %s (id %s) with %s: %s fps, %s frames, every %d-th frame, range %s..%s, %s to process",
        shown, video_id, detector.name, f"{info.fps:g}", info.frame_count, reader.frame_interval,
        reader.start, reader.stop_frame if reader.stop_frame is not None else "live" if info.is_live else "end",
        total if total is not None else "?",
    )  # fmt: skip
    for frame in reader:
        detections = detector.detect_prepared(frame.image, frame.prepared)
        message = build_message(
            video_id, shown, frame.frame_id, frame.ts_ms, frame.image.shape, detections, detector.name
        )
        if on_message is not None:
            on_message(message)
        if acc is not None:
            acc.add(frame.frame_id, frame.ts_ms, frame.image, detections)
        done += 1
        faces_total += message.total_faces
        if max_frame is None or message.total_faces > max_faces:
            max_faces, max_frame, max_ts = message.total_faces, frame.frame_id, frame.ts_ms
        now = time.perf_counter()
        if now - last_report >= progress_every_s:
            last_report = now
            rate = done / (now - started)
            # past an estimated count (no MP4 index) the total is unknown
            known = total if total is not None and done <= total else None
            eta = (known - done) / rate if known is not None and rate > 0 else None
            report(Progress(done, known, rate, eta, frame.frame_id))
        if (max_frames is not None and done >= max_frames) or (stop is not None and stop.is_set()):
            break
    reader.close()
    wall = time.perf_counter() - started
    pictures: dict[str, str | None] | None = None
    if acc is not None and pictures_dir is not None:
        paths: PicturePaths = acc.write(Path(pictures_dir), prefix=pictures_prefix)
        pictures = {k: (str(v) if v is not None else None) for k, v in asdict(paths).items()}
    err = reader.error
    summary = VideoSummary(
        video_id=video_id,
        source=shown,
        model=detector.name,
        fps=info.fps,
        frame_count=info.frame_count,
        frame_interval=reader.frame_interval,
        frame_range=(reader.start, reader.stop_frame),
        frames_processed=done,
        frames_expected=total,
        faces_total=faces_total,
        max_faces=max_faces,
        max_faces_frame_id=max_frame,
        max_faces_ts_ms=max_ts,
        stopped_early=err is not None,
        error=str(err) if err is not None else None,
        error_reason=err.reason.value if err is not None else None,
        last_frame_id=reader.last_frame_id,
        wall_time_s=round(wall, 3),
        frames_per_s=round(done / wall, 3) if wall > 0 else 0.0,
        pictures=pictures,
    )
    level = logging.WARNING if err is not None else logging.INFO
    logger.log(
        level, "done %s: %d frames in %.1fs (%.2f frames/s), %d faces, max %d at frame %s%s",
        shown, done, wall, summary.frames_per_s, faces_total, max_faces, max_frame,
        f"; stopped early: {err}" if err is not None else "",
    )  # fmt: skip
    return summary


def _progress_sink(progress: ProgressFn | logging.Logger | None) -> ProgressFn:
    if callable(progress) and not isinstance(progress, logging.Logger):
        return progress
    log = progress if isinstance(progress, logging.Logger) else logger
    return lambda p: log.info("%s", p)


def detect_image(
    image_path: str | os.PathLike[str],
    detector: Detector,
    *,
    video_id: str | None = None,
    pictures_dir: str | os.PathLike[str] | None = None,
) -> FaceMessage:
    """Detect faces in one still image; returns the message of "frame 0". With ``pictures_dir``, the image with
    its boxes drawn is written there as ``annotated.jpg``."""
    image = read_image(image_path)
    vid = video_id or content_hash(image_path)
    detections = detector.detect(image)
    if pictures_dir is not None:
        save_image(Path(pictures_dir) / "annotated.jpg", annotate(image, detections))
    return build_message(vid, str(image_path), 0, 0.0, image.shape, detections, detector.name)


def detect_faces(image_path: str | os.PathLike[str], detector: Detector | None = None) -> dict[str, Any]:
    """Seed-compatible helper: the message dict (``frame_id``, ``total_faces``, ``faces`` ...) for one image.

    Example:
        >>> detect_faces("people.jpg")["total_faces"]  # doctest: +SKIP
        4
    """
    if detector is None:
        from crowd.detection import build_detector

        detector = build_detector()
    return detect_image(image_path, detector).to_dict()
