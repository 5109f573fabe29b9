"""Schema migrations, the video registry and the summary view, on the real PostgreSQL."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime

import psycopg
import pytest

from crowd import storage

pytestmark = pytest.mark.services


@pytest.fixture
def conn(pg_schema: str):
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as connection:
        yield connection


def test_migrations_apply_once_and_are_recorded(conn: psycopg.Connection) -> None:
    assert storage.schema_version(conn) == 0
    first = storage.migrate(conn)
    second = storage.migrate(conn)
    assert first == [m.version for m in storage.MIGRATIONS] and second == []
    recorded = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert recorded == [(m.version, m.name) for m in storage.MIGRATIONS]
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
    }
    assert {"videos", "frames", "faces", "kafka_offsets", "rejected_messages", "alerts", "video_summary"} <= tables


def test_concurrent_migrations_do_not_race(pg_schema: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[int]] = []

    def run() -> None:
        try:
            with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"]) as c:
                applied.append(storage.migrate(c))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(len(a) for a in applied) == [0, 0, 0, len(storage.MIGRATIONS)]


def test_migrate_joins_the_callers_transaction(pg_schema: str) -> None:
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"]) as c:  # not autocommit
        c.execute("SELECT 1")  # a transaction is open
        storage.migrate(c)
        c.rollback()
        assert storage.schema_version(c) == 0, "migrate inside an open transaction must leave the commit to the caller"


def test_video_registry_lifecycle(conn: psycopg.Connection) -> None:
    storage.migrate(conn)
    assert storage.get_video_status(conn, "v1") is None
    storage.mark_video_processing(
        conn, "v1", "/videos/a.mp4", fps=25.0, frame_count=250, width=640, height=480, size_bytes=99, model="m"
    )
    assert storage.get_video_status(conn, "v1") == "processing"
    storage.mark_video_failed(conn, "v1", "/videos/a.mp4", "decoder exploded")
    assert conn.execute("SELECT status, error FROM videos WHERE id = 'v1'").fetchone() == ("failed", "decoder exploded")
    storage.mark_video_processing(
        conn, "v1", "/videos/a.mp4", fps=25.0, frame_count=250, width=640, height=480, size_bytes=99, model="m"
    )
    storage.mark_video_done(conn, "v1")
    row = conn.execute("SELECT status, error, finished_at IS NOT NULL, fps FROM videos WHERE id = 'v1'").fetchone()
    assert row == ("done", None, True, 25.0)


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
def test_a_failure_reason_quoting_bytes_postgresql_cannot_store_is_recorded_escaped(
    conn: psycopg.Connection, bad: str
) -> None:
    """Before: the statement failed (DataError / UnicodeEncodeError) and the video was not marked failed."""
    storage.migrate(conn)
    assert storage.mark_video_failed(conn, "v1", "/videos/a.mp4", f"box {bad} unreadable")
    status, error = conn.execute("SELECT status, error FROM videos WHERE id = 'v1'").fetchone()
    assert status == "failed" and error.startswith("box \\") and error.endswith(" unreadable"), error


def test_a_run_taking_over_a_live_claim_does_not_count_it_silent_by_default(conn: psycopg.Connection) -> None:
    """Without ``claim_timeout_s`` the settings' default applies (before: NULL, so every takeover counted)."""
    storage.migrate(conn)
    meta = {"fps": None, "frame_count": None, "width": None, "height": None, "size_bytes": None, "model": "m"}
    runs = [storage.RunStamp(f"manual__{i}", datetime(2026, 11, 28, 10, i, tzinfo=UTC)) for i in range(2)]
    for run in runs:
        assert storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=run)
    assert conn.execute("SELECT silent_runs FROM videos WHERE id = 'v1'").fetchone() == (0,)


def test_a_stale_try_cannot_turn_back_the_status_of_its_own_or_a_later_run(conn: psycopg.Connection) -> None:
    """The run started last owns a video's status (``RunStamp``): a late try of a finished run (a worker thawed
    or reconnected after its try was retried) leaves ``done`` alone, and nothing of an older run is written over
    a newer run's status; a newer run takes the video over."""
    storage.migrate(conn)
    older = storage.RunStamp("manual__older", datetime(2026, 11, 28, 10, 0, tzinfo=UTC))
    newer = storage.RunStamp("manual__newer", datetime(2026, 11, 28, 10, 5, tzinfo=UTC))
    meta = {"fps": 25.0, "frame_count": 250, "width": 640, "height": 480, "size_bytes": 99, "model": "m"}

    def status() -> tuple:
        return conn.execute("SELECT status, run_id, error FROM videos WHERE id = 'v1'").fetchone()

    assert storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=older)
    assert storage.mark_video_done(conn, "v1", older)
    assert not storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=older)  # its own stale try
    assert not storage.mark_video_failed(conn, "v1", "/videos/a.mp4", "stopped early", older)
    assert status() == ("done", "manual__older", None)

    assert storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=newer)  # a re-run takes over
    assert not storage.mark_video_done(conn, "v1", older)  # the older run's late finish
    assert not storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=older)  # or late start
    assert not storage.mark_video_failed(conn, "v1", "/videos/a.mp4", "stopped early", older)
    assert status() == ("processing", "manual__newer", None)
    assert storage.mark_video_done(conn, "v1", newer)
    assert not storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta, run=older)
    assert status() == ("done", "manual__newer", None)

    assert storage.mark_video_failed(conn, "v2", "/videos/b.mp4", "not a video", older)  # unknown: registered
    assert storage.mark_video_processing(conn, "v2", "/videos/b.mp4", **meta, run=older)  # a retry of a failure
    assert storage.mark_video_processing(conn, "v1", "/videos/a.mp4", **meta)  # no run (a direct call): as before
    assert status() == ("processing", None, None)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: storage.mark_video_done(c, "never-seen"), id="done-unknown-video"),
    ],
)
def test_registry_errors_name_the_video(conn: psycopg.Connection, call) -> None:
    storage.migrate(conn)
    with pytest.raises(storage.VideoNotFoundError, match="never-seen.*mark_video_processing"):
        call(conn)


def test_unknown_video_status_is_refused_by_the_schema(conn: psycopg.Connection) -> None:
    storage.migrate(conn)
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO videos (id, path, status) VALUES ('x', 'p', 'exploded')")


def test_frames_may_arrive_before_their_video_and_summary_joins_later(conn: psycopg.Connection) -> None:
    storage.migrate(conn)
    rows = [("v2", i, i * 40.0, n, "m", 640, 480, "/v2.mp4") for i, n in enumerate([1, 4, 2, 4])]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, "
            "source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    query = (
        "SELECT frames, total_faces, max_faces, mean_faces, peak_frame_id, peak_ts_ms, status, path "
        "FROM video_summary WHERE video_id = 'v2'"
    )
    assert conn.execute(query).fetchone() == (4, 11, 4, 2.75, 1, 40.0, None, None)
    storage.mark_video_processing(
        conn, "v2", "/v2.mp4", fps=25.0, frame_count=4, width=640, height=480, size_bytes=1, model="m"
    )
    assert conn.execute(query).fetchone()[-2:] == ("processing", "/v2.mp4")


def test_faces_need_their_frame(conn: psycopg.Connection) -> None:
    storage.migrate(conn)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("INSERT INTO faces VALUES ('nope', 1, 0, 0, 0, 1, 1, 0.5)")


def test_a_database_that_never_answers_fails_the_connection_and_the_watcher_fires(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that takes the connection and then says nothing (a hung host, a dead route behind a load balancer):
    libpq waits for ever by default. Tasks must fail (and retry), and the ingest watcher, which runs on the
    triggerer's thread, must give up and fire its run (the safe side), not block every trigger of the triggerer."""
    import json
    import socket
    from types import SimpleNamespace

    import crowd.ingest

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake; nobody ever reads
    port = silent.getsockname()[1]
    conn_json = {"conn_type": "postgres", "host": "127.0.0.1", "port": port, "login": "crowd", "schema": "crowd_test"}
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_SILENT", json.dumps(conn_json))
    monkeypatch.setattr(crowd.ingest, "_watch_conn", None)
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            storage.connect("crowd_silent", connect_timeout=2)
        except psycopg.OperationalError as exc:
            outcome["connect"] = exc

    def watch() -> None:
        message = SimpleNamespace(topic=lambda: "Faces", partition=lambda: 0, offset=lambda: 7)
        outcome["watch"] = crowd.ingest.faces_pending(message, postgres_conn_id="crowd_silent")

    try:
        threads = [threading.Thread(target=connect, daemon=True), threading.Thread(target=watch, daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)  # a liveness bound, far above the timeouts: the old code never returned
        assert not any(thread.is_alive() for thread in threads), "a connection to a silent server never gave up"
    finally:
        silent.close()
    assert "timeout" in str(outcome["connect"]).lower(), outcome
    assert outcome["watch"] == {"topic": "Faces", "partition": 0, "offset": 7}


def test_a_connection_extra_keeps_its_own_libpq_settings(pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety defaults fill in what the connection leaves out; what its extra says wins."""
    import json

    conn_json = json.loads(os.environ["AIRFLOW_CONN_CROWD_POSTGRES"])
    conn_json["extra"]["keepalives_idle"] = 77
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn_json))
    with storage.connect("crowd_postgres") as conn:
        settings = {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}
    assert settings["keepalives_idle"] == "77"
    assert settings["tcp_user_timeout"] == str(storage.CONNECTION_SAFETY["tcp_user_timeout"])
    assert settings["connect_timeout"] == str(storage.CONNECTION_SAFETY["connect_timeout"])
