"""Benchmark: raw detector time vs. our pipeline vs. a seed-style loop, on the same sampled frames.

Run: ``.venv/bin/python bench/detect.py [--backend mtcnn|yolov3-tiny] [--frames 300] [--interval 10]``

(a) raw: ``detector.detect`` (for YOLO: ``net.forward`` only) on frames decoded beforehand;
(b) pipeline: :func:`crowd.pipeline.process_video` incl. decode (threaded, grab() skipping) and messages;
(c) seed-style: ``cap.read()`` on every frame, detect every ``interval``-th, build a dict.
Goal: raw/pipeline time >= 0.95 and a clear win over (c).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from crowd.detection import Detector, YoloV3Detector, build_detector  # noqa: E402
from crowd.pipeline import process_video  # noqa: E402
from crowd.video import FrameReader  # noqa: E402


def make_video(path: Path, n: int, size: tuple[int, int] = (1280, 720), fps: float = 30.0) -> Path:
    faces = (data.lfw_subset()[:100] * 255).astype(np.uint8)
    w, h = size
    rng = np.random.default_rng(0)
    bg = cv2.resize(rng.integers(60, 200, (h // 16, w // 16), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        img = cv2.cvtColor(bg, cv2.COLOR_GRAY2BGR)
        for k in range(8):
            x, y = 40 + k * 150 + (i % 20), 200 + 60 * (k % 3)
            img[y : y + 80, x : x + 80] = cv2.cvtColor(
                cv2.resize(faces[(k + i // 30) % 100], (80, 80)), cv2.COLOR_GRAY2BGR
            )
        writer.write(img)
    writer.release()
    return path


def raw_time(detector: Detector, frames: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for f in frames:
        if isinstance(detector, YoloV3Detector):
            detector.forward(f)
        else:
            detector.detect(f)
    return time.perf_counter() - start


def seed_style(video: Path, detector: Detector, interval: int) -> float:
    start = time.perf_counter()
    cap = cv2.VideoCapture(str(video))
    i, out = 0, []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % interval == 0:
            dets = detector.detect(frame)
            faces = [{"face_id": k, "bounding_box": {"x": d.x, "y": d.y, "width": d.width, "height": d.height},
                      "confidence": d.confidence} for k, d in enumerate(dets)]  # fmt: skip
            out.append(json.dumps({"frame_id": i, "total_faces": len(faces), "faces": faces}).encode())
        i += 1
    cap.release()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="mtcnn")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--video", default=None, help="use this video instead of a generated 1280x720 one")
    args = ap.parse_args()
    detector = build_detector(args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(args.video) if args.video else make_video(Path(tmp) / "bench.mp4", args.frames)
        frames = [f.image for f in FrameReader(video, frame_interval=args.interval)]
        detector.detect(frames[0])  # warm up (net allocation)
        n = len(frames)
        t_raw = raw_time(detector, frames)
        msgs: list[bytes] = []
        start = time.perf_counter()
        summary = process_video(
            video, detector, frame_interval=args.interval, on_message=lambda m: msgs.append(m.to_json())
        )
        t_pipe = time.perf_counter() - start
        t_seed = seed_style(video, detector, args.interval)
    assert summary.frames_processed == n == len(msgs)
    result = {
        "model": detector.name, "video": str(args.video or f"generated 1280x720 x{args.frames}"),
        "sampled_frames": n, "interval": args.interval,
        "raw_ms_per_frame": round(1000 * t_raw / n, 1), "pipeline_ms_per_frame": round(1000 * t_pipe / n, 1),
        "seed_ms_per_frame": round(1000 * t_seed / n, 1),
        "pipeline_over_raw_throughput": round(t_raw / t_pipe, 3), "pipeline_speedup_vs_seed": round(t_seed / t_pipe, 2),
    }  # fmt: skip
    print(f"{'variant':<12}{'ms/frame':>10}")
    for key in ("raw", "pipeline", "seed"):
        print(f"{key:<12}{result[key + '_ms_per_frame']:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
