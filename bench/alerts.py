"""Benchmark what keeping the alert rows costs a drain batch, on a long video that has an alert.

Each batch brings 2,000 new frames of one video with a crowd in them (a live source, a long recording); the drain
then brings the video's ``alerts`` rows to the episodes of its stored frames (``crowd.alerts.update_alerts``).

* ``stretch`` (ours, since session 20): only the stretch between the nearest frames below the threshold around the
  batch's frames is recomputed.
* ``whole``: every frame of the video is read again, as every batch did until session 20. Measured through the
  same function on the path that still does it: a video whose rows were made under another rule (the minimum
  duration 1 us apart, so the episodes are the same) is recomputed whole.

Both run on the same batch, alternating, each inside a transaction rolled back afterwards (the video keeps its
size); the median per-batch time of each, and the median of per-repetition ratios whole / stretch, at two video
sizes: the stretch's cost should not grow with the video, the whole pass's does. Both must leave the same rows.

Example:
    source dev/env.sh
    .venv/bin/python bench/alerts.py --frames 1000000 --small 20000 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 2000
FRAME_COLUMNS = ("video_id", "frame_id", "frame_ts_ms", "total_faces", "model", "frame_width", "frame_height", "source")
FRAME_TYPES = ("text", "int8", "float8", "int4", "text", "int4", "int4", "text")


def _copy_frames(conn, video_id: str, frame_ids: range, faces) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY frames ({', '.join(FRAME_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(list(FRAME_TYPES))
        for f in frame_ids:
            cp.write_row((video_id, f, f * 40.0, faces(f), "yolov3-face@416", 1280, 720, "/videos/x.mp4"))


def _one_size(conn, n_frames: int, repeat: int) -> dict:
    """Per-batch seconds of both ways on a video of ``n_frames`` frames with one alert near its start."""
    from crowd.alerts import AlertRule, update_alerts

    video = f"video-{n_frames}"
    crowd = range(100, 200)  # 4 s at 25 fps: one alert
    started = time.monotonic()
    for first in range(0, n_frames, 100_000):
        _copy_frames(conn, video, range(first, min(first + 100_000, n_frames)), lambda f: 7 if f in crowd else 1)
        conn.commit()
        if time.monotonic() - started > 10:
            print(f"{video}: loaded {first + 100_000:,} of {n_frames:,} frames", flush=True)
            started = time.monotonic()
    conn.execute("ANALYZE frames")
    rules = [AlertRule(threshold=5, min_duration_s=2.0), AlertRule(threshold=5, min_duration_s=2.000001)]
    update_alerts(conn, [(video, f) for f in crowd], rules[0], {video})
    conn.commit()

    times: dict[str, list[float]] = {"stretch": [], "whole": []}
    rows: dict[str, list] = {}
    for rep in range(repeat):
        batch = range(n_frames + rep * BATCH, n_frames + (rep + 1) * BATCH)  # a crowd over its middle half
        hot = range(batch.start + BATCH // 4, batch.stop - BATCH // 4)
        for way in ("stretch", "whole") if rep % 2 == 0 else ("whole", "stretch"):
            stored_rule = conn.execute("SELECT min_duration_ms FROM alerts WHERE video_id = %s", (video,)).fetchone()
            same = rules[0] if stored_rule[0] == rules[0].min_duration_ms else rules[1]
            rule = same if way == "stretch" else rules[1 - rules.index(same)]
            _copy_frames(conn, video, batch, lambda f, hot=hot: 7 if f in hot else 1)
            t0 = time.perf_counter()
            update_alerts(conn, [(video, f) for f in batch], rule, {video})
            times[way].append(time.perf_counter() - t0)
            rows[way] = conn.execute(
                "SELECT started_frame_id, ended_frame_id, peak_count, peak_frame_id FROM alerts WHERE video_id = %s"
                " ORDER BY 1",
                (video,),
            ).fetchall()
            conn.rollback()
        assert rows["stretch"] == rows["whole"] and len(rows["whole"]) == 2, rows
    return {
        "frames": n_frames,
        "stretch_s": statistics.median(times["stretch"]),
        "whole_s": statistics.median(times["whole"]),
        "whole_vs_stretch": statistics.median(w / s for w, s in zip(times["whole"], times["stretch"], strict=True)),
    }


def run(n_frames: int, n_small: int, repeat: int) -> dict:
    import psycopg
    from services import Scratch

    from crowd import storage

    scratch = Scratch()
    try:
        schema = scratch.schema("bench_alerts")
        with psycopg.connect(scratch.dsn(schema)) as conn:
            storage.migrate(conn)
            conn.commit()
            small = _one_size(conn, n_small, repeat)
            large = _one_size(conn, n_frames, repeat)
    finally:
        scratch.close()
    return {
        "repeat": repeat,
        "batch": BATCH,
        "small": small,
        "large": large,
        "ratios": {
            "whole_vs_stretch_large": large["whole_vs_stretch"],
            "whole_vs_stretch_small": small["whole_vs_stretch"],
            "stretch_large_vs_small": large["stretch_s"] / small["stretch_s"],  # ~1: flat
            "whole_large_vs_small": large["whole_s"] / small["whole_s"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames of the long video")
    parser.add_argument("--small", type=int, default=20_000, help="frames of the short video")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    from services import print_ratios_and_json

    out = run(args.frames, args.small, args.repeat)
    print(f"\n{'video frames':>14}{'stretch s':>12}{'whole s':>12}{'whole/stretch':>15}")
    for size in ("small", "large"):
        r = out[size]
        print(f"{r['frames']:>14,}{r['stretch_s']:>12.4f}{r['whole_s']:>12.4f}{r['whole_vs_stretch']:>15.1f}")
    print_ratios_and_json(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
