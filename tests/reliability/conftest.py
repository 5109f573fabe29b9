"""Fault-injection fixtures: a private Kafka broker and a private PostgreSQL that the tests may kill and restart.

The shared services (Kafka on 9092, PostgreSQL on 5433) are used by everybody's tests and are never touched
here. The private ones are started with the same dev scripts, on other ports and in temporary folders:

* Kafka: ``CROWD_KAFKA_PORT=19092 CROWD_KAFKA_CONTROLLER_PORT=19093 CROWD_KAFKA_DIR=<tmp> dev/kafka.sh start``
* PostgreSQL: ``CROWD_PG_PORT=15433 CROWD_PG_DIR=<tmp> dev/postgres.sh start``

Tests reach them through the usual Airflow connection ids: the fixtures monkeypatch ``AIRFLOW_CONN_KAFKA_DEFAULT``,
``AIRFLOW_CONN_KAFKA_WATCH`` and ``AIRFLOW_CONN_CROWD_POSTGRES``. Both services are torn down at session end.

Marker ``soak``: heavy runs (100k backlogs, thousands of API cases) that stay out of the default run; they run
only with ``CROWD_SOAK=1`` (``CROWD_SOAK=1 pytest tests/reliability -m soak``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
KAFKA_PORT = int(os.environ.get("CROWD_REL_KAFKA_PORT", "19092"))
KAFKA_CONTROLLER_PORT = int(os.environ.get("CROWD_REL_KAFKA_CONTROLLER_PORT", "19093"))
PG_PORT = int(os.environ.get("CROWD_REL_PG_PORT", "15433"))
PG_PASSWORD = "crowd"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "soak: heavy reliability run, only with CROWD_SOAK=1 (figures in RELIABILITY.md)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CROWD_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak run: set CROWD_SOAK=1 to run it (see RELIABILITY.md)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def _pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


# --- Kafka ------------------------------------------------------------------------------------------------------


class PrivateKafka:
    """One KRaft broker+controller of our own, started and killed through ``dev/kafka.sh``."""

    def __init__(self, folder: Path, port: int = KAFKA_PORT, controller_port: int = KAFKA_CONTROLLER_PORT) -> None:
        self.folder, self.port, self.controller_port = folder, port, controller_port
        self.bootstrap = f"127.0.0.1:{port}"
        # A listener on port + 2 that sends its clients to port + 3, where a PartitionProxy may stand.
        self.proxied_port, self.proxy_port = port + 2, port + 3
        self.env = {
            **os.environ,
            "CROWD_KAFKA_PORT": str(port),
            "CROWD_KAFKA_CONTROLLER_PORT": str(controller_port),
            "CROWD_KAFKA_DIR": str(folder),
            "CROWD_KAFKA_PROXIED_PORTS": f"{self.proxied_port}:{self.proxy_port}",
        }

    def _script(self, action: str) -> None:
        result = subprocess.run(
            ["bash", str(ROOT / "dev" / "kafka.sh"), action], env=self.env, capture_output=True, text=True, timeout=150
        )
        if result.returncode != 0:
            raise RuntimeError(f"dev/kafka.sh {action} (private broker) failed:\n{result.stderr[-3000:]}")

    @property
    def pid(self) -> int | None:
        try:
            return int((self.folder / "kafka.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def start(self) -> float:
        """Start (or recover after a kill) and wait until it answers; returns the seconds it took."""
        started = time.monotonic()
        self._script("start")
        return time.monotonic() - started

    def kill9(self) -> None:
        """SIGKILL the broker JVM (no clean shutdown) and wait until its port is closed."""
        pid = self.pid
        assert pid is not None, "private broker is not running"
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: _pid_gone(pid), 30, f"broker pid {pid} to die")
        (self.folder / "kafka.pid").unlink(missing_ok=True)  # a zombie would look alive to dev/kafka.sh
        _wait(lambda: not port_open(self.port), 30, "broker port to close")

    def stop(self) -> None:
        if self.pid is not None and not _pid_gone(self.pid):
            self._script("stop")

    def conn(self, group_id: str = "crowd-ingest", *, bootstrap: str | None = None, **more: object) -> str:
        """A ``kafka`` connection (JSON) to this broker, or to ``bootstrap`` (the proxy in front of it)."""
        extra = {
            **more,
            "bootstrap.servers": bootstrap or self.bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "socket.timeout.ms": 5000,
            "reconnect.backoff.max.ms": 1000,
        }
        return json.dumps({"conn_type": "kafka", "extra": extra})

    def admin(self):
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap})

    def create_topic(self, prefix: str = "rel-faces", partitions: int = 3) -> str:
        from confluent_kafka.admin import NewTopic

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        admin = self.admin()  # keep the client alive until the futures resolve
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(timeout=30)
        return name

    def high_watermarks(self, topic: str) -> int:
        """Sum of the partitions' end offsets (= messages in the topic)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "rel-watermarks"})
        try:
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
        finally:
            consumer.close()


@pytest.fixture(scope="session")
def private_kafka() -> Iterator[PrivateKafka]:
    """A private broker on 127.0.0.1:19092 (controller 19093, proxied listener 19094 for a proxy on 19095) in a
    temp folder; killed and removed at the end."""
    if any(port_open(p) for p in (KAFKA_PORT, KAFKA_CONTROLLER_PORT, KAFKA_PORT + 2, KAFKA_PORT + 3)):
        # a failure, not a skip: a broker left by an aborted run would otherwise skip every Kafka fault case
        pytest.fail(
            f"one of ports {KAFKA_PORT}-{KAFKA_PORT + 3} is taken (a private broker left by an aborted run? "
            f"`pkill -f crowd-rel-kafka-`), or set CROWD_REL_KAFKA_PORT"
        )
    folder = Path(tempfile.mkdtemp(prefix="crowd-rel-kafka-"))
    broker = PrivateKafka(folder)
    try:
        broker.start()
        yield broker
    finally:
        try:
            broker.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def kafka_up(private_kafka: PrivateKafka) -> PrivateKafka:
    """The private broker, restarted first if an earlier test left it dead."""
    if not port_open(private_kafka.port):
        private_kafka.start()
    return private_kafka


@pytest.fixture
def private_faces(kafka_up: PrivateKafka, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh 3-partition topic on the private broker; kafka_default/kafka_watch and CROWD_FACES_TOPIC point there."""
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", kafka_up.conn("crowd-ingest"))
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_WATCH", kafka_up.conn("crowd-ingest-watch"))
    topic = kafka_up.create_topic()
    monkeypatch.setenv("CROWD_FACES_TOPIC", topic)
    return topic


# --- PostgreSQL -------------------------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of our own, started through ``dev/postgres.sh``, killable with SIGKILL."""

    def __init__(self, folder: Path, port: int = PG_PORT) -> None:
        self.folder, self.port = folder, port
        self.env = {
            **os.environ,
            "CROWD_PG_PORT": str(port),
            "CROWD_PG_DIR": str(folder),
            "CROWD_PG_PASSWORD": PG_PASSWORD,
        }
        self.dsn = f"postgresql://crowd:{PG_PASSWORD}@127.0.0.1:{port}/crowd_test"

    def _script(self, action: str) -> None:
        result = subprocess.run(
            ["bash", str(ROOT / "dev" / "postgres.sh"), action], env=self.env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"dev/postgres.sh {action} (private cluster) failed:\n{result.stderr[-3000:]}")

    def start(self) -> float:
        started = time.monotonic()
        self._script("start")
        return time.monotonic() - started

    @property
    def pid(self) -> int | None:
        try:
            return int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def kill9(self) -> None:
        """SIGKILL the postmaster and every backend (a crash: the next start runs crash recovery)."""
        pid = self.pid
        assert pid is not None, "private PostgreSQL is not running"
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        for p in [pid, *map(int, children)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in [pid, *map(int, children)]:
            _wait(lambda p=p: _pid_gone(p), 30, f"postgres pid {p} to die")
        _wait(lambda: not port_open(self.port), 30, "postgres port to close")
        # The killed postmaster may stay a zombie until PID 1 reaps it, and pg_ctl and postgres would take its
        # lock files for a live server: every process of it is dead, so they are stale.
        (self.folder / "data" / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.folder.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    def stop(self) -> None:
        self._script("stop")

    def conn_json(self, schema: str) -> str:
        return json.dumps({
            "conn_type": "postgres", "host": "127.0.0.1", "port": self.port, "login": "crowd",
            "password": PG_PASSWORD, "schema": "crowd_test", "extra": {"options": f"-csearch_path={schema}"},
        })  # fmt: skip


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private cluster on 127.0.0.1:15433 in a temp folder (postgres-owned when root); removed at the end."""
    if port_open(PG_PORT):
        pytest.fail(  # not a skip: a cluster left by an aborted run would otherwise skip every PostgreSQL fault case
            f"port {PG_PORT} is taken (a private cluster left by an aborted run? `pkill -f crowd-rel-pg-`), or set "
            "CROWD_REL_PG_PORT"
        )
    folder = Path(tempfile.mkdtemp(prefix="crowd-rel-pg-"))  # under /tmp: the postgres user can reach it
    cluster = PrivatePostgres(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            if cluster.pid is not None and not _pid_gone(cluster.pid):
                cluster.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def private_pg_schema(private_postgres: PrivatePostgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh schema in the private cluster; crowd_postgres and CROWD_PG_DSN_FOR_TESTS point into it."""
    if not port_open(private_postgres.port):
        private_postgres.start()
    schema = f"rel_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(private_postgres.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", private_postgres.conn_json(schema))
    monkeypatch.setenv("CROWD_PG_DSN_FOR_TESTS", f"{private_postgres.dsn}?options=-csearch_path%3D{schema}")
    yield schema
    if not port_open(private_postgres.port):
        private_postgres.start()
    with psycopg.connect(private_postgres.dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- helpers shared by the reliability tests -----------------------------------------------------------------------


def pg_counts(dsn: str | None = None) -> dict[str, int]:
    """Frames (all, and those whose face rows number their ``total_faces``: a frame stored in part, or its faces
    twice under other ids, is not), faces, rejections and the sum of stored next offsets. (A frame cannot be stored
    twice: ``(video_id, frame_id)`` is the table's primary key.)"""
    dsn = dsn or os.environ["CROWD_PG_DSN_FOR_TESTS"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        frames, consistent = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE total_faces = (SELECT count(*) FROM faces x "
            "WHERE x.video_id = f.video_id AND x.frame_id = f.frame_id)) FROM frames f"
        ).fetchone()
        faces = conn.execute("SELECT count(*) FROM faces").fetchone()[0]
        rejected = conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0]
        offsets = conn.execute("SELECT coalesce(sum(next_offset), 0)::bigint FROM kafka_offsets").fetchone()[0]
    return {"frames": frames, "consistent_frames": consistent, "faces": faces, "rejected": rejected, "offsets": offsets}


def loss_figures(counts: dict[str, int], frames_expected: int, faces_expected: int) -> dict[str, int]:
    """A report's ``lost`` and ``duplicated``, measured from ``counts`` (:func:`pg_counts`): the valid messages
    without a stored frame, and the stored frames and face rows beyond those the messages hold (a frame stored
    twice cannot be: the primary key; its faces twice, under other ids, can)."""
    return {
        "lost": frames_expected - counts["frames"],
        "duplicated": max(0, counts["frames"] - frames_expected) + max(0, counts["faces"] - faces_expected),
    }


def report(case: str, figures: dict) -> None:
    """Print a case's measured figures and append them to test-artifacts/reliability.jsonl (for RELIABILITY.md)."""
    line = json.dumps({"case": case, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}, default=str)
    print("FIGURES", line)
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    with open(out / "reliability.jsonl", "a") as f:
        f.write(line + "\n")


def stored_offsets_sum() -> int:
    try:
        with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True, connect_timeout=2) as conn:
            return conn.execute("SELECT coalesce(sum(next_offset), 0)::bigint FROM kafka_offsets").fetchone()[0]
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return 0
