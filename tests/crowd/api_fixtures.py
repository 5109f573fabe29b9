"""Fixtures for the crowd plugin tests: the Airflow API server app with plugins loaded, users and tokens.

The app is built the way ``airflow api-server`` builds it (:func:`airflow.api_fastapi.app.create_app`, which
loads ``plugins/crowd_plugin.py`` from ``AIRFLOW__CORE__PLUGINS_FOLDER`` and mounts ``/crowd``), and driven
with FastAPI's ``TestClient`` so its lifespan (and the plugin's receiver thread) runs per test. Tokens come from
the real ``POST /auth/token`` of SimpleAuthManager, with fixed passwords written to a passwords file.

Import the fixtures into a test module with ``from tests.crowd.api_fixtures import *``.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

USERS = {"admin": "admin", "op": "op", "user": "user", "viewer": "viewer"}
PASSWORDS = {name: f"{name}-pw-{secrets.token_hex(4)}" for name in USERS}


@pytest.fixture(scope="session")
def airflow_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The Airflow API server FastAPI app (core + execution APIs, plugins mounted), built once per session."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("simple-auth")
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    mp.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ",".join(f"{u}:{r}" for u, r in USERS.items()))
    mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
    mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(48))
    mp.setenv("AIRFLOW__CORE__PLUGINS_FOLDER", str(Path(__file__).resolve().parents[2] / "plugins"))
    from airflow.api_fastapi.app import create_app, purge_cached_app

    purge_cached_app()
    app = create_app()
    yield app
    purge_cached_app()
    mp.undo()


@pytest.fixture
def messages_topic(kafka_admin: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh 1-partition topic set as ``CROWD_MESSAGES_TOPIC``, and a fresh receiver consumer group."""
    from tests.conftest import create_topic

    name = create_topic(kafka_admin, f"test-messages-{uuid.uuid4().hex[:10]}", partitions=1)
    monkeypatch.setenv("CROWD_MESSAGES_TOPIC", name)
    monkeypatch.setenv("CROWD_RECEIVER_GROUP", f"test-receiver-{uuid.uuid4().hex[:8]}")
    yield name
    kafka_admin.delete_topics([name])


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``CROWD_RESULTS_DIR``."""
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setenv("CROWD_RESULTS_DIR", str(folder))
    return folder


@pytest.fixture
def client(airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path) -> Iterator[Any]:
    """A TestClient on the Airflow app with its lifespan running (receiver on the fresh topic, schema migrated)."""
    from fastapi.testclient import TestClient

    from crowd import storage

    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)

    with TestClient(airflow_app) as test_client:
        yield test_client


def _free_port(start: int = 8090, end: int = 8190) -> int:
    for port in range(start, end):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{end}")


@pytest.fixture
def live_server(airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path) -> Iterator[str]:
    """The Airflow app under uvicorn on a free port 8090+, in a thread (real HTTP on loopback); yields its base URL.

    Its lifespan runs as with :func:`client` (receiver on the fresh topic, schema migrated).
    """
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(airflow_app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="crowd-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


def token(client: Any, username: str) -> str:
    """A JWT from SimpleAuthManager's ``POST /auth/token``."""
    response = client.post("/auth/token", json={"username": username, "password": PASSWORDS[username]})
    assert response.status_code == 201, response.text
    return response.json()["access_token"]


def auth(client: Any, username: str) -> dict[str, str]:
    """``Authorization`` header for ``username``."""
    return {"Authorization": f"Bearer {token(client, username)}"}


def wait_receiver_ready(client: Any, headers: dict[str, str], timeout_s: float = 30.0) -> None:
    """Wait until the plugin's receiver has joined its group and got the topic's partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        receiver = client.get("/crowd/health", headers=headers).json()["receiver"]
        if receiver["running"] and receiver["connected"] and receiver["assigned_partitions"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"receiver not ready after {timeout_s} s: {receiver}")


# ---- seeding the results through the real ingest path -------------------------------------------------------

SEED_VIDEO = "seedvideo01"
SEED_COUNTS = [0, 1, 3, 2, 5, 4, 1, 0, 2, 3]  # faces per frame; peak: frame 40 (5 faces)
FRAME_STEP = 10
SEED_RUN_ID = "scheduled__2026-11-28T10:00:00+00:00"  # the DAG run recorded as the owner of the video's status


def seed_results(
    faces_topic: str,
    results_dir: Path,
    video_id: str = SEED_VIDEO,
    model: str = "test-model",
    *,
    alert_rule: Any = None,
    alerts_topic: str | None = None,
) -> dict[str, Any]:
    """Register a video, publish one FaceMessage per frame to ``faces_topic``, drain it into PostgreSQL (with
    ``alert_rule``: raising crowd alerts, published to ``alerts_topic`` if given).

    Also writes the video's pictures (heatmap.png, annotated.jpg, faces_over_time.png) with the detection
    side's :class:`crowd.pictures.PictureAccumulator` into ``results_dir/<video_id>/``.
    """
    from crowd import storage
    from crowd.ingest import drain
    from crowd.kafka import DeliveryTracker, reliable_producer
    from crowd.messages import build_message
    from crowd.pictures import PictureAccumulator

    width, height, fps = 320, 240, 10.0
    seed_run = storage.RunStamp(SEED_RUN_ID, datetime(2026, 11, 28, 10, 0, 1, tzinfo=UTC))
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        storage.mark_video_processing(
            conn,
            video_id,
            f"/videos/{video_id}.mp4",
            fps=fps,
            frame_count=100,
            width=width,
            height=height,
            size_bytes=12345,
            model="test-model",
            run=seed_run,
        )
        conn.commit()
    producer = reliable_producer("kafka_default", timeout_s=20)
    tracker = DeliveryTracker()
    acc = PictureAccumulator(width=width, height=height)
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    for i, count in enumerate(SEED_COUNTS):
        frame_id = i * FRAME_STEP
        boxes = [
            SimpleNamespace(x=10 + 50 * k, y=20 + 10 * k, width=40, height=40, confidence=0.9 - 0.1 * k)
            for k in range(count)
        ]
        message = build_message(
            video_id, f"/videos/{video_id}.mp4", frame_id, frame_id * 1000 / fps, image.shape, boxes, model
        )
        producer.produce(faces_topic, key=video_id.encode(), value=message.to_json(), on_delivery=tracker.callback)
        acc.add(frame_id, frame_id * 1000 / fps, image, boxes)
    tracker.wait(producer, timeout_s=20)
    summary = drain(
        "kafka_default",
        "crowd_postgres",
        faces_topic,
        "crowd-ingest",
        idle_timeout_s=3,
        max_seconds=60,
        alert_rule=alert_rule,
        alerts_topic=alerts_topic,
    )
    assert summary.frames == len(SEED_COUNTS) and summary.alerts_error is None, summary
    with storage.connect("crowd_postgres") as conn:
        storage.mark_video_done(conn, video_id, seed_run)
        conn.commit()
    acc.write(results_dir / video_id)
    return {"video_id": video_id, "frames": len(SEED_COUNTS), "faces": sum(SEED_COUNTS), "summary": summary}
