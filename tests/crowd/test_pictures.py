from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from crowd.detection import Detection
from crowd.pictures import PictureAccumulator, annotate


def test_pictures_written(tmp_path: Path) -> None:
    acc = PictureAccumulator(width=320, height=240)
    for i in range(10):
        dets = [Detection(10 + 20 * j, 100, 30, 30, 0.9) for j in range(i % 4)]
        acc.add(i * 10, i * 333.3, np.full((240, 320, 3), 80, np.uint8), dets)
    paths = acc.write(tmp_path / "pics")
    assert all(p is not None and p.stat().st_size > 500 for p in (paths.annotated, paths.heatmap, paths.timeline))
    heat = cv2.imread(str(paths.heatmap))
    assert heat.shape == (240, 320, 3)
    # hottest area is where the centres were (row ~115), cold (blue) far away
    assert heat[115, 25, 2] > heat[10, 300, 2] and heat[10, 300, 0] > heat[10, 300, 2]
    ann = cv2.imread(str(paths.annotated))
    assert (ann[100, 10:40, 1] > 200).any()  # a green box edge of the busiest frame


def test_annotate_draws_boxes() -> None:
    img = np.zeros((100, 100, 3), np.uint8)
    out = annotate(img, [Detection(20, 40, 30, 30, 1.0)])
    assert out[40, 30].tolist() == [0, 255, 0] and img.max() == 0


def test_empty_accumulator(tmp_path: Path) -> None:
    assert PictureAccumulator(10, 10).write(tmp_path).annotated is None


def test_heatmap_of_a_frame_of_extreme_shape_stays_small() -> None:
    """A 1x8192 frame (the probe allows 1..8192 a side) made a histogram of 524,288 x 64 bins: ~0.5 GB at peak
    for a picture of 24 KB. Rows are now at most 4x the columns."""
    import tracemalloc

    acc = PictureAccumulator(width=1, height=8192)
    acc.add(0, 0.0, np.zeros((8192, 1, 3), np.uint8), [Detection(x=0, y=4000, width=1, height=50, confidence=0.9)])
    tracemalloc.start()
    try:
        heat = acc.heatmap()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert heat.shape == (8192, 1, 3)
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB"
