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


def test_memory_per_frame_does_not_grow_with_its_faces() -> None:
    """Every face's centre was kept as two Python floats: a camera read with --pictures until stopped grew by about
    480 MiB per 200,000 frames of 30 faces. The centres go straight into the heatmap's bins."""
    import tracemalloc

    faces = [Detection(x=10 * k, y=5 * k, width=20, height=20, confidence=0.9) for k in range(30)]
    image = np.zeros((240, 320, 3), np.uint8)
    acc = PictureAccumulator(width=320, height=240)
    acc.add(0, 0.0, image, faces)  # the busiest frame's copy is kept: not what is measured
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 20_001):
            acc.add(i, i * 33.3, image, faces[: 29 if i % 2 else 30])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1 << 20, f"{grown / 2**20:.1f} MiB for 20,000 frames"  # 16 bytes a frame: ~0.3 MiB


def test_heatmap_bins_are_those_of_a_2d_histogram_of_the_centres() -> None:
    rng = np.random.default_rng(3)
    width, height = 300, 170
    acc = PictureAccumulator(width=width, height=height)
    centres_x, centres_y = [], []
    for i in range(200):
        dets = []
        for _ in range(int(rng.integers(0, 6))):
            x, y, side = int(rng.integers(-30, width)), int(rng.integers(-30, height)), int(rng.integers(2, 40))
            dets.append(Detection(x=x, y=y, width=side, height=side, confidence=0.5))
            centres_x.append(x + side / 2)
            centres_y.append(y + side / 2)
        acc.add(i, float(i), np.zeros((height, width, 3), np.uint8), dets)
    expected, _, _ = np.histogram2d(centres_y, centres_x, bins=acc._hist.shape, range=((0, height), (0, width)))
    assert acc._hist.sum() > 100 and np.array_equal(acc._hist, expected)
