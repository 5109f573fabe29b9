"""Benchmark latency: message published -> row visible in PostgreSQL, with the drain running in a loop.

A producer (:func:`crowd.kafka.reliable_producer`) publishes Faces messages at ``--rate`` per second (default 30:
ten cameras sampled at 3 frames/s) for ``--seconds``; a thread runs :func:`crowd.ingest.drain` over and over with
the ingest DAG's defaults (batch 2000, ``batch_wait_s`` 1 s, idle timeout 10 s), as the Kafka-triggered DAG
would; a poller sees each frame row appear (every 20 ms, from another connection, so only committed rows
count). Latency = row first seen - the message's Kafka CreateTime (set at ``produce``). Prints p50/p95/max.

Usage: ``source dev/env.sh && python bench/latency.py [--rate 30] [--seconds 20] [--batch-wait 1.0]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    import psycopg
    from confluent_kafka.admin import AdminClient, NewTopic
    from ingest import _message, _use_schema

    from crowd import storage
    from crowd.ingest import drain
    from crowd.kafka import reliable_producer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-wait", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("crowd").setLevel(logging.WARNING)

    port = int(os.environ.get("CROWD_PG_PORT", "5433"))
    password = os.environ.get("CROWD_PG_PASSWORD", "crowd")
    admin_dsn = f"postgresql://crowd:{password}@127.0.0.1:{port}/crowd_test"
    bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    tag = uuid.uuid4().hex[:8]
    topic, schema = f"bench-latency-{tag}", f"bench_latency_{tag}"
    for future in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
        future.result(timeout=30)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    dsn = f"{admin_dsn}?options=-csearch_path%3D{schema}"
    with psycopg.connect(dsn) as conn:
        storage.migrate(conn)
    _use_schema(schema, port, password)

    stop = threading.Event()
    created: dict[int, float] = {}
    seen: dict[int, float] = {}
    drains: list[dict] = []

    def drain_loop() -> None:
        while not stop.is_set():
            s = drain("kafka_default", "crowd_postgres", topic, f"latency-{tag}", batch_wait_s=args.batch_wait,
                      idle_timeout_s=10.0, max_seconds=600)  # fmt: skip
            drains.append({"messages": s.messages, "batches": s.batches, "stopped": s.stopped_because})

    def poll_rows() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                now = time.time()
                for (frame_id,) in conn.execute("SELECT frame_id FROM frames WHERE frame_id >= %s", (len(seen) - 200,)):
                    seen.setdefault(int(frame_id), now)
                time.sleep(0.02)

    def delivered(err, msg) -> None:  # noqa: ANN001 - confluent-kafka callback
        if err is None:
            created[json.loads(msg.value())["frame_id"]] = msg.timestamp()[1] / 1000.0

    threads = [threading.Thread(target=drain_loop, daemon=True), threading.Thread(target=poll_rows, daemon=True)]
    for t in threads:
        t.start()
    producer = reliable_producer("kafka_default", timeout_s=30)
    rng = random.Random(11)
    n = int(args.rate * args.seconds)
    try:
        time.sleep(1.0)  # the drain is up and waiting, as a running ingest would be
        start = time.perf_counter()
        for i in range(n):
            target = start + i / args.rate
            time.sleep(max(0.0, target - time.perf_counter()))
            producer.produce(topic, key=b"cam", value=_message("cam", i, rng), on_delivery=delivered)
            producer.poll(0)
        producer.flush(30)
        deadline = time.time() + 30
        while len(seen) < n and time.time() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        admin.delete_topics([topic])
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    lat = sorted(seen[i] - created[i] for i in created if i in seen)
    assert len(lat) == n, (len(lat), n)
    q = statistics.quantiles(lat, n=100)
    report = {
        "messages": n, "rate_per_s": args.rate, "batch_wait_s": args.batch_wait,
        "latency_s": {"p50": round(q[49], 3), "p95": round(q[94], 3), "max": round(lat[-1], 3)},
        "drain_calls": len(drains), "goal": "p95 <= 10 s",
    }  # fmt: skip
    print(f"{n} messages at {args.rate:g}/s, drain batch_wait {args.batch_wait:g} s: published -> row visible")
    print(f"p50 {q[49]:.3f} s   p95 {q[94]:.3f} s   max {lat[-1]:.3f} s   (goal p95 <= 10 s)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
