"""Benchmark the per-video statistics: what a ``/videos`` page costs to read, and what keeping them costs to write.

* ``read``: the API's ``/videos`` queries (a page of 100 and the total) and one video's summary, on the
  ``video_summary`` view over the trigger-kept ``video_stats`` table (``ours``) vs the same queries on the view
  as it was until migration 11, which aggregated every frame on each read (``aggregate``). Interleaved, repeated,
  median of per-repetition ratios; both must return the same rows.
* ``write``: COPY of the same frames in batches of 2,000 (the drain's batch) into two schemas, one with the
  statistics triggers (``ours``) and one with them disabled (``no_stats``), batches alternating between them.
* ``replay``: the drain's replay path (staging table + upsert) on 2,000 frames of the first video with other
  counts (a re-run with another model), in both schemas, alternating: what a replay costs with the triggers.

Example:
    source dev/env.sh
    .venv/bin/python bench/summary.py --frames 2000000 --videos 100   # the figures in bench/README.md (~4 min)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 2000
FRAME_COLUMNS = ("video_id", "frame_id", "frame_ts_ms", "total_faces", "model", "frame_width", "frame_height", "source")
FRAME_TYPES = ("text", "int8", "float8", "int4", "text", "int4", "int4", "text")


def _old_view_sql() -> str:
    from crowd import storage

    (step,) = [m for m in storage.MIGRATIONS if m.version == 8]  # the last aggregating definition
    return step.sql.replace("VIEW video_summary AS", "VIEW video_summary_aggregate AS")


def run(n_frames: int, n_videos: int, repeat: int) -> dict:
    import psycopg
    from services import Scratch

    from crowd import api, storage

    scratch = Scratch()
    try:
        ours, plain = scratch.schema("bench_stats"), scratch.schema("bench_nostats")
        conns = {name: psycopg.connect(scratch.dsn(schema)) for name, schema in (("ours", ours), ("no_stats", plain))}
        for conn in conns.values():
            storage.migrate(conn)
            conn.commit()
        conns["no_stats"].execute("ALTER TABLE frames DISABLE TRIGGER USER")
        conns["no_stats"].commit()
        conns["ours"].execute(_old_view_sql())
        conns["ours"].commit()

        rng = random.Random(5)
        write_s = {"ours": 0.0, "no_stats": 0.0}
        per_video = n_frames // n_videos
        order = [(v, f) for v in range(n_videos) for f in range(per_video)]
        started = time.monotonic()
        for i in range(0, len(order), BATCH):  # frames arrive video by video, as detection tasks publish them
            rows = [
                (f"video-{v:05d}", f, f * 40.0, rng.randint(0, 30), "yolov3-face@416", 1280, 720, "/videos/x.mp4")
                for v, f in order[i : i + BATCH]
            ]
            for name in ("ours", "no_stats") if (i // BATCH) % 2 == 0 else ("no_stats", "ours"):
                conn = conns[name]
                t0 = time.perf_counter()
                with (
                    conn.cursor() as cur,
                    cur.copy(f"COPY frames ({', '.join(FRAME_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
                ):
                    copy.set_types(list(FRAME_TYPES))
                    for row in rows:
                        copy.write_row(row)
                conn.commit()
                write_s[name] += time.perf_counter() - t0
            if time.monotonic() - started > 10:
                print(f"loaded {i + BATCH:,} of {len(order):,} frames", flush=True)
                started = time.monotonic()
        for c in conns.values():
            c.execute("ANALYZE")
            c.commit()
        conn = conns["ours"]

        page = {"video_id": None, "status": None, "limit": 100, "offset": 0}
        one = {"video_id": f"video-{n_videos // 2:05d}", "status": None, "limit": 1, "offset": 0}
        old_query = api._VIDEO_QUERY.replace("video_summary", "video_summary_aggregate")
        old_count = api._VIDEO_COUNT.replace("FROM video_stats", "FROM frames")
        variants = {
            "ours": (api._VIDEO_QUERY, api._VIDEO_COUNT),
            "aggregate": (old_query, old_count),
        }
        times: dict[str, list[float]] = {}
        answers: dict[str, list] = {}
        for _ in range(repeat):
            for name, (query, count) in variants.items():
                t0 = time.perf_counter()
                rows = conn.execute(query, page).fetchall() + conn.execute(count, page).fetchall()
                times.setdefault(f"page_{name}", []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                rows += conn.execute(query, one).fetchall()
                times.setdefault(f"one_{name}", []).append(time.perf_counter() - t0)
                conn.rollback()
                answers[name] = [tuple(round(x, 9) if isinstance(x, float) else x for x in r) for r in rows]
        diff = [(o, a) for o, a in zip(answers["ours"], answers["aggregate"], strict=True) if o != a]
        assert not diff, f"the two views disagree: {diff[:3]}"
        assert len(answers["ours"]) == 100 + 1 + 1 and answers["ours"][100] == (n_videos,)
        # after the reads: a replay moves ingested_at, which the old view's first_ingested_at follows and ours keeps
        from crowd.ingest import _STAGING_SQL, _UPSERT_FRAMES_SQL

        replay_s: dict[str, list[float]] = {"ours": [], "no_stats": []}
        for c in conns.values():
            c.execute(_STAGING_SQL)
            c.commit()
        for rep in range(repeat):
            for name in ("ours", "no_stats") if rep % 2 == 0 else ("no_stats", "ours"):
                c = conns[name]
                t0 = time.perf_counter()
                c.execute(
                    "INSERT INTO crowd_stage_frames SELECT 'video-00000', g, g * 40.0, (g + %s) %% 31, "
                    "'yolov3-face@416', 1280, 720, '/videos/x.mp4', 0, g FROM generate_series(%s::int8, %s::int8) g",
                    (rep + 1, 2000 * rep, 2000 * rep + 1999),
                )
                c.execute(_UPSERT_FRAMES_SQL)
                c.commit()
                replay_s[name].append(time.perf_counter() - t0)
        for c in conns.values():
            c.close()
    finally:
        scratch.close()

    results = {k: {"seconds": statistics.median(v)} for k, v in times.items()}
    results["write_ours"] = {"seconds": write_s["ours"], "frames_per_s": len(order) / write_s["ours"]}
    results["write_no_stats"] = {"seconds": write_s["no_stats"], "frames_per_s": len(order) / write_s["no_stats"]}
    results["replay_ours"] = {"seconds": statistics.median(replay_s["ours"])}
    results["replay_no_stats"] = {"seconds": statistics.median(replay_s["no_stats"])}
    ratios = {
        "page_aggregate_vs_ours": statistics.median(
            a / o for a, o in zip(times["page_aggregate"], times["page_ours"], strict=True)
        ),
        "one_aggregate_vs_ours": statistics.median(
            a / o for a, o in zip(times["one_aggregate"], times["one_ours"], strict=True)
        ),
        "write_ours_vs_no_stats": write_s["no_stats"] / write_s["ours"],  # throughput kept with the triggers
        "replay_ours_vs_no_stats": statistics.median(  # the same, a replay batch of 2,000 frames
            n / o for n, o in zip(replay_s["no_stats"], replay_s["ours"], strict=True)
        ),
    }
    return {"frames": len(order), "videos": n_videos, "repeat": repeat, "results": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    from services import print_ratios_and_json

    out = run(args.frames, args.videos, args.repeat)
    print(f"\n{'figure':<22}{'seconds':>10}")
    for key, r in out["results"].items():
        print(f"{key:<22}{r['seconds']:>10.4f}")
    print_ratios_and_json(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
