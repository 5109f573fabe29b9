"""Crowd alerts: episodes where a video shows at least ``threshold`` faces per frame, optionally sustained.

An *episode* is a run of consecutive received frames of one video (ordered by ``frame_id``) whose
``total_faces >= threshold``; it raises an alert when it lasts at least ``min_duration_ms`` of video time
(``frame_ts_ms`` of its last frame minus its first). Episodes are recomputed from the ``frames`` table inside
the ingest transaction, so a replayed batch finds the same episodes: one ``alerts`` row per episode, keyed by
``(video_id, started_frame_id)``. An episode seen in pieces (the parts of a split video arrive interleaved; a re-run
replaces frames) keeps the row stored first for it: moved to the episode's start, the others merged into it.

Alert messages go to Kafka through an outbox: rows with ``published_at IS NULL`` are published after the
ingest transaction commits, and marked published only when the broker acknowledged every one. A crash in
between publishes them again on the next drain (at least once; consumers dedupe on ``alert_id``).

Example:
    >>> from crowd.alerts import AlertRule
    >>> rule = AlertRule(threshold=10, min_duration_s=2.0)
    >>> rule.min_duration_ms
    2000.0
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertRule:
    """When a crowd is a crowd: ``threshold`` faces in a frame, for at least ``min_duration_s`` seconds."""

    threshold: int
    min_duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"alert threshold {self.threshold!r} must be >= 1 face (use None to disable alerts)")
        if self.min_duration_s < 0:
            raise ValueError(f"alert min_duration_s {self.min_duration_s!r} must be >= 0 seconds")

    @property
    def min_duration_ms(self) -> float:
        return float(self.min_duration_s) * 1000.0


_EPISODES_SQL = """
WITH f AS (
    SELECT video_id, frame_id, frame_ts_ms, total_faces, total_faces >= %(threshold)s AS hot,
           row_number() OVER (PARTITION BY video_id ORDER BY frame_id) AS rn
    FROM frames WHERE video_id = ANY(%(videos)s)
),
h AS (
    SELECT video_id, frame_id, frame_ts_ms, total_faces,
           rn - row_number() OVER (PARTITION BY video_id ORDER BY frame_id) AS grp
    FROM f WHERE hot
),
ep AS (
    SELECT video_id,
           min(frame_id) AS started_frame_id, min(frame_ts_ms) AS started_ts_ms,
           max(frame_id) AS ended_frame_id, max(frame_ts_ms) AS ended_ts_ms,
           max(total_faces) AS peak_count,
           (array_agg(frame_id ORDER BY total_faces DESC, frame_id))[1] AS peak_frame_id
    FROM h GROUP BY video_id, grp
    HAVING max(frame_ts_ms) - min(frame_ts_ms) >= %(min_duration_ms)s
),
-- the rows already stored for an episode: those starting within it (the same crowd, seen in part before: the parts
-- of a split video arrive interleaved, so an episode can grow at its front, or join two earlier ones). One is kept
-- (the one starting where the episode does, else the oldest: its alert_id is what consumers know), the others go.
known AS (
    SELECT a.id, e.video_id, e.started_frame_id AS episode,
           row_number() OVER (PARTITION BY e.video_id, e.started_frame_id
                              ORDER BY a.started_frame_id = e.started_frame_id DESC, a.id) AS k
    FROM ep e JOIN alerts a ON a.video_id = e.video_id
                           AND a.started_frame_id BETWEEN e.started_frame_id AND e.ended_frame_id
),
merged AS (
    DELETE FROM alerts WHERE id IN (SELECT id FROM known WHERE k > 1) RETURNING id
),
updated AS (
    UPDATE alerts a SET
        started_frame_id = e.started_frame_id, started_ts_ms = e.started_ts_ms,
        ended_frame_id = e.ended_frame_id, ended_ts_ms = e.ended_ts_ms,
        peak_count = e.peak_count, peak_frame_id = e.peak_frame_id,
        threshold = %(threshold)s, min_duration_ms = %(min_duration_ms)s, updated_at = now()
    FROM known m JOIN ep e ON e.video_id = m.video_id AND e.started_frame_id = m.episode
    WHERE a.id = m.id AND m.k = 1
      AND (a.started_frame_id, a.ended_frame_id, a.peak_count, a.peak_frame_id, a.threshold, a.min_duration_ms)
          IS DISTINCT FROM (e.started_frame_id, e.ended_frame_id, e.peak_count, e.peak_frame_id,
                            %(threshold)s::int, %(min_duration_ms)s::float8)
    RETURNING a.id
),
inserted AS (
    INSERT INTO alerts (video_id, started_frame_id, started_ts_ms, ended_frame_id, ended_ts_ms,
                        peak_count, peak_frame_id, threshold, min_duration_ms)
    SELECT video_id, started_frame_id, started_ts_ms, ended_frame_id, ended_ts_ms, peak_count, peak_frame_id,
           %(threshold)s, %(min_duration_ms)s
    FROM ep e
    WHERE NOT EXISTS (SELECT 1 FROM known m WHERE m.video_id = e.video_id AND m.episode = e.started_frame_id)
    ON CONFLICT (video_id, started_frame_id) DO NOTHING
    RETURNING id
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM merged)
"""


def update_alerts(conn: psycopg.Connection, video_ids: Collection[str], rule: AlertRule) -> int:
    """Recompute the episodes of ``video_ids`` from ``frames`` and upsert them; run it inside the batch transaction.

    Returns:
        the number of new episodes (alert rows inserted).
    """
    if not video_ids:
        return 0
    inserted, merged = conn.execute(
        _EPISODES_SQL,
        {"threshold": rule.threshold, "min_duration_ms": rule.min_duration_ms, "videos": list(video_ids)},
    ).fetchone()
    if merged:
        log.info(
            "%d crowd alert(s) merged into the episode they turned out to be part of (frames arrived late)", merged
        )
    return int(inserted)


def alert_message(row: dict) -> bytes:
    """JSON value of the alert message published to the alerts topic (key: ``video_id``)."""
    return json.dumps(
        {
            "type": "crowd_alert",
            "schema_version": 1,
            "alert_id": row["id"],
            "video_id": row["video_id"],
            "path": row.get("path"),
            "started_frame_id": row["started_frame_id"],
            "started_ts_ms": row["started_ts_ms"],
            "ended_frame_id": row["ended_frame_id"],
            "ended_ts_ms": row["ended_ts_ms"],
            "peak_count": row["peak_count"],
            "peak_frame_id": row["peak_frame_id"],
            "threshold": row["threshold"],
            "min_duration_ms": row["min_duration_ms"],
            "created_at": row["created_at"].isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def publish_pending_alerts(
    conn: psycopg.Connection, kafka_conn_id: str, topic: str, *, timeout_s: float = 30, limit: int = 10_000
) -> int:
    """Publish every unpublished alert row to ``topic``, then mark them published (outbox pattern).

    Raises:
        crowd.kafka.PublishError: a message was not acknowledged; the rows stay unpublished for the next try.

    Returns:
        the number of alerts published.
    """
    from psycopg.rows import dict_row

    from crowd.kafka import DeliveryTracker, reliable_producer

    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            """
            SELECT a.*, v.path FROM alerts a LEFT JOIN videos v ON v.id = a.video_id
            WHERE a.published_at IS NULL ORDER BY a.id LIMIT %s
            """,
            (limit,),
        ).fetchall()
    if not rows:
        return 0
    producer = reliable_producer(kafka_conn_id, timeout_s=timeout_s, linger_ms=5)
    try:
        tracker = DeliveryTracker()
        for row in rows:
            producer.produce(
                topic, key=row["video_id"].encode(), value=alert_message(row), on_delivery=tracker.callback
            )
        tracker.wait(producer, timeout_s=timeout_s)
    finally:  # its threads and connections go now, not when the error that may hold it is dropped
        producer.close()
    with conn.transaction():
        conn.execute("UPDATE alerts SET published_at = now() WHERE id = ANY(%s)", ([r["id"] for r in rows],))
    log.info("published %d crowd alert(s) to %s", len(rows), topic)
    return len(rows)
