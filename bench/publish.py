"""Benchmark publishing: our producer path vs a bare confluent-kafka producer, same payloads, same run.

* ``bare``: ``confluent_kafka.Producer({"bootstrap.servers": ...})`` with librdkafka defaults, ``produce`` of
  pre-serialised bytes and keys, ``poll(0)`` per message, ``flush()``; a delivery callback for failures only
  (``delivery.report.only.error``, as ours: no Python call per acknowledged message), checked at the end, so a
  bare run whose deliveries failed cannot look fast;
* ``ours``: :func:`crowd.kafka.reliable_producer` (acks=all, idempotence, lz4, linger) driven by
  ``crowd.jobs._Publisher`` exactly as a detection task does (``FaceMessage`` in, every failure caught), then
  its ``wait()`` (flush, raise on any failure);
* one lever at a time on ``ours`` (a copy of its loop with one thing changed): ``ours_bytes`` (pre-serialised
  bytes: what the encoding costs), ``ours_every_report`` (librdkafka reports every delivery: a Python call per
  acknowledged message, instead of ``delivery.report.only.error`` and successes counted as sent - failed after
  the flush), ``ours_callback_per_produce`` (the delivery callback passed to every ``produce`` call, as until
  the second pass of issue 9, instead of once in the producer's configuration), ``ours_poll100`` (``poll(0)``
  every 100 messages instead of every message), ``ours_no_lz4`` (``compression.type=none``),
  ``ours_produce_batch`` (confluent-kafka's ``produce_batch`` with ``--batch`` messages a call, 100 by default,
  instead of one ``produce`` each: the "async produce with batching" lever of issue 9; librdkafka partitions each
  message by its key, and messages refused because the local queue is full are handed in again once there is
  room).

The message type was a pydantic model until the second pass of issue 9 (encoding 2.0-2.6 us a message,
``build_message`` ~16 us); it is a msgspec ``Struct`` now (~0.65 us to encode, ``build_message`` ~7.6 us):
``bench/README.md`` has the figures of both.

Besides wall time, each variant's CPU time (this process, librdkafka's threads included) is reported: it depends
less on what else runs on the machine (not on the broker). Encoding alone is timed apart, without Kafka.

Every variant takes its messages from the same pool of ``--pool`` distinct messages (cycled up to ``--messages``,
so a run lasts >= 1 s without holding 300,000 message objects), retries a full local queue (``BufferError``)
the same way (``poll(0.01)`` until there is room: more messages than librdkafka's 100,000-message queue), and
starts warm (one message delivered before the clock starts), as in a detection task whose first message leaves
after the model is loaded. ``*_cold`` variants (``--cold``) start the clock right after creating the producer:
an idempotent producer first needs a producer id (~0.5 s once, reported apart).

Each variant sends to its own fresh 3-partition topic. Per repetition all variants run once, in an order rotated
by one each repetition; the figures are medians of the per-repetition times and of the per-repetition ratios
``bare / variant`` (goal for ``ours``: >= 0.8).

Usage: ``source dev/env.sh && python bench/publish.py [--messages 300000] [--repeat 5] [--cold] [--only ours ours_bytes] [--batch 100]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
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


def _produce(producer, topic: str, key: bytes, value: bytes, **kwargs) -> None:
    """``produce`` with the same back-off for every variant: a full local queue waits 10 ms and retries."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, **kwargs)
            return
        except BufferError:
            producer.poll(0.01)


def _encode_us(messages: list) -> dict[str, float]:
    """Encoding alone, no Kafka: best of 5 passes over the pool, microseconds per message (CPU time).

    ``json_stdlib`` is ``json.dumps`` of the same message as plain data, for scale.
    """

    def best(encode: Callable) -> float:
        times = []
        for _ in range(5):
            t0 = time.process_time()
            for m in messages:
                encode(m)
            times.append(time.process_time() - t0)
        return round(min(times) / len(messages) * 1e6, 2)

    plain = {id(m): m.to_dict() for m in messages}
    return {
        "to_json": best(lambda m: m.to_json()),
        "json_stdlib": best(lambda m: json.dumps(plain[id(m)], separators=(",", ":")).encode()),
    }


def run(n: int, repeat: int, pool: int, cold: bool, only: set[str] | None = None, batch: int = 100) -> dict:
    from confluent_kafka import Producer
    from services import Scratch

    from crowd.jobs import _Publisher

    scratch = Scratch()  # closed in the finally below
    bootstrap = scratch.bootstrap
    messages = _messages(pool)
    payloads = [(m.video_id.encode(), m.to_json()) for m in messages]

    def cycle(seq: list) -> itertools.islice:
        return itertools.islice(itertools.cycle(seq), n)

    def topic() -> str:
        return scratch.topic("bench-publish")

    def start(producer: Producer, t: str, warm: bool) -> tuple[float, float]:
        if warm:  # connected, producer id acquired, topic metadata known: what a task has after its first frame
            producer.produce(t, key=b"warm-up", value=b"{}")
            assert producer.flush(30) == 0
        return time.perf_counter(), time.process_time()

    def stop(t0: tuple[float, float]) -> tuple[float, float]:
        return time.perf_counter() - t0[0], time.process_time() - t0[1]

    def bare(warm: bool = True) -> tuple[float, float]:
        t = topic()
        failed: list = []  # reports of failed deliveries only (no Python call per acknowledged message, as ours)
        producer = Producer(
            {"bootstrap.servers": bootstrap, "delivery.report.only.error": True, "on_delivery": failed.append}
        )
        t0 = start(producer, t, warm)
        for key, value in cycle(payloads):
            _produce(producer, t, key, value)
            producer.poll(0)
        assert producer.flush(60) == 0
        elapsed = stop(t0)
        assert not failed, f"bare: {len(failed)} deliveries failed: {failed[0]}"
        return elapsed

    def ours(warm: bool = True) -> tuple[float, float]:
        t = topic()
        publisher = _Publisher.create("kafka_default", t, timeout_s=30)
        t0 = start(publisher.producer, t, warm)
        for m in cycle(messages):
            publisher(m)
        assert publisher.wait(timeout_s=60) == n
        return stop(t0)

    def lever(
        *,
        encode: bool = True,
        errors_only: bool = True,
        callback_per_produce: bool = False,
        poll_every: int = 1,
        **settings: object,
    ) -> tuple[float, float]:
        """``ours`` with one thing changed, in a copy of ``_Publisher.__call__``'s loop."""
        t = topic()
        publisher = _Publisher.create("kafka_default", t, timeout_s=30, errors_only=errors_only, **settings)
        producer, tracker = publisher.producer, publisher.tracker
        extra = {"on_delivery": tracker.callback} if callback_per_produce else {}
        t0 = start(producer, t, True)
        tracker.delivered = 0  # the warm-up message's report
        items = ((m.video_id.encode(), m.to_json()) for m in cycle(messages)) if encode else cycle(payloads)
        for i, (key, value) in enumerate(items):
            _produce(producer, t, key, value, **extra)
            tracker.sent += 1
            if i % poll_every == 0:
                producer.poll(0)
        assert publisher.wait(timeout_s=60) == n and tracker.failed == 0
        return stop(t0)

    def produce_batch(size: int = 100) -> tuple[float, float]:
        """``ours`` handing ``size`` messages at a time to ``Producer.produce_batch``."""
        from confluent_kafka import KafkaError, KafkaException

        t = topic()
        publisher = _Publisher.create("kafka_default", t, timeout_s=30)
        producer, tracker = publisher.producer, publisher.tracker
        t0 = start(producer, t, True)
        tracker.delivered = 0

        def send(batch: list[dict]) -> None:
            while batch:
                producer.produce_batch(t, batch)  # refused messages get an "_error" entry, nothing raised
                refused = [m for m in batch if "_error" in m]
                for m in refused:
                    if m.pop("_error").code() != KafkaError._QUEUE_FULL:
                        raise KafkaException(f"produce_batch refused a message: {m}")
                tracker.sent += len(batch) - len(refused)
                if refused:
                    producer.poll(0.01)
                batch = refused
            producer.poll(0)

        batch: list[dict] = []
        for m in cycle(messages):
            batch.append({"key": m.video_id.encode(), "value": m.to_json()})
            if len(batch) == size:
                send(batch)
                batch = []
        send(batch)
        assert publisher.wait(timeout_s=60) == n and tracker.failed == 0
        return stop(t0)

    variants: dict[str, Callable[[], tuple[float, float]]] = {
        "bare": bare,
        "ours": ours,
        "ours_bytes": lambda: lever(encode=False),
        "ours_every_report": lambda: lever(errors_only=False),
        "ours_callback_per_produce": lambda: lever(callback_per_produce=True),
        "ours_poll100": lambda: lever(poll_every=100),
        "ours_no_lz4": lambda: lever(compression_type="none"),
        "ours_produce_batch": lambda: produce_batch(batch),
    }
    if cold:
        variants.update({"bare_cold": lambda: bare(False), "ours_cold": lambda: ours(False)})
    names = [k for k in variants if not only or k in only or k == "bare"]
    runs: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}  # CPU s of this process (all threads): less load-bound
    try:
        for r in range(repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wall, used = variants[name]()
                runs[name].append(wall)
                cpu[name].append(used)
            print(f"repetition {r + 1}/{repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()))
    finally:
        scratch.close()

    def ratio(base: str, other: str, times: dict[str, list[float]] = runs) -> float:
        return round(statistics.median(b / o for b, o in zip(times[base], times[other], strict=True)), 3)

    ratios = {f"bare_over_{k}": ratio("bare", k) for k in names if k != "bare" and not k.endswith("_cold")}
    if cold:
        ratios["bare_cold_over_ours_cold"] = ratio("bare_cold", "ours_cold")
    cpu_ratios = {f"bare_over_{k}": ratio("bare", k, cpu) for k in names if k != "bare" and not k.endswith("_cold")}
    return {
        "encode_us_per_message": _encode_us(messages),
        "messages": n,
        "distinct_messages": pool,
        "bytes_per_message": round(sum(len(v) for _, v in payloads) / pool),
        "repeat": repeat,
        "seconds": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "seconds_range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in runs.items()},
        "messages_per_s": {k: round(n / statistics.median(v)) for k, v in runs.items()},
        "ratios": ratios,
        "cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "cpu_ratios": cpu_ratios,
        "goal": "bare_over_ours >= 0.8",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300_000, help="messages per variant and repetition")
    parser.add_argument("--pool", type=int, default=20_000, help="distinct messages, cycled")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="also time cold producers (start cost)")
    parser.add_argument("--batch", type=int, default=100, help="messages per produce_batch call (ours_produce_batch)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants (and bare) only")
    args = parser.parse_args(argv)
    report = run(args.messages, args.repeat, args.pool, args.cold, set(args.only or ()), args.batch)
    print(f"{'variant':<27}{'seconds':>9}{'range':>12}{'msg/s':>9}{'bare/variant':>14}{'cpu s':>8}{'cpu bare/v':>12}")
    for k, v in report["seconds"].items():
        lo, hi = report["seconds_range"][k]
        r = report["ratios"].get(f"bare_over_{k}", report["ratios"].get("bare_cold_over_ours_cold"))
        c = report["cpu_ratios"].get(f"bare_over_{k}")
        shown, cpu_shown = ("", "") if k in ("bare", "bare_cold") else (f"{r:.3f}", f"{c:.3f}" if c else "")
        print(
            f"{k:<27}{v:>9.3f}{f'{lo:.2f}-{hi:.2f}':>12}{report['messages_per_s'][k]:>9}{shown:>14}"
            f"{report['cpu_seconds'][k]:>8.2f}{cpu_shown:>12}"
        )
    print(f"encoding alone, us/message: {report['encode_us_per_message']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
