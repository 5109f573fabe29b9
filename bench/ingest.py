"""Benchmark the Faces drain: rows/s of ``crowd.ingest.drain`` vs a raw COPY vs a seed-style loop.

Same messages, same run, fresh topic and fresh schemas on the local broker and PostgreSQL:

* ``drain``: the real thing (Kafka consume, validation, COPY + upsert, offsets in the same transaction);
* ``raw_copy``: the same frames and faces rows, already parsed in memory, COPYed straight into the tables
  (the floor: no Kafka, no validation, no upsert); the product's tables, so with the per-video statistics
  triggers on ``frames`` (migration 11) that any writer pays;
* ``raw_copy_no_stats``: the same COPY with those triggers disabled (the strictest floor, reported apart);
* ``fixed``: the same drain called again with nothing left to read: its fixed start cost (connect, migrate,
  advisory lock, assign, reach the end of every partition), reported apart and subtracted in ``*_minus_fixed``;
* ``seed_loop``: what a naive consumer does: one message at a time from Kafka, ``json.loads``, one INSERT per
  frame and per face, one commit per message (on the first ``--seed-messages``: it is slow), timed from its first
  message (joining its consumer group is not its cost); compared in rows/s.

Drains (per batch size), the raw COPY and the seed loop alternate ``--repeat`` times, each into a fresh schema
(migrated before its clock starts) and consumer group; medians and per-repetition ratios (the machine is shared).

Usage: ``source dev/env.sh && python bench/ingest.py [--messages 60000] [--seed-messages 2000]
[--batch-sizes 2000,5000] [--repeat 3]``; prints a table and a JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

ROWS_NOTE = "rows = frames + faces"


def _message(video_id: str, frame_id: int, rng: random.Random) -> bytes:
    from crowd.messages import FaceMessage

    n = rng.randint(0, 6)
    faces = [
        {
            "face_id": i,
            "bounding_box": {"x": rng.randint(0, 560), "y": rng.randint(0, 400), "width": 40, "height": 50},
            "confidence": round(rng.uniform(0.3, 1.0), 4),
        }
        for i in range(n)
    ]
    return FaceMessage.from_dict(
        {
            "video_id": video_id,
            "source": f"/videos/{video_id}.mp4",
            "frame_id": frame_id,
            "frame_ts_ms": frame_id * 40.0,
            "frame_width": 640,
            "frame_height": 480,
            "model": "yolov3-face@416",
            "total_faces": n,
            "faces": faces,
        }
    ).to_json()


def run(n_messages: int, n_seed: int, batch_sizes: list[int], repeat: int) -> dict:
    import psycopg
    from confluent_kafka import Consumer, KafkaError
    from services import Scratch

    from crowd import storage
    from crowd.ingest import FACE_COLUMNS, FACE_TYPES, FRAME_COLUMNS, FRAME_TYPES, Batch, drain
    from crowd.kafka import DeliveryTracker, reliable_producer

    scratch = Scratch()
    try:
        topic = scratch.topic("bench-faces")
        rng = random.Random(7)
        producer = reliable_producer("kafka_default", timeout_s=60)
        tracker = DeliveryTracker()
        values = []
        for i in range(n_messages):
            video = f"video-{i % 8}"
            value = _message(video, i // 8, rng)
            values.append(value)
            producer.produce(topic, key=video.encode(), value=value, on_delivery=tracker.callback)
            producer.poll(0)
        tracker.wait(producer, timeout_s=120)

        # parsed rows for the raw COPY (outside the timing)
        batch = Batch(topic=topic)

        class _Msg:  # the minimum of confluent_kafka.Message that Batch.add uses
            def __init__(self, offset: int, key: bytes, value: bytes) -> None:
                self._offset, self._key, self._value = offset, key, value

            def partition(self) -> int:
                return 0

            def offset(self) -> int:
                return self._offset

            def value(self) -> bytes:
                return self._value

            def key(self) -> bytes:
                return self._key

        for i, value in enumerate(values):
            batch.add(_Msg(i, f"video-{i % 8}".encode(), value))  # type: ignore[arg-type]
        assert not batch.rejected, batch.rejected[:1]
        frame_rows = [f for f, _ in batch.frames.values()]
        face_rows = [r for _, faces in batch.frames.values() for r in faces]
        n_rows = len(frame_rows) + len(face_rows)

        def raw_copy(dsn: str, stats: bool = True) -> float:
            with psycopg.connect(dsn) as conn:
                storage.migrate(conn)
                if not stats:
                    conn.execute("ALTER TABLE frames DISABLE TRIGGER USER")
                conn.commit()
                started = time.perf_counter()
                with conn.cursor() as cur:
                    for table, cols, types, rows in (
                        ("frames", FRAME_COLUMNS, FRAME_TYPES, frame_rows),
                        ("faces", FACE_COLUMNS, FACE_TYPES, face_rows),
                    ):
                        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)") as copy:
                            copy.set_types(list(types))
                            for row in rows:
                                copy.write_row(row)
                conn.commit()
                return time.perf_counter() - started

        def seed_loop(dsn: str, group: str) -> tuple[float, int, int]:
            """The seed's design on the first ``n_seed`` messages: one message, one INSERT per row, one commit.
            Timed from its first message (the group join is not its cost): (seconds, rows, messages)."""
            consumer = Consumer(
                {"bootstrap.servers": scratch.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                 "enable.auto.commit": True}
            )  # fmt: skip
            consumer.subscribe([topic])
            rows = done = 0
            started = None
            with psycopg.connect(dsn) as conn:
                storage.migrate(conn)
                while done < n_seed:
                    msg = consumer.poll(1.0)
                    if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                        continue
                    started = started or time.perf_counter()
                    data = json.loads(msg.value())
                    conn.execute(
                        "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, "
                        "frame_height, source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (data["video_id"], data["frame_id"], data["frame_ts_ms"], data["total_faces"], data["model"],
                         data["frame_width"], data["frame_height"], data["source"]),
                    )  # fmt: skip
                    for face in data["faces"]:
                        b = face["bounding_box"]
                        conn.execute(
                            "INSERT INTO faces VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            (data["video_id"], data["frame_id"], face["face_id"], b["x"], b["y"], b["width"],
                             b["height"], face["confidence"]),
                        )  # fmt: skip
                        rows += 1
                    conn.commit()
                    rows += 1
                    done += 1
                seconds = time.perf_counter() - started
            consumer.close()
            return seconds, rows, done

        runs: dict[str, list] = {}
        for rep in range(repeat):  # interleaved: every variant once per repetition, ratios per repetition
            for size in batch_sizes:
                name = scratch.schema(f"bench_drain_r{rep}_b{size}")  # also the drain's group
                scratch.use_schema(name)
                with psycopg.connect(scratch.dsn(name)) as conn:  # as raw_copy: the schema is made before the clock
                    storage.migrate(conn)
                summary = drain("kafka_default", "crowd_postgres", topic, name, batch_size=size, batch_wait_s=0.5)
                assert summary.messages == n_messages and summary.lag_left == 0, summary
                assert summary.frames + summary.faces == n_rows, (summary, n_rows)
                runs.setdefault(f"drain_b{size}", []).append(summary.seconds)
                # fixed cost: the same drain again, nothing left to read (connect, migrate, lock, assign, EOF)
                again = drain("kafka_default", "crowd_postgres", topic, name, batch_size=size, batch_wait_s=0.5)
                assert again.messages == 0, again
                runs.setdefault(f"fixed_b{size}", []).append(again.seconds)
            runs.setdefault("raw_copy", []).append(raw_copy(scratch.dsn(scratch.schema(f"bench_copy_r{rep}"))))
            runs.setdefault("raw_copy_no_stats", []).append(
                raw_copy(scratch.dsn(scratch.schema(f"bench_copy_nostats_r{rep}")), stats=False)
            )
            seed_group = f"bench-seed-{topic}-r{rep}"
            runs.setdefault("seed_loop", []).append(
                seed_loop(scratch.dsn(scratch.schema(f"bench_seed_r{rep}")), seed_group)
            )
        results = {}
        for key, times in runs.items():
            if key != "seed_loop":
                results[key] = {"rows": n_rows, "seconds": statistics.median(times), "messages": n_messages}

        seed_runs = [r for r in runs["seed_loop"]]
        results["seed_loop"] = {
            "rows": seed_runs[0][1],
            "seconds": statistics.median(t for t, _, _ in seed_runs),
            "messages": seed_runs[0][2],
        }
    finally:
        scratch.close()

    for key, r in results.items():
        r["rows_per_s"] = r["rows"] / r["seconds"] if r["seconds"] else 0.0
        r["messages_per_s"] = r["messages"] / r["seconds"] if r["seconds"] else 0.0
        if key.startswith("fixed"):
            r["rows"] = r["messages"] = r["rows_per_s"] = r["messages_per_s"] = 0
    ratios = {}
    for size in batch_sizes:
        d, f = runs[f"drain_b{size}"], runs[f"fixed_b{size}"]
        ratios[f"drain_b{size}_vs_raw_copy"] = statistics.median(
            c / t for c, t in zip(runs["raw_copy"], d, strict=True)
        )
        ratios[f"drain_b{size}_vs_raw_copy_no_stats"] = statistics.median(
            c / t for c, t in zip(runs["raw_copy_no_stats"], d, strict=True)
        )
        ratios[f"drain_b{size}_minus_fixed_vs_raw_copy"] = statistics.median(
            c / (t - x) for c, t, x in zip(runs["raw_copy"], d, f, strict=True)
        )
        ratios[f"drain_b{size}_vs_seed_loop"] = statistics.median(  # rows/s against rows/s, per repetition
            (n_rows / t) / (rows / u) for t, (u, rows, _) in zip(d, runs["seed_loop"], strict=True)
        )
    return {
        "messages": n_messages,
        "batch_sizes": batch_sizes,
        "repeat": repeat,
        "results": results,
        "ratios": ratios,
        "goals": {"drain_vs_raw_copy": ">= 0.5", "drain_vs_seed_loop": ">= 10"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--seed-messages", type=int, default=2_000, help="messages for the (slow) seed loop")
    parser.add_argument("--batch-sizes", default="2000,5000", help="drain batch sizes to compare")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.messages, args.seed_messages, [int(b) for b in args.batch_sizes.split(",")], args.repeat)
    print(f"{'method':<18} {'messages':>9} {'rows':>9} {'seconds':>8} {'rows/s':>10} {'msg/s':>9}  ({ROWS_NOTE})")
    for name, r in report["results"].items():
        print(
            f"{name:<18} {r['messages']:>9} {r['rows']:>9} {r['seconds']:>8.2f} "
            f"{r['rows_per_s']:>10.0f} {r['messages_per_s']:>9.0f}"
        )
    for key, value in report["ratios"].items():
        goal = "(goal >= 10x)" if "seed" in key else "(goal >= 0.5)"
        print(f"{key:<42} {value:6.2f} {goal}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
