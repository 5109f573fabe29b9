"""Benchmark the folder scan: a folder of videos already processed, scanned again (what every scheduled run does).

* ``hash_all``: the scan as it was before the scanned_files table: every ``.mp4`` read whole (SHA-256) at every
  scan to learn its video id (``crowd.storage.known_video_ids`` replaced by one that knows nothing);
* ``ours``: :func:`crowd.jobs.find_new_videos` as it is: a file whose size, times and inode are those recorded
  when it was hashed keeps its id without being read.

Both scan the same folder (``--files`` files of ``--mb`` MB of random bytes, dated an hour back, all registered as
processed), interleaved, ``--repeat`` times; medians and the ratio ``hash_all / ours``. The files sit in the page
cache after the first pass, so ``hash_all`` measures hashing alone: on a disk or network share that does not hold
the whole folder in memory, reading it costs more.

Usage: ``source dev/env.sh && python bench/scan.py [--files 16] [--mb 64] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    from services import Scratch

    from crowd import jobs, storage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--mb", type=int, default=64, help="size of each file, MB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("crowd", "airflow"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with Scratch() as scratch, tempfile.TemporaryDirectory() as folder:
        scratch.use_schema(scratch.schema("bench_scan"))
        os.environ.update({"CROWD_VIDEO_ROOTS": folder, "CROWD_SCAN_MIN_AGE_S": "60"})
        hour_ago = time.time() - 3600
        for i in range(args.files):
            path = Path(folder) / f"camera-{i:03d}.mp4"
            with open(path, "wb") as out:
                for _ in range(args.mb):
                    out.write(os.urandom(1 << 20))
            os.utime(path, (hour_ago, hour_ago))
        items = jobs.find_new_videos()  # the first scan hashes every file (and sees they are not videos)
        with storage.connect("crowd_postgres") as conn:
            for item in items:
                storage.mark_video_failed(conn, item.video_id, item.path, "benchmark file")
        print(f"{args.files} files x {args.mb} MB, registered as processed")

        def forgetful(conn, signatures):  # the scan before scanned_files: nothing known, every file read
            return {}

        def hash_all() -> tuple[float, list]:
            original = storage.known_video_ids
            storage.known_video_ids = forgetful
            try:
                return timed()
            finally:
                storage.known_video_ids = original

        def timed() -> tuple[float, list]:
            started = time.perf_counter()
            planned = jobs.find_new_videos()
            return time.perf_counter() - started, planned

        runs: dict[str, list[float]] = {"hash_all": [], "ours": []}
        for r in range(args.repeat):
            order = [("hash_all", hash_all), ("ours", timed)]
            for name, variant in order if r % 2 == 0 else order[::-1]:
                seconds, planned = variant()
                assert planned == [], f"{name} planned processed videos again: {planned[:3]}"
                runs[name].append(seconds)
            print(f"repetition {r + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in runs.items()))

    ratio = statistics.median(h / o for h, o in zip(runs["hash_all"], runs["ours"], strict=True))
    report = {
        "files": args.files,
        "mb_per_file": args.mb,
        "seconds": {k: round(statistics.median(v), 4) for k, v in runs.items()},
        "seconds_range": {k: [round(min(v), 4), round(max(v), 4)] for k, v in runs.items()},
        "hash_all_over_ours": round(ratio, 1),
        "hashed_mb_per_s": round(args.files * args.mb / statistics.median(runs["hash_all"])),
    }
    print(f"{'variant':<10}{'seconds':>10}{'range':>18}")
    for k, v in report["seconds"].items():
        lo, hi = report["seconds_range"][k]
        print(f"{k:<10}{v:>10.3f}{f'{lo:.3f}-{hi:.3f}':>18}")
    print(f"hash_all / ours: {report['hash_all_over_ours']}x ({report['hashed_mb_per_s']} MB/s hashed)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
