"""Schema migrations, the video registry and the summary view, on the real PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

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
    # each step applied once, by whichever caller took the lock first (a step per transaction: callers share them)
    assert sorted(v for a in applied for v in a) == [m.version for m in storage.MIGRATIONS], applied


def test_migrate_joins_the_callers_transaction(pg_schema: str) -> None:
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"]) as c:  # not autocommit
        c.execute("SELECT 1")  # a transaction is open
        storage.migrate(c)
        c.rollback()
        assert storage.schema_version(c) == 0, "migrate inside an open transaction must leave the commit to the caller"


def test_a_schema_migrated_by_a_newer_crowd_is_refused(conn: psycopg.Connection) -> None:
    """A worker left on an older crowd after another migrated the schema further: it went on silently, writing what
    the newer code no longer reads (lost ranges without their consumer group, counted by no run)."""
    storage.migrate(conn)
    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'from a newer crowd')")
    conn.commit()
    known = storage.MIGRATIONS[-1].version
    with pytest.raises(
        storage.SchemaTooNewError, match=rf"migration\(s\) \[99\], newer than this code knows \(up to {known}\)"
    ):
        storage.migrate(conn)
    cli = subprocess.run([sys.executable, "-m", "crowd.storage", "migrate"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(storage.__file__).parents[1])})  # fmt: skip
    assert cli.returncode == 1 and "newer than this code knows" in cli.stderr, cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr, cli.stderr[-2000:]


def test_each_migration_step_holds_its_locks_for_itself_only(pg_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """All steps in one transaction kept the tables the first steps altered locked while a later one read every
    frame (15 s at 50 million): the API's reads and the drain waited, or timed out. Now each step commits: a step
    already applied is readable while the next runs, and a failed step leaves the ones before it applied."""
    from crowd.storage import Migration

    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE t (x int)")
        c.execute("INSERT INTO t SELECT generate_series(1, 1100000)")
        c.execute("ANALYZE t")
    steps = (
        Migration(1, "alter t", "ALTER TABLE t ADD COLUMN y int"),
        Migration(2, "read t whole, slowly", "SELECT pg_sleep(3), count(*) FROM t", reads="t"),
        Migration(3, "fails", "SELECT 1 / 0"),
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(dsn) as c:
                storage.migrate(c, steps)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="crowd.storage"):
        migrating = threading.Thread(target=run)
        migrating.start()
        with psycopg.connect(dsn, autocommit=True) as c:
            deadline = time.monotonic() + 30
            while not c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3)%%'"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "step 2 never ran"
                time.sleep(0.05)
            c.execute("SET lock_timeout = '500ms'")
            assert c.execute("SELECT count(y) FROM t").fetchone() == (0,), "step 1's column is not there"
        migrating.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.DivisionByZero), errors
    with psycopg.connect(dsn, autocommit=True) as c:
        assert storage.schema_version(c) == 2, "the steps before the failed one were undone"
    assert re.search(r"schema migration 2 reads every row of t \(about 1100000 rows", caplog.text), caplog.text
    assert re.search(r"schema migration 1 applied in [\d.]+ s", caplog.text)


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
    # part 1 found the video corrupt; part 0's retry (same run) leaves it failed, with its reason
    assert not storage.mark_video_processing(conn, "v2", "/videos/b.mp4", **meta, run=older)
    assert conn.execute("SELECT status, error FROM videos WHERE id = 'v2'").fetchone() == ("failed", "not a video")
    assert storage.mark_video_processing(conn, "v2", "/videos/b.mp4", **meta, run=newer)  # a later run retries it
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
    monkeypatch.setattr(crowd.ingest, "_watch_conns", {})
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


def test_times_are_read_in_utc_whatever_the_server_s_time_zone(pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose time zone came from its host (initdb) answered the API's times as ``+01:00``, and the alert
    messages' likewise, where a UTC server gave ``Z``: one row, two strings. Sessions are UTC now, unless the
    connection's own ``options`` say otherwise."""
    import json

    with storage.connect("crowd_postgres") as conn:  # this server's own: Etc/UTC (Debian's initdb, from the host)
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "UTC"
        assert conn.execute("SELECT now()").fetchone()[0].utcoffset().total_seconds() == 0
    conn_json = json.loads(os.environ["AIRFLOW_CONN_CROWD_POSTGRES"])
    conn_json["extra"]["options"] += " -c TimeZone=Europe/Berlin"
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn_json))
    with storage.connect("crowd_postgres", statement_timeout_s=5) as conn:
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "Europe/Berlin"
        assert conn.execute("SELECT current_setting('statement_timeout')").fetchone()[0] == "5s"


# The statistics the old video_summary view computed from frames on every read: the truth video_stats must equal.
_FRESH_STATS = """
SELECT a.video_id, a.frames, a.total_faces, a.max_faces, p.frame_id, p.frame_ts_ms, a.first_ts_ms, a.last_ts_ms,
       a.last_ingested_at
FROM (SELECT video_id, count(*) AS frames, sum(total_faces) AS total_faces, max(total_faces) AS max_faces,
             min(frame_ts_ms) AS first_ts_ms, max(frame_ts_ms) AS last_ts_ms, max(ingested_at) AS last_ingested_at
      FROM frames GROUP BY video_id) a
JOIN (SELECT DISTINCT ON (video_id) video_id, frame_id, frame_ts_ms FROM frames
      ORDER BY video_id, total_faces DESC, frame_id) p USING (video_id)
ORDER BY a.video_id
"""
_KEPT_STATS = """
SELECT video_id, frames, total_faces, max_faces, peak_frame_id, peak_ts_ms, first_ts_ms, last_ts_ms, last_ingested_at
FROM video_summary ORDER BY video_id
"""
_FRAME_INSERT = (
    "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source) "
    "VALUES (%s, %s, %s, %s, 'm', 640, 480, 's')"
)


def _assert_stats_match(conn: psycopg.Connection, context: str) -> None:
    kept, fresh = conn.execute(_KEPT_STATS).fetchall(), conn.execute(_FRESH_STATS).fetchall()
    assert kept == fresh, f"after {context}: kept {kept} != computed from frames {fresh}"


def test_video_stats_follow_every_kind_of_write(conn: psycopg.Connection) -> None:
    """Inserts, COPY, the drain's replay upsert (same counts and changed ones), updates that move a frame to
    another video, deletes and truncate: the statistics the triggers keep equal a fresh aggregate of frames."""
    import random

    from crowd.ingest import _STAGING_SQL, _UPSERT_FRAMES_SQL, FRAME_COLUMNS, FRAME_TYPES

    storage.migrate(conn)
    conn.execute(_STAGING_SQL.replace("ON COMMIT DELETE ROWS", "ON COMMIT PRESERVE ROWS"))
    rng = random.Random(11)
    videos = ["va", "vb", "vc"]
    stored: set[tuple[str, int]] = set()
    for step in range(120):
        kind = rng.choice(
            ["insert", "copy", "replay", "replay_changed", "update", "retime", "reingest", "move", "delete"]
        )
        if kind in ("insert", "copy"):
            rows = []
            for _ in range(rng.randint(1, 20)):
                key = (rng.choice(videos), rng.randint(0, 300))
                if key not in stored and key not in {(r[0], r[1]) for r in rows}:
                    rows.append((*key, key[1] * 40.0, rng.randint(0, 9)))
            if kind == "insert":
                with conn.cursor() as cur:
                    cur.executemany(_FRAME_INSERT, rows)
            else:
                with (
                    conn.cursor() as cur,
                    cur.copy(
                        "COPY frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, "
                        "source) FROM STDIN"
                    ) as copy,
                ):
                    for row in rows:
                        copy.write_row((*row, "m", 640, 480, "s"))
            stored |= {(r[0], r[1]) for r in rows}
        elif kind in ("replay", "replay_changed") and stored:
            keys = rng.sample(sorted(stored), min(len(stored), rng.randint(1, 15)))
            new_key = (rng.choice(videos), rng.randint(301, 400))  # a replay also brings frames not stored yet
            if new_key in keys:
                keys.remove(new_key)
            with conn.transaction(), conn.cursor() as cur:
                old = dict(
                    ((v, f), (ts, n))
                    for v, f, ts, n in cur.execute(
                        "SELECT video_id, frame_id, frame_ts_ms, total_faces FROM frames"
                        " WHERE (video_id, frame_id) IN (SELECT * FROM unnest(%s::text[], %s::int8[]))",
                        ([k[0] for k in keys], [k[1] for k in keys]),
                    ).fetchall()
                )
                cur.execute("DELETE FROM crowd_stage_frames")
                with cur.copy(f"COPY crowd_stage_frames ({', '.join(FRAME_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(list(FRAME_TYPES))
                    for k in [*keys, new_key]:
                        ts, n = old.get(k, (k[1] * 40.0, 1))
                        if kind == "replay_changed":
                            n = rng.randint(0, 12)
                        cp.write_row((*k, ts, n, "m", 640, 480, "s", 0, step))
                cur.execute(_UPSERT_FRAMES_SQL)
            stored.add(new_key)
        elif kind == "update" and stored:
            v, f = rng.choice(sorted(stored))
            conn.execute(
                "UPDATE frames SET total_faces = %s, frame_ts_ms = %s WHERE video_id = %s AND frame_id = %s",
                (rng.randint(0, 12), rng.choice([f * 40.0, 0.0, 99999.0]), v, f),
            )
        elif kind == "retime" and stored:  # only times change: the first or last frame may move inwards
            v, f = rng.choice(sorted(stored))
            conn.execute(
                "UPDATE frames SET frame_ts_ms = %s WHERE video_id = %s AND frame_id = %s",
                (rng.choice([f * 40.0 + 1, 5000.0, 0.5]), v, f),
            )
        elif kind == "reingest" and stored:  # only ingested_at changes, backwards: the last one may go
            v = rng.choice(videos)
            conn.execute(
                "UPDATE frames SET ingested_at = ingested_at - interval '1 hour' "
                "WHERE video_id = %s AND frame_id %% 2 = %s",
                (v, rng.randint(0, 1)),
            )
        elif kind == "move" and stored:
            v, f = rng.choice(sorted(stored))
            target = rng.choice([x for x in [*videos, "vnew"] if x != v])
            if (target, f) not in stored:
                conn.execute("UPDATE frames SET video_id = %s WHERE video_id = %s AND frame_id = %s", (target, v, f))
                stored.remove((v, f))
                stored.add((target, f))
                videos = sorted({*videos, target})
        elif kind == "delete" and stored:
            v = rng.choice(videos)
            deleted = conn.execute(
                "DELETE FROM frames WHERE video_id = %s AND frame_id %% %s = 0 RETURNING video_id, frame_id",
                (v, rng.choice([1, 2, 3])),
            ).fetchall()
            stored -= set(deleted)
        _assert_stats_match(conn, f"step {step} ({kind})")
    assert len(conn.execute(_KEPT_STATS).fetchall()) >= 2
    conn.execute("TRUNCATE frames CASCADE")
    assert conn.execute("SELECT count(*) FROM video_stats").fetchone() == (0,)


def test_video_stats_stay_right_under_concurrent_writers(conn: psycopg.Connection) -> None:
    """Two drains (other groups or topics) writing frames of the same video at once, one of them replaying frames
    with other counts (a recompute): neither overwrites what the other added."""
    storage.migrate(conn)
    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def add(start: int) -> None:
        try:
            with psycopg.connect(dsn) as c:
                barrier.wait(timeout=30)
                for i in range(start, start + 200, 10):
                    with c.transaction(), c.cursor() as cur:
                        cur.executemany(_FRAME_INSERT, [("shared", f, f * 40.0, f % 7) for f in range(i, i + 10)])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    def replace() -> None:
        try:
            with psycopg.connect(dsn) as c:
                barrier.wait(timeout=30)
                for n in range(20):
                    with c.transaction():
                        c.execute(
                            "UPDATE frames SET total_faces = %s WHERE video_id = 'shared' AND frame_id < 50", (n,)
                        )
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with conn.cursor() as cur:
        cur.executemany(_FRAME_INSERT, [("shared", f, f * 40.0, 1) for f in range(50)])
    threads = [threading.Thread(target=add, args=(1000,)), threading.Thread(target=add, args=(2000,))]
    threads.append(threading.Thread(target=replace))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    _assert_stats_match(conn, "concurrent writers")
    assert conn.execute("SELECT frames FROM video_stats WHERE video_id = 'shared'").fetchone() == (450,)


def test_the_statistics_migration_counts_the_frames_already_stored(conn: psycopg.Connection) -> None:
    before = tuple(m for m in storage.MIGRATIONS if m.version < 11)
    storage.migrate(conn, before)
    with conn.cursor() as cur:
        cur.executemany(_FRAME_INSERT, [(v, f, f * 10.0, (f * 7) % 5) for v in ("m1", "m2") for f in range(30)])
    assert storage.migrate(conn) == [v for v in (m.version for m in storage.MIGRATIONS) if v >= 11]
    _assert_stats_match(conn, "the migration")
    assert [r[:4] for r in conn.execute(_KEPT_STATS).fetchall()] == [("m1", 30, 60, 4), ("m2", 30, 60, 4)]


class _Record:
    """What ``Batch.add`` reads of a consumed Kafka message: a frame message of ``video`` at ``offset``."""

    def __init__(self, offset: int, video: str, frame: int) -> None:
        from crowd.messages import FaceMessage

        self._offset, self._key = offset, video.encode()
        self._value = FaceMessage.from_dict(
            {"video_id": video, "frame_id": frame, "frame_ts_ms": frame * 40.0, "total_faces": 0, "faces": [],
             "model": "m", "frame_width": 640, "frame_height": 480, "source": "s"}
        ).to_json()  # fmt: skip

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return self._key


def test_two_drains_writing_the_same_videos_in_turns_do_not_deadlock(pg_schema: str) -> None:
    """One drain replays a batch (an upsert: its statistics triggers lock the updated video's row, then the inserted
    one's) while another COPYs new frames of the same videos (locked in video order): without per-video locks taken
    first, in one order, they deadlocked (a failed batch, a retried task)."""
    from crowd.ingest import _STAGING_SQL, Batch, write_batch

    def batch_of(*frames: tuple[str, int]) -> Batch:
        batch = Batch(topic="t")
        for offset, (video, frame) in enumerate(frames):
            batch.add(_Record(offset, video, frame))  # type: ignore[arg-type]
        return batch

    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    with psycopg.connect(dsn) as c:
        storage.migrate(c)
        c.execute(_STAGING_SQL)
        write_batch(c, batch_of(("v2", 0)), "g-seed")  # v2's frame 0 exists: the replays take the upsert path
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def drain(replays: bool) -> None:
        with psycopg.connect(dsn) as c:
            c.execute(_STAGING_SQL)
            c.commit()
            barrier.wait(timeout=30)
            for i in range(150):
                if replays:  # v2's frame 0 again and a new frame of v1
                    batch = batch_of(("v2", 0), ("v1", 10_000 + i))
                else:  # new frames of both
                    batch = batch_of(("v1", 20_000 + i), ("v2", 20_000 + i))
                try:
                    write_batch(c, batch, f"g-{replays}")
                except psycopg.errors.DeadlockDetected as exc:
                    errors.append(str(exc))

    threads = [threading.Thread(target=drain, args=(r,)) for r in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, f"{len(errors)} deadlocks, first: {errors[0]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        _assert_stats_match(c, "two drains")
        assert c.execute("SELECT video_id, frames FROM video_stats ORDER BY video_id").fetchall() == [
            ("v1", 300),
            ("v2", 151),
        ]


def test_drains_take_video_locks_in_one_order_even_when_two_ids_share_a_lock(pg_schema: str) -> None:
    """A video's lock is keyed by its id's 32-bit hash, so two ids can share one (video ids are content hashes or
    free names: with enough of them, two collide). Taken in id order, two drains could then take the same two
    locks in opposite orders: with ids a < b < c and hash(a) = hash(c), a drain writing a and b takes a's lock then
    b's, another writing b and c takes b's then c's = a's: a deadlock (one batch failed, its task retried). Taken
    in the order of the hashes, every drain takes any two locks in the same order."""
    from crowd.ingest import _LOCK_VIDEOS_SQL

    dsn = os.environ["CROWD_PG_DSN_FOR_TESTS"]
    with psycopg.connect(dsn, autocommit=True) as c:
        a, c_ = c.execute(
            """
            SELECT min(s), max(s) FROM (SELECT 'video-' || g AS s FROM generate_series(1, 300000) g) t
            GROUP BY hashtext(s) HAVING count(*) = 2 ORDER BY min(s) LIMIT 1
            """
        ).fetchone()
        b = a + "~"  # between the two
        assert a < b < c_, (a, b, c_)
        key = "SELECT hashtext(%s) = hashtext(%s)"
        assert c.execute(key, (a, c_)).fetchone()[0] and not c.execute(key, (a, b)).fetchone()[0]

    def waiting(pid: int) -> bool:  # blocked on an advisory lock
        with psycopg.connect(dsn, autocommit=True) as c:
            row = c.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        return row is not None and row[0] == "advisory"

    def wait_until_waiting(pid: int) -> None:
        deadline = time.monotonic() + 30
        while not waiting(pid):
            assert time.monotonic() < deadline, f"backend {pid} never waited for a lock"
            time.sleep(0.02)

    errors: list[BaseException] = []

    def drain(conn: psycopg.Connection, videos: list[str]) -> None:  # the drain's first statement, as write_batch
        try:
            with conn.transaction():
                conn.execute(_LOCK_VIDEOS_SQL, (videos,))
                time.sleep(0.5)  # the batch's writes
        except psycopg.Error as exc:
            errors.append(exc)

    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        holder.execute(_LOCK_VIDEOS_SQL, ([a],))  # a's (and c's) lock held: the drains queue behind it
        threads = [threading.Thread(target=drain, args=(first, [a, b]))]
        threads[0].start()
        wait_until_waiting(first.info.backend_pid)
        threads.append(threading.Thread(target=drain, args=(second, [b, c_])))
        threads[1].start()
        wait_until_waiting(second.info.backend_pid)
        holder.commit()  # the first drain gets a's lock and asks for b's: in id order the second holds it
        for t in threads:
            t.join(timeout=60)
    assert not [t for t in threads if t.is_alive()], "a drain never finished"
    assert not errors, f"a drain failed: {errors[0]!r}"
