"""Session fixtures: the real Kafka broker and PostgreSQL, a fresh topic and schema per test, Airflow's home.

The environment comes from ``dev/env.sh`` (the one definition of connections and folders); the services are
started by ``dev/kafka.sh`` and ``dev/postgres.sh`` when they are not already up, so ``pytest`` works on its own
as well as through ``dev/test.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_dev_env() -> None:
    """Import the variables ``dev/env.sh`` exports unless this process already has them."""
    if os.environ.get("CROWD_ENV_LOADED") == str(ROOT):
        return
    out = subprocess.run(
        ["bash", "-c", f"source {ROOT}/dev/env.sh && env -0"], check=True, capture_output=True
    ).stdout.decode()
    for item in out.split("\0"):
        if "=" in item:
            key, value = item.split("=", 1)
            if key.startswith(("AIRFLOW", "CROWD_", "PYTHONPATH")):
                os.environ.setdefault(key, value)
    os.environ["CROWD_ENV_LOADED"] = str(ROOT)


_load_dev_env()

KAFKA_BOOTSTRAP = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _ensure_service(script: str, host: str, port: int) -> None:
    """Start the service with its dev script unless something already answers on its port."""
    if _port_open(host, port):
        return
    result = subprocess.run(["bash", str(ROOT / "dev" / script), "start"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.exit(f"dev/{script} start failed:\n{result.stderr[-3000:]}", returncode=3)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``host:port`` of the real Kafka 4 broker (started by dev/kafka.sh when it is down)."""
    host, port = KAFKA_BOOTSTRAP.rsplit(":", 1)
    _ensure_service("kafka.sh", host, int(port))
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str):
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def create_topic(admin, name: str, partitions: int = 3) -> str:
    """Create ``name`` and wait until the broker has it."""
    from confluent_kafka.admin import NewTopic

    for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        future.result(timeout=30)
    return name


@pytest.fixture
def faces_topic(kafka_admin, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty topic with 3 partitions, set as ``CROWD_FACES_TOPIC`` for the test."""
    name = create_topic(kafka_admin, f"test-faces-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("CROWD_FACES_TOPIC", name)
    yield name
    kafka_admin.delete_topics([name])


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> str:
    """DSN of the test database (``crowd_test``) as the ``crowd`` role."""
    port = os.environ.get("CROWD_PG_PORT", "5433")
    _ensure_service("postgres.sh", "127.0.0.1", int(port))
    password = os.environ.get("CROWD_PG_PASSWORD", "crowd")
    return f"postgresql://crowd:{password}@127.0.0.1:{port}/crowd_test"


@pytest.fixture
def pg_schema(postgres_admin_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL schema; the ``crowd_postgres`` connection points into it for the test.

    Yields the schema name. Code under test reaches it through the usual Airflow connection id.
    """
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    port = int(os.environ.get("CROWD_PG_PORT", "5433"))
    conn_json = {
        "conn_type": "postgres",
        "host": "127.0.0.1",
        "port": port,
        "login": "crowd",
        "password": os.environ.get("CROWD_PG_PASSWORD", "crowd"),
        "schema": "crowd_test",
        "extra": {"options": f"-csearch_path={schema}"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn_json))
    monkeypatch.setenv("CROWD_PG_DSN_FOR_TESTS", f"{postgres_admin_dsn}?options=-csearch_path%3D{schema}")
    yield schema
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite under AIRFLOW_HOME), so ``dag.test()`` works."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"airflow db migrate failed:\n{result.stderr[-3000:]}")
    return Path(os.environ["AIRFLOW_HOME"])


@pytest.fixture
def video_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh video root (``CROWD_VIDEO_ROOTS``) and results folder; the offline MTCNN face model; 10 s publish
    timeout. The folder is returned empty."""
    root = tmp_path / "videos"
    root.mkdir()
    monkeypatch.setenv("CROWD_VIDEO_ROOTS", str(root))
    monkeypatch.setenv("CROWD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CROWD_DETECTOR", "mtcnn")
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "10")
    monkeypatch.setenv("CROWD_SCAN_MIN_AGE_S", "0")  # videos are written right before a scan
    return root
