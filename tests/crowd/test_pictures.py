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
