"""Benchmark scaling with the real CeleryExecutor: 1 vs 2 Celery workers on the detection DAG (throughput ratio).

Each round starts the CeleryExecutor profile ``dev/celery.sh`` (RabbitMQ, PostgreSQL metadata, the Airflow
components and ``CROWD_CELERY_WORKERS`` workers of concurrency 1) with its own state folder under /tmp, fresh
databases and a fresh Kafka topic, lets ``crowd_video_scan`` (schedule ``@once``) run on ``--videos`` generated
clips, reads the run and its ``detect_and_publish`` task instances from the REST API, and cleans the profile up
(``dev/celery.sh clean``, the topic deleted), also on failure. Rounds alternate the worker counts (``--order``).

The clips come from ``bench/detect.py``'s ``make_video`` (1280x720, the size its face layout needs) at ``--fps``
3, so the DAG's default sampling (fps/3) runs the detector on every frame; lengths differ by one frame so that
every clip has its own content hash. The run uses the DAG's default ``model`` param (empty: ``CROWD_DETECTOR``,
``auto`` unless set: YOLOv3 face if installed, else MTCNN), which is what a scheduled run does.

Printed: one row per round (run seconds from the run's start to its end, the detection span from the first
``detect_and_publish`` start to the last end, the sum of the task durations, tasks per worker hostname), one JSON
line, and ``run_1w / run_2w`` (the throughput of 2 workers relative to 1; medians over the rounds).

Usage: ``.venv/bin/python bench/scaling_celery.py [--videos 4] [--frames 45] [--order 1,2,1,2]``
(Kafka and PostgreSQL must run: ``dev/kafka.sh start``, ``dev/postgres.sh start``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from dev.polling import wait_until  # noqa: E402

SCRIPT = ROOT / "dev" / "celery.sh"
DAG_ID = "crowd_video_scan"


@dataclass
class Round:
    """One profile start with ``workers`` Celery workers and its ``crowd_video_scan`` run."""

    workers: int
    state: str
    run_s: float
    detect_span_s: float
    task_sum_s: float
    tasks_per_host: dict[str, int]
    startup_s: float


def _sourced_env(script: str) -> dict[str, str]:
    """The environment after ``source script`` in a clean bash (settings files of dev/)."""
    out = subprocess.run(
        ["bash", "-c", f"source {script} >/dev/null 2>&1 && env -0"], check=True, capture_output=True
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _celery(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def make_videos(folder: Path, count: int, frames: int, fps: float) -> list[Path]:
    """``count`` clips of ``frames``, ``frames + 1``, ... frames (distinct content hashes, near-equal work)."""
    from detect import make_video

    return [make_video(folder / f"cam{i}.mp4", frames + i, fps=fps) for i in range(count)]


def run_round(workers: int, base_env: dict[str, str], videos: Path, tmp: Path, timeout: float) -> Round:
    """Start the profile with ``workers`` workers, run the scan DAG once, read its timings, clean up."""
    import httpx
    from confluent_kafka.admin import AdminClient

    state = tmp / f"state-{workers}w-{uuid.uuid4().hex[:6]}"
    suffix = uuid.uuid4().hex[:8]
    topics = [f"scaling-faces-{suffix}", f"scaling-alerts-{suffix}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_"))}
    env.update({
        "CROWD_CELERY_STATE": str(state),
        "CROWD_CELERY_WORKERS": str(workers),
        "CROWD_VIDEO_ROOTS": str(videos),
        "CROWD_SCAN_SCHEDULE": "@once",
        "CROWD_SCAN_MIN_AGE_S": "0",  # the clips were generated moments before
        "CROWD_FACES_TOPIC": topics[0],
        "CROWD_ALERTS_TOPIC": topics[1],
        "CROWD_PG_PORT": base_env.get("CROWD_PG_PORT", "5433"),
        "CROWD_PG_PASSWORD": base_env.get("CROWD_PG_PASSWORD", "crowd"),
        "AIRFLOW_CONN_KAFKA_DEFAULT": base_env["AIRFLOW_CONN_KAFKA_DEFAULT"],
    })  # fmt: skip
    bootstrap = json.loads(base_env["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
    logs = state / "logs"
    started = time.monotonic()
    try:
        result = _celery("start", env=env, timeout=420)
        if result.returncode != 0:
            raise RuntimeError(f"dev/celery.sh start ({workers} workers) failed:\n{result.stderr[-3000:]}")
        startup_s = time.monotonic() - started
        settings = _sourced_env(str(state / "celery.env"))
        url = settings["CROWD_CELERY_API_URL"]
        token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30)
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
            wait_until(
                f"DAG {DAG_ID} to be parsed",
                lambda: api.get(f"/api/v2/dags/{DAG_ID}").status_code == 200,
                180,
                hint=f"logs: {logs}",
            )
            api.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()  # @once: run now

            def runs() -> list[dict]:
                resp = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 10})
                resp.raise_for_status()
                return resp.json()["dag_runs"]

            run_id = wait_until(f"the scheduled {DAG_ID} run", runs, 120, hint=f"logs: {logs}")[0]["dag_run_id"]

            def finished() -> dict | None:
                run = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
                return run if run["state"] in ("success", "failed") else None

            run = wait_until(f"{DAG_ID} run {run_id} to finish", finished, timeout, hint=f"logs: {logs}")
            resp = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
            resp.raise_for_status()
            tis = resp.json()["task_instances"]
        detect = [ti for ti in tis if ti["task_id"] == "detect_and_publish"]
        if run["state"] != "success" or not detect:
            states = [(ti["task_id"], ti["map_index"], ti["state"]) for ti in tis]
            raise RuntimeError(f"{DAG_ID} run {run_id} ended {run['state']!r}: {states}; logs: {logs}")
        starts = [_ts(ti["start_date"]) for ti in detect]
        ends = [_ts(ti["end_date"]) for ti in detect]
        return Round(
            workers=workers,
            state=run["state"],
            run_s=round((_ts(run["end_date"]) - _ts(run["start_date"])).total_seconds(), 2),
            detect_span_s=round((max(ends) - min(starts)).total_seconds(), 2),
            task_sum_s=round(sum((e - s).total_seconds() for s, e in zip(starts, ends, strict=True)), 2),
            tasks_per_host=dict(sorted(Counter(ti["hostname"].split("@")[0] for ti in detect).items())),
            startup_s=round(startup_s, 1),
        )
    finally:
        cleaned = _celery("clean", env=env, timeout=240)
        if cleaned.returncode != 0:
            print(f"warning: dev/celery.sh clean failed (state {state}):\n{cleaned.stderr[-2000:]}", file=sys.stderr)
        admin = AdminClient({"bootstrap.servers": bootstrap})  # kept alive until the deletions are answered
        for topic, future in admin.delete_topics(topics).items():
            try:
                future.result(timeout=30)  # wait: the request is sent asynchronously
            except Exception as exc:  # a topic never created (start failed early) is fine
                print(f"warning: topic {topic} not deleted: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=45, help="frames of the first clip (every frame is sampled)")
    parser.add_argument("--fps", type=float, default=3.0, help="clip fps; the DAG samples every int(fps/3)-th frame")
    parser.add_argument("--order", default="1,2,1,2", help="worker counts of the rounds, in order")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one run")
    args = parser.parse_args(argv)
    order = [int(w) for w in args.order.split(",")]
    # SIGTERM -> SystemExit, so that the finally blocks clean the profile up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base_env = _sourced_env(str(ROOT / "dev" / "env.sh"))
    wall = time.monotonic()
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="crowd-scaling-celery-", dir="/tmp") as tmp:
        videos = Path(tmp) / "videos"
        videos.mkdir()
        clips = make_videos(videos, args.videos, args.frames, args.fps)
        sampled = sum(args.frames + i for i in range(args.videos))
        for workers in order:
            rounds.append(run_round(workers, base_env, videos, Path(tmp), args.timeout))
            r = rounds[-1]
            print(f"round {len(rounds)}: {workers} worker(s): run {r.run_s} s (start-up {r.startup_s} s)", flush=True)
    print(f"\n{'workers':>7}{'run s':>8}{'detect span s':>15}{'sum task s':>12}  tasks per worker")
    for r in rounds:
        print(f"{r.workers:>7}{r.run_s:>8}{r.detect_span_s:>15}{r.task_sum_s:>12}  {r.tasks_per_host}")
    median = {w: round(statistics.median(r.run_s for r in rounds if r.workers == w), 2) for w in sorted(set(order))}
    span = {
        w: round(statistics.median(r.detect_span_s for r in rounds if r.workers == w), 2) for w in sorted(set(order))
    }
    report = {
        "executor": "CeleryExecutor", "cores": os.cpu_count(), "videos": len(clips), "sampled_frames": sampled,
        "rounds": [asdict(r) for r in rounds],
        "run_s_median": median, "detect_span_s_median": span,
        "run_1w_over_run_2w": round(median[1] / median[2], 3) if {1, 2} <= median.keys() else None,
        "span_1w_over_span_2w": round(span[1] / span[2], 3) if {1, 2} <= span.keys() else None,
        "bench_wall_s": round(time.monotonic() - wall, 1),
    }  # fmt: skip
    print(json.dumps(report))
    if report["run_1w_over_run_2w"] is not None:
        print(f"run_1w / run_2w = {report['run_1w_over_run_2w']}x (detection span: {report['span_1w_over_span_2w']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
