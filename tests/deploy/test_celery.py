"""Airflow with the CeleryExecutor for real: RabbitMQ, PostgreSQL metadata DB, two Celery workers (dev/celery.sh).

Videos dropped into the watched folder are scanned by ``crowd_video_scan`` (schedule ``@once`` here, so the run
starts when the DAG is unpaused), its mapped ``detect_and_publish`` tasks spread over both workers, the messages
go to a fresh Kafka topic, ``crowd_faces_ingest`` fires by itself (asset watcher) and a fresh results database
holds exactly one row per sampled frame. The acceptance test then follows one more video from the folder to
``GET /crowd/videos/{id}`` on the running api-server and prints the time of each stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from crowd.video import content_hash, frame_interval_for, probe_video, sampled_frame_ids
from dev.polling import wait_until
from tests.crowd._helpers import CARPHONE, write_clip

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.services]

ROOT = Path(__file__).resolve().parents[2]
FRAMES_PER_TASK = 40  # 120 + 90 + 60 frames -> 3 + 3 + 2 mapped detection tasks


def _expected_frames(path: Path) -> set[tuple[str, int]]:
    info = probe_video(path)
    video_id = content_hash(path)
    return {(video_id, f) for f in sampled_frame_ids(info.frame_count, frame_interval_for(info.fps))}


def _script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "dev" / "celery.sh"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _read_env(envfile: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f"source {envfile} && env -0"], check=True, capture_output=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


class Profile:
    """The running profile: its settings (celery.env), an authenticated API client and the results DB."""

    def __init__(self, env: dict[str, str], videos: Path) -> None:
        self.env = env
        self.videos = videos
        self.url = env["CROWD_CELERY_API_URL"]
        token = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30)
        token.raise_for_status()
        self.api = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=30
        )
        self.results_dsn = env["AIRFLOW_CONN_CROWD_POSTGRES"]

    def wait(self, what: str, check, timeout: float, interval: float = 2.0):
        logs = f"logs: {self.env['CROWD_CELERY_STATE_DIR']}/logs"
        return wait_until(what, check, timeout, every_s=interval, hint=logs)

    def unpause(self, dag_id: str) -> None:
        self.wait(f"DAG {dag_id} to be parsed", lambda: self.api.get(f"/api/v2/dags/{dag_id}").status_code == 200, 120)
        self.api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def runs(self, dag_id: str) -> list[dict]:
        resp = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "run_after", "limit": 100})
        resp.raise_for_status()
        return resp.json()["dag_runs"]

    def finished_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        def done():
            run = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
            return run if run["state"] in ("success", "failed") else None

        return self.wait(f"{dag_id} run {run_id} to finish", done, timeout)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        resp = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        resp.raise_for_status()
        return resp.json()["task_instances"]

    def stored_frames(self) -> set[tuple[str, int]]:
        with psycopg.connect(self.results_dsn) as conn:
            return set(conn.execute("SELECT video_id, frame_id FROM frames").fetchall())


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, kafka_admin, postgres_admin_dsn: str) -> Iterator[Profile]:
    """Start the CeleryExecutor profile (dev/celery.sh start) on fresh databases and topics; always clean up."""
    base = tmp_path_factory.mktemp("celery")
    videos = base / "videos"
    videos.mkdir()
    suffix = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_"))}
    env.update({
        "CROWD_CELERY_STATE": str(base / "state"),
        "CROWD_VIDEO_ROOTS": str(videos),
        "CROWD_FRAMES_PER_TASK": str(FRAMES_PER_TASK),
        "CROWD_SCAN_SCHEDULE": "@once",
        "CROWD_FACES_TOPIC": f"celery-faces-{suffix}",
        "CROWD_ALERTS_TOPIC": f"celery-alerts-{suffix}",
        "CROWD_DETECTOR": "mtcnn",
        "CROWD_PG_PORT": os.environ.get("CROWD_PG_PORT", "5433"),
        "CROWD_PG_PASSWORD": os.environ.get("CROWD_PG_PASSWORD", "crowd"),
        "AIRFLOW_CONN_KAFKA_DEFAULT": os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"],
    })  # fmt: skip
    started = time.monotonic()
    result = _script("start", env=env, timeout=360)
    print(
        f"\n[stage] start-up (RabbitMQ, databases, migrations, 6 Airflow processes): {time.monotonic() - started:.1f} s"
    )
    try:
        assert result.returncode == 0, f"dev/celery.sh start failed:\n{result.stderr[-4000:]}"
        settings = _read_env(base / "state" / "celery.env")
        settings["CROWD_CELERY_STATE_DIR"] = str(base / "state")
        yield Profile(settings, videos)
    finally:
        pgids = [int(p.read_text()) for p in (base / "state" / "pids").glob("*.pid")]
        node = (
            _read_env(base / "state" / "celery.env").get("RABBITMQ_NODENAME", "")
            if (base / "state" / "celery.env").exists()
            else ""
        )
        stopped = _script("clean", env=env, timeout=180)
        kafka_admin.delete_topics([env["CROWD_FACES_TOPIC"], env["CROWD_ALERTS_TOPIC"]])
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        # Nothing left behind: no process in the groups we started, no RabbitMQ node, no epmd of ours.
        left = [g for g in pgids if subprocess.run(["pgrep", "-g", str(g)], capture_output=True).returncode == 0]
        if node:
            beam = subprocess.run(["pgrep", "-f", node], capture_output=True, text=True).stdout.split()
            left += [int(p) for p in beam]
        assert not left, f"processes left behind (process groups / pids): {left}"


def test_mapped_detection_spreads_over_two_workers_and_ingest_stores_every_frame(profile: Profile) -> None:
    clips = [
        shutil.copy(CARPHONE, profile.videos / "cam1.mp4"),
        write_clip(CARPHONE, profile.videos / "cam2.mp4", 90),
        write_clip(CARPHONE, profile.videos / "cam3.mp4", 60),
    ]
    expected = set().union(*(_expected_frames(Path(c)) for c in clips))

    t0 = time.monotonic()
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_scan")  # @once: the scheduler starts the run now
    run = profile.wait("the scheduled crowd_video_scan run", lambda: profile.runs("crowd_video_scan"), 120)[0]
    assert run["run_type"] == "scheduled"
    run = profile.finished_run("crowd_video_scan", run["dag_run_id"], 300)
    detect_s = time.monotonic() - t0
    tis = profile.task_instances("crowd_video_scan", run["dag_run_id"])
    detect = [ti for ti in tis if ti["task_id"] == "detect_and_publish"]
    assert run["state"] == "success", [(ti["task_id"], ti["map_index"], ti["state"]) for ti in tis]
    assert len(detect) == 8, len(detect)  # 3 + 3 + 2 frame ranges
    hosts = {ti["hostname"].split("@")[0] for ti in detect}
    print(f"[stage] detection run: {detect_s:.1f} s; detect_and_publish per worker: "
          f"{ {h: sum(ti['hostname'].startswith(h + '@') for ti in detect) for h in sorted(hosts)} }")  # fmt: skip
    assert hosts == {"worker1", "worker2"}, [ti["hostname"] for ti in detect]

    t1 = time.monotonic()
    profile.wait("every sampled frame in PostgreSQL", lambda: profile.stored_frames() >= expected, 180)
    print(f"[stage] ingest after the detection run: {time.monotonic() - t1:.1f} s ({len(expected)} frames)")
    assert profile.stored_frames() == expected  # exactly the sampled frames: nothing missing, nothing else

    ingest_runs = profile.runs("crowd_faces_ingest")
    assert ingest_runs and all(r["run_type"] == "asset_triggered" for r in ingest_runs), ingest_runs
    with psycopg.connect(profile.results_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == len(expected)  # one row each
        assert conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0] == 0


def test_acceptance_video_in_folder_to_results_in_the_api(profile: Profile) -> None:
    """One new video: folder -> scan run (Celery) -> Kafka -> ingest -> GET /crowd/videos/{id}, timed per stage."""
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_scan")
    profile.wait(
        "no active scan run",
        lambda: all(r["state"] in ("success", "failed") for r in profile.runs("crowd_video_scan")),
        300,
    )
    video = write_clip(CARPHONE, profile.videos / "upload.mp4", 100)
    expected = _expected_frames(video)
    video_id = content_hash(video)

    t0 = time.monotonic()
    resp = profile.api.post("/api/v2/dags/crowd_video_scan/dagRuns", json={"logical_date": None})
    resp.raise_for_status()
    run = profile.finished_run("crowd_video_scan", resp.json()["dag_run_id"], 300)
    assert run["state"] == "success"
    t1 = time.monotonic()

    def complete():
        r = profile.api.get(f"/crowd/videos/{video_id}")
        return r.json() if r.status_code == 200 and r.json()["frames"] == len(expected) else None

    summary = profile.wait(f"/crowd/videos/{video_id} to show {len(expected)} frames", complete, 180, interval=1.0)
    t2 = time.monotonic()
    frames = profile.api.get(f"/crowd/videos/{video_id}/frames", params={"limit": 500}).json()
    t3 = time.monotonic()
    print(f"\n[stage] detection run (trigger -> success): {t1 - t0:.1f} s")
    print(f"[stage] ingest (detection done -> all frames visible in the API): {t2 - t1:.1f} s")
    print(f"[stage] API (GET /crowd/videos/{{id}}/frames): {(t3 - t2) * 1000:.0f} ms; total {t3 - t0:.1f} s")
    assert summary["status"] == "done" and summary["frame_count"] == 100
    assert {(video_id, f["frame_id"]) for f in frames["items"]} == expected
    assert summary["total_faces"] >= 0.9 * len(expected)  # a face in every frame of carphone
