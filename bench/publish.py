"""Benchmark publishing: our producer path vs a bare confluent-kafka producer, same payloads, same run.

* ``ours``: :func:`crowd.kafka.reliable_producer` (acks=all, idempotence, lz4, linger) driven by
  ``crowd.jobs._Publisher`` exactly as a detection task does (``FaceMessage.to_json()``, key = video id, one
  ``poll(0)`` per message, every delivery report counted by :class:`~crowd.kafka.DeliveryTracker`), then
  ``tracker.wait()`` (flush, raise on any failure);
* ``ours_bytes``: the same producer and tracker on the pre-serialised bytes (isolates the JSON encoding);
* ``bare``: ``confluent_kafka.Producer({"bootstrap.servers": ...})`` with librdkafka defaults, ``produce`` of
  the same bytes and keys, no callback, ``poll(0)`` per message, ``flush()``.

Those three start warm (one message delivered before the clock starts), as in a detection task, where the first
message leaves only after the model is loaded and the first frame decoded and detected. ``*_cold`` variants
start the clock right after creating the producer: an idempotent producer first needs a producer id, and
librdkafka asks for it only on a 500 ms retry timer when no broker connection is up yet at creation, so a cold
burst of 50,000 messages (~0.1 s of work) pays ~0.5 s once. That start cost is reported apart.

Each variant sends to its own fresh 3-partition topic; variants alternate ``--repeat`` times, medians and
per-repetition ratios. Goal: bare time / ours time >= 0.8.

Usage: ``source dev/env.sh && python bench/publish.py [--messages 50000] [--repeat 7] (50,000 stays below librdkafka's 100,000-message queue, which a cold producer fills before it has its id: _Publisher does not retry a BufferError)``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def _messages(n: int) -> list:
    from crowd.detection import Detection
    from crowd.messages import build_message

    rng = random.Random(3)
    out = []
    for i in range(n):
        dets = [
            Detection(rng.randint(0, 1100), rng.randint(0, 600), 60, 70, round(rng.uniform(0.5, 1), 4))
            for _ in range(rng.randint(0, 6))
        ]
        out.append(
            build_message(f"{i % 8:032x}", "/videos/cam.mp4", i // 8 * 10, i // 8 * 333.3, (720, 1280, 3), dets, "m")
        )
    return out


def run(n: int, repeat: int) -> dict:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from crowd.jobs import _Publisher
    from crowd.kafka import DeliveryTracker, reliable_producer

    bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    messages = _messages(n)
    payloads = [(m.video_id.encode(), m.to_json()) for m in messages]
    topics: list[str] = []

    def topic() -> str:
        name = f"bench-publish-{uuid.uuid4().hex[:8]}"
        for future in admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)]).values():
            future.result(timeout=30)
        topics.append(name)
        return name

    def warm_up(producer: Producer, t: str, warm: bool) -> None:
        if warm:  # connected, producer id acquired, topic metadata known: what a task has after its first frame
            producer.produce(t, key=b"warm-up", value=b"{}")
            assert producer.flush(30) == 0

    def ours(warm: bool) -> float:
        t = topic()
        producer = reliable_producer("kafka_default", timeout_s=30)
        warm_up(producer, t, warm)
        start = time.perf_counter()
        publisher = _Publisher(producer, t)
        for m in messages:
            publisher(m)
        assert publisher.tracker.wait(producer, timeout_s=60) == n
        return time.perf_counter() - start

    def ours_bytes(warm: bool) -> float:
        t = topic()
        producer = reliable_producer("kafka_default", timeout_s=30)
        warm_up(producer, t, warm)
        start = time.perf_counter()
        tracker = DeliveryTracker()
        for key, value in payloads:
            producer.produce(t, key=key, value=value, on_delivery=tracker.callback)
            producer.poll(0)
        assert tracker.wait(producer, timeout_s=60) == n
        return time.perf_counter() - start

    def bare(warm: bool) -> float:
        t = topic()
        producer = Producer({"bootstrap.servers": bootstrap})
        warm_up(producer, t, warm)
        start = time.perf_counter()
        for key, value in payloads:
            producer.produce(t, key=key, value=value)
            producer.poll(0)
        assert producer.flush(60) == 0
        return time.perf_counter() - start

    variants = {
        "bare": lambda: bare(True),
        "ours": lambda: ours(True),
        "ours_bytes": lambda: ours_bytes(True),
        "bare_cold": lambda: bare(False),
        "ours_cold": lambda: ours(False),
    }
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(repeat):
            for name, fn in variants.items():
                runs.setdefault(name, []).append(fn())
    finally:
        admin.delete_topics(topics)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = {
        f"bare_over_{k}": round(statistics.median(b / o for b, o in zip(runs["bare"], runs[k], strict=True)), 3)
        for k in ("ours", "ours_bytes")
    }
    ratio["bare_cold_over_ours_cold"] = round(
        statistics.median(b / o for b, o in zip(runs["bare_cold"], runs["ours_cold"], strict=True)), 3
    )
    return {
        "messages": n,
        "bytes_per_message": round(sum(len(v) for _, v in payloads) / n),
        "repeat": repeat,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "messages_per_s": {k: round(n / v) for k, v in med.items()},
        "ratios": ratio,
        "goal": "bare_over_ours >= 0.8",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    report = run(args.messages, args.repeat)
    print(f"{'variant':<12}{'seconds':>9}{'msg/s':>10}")
    for k, v in report["seconds"].items():
        print(f"{k:<12}{v:>9.3f}{report['messages_per_s'][k]:>10}")
    for k, v in report["ratios"].items():
        print(f"{k:<22}{v:>6.3f} (goal >= 0.8 for ours)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
