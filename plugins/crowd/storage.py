"""PostgreSQL schema, migrations and the video registry.

The schema lives in whatever schema the connection's ``search_path`` points at (``public`` by default; tests
point the ``crowd_postgres`` connection at a fresh schema). :func:`migrate` creates and upgrades it with
versioned, idempotent migrations recorded in ``schema_migrations``, under a PostgreSQL advisory lock so
concurrent tasks never race.

Transactions: every function here runs its statements inside ``conn.transaction()``. On an autocommit
connection (or a non-autocommit one with no transaction open) that block commits on exit; when the caller
already has a transaction open, the work joins it as a savepoint and the caller's ``commit()`` makes it
durable.

Example:
    >>> from crowd import storage
    >>> with storage.connect("crowd_postgres") as conn:
    ...     storage.migrate(conn)
    ...     storage.mark_video_processing(conn, "ab12", "/videos/a.mp4", fps=25.0, frame_count=250,
    ...                                   width=640, height=480, size_bytes=1234, model="yolov3-face@416")
    ...     storage.get_video_status(conn, "ab12")
    'processing'
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass
from datetime import datetime

import psycopg

from crowd.config import Settings

log = logging.getLogger(__name__)

VIDEO_STATUSES = ("pending", "processing", "done", "failed")


class VideoNotFoundError(LookupError):
    """A video id has no row in ``videos``; the message names the id."""


class SchemaTooNewError(RuntimeError):
    """The results schema has migrations this code does not know: it was upgraded by a newer crowd (a rolling
    upgrade, a worker left behind); the message says which versions."""


@dataclass(frozen=True)
class Migration:
    """One schema step. ``version`` only grows; a step never changes once released. ``reads``: a table the step
    reads whole (its time grows with that table: a warning with the table's size comes first)."""

    version: int
    name: str
    sql: str
    reads: str | None = None


# Per-video statistics, kept by statement-level triggers on frames so that any writer (the drain's COPY, its upsert
# on a replay, a hand-made fix) keeps them right, and reading them costs one row per video instead of a pass over
# every frame (the old video_summary view aggregated the whole frames table on each read: seconds per API page at
# millions of frames).
#
# Counts and sums move by deltas (commutative: concurrent writers of one video cannot lose each other's). The
# extremes (max, peak, first/last time, last ingested) only grow with new frames; only where a changed or deleted
# frame held one of them (the peak frame lowered, the first frame moved later, ...) are they recomputed from the
# video's frames, so a replay (same or other counts) costs no pass over a long video. An upsert fires its UPDATE
# trigger (updated rows only) before its INSERT trigger (inserted rows only); the recompute is idempotent, so
# either order gives the same result. first_ingested_at is when the video's first frame was stored, kept through
# replays. Writers that may share videos take per-video locks in one order first (see crowd.ingest.write_batch):
# an upsert locks its updated videos' rows before its inserted ones', and two such orders could deadlock.
_STATS_AGGREGATE = """
    SELECT a.video_id, a.frames, a.total_faces, a.max_faces, a.peak_frame_id, p.frame_ts_ms AS peak_ts_ms,
           a.first_ts_ms, a.last_ts_ms, a.first_ingested_at, a.last_ingested_at
    FROM (SELECT video_id, count(*) AS frames, sum(total_faces) AS total_faces, max(total_faces) AS max_faces,
                 -(max(ARRAY[total_faces::bigint, -frame_id]))[2] AS peak_frame_id,  -- most faces, then first
                 min(frame_ts_ms) AS first_ts_ms, max(frame_ts_ms) AS last_ts_ms,
                 min(ingested_at) AS first_ingested_at, max(ingested_at) AS last_ingested_at
          FROM {source} g GROUP BY video_id) a
    JOIN {source} p ON p.video_id = a.video_id AND p.frame_id = a.peak_frame_id
    ORDER BY a.video_id
"""  # one pass and a join, no sort: a third of the cost of DISTINCT ON in the insert trigger (bench/summary.py)
_NEW_PEAK = "(EXCLUDED.max_faces, -EXCLUDED.peak_frame_id) > (s.max_faces, -s.peak_frame_id)"
# fold rows whose extremes can only raise the stored ones (idempotent: a row folded twice changes nothing)
_MERGE_EXTREMES = f"""
        max_faces = greatest(s.max_faces, EXCLUDED.max_faces),
        peak_frame_id = CASE WHEN {_NEW_PEAK} THEN EXCLUDED.peak_frame_id ELSE s.peak_frame_id END,
        peak_ts_ms = CASE WHEN {_NEW_PEAK} THEN EXCLUDED.peak_ts_ms ELSE s.peak_ts_ms END,
        first_ts_ms = least(s.first_ts_ms, EXCLUDED.first_ts_ms),
        last_ts_ms = greatest(s.last_ts_ms, EXCLUDED.last_ts_ms),
        first_ingested_at = least(s.first_ingested_at, EXCLUDED.first_ingested_at),
        last_ingested_at = greatest(s.last_ingested_at, EXCLUDED.last_ingested_at)
"""
# apply per-video deltas of frames and faces from {rows} (video_id, sign, total_faces); a video new to the table
# takes its extremes from {extremes_source}; emptied videos are dropped
_APPLY_DELTAS = """
    INSERT INTO video_stats AS s
    SELECT d.video_id, d.frames, d.total_faces, x.max_faces, x.peak_frame_id, x.peak_ts_ms, x.first_ts_ms,
           x.last_ts_ms, x.first_ingested_at, x.last_ingested_at
    FROM (SELECT video_id, sum(sign) AS frames, sum(sign * total_faces) AS total_faces FROM ({rows}) r
          GROUP BY video_id) d
    LEFT JOIN ({extremes}) x USING (video_id)
    ORDER BY d.video_id
    ON CONFLICT (video_id) DO UPDATE SET
        frames = s.frames + EXCLUDED.frames, total_faces = s.total_faces + EXCLUDED.total_faces;
    DELETE FROM video_stats WHERE frames <= 0 AND video_id IN (SELECT video_id FROM ({rows}) r);
"""
_VIDEO_STATS_SQL = f"""
LOCK TABLE frames IN SHARE ROW EXCLUSIVE MODE;  -- writers wait until the statistics below are complete

CREATE TABLE video_stats (
    video_id          text PRIMARY KEY,
    frames            bigint NOT NULL,
    total_faces       bigint NOT NULL,
    max_faces         integer,
    peak_frame_id     bigint,  -- the first frame with max_faces
    peak_ts_ms        double precision,
    first_ts_ms       double precision,
    last_ts_ms        double precision,
    first_ingested_at timestamptz,
    last_ingested_at  timestamptz
);

-- the extremes of these videos, from their frames (a new snapshot: it sees what writers it waited for committed)
CREATE FUNCTION crowd_video_stats_extremes(ids text[]) RETURNS void LANGUAGE plpgsql
AS $fn$
BEGIN
    UPDATE video_stats s SET
        max_faces = x.max_faces, peak_frame_id = x.peak_frame_id, peak_ts_ms = x.peak_ts_ms,
        first_ts_ms = x.first_ts_ms, last_ts_ms = x.last_ts_ms, last_ingested_at = x.last_ingested_at,
        first_ingested_at = least(s.first_ingested_at, x.first_ingested_at)
    FROM ({_STATS_AGGREGATE.format(source="(SELECT * FROM frames WHERE video_id = ANY (ids))")}) x
    WHERE s.video_id = x.video_id;
END
$fn$;

CREATE FUNCTION crowd_video_stats_added() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO video_stats AS s {_STATS_AGGREGATE.format(source="added")}
    ON CONFLICT (video_id) DO UPDATE SET
        frames = s.frames + EXCLUDED.frames, total_faces = s.total_faces + EXCLUDED.total_faces,
        {_MERGE_EXTREMES};
    RETURN NULL;
END
$fn$;

CREATE FUNCTION crowd_video_stats_updated() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    lowered text[];
BEGIN
    {
    _APPLY_DELTAS.format(
        rows="SELECT video_id, 1 AS sign, total_faces FROM after_rows "
        "UNION ALL SELECT video_id, -1, total_faces FROM before_rows",
        extremes=_STATS_AGGREGATE.format(source="after_rows"),
    )
}
    -- videos where a frame that held an extreme lost it (changed, moved away): extremes recomputed
    lowered := ARRAY(
        SELECT DISTINCT o.video_id
        FROM before_rows o
        JOIN video_stats s ON s.video_id = o.video_id
        LEFT JOIN after_rows n ON n.video_id = o.video_id AND n.frame_id = o.frame_id
        WHERE (o.frame_id = s.peak_frame_id
               AND (n.video_id IS NULL OR n.total_faces < o.total_faces OR n.frame_ts_ms <> o.frame_ts_ms))
           OR (o.frame_ts_ms = s.first_ts_ms AND (n.video_id IS NULL OR n.frame_ts_ms > o.frame_ts_ms))
           OR (o.frame_ts_ms = s.last_ts_ms AND (n.video_id IS NULL OR n.frame_ts_ms < o.frame_ts_ms))
           OR (o.ingested_at = s.last_ingested_at AND (n.video_id IS NULL OR n.ingested_at < o.ingested_at))
    );
    IF cardinality(lowered) > 0 THEN
        PERFORM crowd_video_stats_extremes(lowered);
    END IF;
    INSERT INTO video_stats AS s
    SELECT * FROM ({_STATS_AGGREGATE.format(source="after_rows")}) x WHERE NOT x.video_id = ANY (lowered)
    ON CONFLICT (video_id) DO UPDATE SET {_MERGE_EXTREMES};
    RETURN NULL;
END
$fn$;

CREATE FUNCTION crowd_video_stats_deleted() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    {
    _APPLY_DELTAS.format(
        rows="SELECT video_id, -1 AS sign, total_faces FROM before_rows",
        extremes=_STATS_AGGREGATE.format(source="before_rows"),
    )
}
    PERFORM crowd_video_stats_extremes(ARRAY(  -- only videos where a deleted frame held an extreme
        SELECT DISTINCT o.video_id FROM before_rows o JOIN video_stats s ON s.video_id = o.video_id
        WHERE o.frame_id = s.peak_frame_id OR o.frame_ts_ms IN (s.first_ts_ms, s.last_ts_ms)
           OR o.ingested_at = s.last_ingested_at
    ));
    RETURN NULL;
END
$fn$;

CREATE FUNCTION crowd_video_stats_truncated() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    DELETE FROM video_stats;
    RETURN NULL;
END
$fn$;

-- the functions name this schema's tables, whoever writes frames and whatever their search_path (pg_temp last: a
-- temporary table of the same name cannot take their writes)
DO $do$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['crowd_video_stats_extremes(text[])', 'crowd_video_stats_added()',
                              'crowd_video_stats_updated()', 'crowd_video_stats_deleted()',
                              'crowd_video_stats_truncated()'] LOOP
        EXECUTE format('ALTER FUNCTION %I.%s SET search_path = %I, pg_temp', current_schema(), fn, current_schema());
    END LOOP;
END
$do$;

CREATE TRIGGER video_stats_added AFTER INSERT ON frames REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION crowd_video_stats_added();
CREATE TRIGGER video_stats_updated AFTER UPDATE ON frames REFERENCING OLD TABLE AS before_rows NEW TABLE AS after_rows
    FOR EACH STATEMENT EXECUTE FUNCTION crowd_video_stats_updated();
CREATE TRIGGER video_stats_deleted AFTER DELETE ON frames REFERENCING OLD TABLE AS before_rows
    FOR EACH STATEMENT EXECUTE FUNCTION crowd_video_stats_deleted();
CREATE TRIGGER video_stats_truncated AFTER TRUNCATE ON frames
    FOR EACH STATEMENT EXECUTE FUNCTION crowd_video_stats_truncated();

INSERT INTO video_stats {_STATS_AGGREGATE.format(source="frames")};

CREATE OR REPLACE VIEW video_summary AS
SELECT s.video_id, s.frames, s.total_faces, s.max_faces, s.total_faces::double precision / s.frames AS mean_faces,
       s.peak_frame_id, s.peak_ts_ms, s.first_ts_ms, s.last_ts_ms, s.last_ingested_at, v.status, v.path, v.model,
       s.first_ingested_at
FROM video_stats s
LEFT JOIN videos v ON v.id = s.video_id;
"""  # noqa: S608 - fixed fragments of this module, no input

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "videos, frames, faces, offsets, rejected messages",
        """
        CREATE TABLE videos (
            id          text PRIMARY KEY,
            path        text NOT NULL,
            fps         double precision,
            frame_count bigint,
            width       integer,
            height      integer,
            size_bytes  bigint,
            status      text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'done', 'failed')),
            error       text,
            model       text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz
        );
        CREATE INDEX videos_status_idx ON videos (status);

        -- No FK to videos: frames may arrive before the detection task registers the video.
        CREATE TABLE frames (
            video_id        text NOT NULL,
            frame_id        bigint NOT NULL CHECK (frame_id >= 0),
            frame_ts_ms     double precision NOT NULL CHECK (frame_ts_ms >= 0),
            total_faces     integer NOT NULL CHECK (total_faces >= 0),
            model           text NOT NULL,
            frame_width     integer NOT NULL,
            frame_height    integer NOT NULL,
            source          text NOT NULL,
            kafka_partition integer,
            kafka_offset    bigint,
            ingested_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (video_id, frame_id)
        );

        CREATE TABLE faces (
            video_id   text NOT NULL,
            frame_id   bigint NOT NULL,
            face_id    integer NOT NULL CHECK (face_id >= 0),
            x          integer NOT NULL CHECK (x >= 0),
            y          integer NOT NULL CHECK (y >= 0),
            width      integer NOT NULL CHECK (width >= 0),
            height     integer NOT NULL CHECK (height >= 0),
            confidence real NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
            PRIMARY KEY (video_id, frame_id, face_id),
            FOREIGN KEY (video_id, frame_id) REFERENCES frames (video_id, frame_id) ON DELETE CASCADE
        );

        CREATE TABLE kafka_offsets (
            consumer_group text NOT NULL,
            topic          text NOT NULL,
            partition      integer NOT NULL,
            next_offset    bigint NOT NULL CHECK (next_offset >= 0),
            updated_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer_group, topic, partition)
        );

        CREATE TABLE rejected_messages (
            id          bigserial PRIMARY KEY,
            topic       text NOT NULL,
            partition   integer NOT NULL,
            "offset"    bigint NOT NULL,
            key         bytea,
            raw         bytea,
            reason      text NOT NULL,
            rejected_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (topic, partition, "offset")
        );
        """,
    ),
    Migration(
        2,
        "crowd alerts",
        """
        CREATE TABLE alerts (
            id               bigserial PRIMARY KEY,
            video_id         text NOT NULL,
            started_frame_id bigint NOT NULL,
            started_ts_ms    double precision NOT NULL,
            ended_frame_id   bigint,
            ended_ts_ms      double precision,
            peak_count       integer NOT NULL,
            peak_frame_id    bigint NOT NULL,
            threshold        integer NOT NULL,
            min_duration_ms  double precision NOT NULL DEFAULT 0,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            published_at     timestamptz,
            UNIQUE (video_id, started_frame_id)
        );
        CREATE INDEX alerts_unpublished_idx ON alerts (id) WHERE published_at IS NULL;
        """,
    ),
    Migration(
        3,
        "video_summary view",
        """
        CREATE VIEW video_summary AS
        WITH per_video AS (
            SELECT video_id,
                   count(*)                       AS frames,
                   sum(total_faces)::bigint       AS total_faces,
                   max(total_faces)               AS max_faces,
                   avg(total_faces)::double precision AS mean_faces,
                   min(frame_ts_ms)               AS first_ts_ms,
                   max(frame_ts_ms)               AS last_ts_ms,
                   max(ingested_at)               AS last_ingested_at
            FROM frames GROUP BY video_id
        ),
        peaks AS (
            SELECT DISTINCT ON (video_id) video_id, frame_id AS peak_frame_id, frame_ts_ms AS peak_ts_ms
            FROM frames ORDER BY video_id, total_faces DESC, frame_id
        )
        SELECT p.video_id, p.frames, p.total_faces, p.max_faces, p.mean_faces,
               k.peak_frame_id, k.peak_ts_ms, p.first_ts_ms, p.last_ts_ms, p.last_ingested_at,
               v.status, v.path, v.model
        FROM per_video p
        JOIN peaks k USING (video_id)
        LEFT JOIN videos v ON v.id = p.video_id;
        """,
    ),
    Migration(
        4,
        "scanned files: the content hash of each video file, known by its signature",
        """
        CREATE TABLE scanned_files (
            path       text PRIMARY KEY,
            size_bytes bigint NOT NULL,
            mtime_ns   bigint NOT NULL,
            ctime_ns   bigint NOT NULL,
            inode      bigint NOT NULL,
            video_id   text NOT NULL,
            hashed_at  timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    Migration(
        5,
        "videos: the Airflow run that owns the status (a stale try of an older run cannot turn it back)",
        """
        ALTER TABLE videos ADD COLUMN run_id text, ADD COLUMN run_started_at timestamptz;
        """,
    ),
    Migration(
        6,
        "kafka_offsets: the broker's id of the topic the offsets belong to (a topic made again starts over)",
        """
        ALTER TABLE kafka_offsets ADD COLUMN topic_id text;
        """,
    ),
    Migration(
        7,
        "videos: the claim of the run processing a video (its last sign of life) and the runs that died silently",
        """
        ALTER TABLE videos ADD COLUMN alive_at timestamptz,
                           ADD COLUMN silent_runs integer NOT NULL DEFAULT 0 CHECK (silent_runs >= 0),
                           ADD COLUMN reason_given boolean NOT NULL DEFAULT false;
        """,
    ),
    Migration(
        8,
        "video_summary: when a video's frames were first stored (a stable order for videos the registry lacks)",
        """
        CREATE OR REPLACE VIEW video_summary AS
        WITH per_video AS (
            SELECT video_id,
                   count(*)                       AS frames,
                   sum(total_faces)::bigint       AS total_faces,
                   max(total_faces)               AS max_faces,
                   avg(total_faces)::double precision AS mean_faces,
                   min(frame_ts_ms)               AS first_ts_ms,
                   max(frame_ts_ms)               AS last_ts_ms,
                   max(ingested_at)               AS last_ingested_at,
                   min(ingested_at)               AS first_ingested_at
            FROM frames GROUP BY video_id
        ),
        peaks AS (
            SELECT DISTINCT ON (video_id) video_id, frame_id AS peak_frame_id, frame_ts_ms AS peak_ts_ms
            FROM frames ORDER BY video_id, total_faces DESC, frame_id
        )
        SELECT p.video_id, p.frames, p.total_faces, p.max_faces, p.mean_faces,
               k.peak_frame_id, k.peak_ts_ms, p.first_ts_ms, p.last_ts_ms, p.last_ingested_at,
               v.status, v.path, v.model, p.first_ingested_at
        FROM per_video p
        JOIN peaks k USING (video_id)
        LEFT JOIN videos v ON v.id = p.video_id;
        """,
    ),
    Migration(
        9,
        "alerts: a revision per change (changed alerts are published again) and an outbox of withdrawn alerts",
        """
        ALTER TABLE alerts ADD COLUMN revision integer NOT NULL DEFAULT 1;
        CREATE TABLE alert_withdrawals (
            alert_id     bigint PRIMARY KEY,
            video_id     text NOT NULL,
            merged_into  bigint,
            withdrawn_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz
        );
        CREATE INDEX alert_withdrawals_unpublished_idx ON alert_withdrawals (alert_id) WHERE published_at IS NULL;
        """,
    ),
    Migration(
        10,
        "rejected_messages: the broker's id of the topic (a topic made again does not overwrite the old one's rows)",
        """
        ALTER TABLE rejected_messages ADD COLUMN topic_id text;
        ALTER TABLE rejected_messages DROP CONSTRAINT IF EXISTS rejected_messages_topic_partition_offset_key;
        CREATE UNIQUE INDEX rejected_messages_position_key
            ON rejected_messages (topic, partition, "offset", (coalesce(topic_id, '')));
        """,
    ),
    Migration(
        11,
        "video_stats: each video's statistics kept by triggers on frames (video_summary no longer aggregates frames)",
        _VIDEO_STATS_SQL,
        reads="frames",
    ),
    Migration(
        12,
        "alert_rule_applied: the alert rule each video's rows follow (a batch recomputes a stretch only under it)",
        """
        CREATE TABLE alert_rule_applied (
            video_id        text PRIMARY KEY,
            threshold       integer NOT NULL,
            min_duration_ms double precision NOT NULL
        );
        """,
    ),
    Migration(
        13,
        "rejected_messages: the consumer group that recorded the row (a loss another group met is not this one's)",
        "ALTER TABLE rejected_messages ADD COLUMN consumer_group text",
    ),
)

_BOOTSTRAP_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


#: libpq settings every connection gets unless its Airflow connection's extra says otherwise: a server that does
#: not answer, or a network cut mid-query (no reset: a dead host, a dropped route), fails the call in about a
#: minute instead of blocking a task until its execution timeout and the watcher's triggerer thread for ever,
#: and a dead client's session (holding the drain's advisory lock) is noticed by the server within minutes.
CONNECTION_SAFETY: dict[str, int] = {
    "connect_timeout": 10,  # s, the whole connection set-up
    "keepalives": 1,
    "keepalives_idle": 30,  # s of silence before the first probe
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms a sent request may go unacknowledged
}


def connect(postgres_conn_id: str, *, statement_timeout_s: float | None = None, **overrides: int) -> psycopg.Connection:
    """Open a psycopg 3 connection (not autocommit) from an Airflow Postgres connection id.

    The connection's extra decides; :data:`CONNECTION_SAFETY` fills in what it leaves out, and ``overrides``
    (libpq settings, e.g. ``connect_timeout=3``) win over both. ``statement_timeout_s``: the session's
    ``statement_timeout``, unless the extra's ``options`` set one (they come after it, so they win). The session's
    ``TimeZone`` is UTC (the same way: the extra's ``options`` may set another): times read from it, in the API's
    answers and the alert messages, are UTC whatever time zone the server took from its host at ``initdb``. The
    caller closes it (use it as a context manager).
    """
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    class _Hook(PostgresHook):
        def _create_connection(self, conn_args: dict) -> psycopg.Connection:
            args = {**CONNECTION_SAFETY, **conn_args, **overrides}
            ours = "-c TimeZone=UTC"
            if statement_timeout_s:
                ours += f" -c statement_timeout={max(1, round(statement_timeout_s * 1000))}"
            args["options"] = f"{ours} {args.get('options') or ''}".strip()
            return super()._create_connection(args)

    conn = _Hook(postgres_conn_id=postgres_conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(
            f"connection {postgres_conn_id!r} gave a {type(conn).__name__}, expected psycopg 3; "
            "install apache-airflow-providers-postgres>=6 with psycopg 3"
        )
    return conn


def migrate(conn: psycopg.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every migration not yet recorded in ``schema_migrations``, in version order, each in a transaction of
    its own (inside the caller's, if one is open: then the caller commits them all).

    One step per transaction: the locks of a step are held for that step only (all in one, the tables the first
    steps altered stayed locked, readers and the drain waiting, while a later step read every frame). Safe to call
    from many tasks at once: a transaction-scoped advisory lock (keyed on the current schema) serialises the steps,
    each applied once by whichever caller holds the lock, and a caller finds nothing to do once the schema is
    current.

    Returns:
        the versions applied by this call (empty when the schema was already current).

    Raises:
        SchemaTooNewError: the schema has migrations ``migrations`` lacks (a newer crowd migrated it): this code
            would write what the newer one no longer reads.
    """
    applied_now: list[int] = []
    known = max(m.version for m in migrations)
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('crowd.migrate:' || current_schema()))")
            conn.execute(_BOOTSTRAP_SQL)
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
            if unknown := sorted(v for v in done if v > known):
                raise SchemaTooNewError(
                    f"the results schema has migration(s) {unknown}, newer than this code knows (up to {known}): "
                    "a newer crowd migrated it. Upgrade crowd on this machine (every worker and API server runs "
                    "the same version); older code would write what the newer one no longer reads"
                )
            pending = sorted((m for m in migrations if m.version not in done), key=lambda m: m.version)
            if not pending:
                break
            step = pending[0]
            _apply(conn, step)
        applied_now.append(step.version)
    if applied_now:
        log.info("schema migrated to version %d (applied %s)", applied_now[-1], applied_now)
    return applied_now


def _apply(conn: psycopg.Connection, step: Migration) -> None:
    """Run one migration step and record it, logging its time (and warning first if it reads a table whole)."""
    if step.reads:
        rows = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (step.reads,))
        estimate = (rows.fetchone() or (None,))[0]
        if estimate and estimate > 1_000_000:
            log.warning(
                "schema migration %d reads every row of %s (about %d rows; 50 million took 15 s on a warm cache "
                "here, longer from disk): the drain and the API wait on it meanwhile",
                step.version, step.reads, estimate,
            )  # fmt: skip
    log.info("applying schema migration %d: %s", step.version, step.name)
    started = time.monotonic()
    conn.execute(step.sql)
    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (step.version, step.name))
    log.info("schema migration %d applied in %.1f s", step.version, time.monotonic() - started)


def schema_version(conn: psycopg.Connection) -> int:
    """Highest applied migration version, 0 for an empty database."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])


# --- scanned files (the scan's memory of content hashes) ----------------------------------------------------


@dataclass(frozen=True)
class FileSignature:
    """What ``stat`` says of a file: while all of it stays the same, the content is taken to be the same.

    ``ctime_ns`` cannot be set back by a program (unlike the modification time), so a file rewritten in place
    with the same size and its old modification time restored is still seen as changed.
    """

    size_bytes: int
    mtime_ns: int
    ctime_ns: int
    inode: int  # as a signed 64-bit number (PostgreSQL's bigint): some file systems give inodes above 2**63

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        """The signature of a file from its ``os.stat`` result."""
        inode = st.st_ino - (1 << 64) if st.st_ino >= 1 << 63 else st.st_ino
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, inode)


def known_video_ids(conn: psycopg.Connection, signatures: Mapping[str, FileSignature]) -> dict[str, str]:
    """The video id hashed before for each path whose file still has the signature it had then."""
    if not signatures:
        return {}
    rows = conn.execute(
        "SELECT path, size_bytes, mtime_ns, ctime_ns, inode, video_id FROM scanned_files WHERE path = ANY(%s)",
        (list(signatures),),
    ).fetchall()
    return {path: video_id for path, *sig, video_id in rows if FileSignature(*sig) == signatures[path]}


def remember_video_ids(
    conn: psycopg.Connection,
    hashed: Mapping[str, tuple[FileSignature, str]],
    *,
    listed: Iterable[str],
    roots: Iterable[str],
) -> None:
    """Record the video id and signature of each path just hashed, and forget the paths under ``roots`` that the
    scan did not list (deleted or moved files)."""
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(
                """
                INSERT INTO scanned_files (path, size_bytes, mtime_ns, ctime_ns, inode, video_id)
                VALUES (%s, %s, %s, %s, %s, %s)
                ON CONFLICT (path) DO UPDATE SET
                    size_bytes = EXCLUDED.size_bytes, mtime_ns = EXCLUDED.mtime_ns, ctime_ns = EXCLUDED.ctime_ns,
                    inode = EXCLUDED.inode, video_id = EXCLUDED.video_id, hashed_at = now()
                """,
                [(path, *astuple(sig), video_id) for path, (sig, video_id) in hashed.items()],
            )
        roots = [str(r).rstrip("/") for r in roots]
        if not roots:  # nothing to forget (the scan remembering one hash as soon as it is read)
            return
        conn.execute(
            """
            DELETE FROM scanned_files
            WHERE NOT (path = ANY(%(listed)s))
              AND EXISTS (SELECT 1 FROM unnest(%(roots)s::text[]) AS root WHERE starts_with(path, root || '/'))
            """,
            {"listed": list(listed), "roots": roots},
        )


# --- video registry (called by the detection DAG) ---------------------------------------------------------


def get_video_status(conn: psycopg.Connection, video_id: str) -> str | None:
    """Status of ``video_id`` (``pending``, ``processing``, ``done``, ``failed``), or None if unknown."""
    row = conn.execute("SELECT status FROM videos WHERE id = %s", (video_id,)).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class VideoState:
    """A registered video's status and, while ``processing``, the claim of the run processing it.

    A run claims a video when its first part starts (:func:`mark_video_processing`) and keeps the claim alive
    on a timer while its tasks work (:func:`keep_video_claim`). A run that ends with a reason the video is not to
    blame for (Kafka, the results folder) says so (:func:`note_video_reason`); one that ends without a word (its
    process killed: out of memory, a crash, a lost worker, its execution timeout) leaves the claim to lapse, and
    the next run to claim the video counts it in ``silent_runs`` (a run whose claim is still alive then is
    superseded, not counted).
    """

    status: str
    run_id: str | None
    alive_s_ago: float | None  # seconds since the claim's last sign of life (None: never, or before migration 7)
    silent_runs: int  # runs before the current one that ended without finishing the video or giving a reason
    reason_given: bool  # the current run's last try ended with a reason the video is not to blame for

    def claimed(self, timeout_s: float) -> bool:
        """Whether a run is processing the video now: ``processing`` with a sign of life within ``timeout_s``."""
        return self.status == "processing" and self.alive_s_ago is not None and self.alive_s_ago < timeout_s

    def runs_ended_silently(self) -> int:
        """Runs that ended without a word, the current one included once its claim has lapsed."""
        return self.silent_runs + (self.status == "processing" and not self.reason_given)


def get_video_state(conn: psycopg.Connection, video_id: str) -> VideoState | None:
    """The :class:`VideoState` of ``video_id``, or None if unknown (times from the database's clock)."""
    row = conn.execute(
        """
        SELECT status, run_id, EXTRACT(EPOCH FROM clock_timestamp() - alive_at)::float8, silent_runs, reason_given
        FROM videos WHERE id = %s
        """,
        (video_id,),
    ).fetchone()
    return None if row is None else VideoState(*row)


def keep_video_claim(conn: psycopg.Connection, video_id: str, run: RunStamp | None = None) -> bool:
    """A sign of life of ``run`` processing ``video_id``; False if the video is no longer ``processing`` by it."""
    with conn.transaction():
        cur = conn.execute(
            """
            UPDATE videos SET alive_at = clock_timestamp()
            WHERE id = %s AND status = 'processing' AND run_id IS NOT DISTINCT FROM %s
            """,
            (video_id, _run_columns(run)[0]),
        )
    return cur.rowcount == 1


def note_video_reason(
    conn: psycopg.Connection, video_id: str, run: RunStamp | None = None, *, release: bool = True
) -> bool:
    """Record that ``run``'s try on ``video_id`` ended with a reason the video is not to blame for (and logged
    it): the run does not count among the runs that ended silently, and with ``release`` its claim is released (a
    retry of the try claims it again). A part of a split video does not release it: the other parts may still be
    working (their claim lapses if none is, and the run's end releases it). False if ``run`` does not own the
    status."""
    with conn.transaction():
        cur = conn.execute(
            """
            UPDATE videos SET reason_given = true, updated_at = now(),
                              alive_at = CASE WHEN %s THEN NULL ELSE alive_at END
            WHERE id = %s AND status = 'processing' AND run_id IS NOT DISTINCT FROM %s
            """,
            (release, video_id, _run_columns(run)[0]),
        )
    return cur.rowcount == 1


def release_video_claim(conn: psycopg.Connection, video_id: str, run: RunStamp | None = None) -> bool:
    """``run`` is over without finishing ``video_id``: the next scan need not wait for its claim to lapse. False if
    ``run`` does not own the status."""
    with conn.transaction():
        cur = conn.execute(
            """
            UPDATE videos SET alive_at = NULL, updated_at = now()
            WHERE id = %s AND status = 'processing' AND run_id IS NOT DISTINCT FROM %s
            """,
            (video_id, _run_columns(run)[0]),
        )
    return cur.rowcount == 1


def fail_abandoned_video(
    conn: psycopg.Connection, video_id: str, *, claim_timeout_s: float, max_silent_runs: int
) -> bool:
    """Mark ``video_id`` failed if ``max_silent_runs`` runs in a row (the current one included) ended without
    finishing it or giving a reason, the current one's claim having lapsed (no sign of life for
    ``claim_timeout_s``). Checked and written in one statement, so a run claiming it meanwhile keeps it.

    Returns:
        True if the video was marked failed.
    """
    with conn.transaction():
        cur = conn.execute(
            """
            UPDATE videos SET status = 'failed', finished_at = now(), updated_at = now(),
                error = format('%%s runs in a row ended without finishing this video or giving a reason (the task '
                               'process killed: out of memory, a crash, a lost worker, or its execution timeout), '
                               'the last one %%s; their task logs tell more. Trigger crowd_video_detect with '
                               'its path to try again', silent_runs + 1, coalesce(run_id, '(not recorded)'))
            WHERE id = %s AND status = 'processing' AND NOT reason_given AND silent_runs + 1 >= %s
              AND (alive_at IS NULL OR alive_at < clock_timestamp() - make_interval(secs => %s))
            """,
            (video_id, max_silent_runs, claim_timeout_s),
        )
    return cur.rowcount == 1


@dataclass(frozen=True)
class RunStamp:
    """The Airflow run writing a video's status: its id and when it started.

    The run started last owns the status: nothing is written over the status of a run started later, and a try
    of a run that is already done with the video (a stale one, e.g. a worker thawed or reconnected after its try
    was retried and the run finished) cannot turn its ``done`` back into ``processing`` or ``failed``, nor a
    retried first part the ``failed`` another part of its run recorded (a corrupt range) into ``processing``.
    Clearing a task of a finished run takes the video back: Airflow gives the cleared run a new start date.
    """

    run_id: str
    started_at: datetime


def mark_video_processing(
    conn: psycopg.Connection,
    video_id: str,
    path: str,
    *,
    fps: float | None,
    frame_count: int | None,
    width: int | None,
    height: int | None,
    size_bytes: int | None,
    model: str | None,
    run: RunStamp | None = None,
    claim_timeout_s: float = Settings.video_claim_timeout_s,
) -> bool:
    """Register ``video_id`` (or re-register it) as being processed by ``run``, its claim alive (see
    :class:`VideoState`); clears any previous error.

    The run taken over from is counted in ``silent_runs`` if it ended without a word: unless it gave a reason, or
    its claim is still alive (a sign of life within ``claim_timeout_s``, the settings' ``video_claim_timeout_s``:
    it is superseded, not dead).

    Returns:
        False when the video was left as it is: owned by a later run, or ``done`` or ``failed`` by ``run`` (see
        :class:`RunStamp`).
    """
    run_columns = _run_columns(run)
    with conn.transaction():
        written = conn.execute(
            """
            INSERT INTO videos (id, path, fps, frame_count, width, height, size_bytes, status, model, run_id,
                                run_started_at, alive_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, 'processing', %s, %s, %s, clock_timestamp())
            ON CONFLICT (id) DO UPDATE SET  -- what is not known yet (a claim when the run is planned) is kept
                path = EXCLUDED.path, fps = COALESCE(EXCLUDED.fps, videos.fps),
                frame_count = COALESCE(EXCLUDED.frame_count, videos.frame_count),
                width = COALESCE(EXCLUDED.width, videos.width), height = COALESCE(EXCLUDED.height, videos.height),
                size_bytes = COALESCE(EXCLUDED.size_bytes, videos.size_bytes),
                model = COALESCE(EXCLUDED.model, videos.model), status = 'processing', error = NULL, finished_at = NULL,
                run_id = EXCLUDED.run_id, run_started_at = EXCLUDED.run_started_at, updated_at = now(),
                alive_at = clock_timestamp(), reason_given = false,
                silent_runs = CASE  -- the run it takes over from ended silently: count it (not a retry of itself)
                    WHEN videos.status <> 'processing' THEN 0
                    WHEN videos.run_id IS NOT DISTINCT FROM EXCLUDED.run_id OR videos.reason_given
                        OR videos.alive_at > clock_timestamp() - make_interval(secs => %s)
                        THEN videos.silent_runs
                    ELSE videos.silent_runs + 1 END
            WHERE NOT COALESCE(  -- owned by a later run, or done or failed by this one: leave it
                videos.run_started_at > EXCLUDED.run_started_at
                OR (videos.run_started_at = EXCLUDED.run_started_at AND videos.status IN ('done', 'failed')), false)
            RETURNING id
            """,
            (video_id, str(path), fps, frame_count, width, height, size_bytes, model, *run_columns, claim_timeout_s),
        ).fetchone()
    return written is not None


def mark_video_done(conn: psycopg.Connection, video_id: str, run: RunStamp | None = None) -> bool:
    """Mark ``video_id`` done by ``run``.

    Returns:
        False when the video was left as it is: a run started after ``run`` owns its status.

    Raises:
        VideoNotFoundError: the video was never registered with :func:`mark_video_processing`.
    """
    run_id, started_at = _run_columns(run)
    with conn.transaction():
        cur = conn.execute(
            """
            UPDATE videos SET status = 'done', error = NULL, finished_at = now(), updated_at = now(),
                              run_id = COALESCE(%(run_id)s, run_id),
                              run_started_at = COALESCE(%(started_at)s, run_started_at)
            WHERE id = %(id)s AND NOT COALESCE(run_started_at > %(started_at)s::timestamptz, false)
            """,
            {"id": video_id, "run_id": run_id, "started_at": started_at},
        )
        if cur.rowcount == 1:
            return True
        if conn.execute("SELECT 1 FROM videos WHERE id = %s", (video_id,)).fetchone() is None:
            raise VideoNotFoundError(
                f"video {video_id!r} is not in the videos table; call mark_video_processing() for it first"
            )
    return False


# the failed row, unless the row says otherwise: {condition} is the ON CONFLICT's WHERE (the row as it is: videos.*)
_MARK_FAILED_SQL = """
INSERT INTO videos (id, path, status, error, finished_at, run_id, run_started_at)
VALUES (%s, %s, 'failed', %s, now(), %s, %s)
ON CONFLICT (id) DO UPDATE SET
    path = EXCLUDED.path, status = 'failed', error = EXCLUDED.error, finished_at = now(),
    run_id = EXCLUDED.run_id, run_started_at = EXCLUDED.run_started_at, updated_at = now()
WHERE {condition}
RETURNING id
"""
_UNLESS_LATER_OR_DONE = """NOT COALESCE(  -- owned by a later run, or done by this one: leave it
    videos.run_started_at > EXCLUDED.run_started_at
    OR (videos.run_started_at = EXCLUDED.run_started_at AND videos.status = 'done'), false)"""
_ONLY_IF_PROCESSING_BY_THIS_RUN = "videos.status = 'processing' AND videos.run_id IS NOT DISTINCT FROM EXCLUDED.run_id"


def _mark_failed(
    conn: psycopg.Connection, condition: str, video_id: str, path: str, error: str, run: RunStamp | None
) -> bool:
    with conn.transaction():
        written = conn.execute(
            _MARK_FAILED_SQL.format(condition=condition),
            (video_id, str(path), storable_text(str(error)[:10_000]), *_run_columns(run)),
        ).fetchone()
    return written is not None


def mark_video_failed(
    conn: psycopg.Connection, video_id: str, path: str, error: str, run: RunStamp | None = None
) -> bool:
    """Mark ``video_id`` failed with ``error`` (registers it if it was unknown, e.g. unreadable files).

    Returns:
        False when the video was left as it is: owned by a later run, or ``done`` by ``run`` (see
        :class:`RunStamp`). A later failure of the same run (another part) replaces the reason.
    """
    return _mark_failed(conn, _UNLESS_LATER_OR_DONE, video_id, path, error, run)


def mark_video_failed_if_owned(
    conn: psycopg.Connection, video_id: str, path: str, error: str, run: RunStamp | None = None
) -> bool:
    """Mark ``video_id`` failed with ``error`` only if it has no row yet or is ``processing`` by ``run`` itself
    (checked and written in one statement: a run that claims it meanwhile keeps it).

    Returns:
        whether it was written.
    """
    return _mark_failed(conn, _ONLY_IF_PROCESSING_BY_THIS_RUN, video_id, path, error, run)


def video_failed_with(conn: psycopg.Connection, video_id: str, reason_prefix: str) -> bool:
    """Whether ``video_id`` is ``failed`` with a reason starting with ``reason_prefix`` (a kind of failure that
    its writer marks by the reason's first words, e.g. :data:`crowd.jobs.FILE_WENT_AWAY`)."""
    with conn.transaction():
        row = conn.execute(
            "SELECT starts_with(error, %s) FROM videos WHERE id = %s AND status = 'failed'", (reason_prefix, video_id)
        ).fetchone()
    return bool(row and row[0])


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it in a text column: a NUL or a lone surrogate (a reason may quote bytes
    from a file or a message) would fail the statement, and with it what the caller meant to record."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _run_columns(run: RunStamp | None) -> tuple[str | None, datetime | None]:
    return (run.run_id, run.started_at) if run else (None, None)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from crowd.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m crowd.storage", description="crowd results database.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema (idempotent)")
    sub.add_parser("version", help="print the schema version")
    args = parser.parse_args(argv)
    settings = load_settings()
    with connect(settings.postgres_conn_id) as conn:
        if args.command == "migrate":
            try:
                applied = migrate(conn)
            except SchemaTooNewError as exc:
                print(f"python -m crowd.storage migrate: {exc}", file=sys.stderr)
                return 1
            print(f"schema at version {schema_version(conn)}; applied now: {applied or 'none'}")
        else:
            print(schema_version(conn))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
