"""Benchmark memory: peak RSS of a detection run and of the drain, at two input sizes (should stay flat).

* detection: :func:`crowd.pipeline.process_video` on a generated 1920x1080 mp4v clip (``--seconds`` long at 30 fps,
  default 60 s; ``--seconds 600`` is the 10-minute camera file of issue 9, ~25 min in all), once on the first
  half of its frames and once on all of them, every 10th frame, messages encoded and dropped;
* drain: :func:`crowd.ingest.drain` of a backlog of ``--messages`` and of 3x that many, each into a fresh
  schema.

Every measurement runs in a fresh process (``ru_maxrss`` is a high-water mark); RSS is also sampled every
50 ms to show its course (at 25 %, 50 % and 100 % of the run). Flat = the larger input's peak within ~10 %.

Usage: ``source dev/env.sh && python bench/memory.py [--seconds 60] [--messages 30000]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))


def _sampler(samples: list[int], stop: threading.Event) -> None:
    import psutil

    proc = psutil.Process()
    while not stop.is_set():
        samples.append(proc.memory_info().rss)
        time.sleep(0.05)


def child(kind: str, arg: str, size: int) -> None:
    samples: list[int] = []
    stop = threading.Event()
    if kind == "detect":
        from crowd.detection import build_detector
        from crowd.pipeline import process_video

        detector = build_detector("yolov3-tiny")
        threading.Thread(target=_sampler, args=(samples, stop), daemon=True).start()
        start = time.perf_counter()
        summary = process_video(arg, detector, frame_interval=10, frame_range=(0, size), on_message=lambda m: m.to_json(),
                                video_id="v")  # fmt: skip
        work = summary.frames_processed
    else:
        from crowd.ingest import drain

        threading.Thread(target=_sampler, args=(samples, stop), daemon=True).start()
        start = time.perf_counter()
        summary = drain("kafka_default", "crowd_postgres", arg, f"mem-{uuid.uuid4().hex[:8]}", batch_wait_s=0.5)
        work = summary.messages
        assert work == size, (work, size)
    seconds = time.perf_counter() - start
    stop.set()
    n = len(samples)
    course = (
        {f"{p}%": round(samples[max(0, min(n - 1, n * p // 100 - 1))] / 2**20, 1) for p in (25, 50, 100)} if n else {}
    )
    print(json.dumps({"kind": kind, "work": work, "seconds": round(seconds, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "rss_course_mib": course}))  # fmt: skip


def _run_child(kind: str, arg: str, size: int, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, arg, str(size)],
        capture_output=True, text=True, check=True, env=env or os.environ.copy(),
    )  # fmt: skip
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    from detect import make_video
    from ingest import _message
    from services import Scratch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        frames = 30 * args.seconds
        video = make_video(Path(tmp) / "long1080.mp4", frames, size=(1920, 1080))
        for size in (frames // 2, frames):
            results.append(
                {"input": f"1080p mp4v, {size} frames ({size // 30} s)", **_run_child("detect", str(video), size)}
            )

    import random

    scratch = Scratch()
    from crowd.kafka import DeliveryTracker, reliable_producer

    try:
        for n in (args.messages, 3 * args.messages):
            topic, schema = scratch.topic("bench-mem"), scratch.schema("bench_mem")
            rng = random.Random(5)
            producer = reliable_producer("kafka_default", timeout_s=60)
            tracker = DeliveryTracker()
            for i in range(n):
                producer.produce(topic, key=f"video-{i % 8}".encode(), value=_message(f"video-{i % 8}", i // 8, rng),
                                 on_delivery=tracker.callback)  # fmt: skip
                producer.poll(0)
            tracker.wait(producer, timeout_s=120)
            scratch.use_schema(schema)
            results.append({"input": f"backlog of {n} messages", **_run_child("drain", topic, n)})
    finally:
        scratch.close()
    print(f"{'input':<34}{'work':>8}{'s':>7}{'peak MiB':>10}  RSS course (25/50/100 %)")
    for r in results:
        course = " / ".join(str(v) for v in r["rss_course_mib"].values())
        print(f"{r['input']:<34}{r['work']:>8}{r['seconds']:>7}{r['peak_rss_mib']:>10}  {course}")
    growth = {
        "detect_peak_ratio": round(results[1]["peak_rss_mib"] / results[0]["peak_rss_mib"], 3),
        "drain_peak_ratio": round(results[3]["peak_rss_mib"] / results[2]["peak_rss_mib"], 3),
    }
    print(json.dumps({"results": results, "peak_ratio_larger_vs_smaller_input": growth}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
