"""Drive one sample video through the running local Airflow and print what landed in PostgreSQL.

Called by dev/demo.sh after setup; talks only to the local Airflow REST API and the crowd plugin.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import requests
import skvideo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dev.polling import wait_until  # noqa: E402

API = f"http://127.0.0.1:{os.environ.get('AIRFLOW__API__PORT', '8080')}"
SAMPLE = Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"


def say(text: str) -> None:
    print(f"\033[1m[crowd]\033[0m {text}", file=sys.stderr, flush=True)


def wait(what: str, check, timeout_s: float):
    """:func:`dev.polling.wait_until` every 2 s; a timeout ends the demo with the reason."""
    try:
        return wait_until(what, check, timeout_s, every_s=2.0)
    except TimeoutError as exc:
        sys.exit(f"[crowd] {exc}")


def main() -> int:
    from crowd.video import content_hash

    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE
    root = Path(os.environ["CROWD_VIDEO_ROOTS"].split(os.pathsep)[0])
    video = root / f"demo-{source.name}"
    shutil.copy(source, video)
    video_id = content_hash(video)
    say(f"sample video {video} (id {video_id})")

    token = requests.post(f"{API}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10)
    token.raise_for_status()
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    say("waiting for the DAGs to be parsed")
    wait("crowd_video_detect", lambda: http.get(f"{API}/api/v2/dags/crowd_video_detect", timeout=10).ok, 180)
    for dag_id in ("crowd_video_detect", "crowd_faces_ingest"):
        http.patch(f"{API}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=10).raise_for_status()

    started = time.monotonic()
    run = http.post(
        f"{API}/api/v2/dags/crowd_video_detect/dagRuns",
        json={"logical_date": None, "conf": {"video_path": str(video)}},
        timeout=10,
    )
    run.raise_for_status()
    run_id = run.json()["dag_run_id"]
    say(f"triggered crowd_video_detect run {run_id}")

    def run_finished():
        state = http.get(f"{API}/api/v2/dags/crowd_video_detect/dagRuns/{run_id}", timeout=10).json()["state"]
        return state if state in ("success", "failed") else None

    state = wait("the detection run", run_finished, 600)
    say(f"detection run {state} after {time.monotonic() - started:.0f} s")
    if state != "success":
        say(f"see the task logs: {API}/dags/crowd_video_detect/runs/{run_id}")
        return 1

    say("waiting for the Kafka-triggered ingest to store the frames in PostgreSQL")

    def stored():
        # every message the run published is stored when the ingest's stored offsets reach Faces' end offsets
        # (the first stored frame alone may be a part of them, and a video run before has its old rows)
        health = http.get(f"{API}/crowd/health", timeout=10)
        if not health.ok or health.json().get("ingest_lag") != 0:
            return None
        response = http.get(f"{API}/crowd/videos/{video_id}", timeout=10)
        return response.json() if response.ok and response.json().get("frames") else None

    summary = wait("frames in PostgreSQL", stored, 300)
    say(f"end to end in {time.monotonic() - started:.0f} s")
    print()
    for key in ("video_id", "path", "status", "frames", "total_faces", "max_faces", "mean_faces", "peak_ts_ms"):
        if key in summary:
            print(f"  {key:12} {summary[key]}")
    print()
    say(f"Airflow UI: {API}   login admin / admin (viewer / viewer for read-only)")
    say(f"dashboard:  {API}/crowd/dashboard   API docs: {API}/crowd/docs")
    say("stop everything with: bash dev/stop.sh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
