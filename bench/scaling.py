"""Benchmark scaling: 1 vs 2 detection worker processes on several videos (throughput ratio).

Each worker is a separate process (as Celery workers or mapped Airflow tasks are) running
:func:`crowd.pipeline.process_video` on its share of the videos, messages encoded but not sent. Variants, interleaved
``--repeat`` times (medians):

* ``1w``: one worker, all videos, OpenCV's default threads (one per core);
* ``2w``: two workers, each with OpenCV's default threads (4 inference threads on 2 cores);
* ``2w_1t``: two workers, ``cv2.setNumThreads(1)`` each (one inference thread per core).

Usage: ``.venv/bin/python bench/scaling.py [--videos 4] [--frames 150] [--interval 10] [--backend yolov3-tiny]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))


def _worker(args: tuple[list[str], str, int, int | None, mp.Barrier]) -> tuple[int, float]:
    videos, backend, interval, threads, barrier = args
    import cv2

    from crowd.detection import build_detector
    from crowd.pipeline import process_video

    if threads is not None:
        cv2.setNumThreads(threads)
    detector = build_detector(backend)
    barrier.wait()  # model loaded in every worker: time the work, not the start
    start = time.perf_counter()
    frames = 0
    for video in videos:
        frames += process_video(video, detector, frame_interval=interval, on_message=lambda m: m.to_json(),
                                video_id="v").frames_processed  # fmt: skip
    return frames, time.perf_counter() - start


def run_workers(videos: list[str], workers: int, backend: str, interval: int, threads: int | None) -> tuple[int, float]:
    """Frames processed and wall seconds from the common start to the last worker's end."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        shares = [videos[i::workers] for i in range(workers)]
        with ctx.Pool(workers) as pool:
            results = pool.map(_worker, [(s, backend, interval, threads, barrier) for s in shares])
    return sum(f for f, _ in results), max(t for _, t in results)


def main(argv: list[str] | None = None) -> int:
    from detect import make_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--backend", default="yolov3-tiny")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_video(Path(tmp) / "v0.mp4", args.frames)
        videos = [str(base)]
        for i in range(1, args.videos):  # same content, separate files (the OS cache holds them all)
            copy = Path(tmp) / f"v{i}.mp4"
            copy.write_bytes(base.read_bytes())
            videos.append(str(copy))
        frames = 0
        for _ in range(args.repeat):
            for name, workers, threads in (("1w", 1, None), ("2w", 2, None), ("2w_1t", 2, 1)):
                frames, seconds = run_workers(videos, workers, args.backend, args.interval, threads)
                runs.setdefault(name, []).append(frames / seconds)
    ratios = {
        k: round(statistics.median(a / b for a, b in zip(runs[k], runs["1w"], strict=True)), 3) for k in ("2w", "2w_1t")
    }
    report = {
        "cores": os.cpu_count(), "backend": args.backend, "videos": args.videos, "sampled_frames": frames,
        "frames_per_s": {k: round(statistics.median(v), 2) for k, v in runs.items()},
        "throughput_vs_1_worker": ratios,
    }  # fmt: skip
    print(f"{'variant':<8}{'frames/s':>10}{'vs 1w':>8}")
    for k, v in report["frames_per_s"].items():
        print(f"{k:<8}{v:>10}{ratios.get(k, 1.0):>8}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
