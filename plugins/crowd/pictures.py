"""Pictures of a processed video: annotated busiest frame, density heatmap of face centres, faces over time.

Feed a :class:`PictureAccumulator` once per processed frame, then call :meth:`PictureAccumulator.write`.

Example:
    >>> acc = PictureAccumulator(width=1280, height=720)
    >>> acc.add(frame_id=0, ts_ms=0.0, image=frame, detections=dets)   # doctest: +SKIP
    >>> acc.write("out/pictures")                                       # doctest: +SKIP
    PicturePaths(annotated=..., heatmap=..., timeline=...)
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class PicturePaths:
    """Files written by :meth:`PictureAccumulator.write` (``None`` when nothing was processed)."""

    annotated: Path | None
    heatmap: Path | None
    timeline: Path | None


def annotate(image: np.ndarray, detections: Sequence[Any], caption: str | None = None) -> np.ndarray:
    """Copy of ``image`` with boxes (green) and a count caption drawn."""
    out = image.copy()
    thickness = max(1, round(max(out.shape[:2]) / 500))
    for d in detections:
        cv2.rectangle(out, (d.x, d.y), (d.x + d.width, d.y + d.height), (0, 255, 0), thickness)
    text = caption if caption is not None else f"{len(detections)} faces"
    scale = max(0.5, out.shape[1] / 1200)
    cv2.putText(out, text, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2)
    cv2.putText(out, text, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 255, 255), thickness)
    return out


def replace_file(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: into a hidden temporary file of the same folder, synced to disk, then
    renamed over ``path``.

    A reader (the API), or a second try of the same task writing the same picture, sees the old file or the new
    one, never half of one; a process killed while writing leaves the old file (and at most a hidden ``.tmp``
    file, which the API does not list).

    Raises:
        OSError: the file could not be written (no space left, no permission), naming it.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique: other tries may write too
    try:
        try:
            with open(tmp, "xb") as out:  # mode 0666 less the umask, as any new file
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OSError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def save_image(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Encode ``image`` in the format of ``path``'s suffix (``.png``, ``.jpg``) and :func:`replace_file` it.

    Raises:
        OSError: the file could not be written, or OpenCV could not encode the image, naming the file.
    """
    target = Path(path)
    try:
        encoded, buffer = cv2.imencode(target.suffix, image)
    except cv2.error as exc:
        raise OSError(f"cannot write {target}: {exc}") from None
    if not encoded:
        raise OSError(f"cannot write {target}: OpenCV could not encode it as {target.suffix}")
    return replace_file(target, buffer.tobytes())


@dataclass
class PictureAccumulator:
    """Collects what the pictures need, cheaply: counts per frame, face centres, and the busiest frame.

    Memory per frame is two numbers (time and count, in flat arrays) whatever its faces: the centres go straight
    into the heatmap's bins. A camera read with ``--pictures`` until stopped kept every face's centre as Python
    floats (about 480 MiB at 200,000 frames of 30 faces).
    """

    width: int
    height: int
    bins: int = 64
    ts_ms: array = field(default_factory=lambda: array("d"))
    counts: array = field(default_factory=lambda: array("l"))
    _hist: np.ndarray = field(init=False, repr=False)
    _best: tuple[int, int, float, np.ndarray, list[Any]] | None = None

    def __post_init__(self) -> None:
        # bins of the frame's shape, at most 4x as many rows as columns (a 1x8192 frame made 33M bins: 0.5 GB)
        rows = max(1, min(round(self.bins * self.height / max(self.width, 1)), 4 * self.bins))
        self._hist = np.zeros((rows, self.bins), np.float64)

    def add(self, frame_id: int, ts_ms: float, image: np.ndarray, detections: Sequence[Any]) -> None:
        """Record one processed frame (keeps a copy of the image only if it is the busiest so far)."""
        n = len(detections)
        self.ts_ms.append(ts_ms)
        self.counts.append(n)
        rows, cols = self._hist.shape
        for d in detections:  # the bin of each centre inside the frame (the frame's far edges are in the last bins)
            cx, cy = d.x + d.width / 2, d.y + d.height / 2
            if 0 <= cx <= self.width and 0 <= cy <= self.height:
                col = min(int(cx * cols / max(self.width, 1)), cols - 1)
                self._hist[min(int(cy * rows / max(self.height, 1)), rows - 1), col] += 1
        if self._best is None or n > self._best[0]:
            self._best = (n, frame_id, ts_ms, image.copy(), list(detections))

    def heatmap(self) -> np.ndarray:
        """BGR image (frame size) of face-centre density, ``COLORMAP_JET`` (blue = none)."""
        hist = cv2.GaussianBlur(self._hist.astype(np.float32), (3, 3), 0)
        if hist.max() > 0:
            hist = hist / hist.max()
        small = (hist * 255).astype(np.uint8)
        big = cv2.resize(small, (self.width, self.height), interpolation=cv2.INTER_NEAREST)
        return cv2.applyColorMap(big, cv2.COLORMAP_JET)

    def write(self, folder: str | os.PathLike[str], prefix: str = "") -> PicturePaths:
        """Write ``annotated.jpg``, ``heatmap.png`` and ``faces_over_time.png`` into ``folder``; return paths.

        Raises:
            OSError: a picture could not be written (no space left, no permission), naming the file.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if self._best is None:
            return PicturePaths(None, None, None)
        n, frame_id, ts, image, dets = self._best
        annotated = out / f"{prefix}annotated.jpg"
        save_image(annotated, annotate(image, dets, f"frame {frame_id} ({ts / 1000:.1f} s): {n} faces"))
        heat = out / f"{prefix}heatmap.png"
        save_image(heat, self.heatmap())
        timeline = out / f"{prefix}faces_over_time.png"
        self._plot(timeline)
        return PicturePaths(annotated, heat, timeline)

    def _plot(self, path: Path) -> None:
        from matplotlib.figure import Figure  # Agg canvas via Figure, no pyplot global state

        fig = Figure(figsize=(8, 3), dpi=100)
        ax = fig.add_subplot()
        seconds = np.asarray(self.ts_ms) / 1000.0
        ax.plot(seconds, np.asarray(self.counts), drawstyle="steps-post", color="tab:blue")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("faces")
        ax.set_title("faces per processed frame")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        replace_file(path, png.getvalue())
