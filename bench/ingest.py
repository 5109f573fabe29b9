"""Benchmark the Faces drain: rows/s of ``crowd.ingest.drain`` vs a raw COPY vs a seed-style loop.

Same messages, same run, fresh topic and fresh schemas on the local broker and PostgreSQL:

* ``drain``: the real thing (Kafka consume, validation, COPY + upsert, offsets in the same transaction);
* ``raw_copy``: the same frames and faces rows, already parsed in memory, COPYed straight into the tables
  (the floor: no Kafka, no validation, no upsert);
* ``seed_loop``: what a naive consumer does: one message at a time from Kafka, ``json.loads``, one INSERT per
  frame and per face, one commit per message.

Usage: ``source dev/env.sh && python bench/ingest.py [--messages 20000] [--seed-messages 2000]``; prints a
table and a JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
import uuid
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
    return FaceMessage(
        video_id=video_id,
        source=f"/videos/{video_id}.mp4",
        frame_id=frame_id,
        frame_ts_ms=frame_id * 40.0,
        frame_width=640,
        frame_height=480,
        model="yolov3-face@416",
        total_faces=n,
        faces=faces,
    ).to_json()


def _schema(admin_dsn: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{admin_dsn}?options=-csearch_path%3D{name}"


def _use_schema(name: str, port: int, password: str) -> None:
    os.environ["AIRFLOW_CONN_CROWD_POSTGRES"] = json.dumps(
        {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": port,
            "login": "crowd",
            "password": password,
            "schema": "crowd_test",
            "extra": {"options": f"-csearch_path={name}"},
        }
    )


def run(n_messages: int, n_seed: int, batch_size: int) -> dict:
    import psycopg
    from confluent_kafka import Consumer, KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    from crowd import storage
    from crowd.ingest import FACE_COLUMNS, FACE_TYPES, FRAME_COLUMNS, FRAME_TYPES, Batch, drain
    from crowd.kafka import DeliveryTracker, reliable_producer

    port = int(os.environ.get("CROWD_PG_PORT", "5433"))
    password = os.environ.get("CROWD_PG_PASSWORD", "crowd")
    admin_dsn = f"postgresql://crowd:{password}@127.0.0.1:{port}/crowd_test"
    bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    tag = uuid.uuid4().hex[:8]
    topic = f"bench-faces-{tag}"
    for future in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
        future.result(timeout=30)
    schemas = {k: f"bench_{k}_{tag}" for k in ("drain", "copy", "seed")}
    dsns = {k: _schema(admin_dsn, v) for k, v in schemas.items()}
    try:
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

        # 1. the drain
        _use_schema(schemas["drain"], port, password)
        summary = drain("kafka_default", "crowd_postgres", topic, "bench", batch_size=batch_size, batch_wait_s=0.5)
        assert summary.messages == n_messages and summary.lag_left == 0, summary
        drain_rows = summary.frames + summary.faces
        results = {"drain": {"rows": drain_rows, "seconds": summary.seconds, "messages": summary.messages}}

        # 2. raw COPY of the same rows (parsed outside the timing)
        batch = Batch(topic=topic)

        class _Msg:  # the minimum of confluent_kafka.Message that Batch.add uses
            def __init__(self, offset: int, value: bytes) -> None:
                self._offset, self._value = offset, value

            def partition(self) -> int:
                return 0

            def offset(self) -> int:
                return self._offset

            def value(self) -> bytes:
                return self._value

            def key(self) -> None:
                return None

        for i, value in enumerate(values):
            batch.add(_Msg(i, value))  # type: ignore[arg-type]
        frame_rows = [f for f, _ in batch.frames.values()]
        face_rows = [r for _, faces in batch.frames.values() for r in faces]
        with psycopg.connect(dsns["copy"]) as conn:
            storage.migrate(conn)
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
            copy_s = time.perf_counter() - started
        results["raw_copy"] = {"rows": len(frame_rows) + len(face_rows), "seconds": copy_s, "messages": n_messages}

        # 3. seed-style loop: one message, one transaction (on the first n_seed messages)
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-seed-{tag}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
            }
        )
        consumer.subscribe([topic])
        seed_rows = 0
        done = 0
        with psycopg.connect(dsns["seed"]) as conn:
            storage.migrate(conn)
            started = time.perf_counter()
            while done < n_seed:
                msg = consumer.poll(1.0)
                if msg is None or (msg.error() and msg.error().code() == KafkaError._PARTITION_EOF):
                    continue
                data = json.loads(msg.value())
                conn.execute(
                    "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, "
                    "frame_height, source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (
                        data["video_id"],
                        data["frame_id"],
                        data["frame_ts_ms"],
                        data["total_faces"],
                        data["model"],
                        data["frame_width"],
                        data["frame_height"],
                        data["source"],
                    ),
                )
                for face in data["faces"]:
                    b = face["bounding_box"]
                    conn.execute(
                        "INSERT INTO faces VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (
                            data["video_id"],
                            data["frame_id"],
                            face["face_id"],
                            b["x"],
                            b["y"],
                            b["width"],
                            b["height"],
                            face["confidence"],
                        ),
                    )
                    seed_rows += 1
                conn.commit()
                seed_rows += 1
                done += 1
            seed_s = time.perf_counter() - started
        consumer.close()
        results["seed_loop"] = {"rows": seed_rows, "seconds": seed_s, "messages": done}
    finally:
        admin.delete_topics([topic])
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for name in schemas.values():
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    for r in results.values():
        r["rows_per_s"] = r["rows"] / r["seconds"] if r["seconds"] else 0.0
        r["messages_per_s"] = r["messages"] / r["seconds"] if r["seconds"] else 0.0
    drain_rate = results["drain"]["rows_per_s"]
    return {
        "messages": n_messages,
        "batch_size": batch_size,
        "results": results,
        "ratios": {
            "drain_vs_raw_copy": drain_rate / results["raw_copy"]["rows_per_s"],
            "drain_vs_seed_loop": drain_rate / results["seed_loop"]["rows_per_s"],
        },
        "goals": {"drain_vs_raw_copy": ">= 0.5", "drain_vs_seed_loop": ">= 10"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed-messages", type=int, default=2_000, help="messages for the (slow) seed loop")
    parser.add_argument("--batch-size", type=int, default=2_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.messages, args.seed_messages, args.batch_size)
    print(f"{'method':<10} {'messages':>9} {'rows':>9} {'seconds':>8} {'rows/s':>10} {'msg/s':>9}  ({ROWS_NOTE})")
    for name, r in report["results"].items():
        print(
            f"{name:<10} {r['messages']:>9} {r['rows']:>9} {r['seconds']:>8.2f} "
            f"{r['rows_per_s']:>10.0f} {r['messages_per_s']:>9.0f}"
        )
    ratios = report["ratios"]
    print(
        f"drain / raw COPY = {ratios['drain_vs_raw_copy']:.2f} (goal >= 0.5); "
        f"drain / seed loop = {ratios['drain_vs_seed_loop']:.1f}x (goal >= 10x)"
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
