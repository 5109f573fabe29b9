"""Synthetic Darknet weights for a YOLOv3 cfg: the real network's shape and cost, no real detections.

The YOLOv3 *face* weights cannot be had offline (``../shared/NOTES.md``), so tests and ``bench/detect.py`` load
``include/yolov3/yolov3-face.cfg`` with weights written here: He-scaled random convolutions (activations stay in
range through all 75 layers, so ``net.forward`` costs what it costs with trained weights) and a detection head
whose biases fix every output row (``obj_bias`` > 0: every cell reports a face; < 0: none does).

Usage: ``python dev/yolo_weights.py include/yolov3/yolov3-face.cfg /tmp/yolov3-face-synthetic.weights [-10]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from crowd.models import darknet_conv_layers  # noqa: E402


def write_weights(cfg: Path, path: Path, *, obj_bias: float, seed: int = 0) -> int:
    """Write weights for ``cfg`` to ``path``; returns the number of parameters."""
    rng = np.random.default_rng(seed)
    parts = [np.array([0, 2, 0], np.int32).tobytes(), np.array([0], np.int64).tobytes()]
    total = 0
    for f, c, k, bn in darknet_conv_layers(cfg):
        fan_in = c * k * k
        if bn:
            block = [np.zeros(f), np.ones(f), np.zeros(f), np.ones(f)]  # bias, scale, mean, var
            block.append(rng.standard_normal(f * fan_in) * np.sqrt(1.0 / fan_in))
        else:  # detection head: zero weights, biases fix the output (tx, ty, tw, th, obj, class) per anchor
            block = [np.tile([0, 0, 0, 0, obj_bias, 10.0], f // 6), np.zeros(f * fan_in)]
        arr = np.concatenate(block).astype(np.float32)
        total += arr.size
        parts.append(arr.tobytes())
    path.write_bytes(b"".join(parts))
    return total


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    n = write_weights(Path(sys.argv[1]), Path(sys.argv[2]), obj_bias=float(sys.argv[3]) if len(sys.argv) == 4 else -10)
    print(f"{sys.argv[2]}: {n:,} parameters")
