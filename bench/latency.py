"""Benchmark latency: message published -> row visible in PostgreSQL, with the drain running in a loop.

A producer (:func:`crowd.kafka.reliable_producer`) publishes Faces messages at ``--rate`` per second (default 30:
ten cameras sampled at 3 frames/s) for ``--seconds``; a thread runs :func:`crowd.ingest.drain` over and over with
the ingest DAG's batch settings (batch 2000, ``batch_wait_s`` 1 s, idle timeout 10 s) but ``linger_s`` 0 (each
drain returns at the end of the topic and the loop starts the next at once: a DAG run that never ends); a poller sees each frame row appear (every 20 ms, from another connection, so only committed rows
count). Latency = row first seen - the message's Kafka CreateTime (set at ``produce``). Prints p50/p95/max.

Usage: ``source dev/env.sh && python bench/latency.py [--rate 30] [--seconds 20] [--batch-wait 1.0]``

``--trigger``: the same latency with the real trigger-driven ingest instead of a drain loop. Starts
``airflow standalone`` (scheduler, LocalExecutor, triggerer, dag-processor, api-server) in a temp AIRFLOW_HOME on a
free port, against a fresh topic (``CROWD_FACES_TOPIC``), a fresh PostgreSQL schema (migrated first, via
``python -m crowd.storage migrate``) and fresh ingest/watch consumer groups; waits for ``crowd_faces_ingest`` to
be registered, unpauses it, then publishes three phases: ``steady`` (1 message every ``--interval`` s for
``--steady-s`` s), ``burst`` (``--burst`` messages at once, after the steady run has had time to go idle) and
``sparse`` (``--sparse`` messages spaced ``--sparse-gap`` s apart, longer than the DAG's linger_s, so each
one finds no run open). Each row is polled every 100 ms by (video_id, frame_id); latency = row first seen - Kafka
CreateTime. Prints p50/p95/max per phase, the DAG runs (``airflow dags list-runs``) and, from the temp metadata
DB, per run: asset event (watcher fire) -> run queued -> run start -> task start -> task end.
``--linger X`` runs the DAG with ``linger_s`` = X (``CROWD_INGEST_LINGER_S``; asset-triggered runs take no conf,
the Param default comes from the settings): 0 stops every run at the end of the topic, one run per message at
low rates; the default (5 s) keeps a run reading the steady stream.
Everything (process group, topic, schema) is torn down in ``finally``.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def _quantiles(lat: list[float]) -> dict:
    lat = sorted(lat)
    if len(lat) < 2:
        return {
            "n": len(lat),
            "p50": lat[0] if lat else None,
            "p95": lat[0] if lat else None,
            "max": lat[-1] if lat else None,
        }
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"n": len(lat), "p50": round(q[49], 3), "p95": round(q[94], 3), "max": round(lat[-1], 3)}


def run_trigger(args: argparse.Namespace) -> int:  # noqa: C901, PLR0915 - one linear scenario
    import contextlib
    import shutil
    import sqlite3
    import subprocess
    import tempfile

    import psycopg
    from ingest import _message
    from services import Scratch

    from crowd.config import load_settings
    from crowd.kafka import reliable_producer
    from dev.standalone import airflow, dag_runs, running_standalone, standalone_env, wait_for_dag

    kafka_extra = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]
    scratch = Scratch()  # closed in the finally below
    topic, schema = scratch.topic("bench-latency-trig"), scratch.schema("bench_latency_trig")
    tag = topic.rsplit("-", 1)[1]
    tmp = Path(tempfile.mkdtemp(prefix="crowd-latency-"))
    home = tmp / "airflow"
    home.mkdir()
    linger = args.linger if args.linger is not None else load_settings().ingest_linger_s
    env = standalone_env(
        home,
        ROOT / "dags",
        CROWD_INGEST_LINGER_S=f"{linger:g}",
        CROWD_INGEST_SWEEP_SCHEDULE="none",
        CROWD_FACES_TOPIC=topic,
        CROWD_INGEST_GROUP=f"latency-ingest-{tag}",
        AIRFLOW_CONN_KAFKA_WATCH=json.dumps(
            {"conn_type": "kafka", "extra": {**kafka_extra, "group.id": f"latency-watch-{tag}"}}
        ),
        AIRFLOW_CONN_CROWD_POSTGRES=scratch.postgres_conn(schema),
    )  # fmt: skip
    scratch.use_schema(schema)
    dsn = scratch.dsn(schema)
    standalone = contextlib.ExitStack()
    created: dict[tuple[str, int], float] = {}
    seen: dict[tuple[str, int], float] = {}
    phase_of: dict[str, str] = {}
    stop = threading.Event()
    report: dict = {"mode": "trigger", "linger_s": linger}
    t0 = time.time()

    def poll_rows() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                now = time.time()
                for video_id, frame_id in conn.execute("SELECT video_id, frame_id FROM frames"):
                    seen.setdefault((video_id, int(frame_id)), now)
                time.sleep(0.1)

    def delivered(err, msg) -> None:  # noqa: ANN001 - confluent-kafka callback
        if err is None:
            m = json.loads(msg.value())
            created[(m["video_id"], m["frame_id"])] = msg.timestamp()[1] / 1000.0

    def wait_rows(keys: list[tuple[str, int]], timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not all(k in seen for k in keys):
            time.sleep(0.2)

    poller = threading.Thread(target=poll_rows, daemon=True)
    try:
        subprocess.run([sys.executable, "-m", "crowd.storage", "migrate"], env=env, check=True, capture_output=True,
                       timeout=120)  # fmt: skip
        standalone.enter_context(running_standalone(env, tmp / "standalone.log"))
        wait_for_dag(env, "crowd_faces_ingest")
        airflow(env, "dags", "unpause", "crowd_faces_ingest")
        print(f"standalone up, DAG registered and unpaused after {time.time() - t0:.0f} s", flush=True)
        # publishing starts right after the unpause: the first messages measure the watcher's start-up
        poller.start()
        producer = reliable_producer("kafka_default", timeout_s=30)
        rng = random.Random(11)

        def publish(video: str, i: int) -> tuple[str, int]:
            producer.produce(topic, key=video.encode(), value=_message(video, i, rng), on_delivery=delivered)
            producer.poll(0)
            return (video, i)

        # steady: 1 message every --interval s
        video = f"steady-{tag}"
        phase_of[video] = "steady"
        keys = []
        start = time.perf_counter()
        for i in range(int(args.steady_s / args.interval)):
            time.sleep(max(0.0, start + i * args.interval - time.perf_counter()))
            keys.append(publish(video, i))
        producer.flush(30)
        wait_rows(keys, 120)
        print(f"steady done at {time.time() - t0:.0f} s", flush=True)
        time.sleep(max(15.0, linger + 8))  # the steady run goes idle and ends
        # burst: --burst messages at once
        video = f"burst-{tag}"
        phase_of[video] = "burst"
        keys = [publish(video, i) for i in range(args.burst)]
        producer.flush(30)
        wait_rows(keys, 120)
        print(f"burst done at {time.time() - t0:.0f} s", flush=True)
        # sparse: messages spaced longer than linger_s: each one finds no run open
        video = f"sparse-{tag}"
        phase_of[video] = "sparse"
        for i in range(args.sparse):
            time.sleep(max(15.0, linger + 8))
            keys = [publish(video, i)]
            producer.flush(30)
            wait_rows(keys, 120)
        print(f"sparse done at {time.time() - t0:.0f} s", flush=True)
        report["dag_runs"] = [
            {k: r.get(k) for k in ("run_id", "state", "start_date", "end_date")}
            for r in dag_runs(env, "crowd_faces_ingest")
        ]
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(timeout=5)
        standalone.close()
        scratch.close()

    # where the time goes, per run, from the temp metadata DB (sqlite)
    timeline = []
    try:
        db = sqlite3.connect(home / "airflow.db")

        def ts(v: str | None) -> float | None:
            from datetime import datetime, timezone

            if not v:
                return None
            moment = datetime.fromisoformat(v)  # Airflow's SQLite columns hold UTC without a zone
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()

        events = [ts(r[0]) for r in db.execute("SELECT timestamp FROM asset_event ORDER BY timestamp")]
        for run_id, queued, started, ended, ti_start, ti_end, ti_queued in db.execute(
            "SELECT r.run_id, r.queued_at, r.start_date, r.end_date, t.start_date, t.end_date, t.queued_dttm"
            " FROM dag_run r JOIN task_instance t ON t.run_id = r.run_id AND t.dag_id = r.dag_id"
            " WHERE r.dag_id = 'crowd_faces_ingest' ORDER BY r.queued_at"
        ):
            q, s, e, ts0, ts1, tq = ts(queued), ts(started), ts(ended), ts(ti_start), ts(ti_end), ts(ti_queued)
            fired = max((x for x in events if x is not None and x <= q), default=None)
            timeline.append({
                "run_id": run_id,
                "event_to_queued_s": round(q - fired, 2) if fired and q else None,
                "queued_to_run_start_s": round(s - q, 2) if s and q else None,
                "run_start_to_ti_queued_s": round(tq - s, 2) if tq and s else None,
                "ti_queued_to_ti_start_s": round(ts0 - tq, 2) if ts0 and tq else None,
                "ti_start_to_ti_end_s": round(ts1 - ts0, 2) if ts1 and ts0 else None,
                "run_end_s_after_start": round(e - t0, 1) if e else None,
                "queued_s_after_start": round(q - t0, 1) if q else None,
            })  # fmt: skip
        report["asset_events"] = len(events)
    except Exception as exc:  # noqa: BLE001 - the timeline is a bonus
        report["timeline_error"] = repr(exc)
    report["timeline"] = timeline
    # steady messages published before the first run was queued: the watcher was not running yet (warm-up)
    first_q = min((r["queued_s_after_start"] for r in timeline if r["queued_s_after_start"] is not None), default=None)
    if first_q is not None:
        for k, c in created.items():
            if phase_of.get(k[0]) == "steady" and c - t0 < first_q:
                phase_of[k[0] + f"#{k[1]}"] = "warmup"
    # per message: produce -> first run queued after it -> that run's task start -> row seen
    runs_q = sorted((r["queued_s_after_start"], r) for r in timeline if r["queued_s_after_start"] is not None)
    split: dict[str, list[tuple[float, float, float]]] = {}
    for k, c in created.items():
        if k not in seen:
            continue
        c_rel, s_rel = c - t0, seen[k] - t0
        run = next((r for q, r in runs_q if q >= c_rel - 0.05), None)
        if run is None or run["queued_s_after_start"] > s_rel:  # picked up by a run already open
            continue
        q_rel = run["queued_s_after_start"]
        start = q_rel + (run["queued_to_run_start_s"] or 0) + (run["run_start_to_ti_queued_s"] or 0)
        start += run["ti_queued_to_ti_start_s"] or 0
        split.setdefault(phase_of.get(k[0] + f"#{k[1]}", phase_of[k[0]]), []).append(
            (q_rel - c_rel, start - q_rel, s_rel - start)
        )
    report["breakdown_median_s"] = {
        phase: {
            "produce_to_run_queued": round(statistics.median(x[0] for x in v), 2),
            "run_queued_to_task_start": round(statistics.median(x[1] for x in v), 2),
            "task_start_to_row": round(statistics.median(x[2] for x in v), 2),
            "n": len(v),
        }
        for phase, v in split.items()
    }
    report["standalone_log"] = str(tmp / "standalone.log")

    print(f"trigger-driven ingest, linger_s {report['linger_s']:g}: published -> row visible")
    report["latency_s"] = {}

    def phase_in(k: tuple[str, int]) -> str:
        return phase_of.get(k[0] + f"#{k[1]}", phase_of[k[0]])

    for phase in ("warmup", "steady", "burst", "sparse", "all"):
        lat = [seen[k] - created[k] for k in created if k in seen and phase in ("all", phase_in(k))]
        missing = sum(1 for k in created if k not in seen and phase in ("all", phase_in(k)))
        qs = _quantiles(lat)
        qs["missing"] = missing
        report["latency_s"][phase] = qs
        print(f"{phase:7s} n={qs['n']:3d} missing={missing}  p50 {qs['p50']} s  p95 {qs['p95']} s  max {qs['max']} s")
    if args.per_message:
        report["per_message"] = sorted(
            [
                (phase_in(k), k[1], round(created[k] - t0, 2), round(seen[k] - created[k], 2))
                for k in created
                if k in seen
            ]
        )
    print(f"DAG runs: {len(report.get('dag_runs', []))}; asset events: {report.get('asset_events')}")
    for phase, b in report["breakdown_median_s"].items():
        print(f"{phase:7s} medians: {b}")
    print(json.dumps(report))
    shutil.rmtree(home, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import psycopg
    from ingest import _message
    from services import Scratch

    from crowd import storage
    from crowd.ingest import drain
    from crowd.kafka import reliable_producer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-wait", type=float, default=1.0)
    parser.add_argument("--trigger", action="store_true", help="airflow standalone + the Kafka-triggered DAG")
    parser.add_argument("--interval", type=float, default=2.0, help="--trigger steady phase: s between messages")
    parser.add_argument("--steady-s", type=float, default=120.0)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--sparse", type=int, default=3)
    parser.add_argument("--linger", type=float, default=None, help="--trigger: the DAG's linger_s (default: settings)")
    parser.add_argument("--per-message", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("crowd").setLevel(logging.WARNING)
    if args.trigger:
        return run_trigger(args)

    scratch = Scratch()  # closed in the finally below
    topic, schema = scratch.topic("bench-latency"), scratch.schema("bench_latency")
    dsn = scratch.dsn(schema)
    with psycopg.connect(dsn) as conn:
        storage.migrate(conn)
    scratch.use_schema(schema)

    stop = threading.Event()
    created: dict[int, float] = {}
    seen: dict[int, float] = {}
    drains: list[dict] = []

    def drain_loop() -> None:
        while not stop.is_set():
            s = drain("kafka_default", "crowd_postgres", topic, f"latency-{topic}", batch_wait_s=args.batch_wait,
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
        scratch.close()
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
