"""Crowd alerts: episodes where a video shows at least ``threshold`` faces per frame, optionally sustained.

An *episode* is a run of consecutive received frames of one video (ordered by ``frame_id``) whose
``total_faces >= threshold``; it raises an alert when it lasts at least ``min_duration_ms`` of video time
(the latest ``frame_ts_ms`` of its frames minus the earliest; its start and end times are those two). Episodes are
recomputed from the ``frames`` table inside the ingest transaction (only where a batch's frames can change them), so a replayed batch finds the same episodes: one ``alerts`` row per episode, keyed by
``(video_id, started_frame_id)``. The rows follow the frames stored, whatever order they came in (the parts of a
split video arrive interleaved; a re-run replaces frames): an episode seen in pieces keeps the row stored first for
it, moved to the episode's start, the others merged into it; a row whose frames no longer make an episode (frames
that came later split it into runs too short, or a re-run found fewer faces) is deleted.

Consumers of the alerts topic are told every change, so that what they hold ends as the table: a changed row
gets the next ``revision`` and is published again (type ``crowd_alert``: keep the highest revision per
``alert_id``), and a deleted row is withdrawn (type ``crowd_alert_withdrawn``, with the ``alert_id`` it was
``merged_into``, if any; one never published may be withdrawn too: ignore unknown ids).

Messages go to Kafka through an outbox: alert rows and ``alert_withdrawals`` rows with ``published_at IS NULL``
are published after the ingest transaction commits, and marked published only when the broker acknowledged every
one. A crash in between publishes them again on the next drain (at least once: the same ``alert_id`` and
``revision`` twice is one message).

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


#: Frame ids of one video in a batch closer than this are one cluster, with one stretch (see ``_WINDOWS_SQL``).
CLUSTER_GAP = 1000


# SQL condition: the rows of the video ``b.video_id`` were not made under this rule (``alert_rule_applied``).
_ROWS_NOT_UNDER_THIS_RULE_SQL = """NOT EXISTS (SELECT 1 FROM alert_rule_applied r WHERE r.video_id = b.video_id
                       AND r.threshold = %(threshold)s AND r.min_duration_ms = %(min_duration_ms)s)"""

# Whether a batch without a frame at the threshold can change a row: its videos have rows, or rows not made under
# this rule (the rule changed, a new video, frames stored while alerts were off).
_ANY_TO_RECOMPUTE_SQL = f"""
SELECT EXISTS (SELECT 1 FROM alerts WHERE video_id = ANY(%(batch_videos)s::text[]))
    OR EXISTS (SELECT 1 FROM unnest(%(batch_videos)s::text[]) AS b(video_id) WHERE {_ROWS_NOT_UNDER_THIS_RULE_SQL})
"""  # noqa: S608 - fixed fragments of this module, no input

# The rule the recomputed videos' rows now follow.
_RULE_APPLIED_SQL = """
INSERT INTO alert_rule_applied AS r (video_id, threshold, min_duration_ms)
SELECT DISTINCT video_id, %(threshold)s, %(min_duration_ms)s FROM crowd_alert_windows ORDER BY 1
ON CONFLICT (video_id) DO UPDATE SET threshold = EXCLUDED.threshold, min_duration_ms = EXCLUDED.min_duration_ms
WHERE (r.threshold, r.min_duration_ms) IS DISTINCT FROM (EXCLUDED.threshold, EXCLUDED.min_duration_ms)
"""

# Frames stored without the alert rule (alerts off): their videos' rows no longer follow it, the next batch with
# alerts on recomputes them whole.
FORGET_RULE_SQL = "DELETE FROM alert_rule_applied WHERE video_id = ANY(%s::text[])"


# The stretches of each video to recompute. The batch's frames of a video are taken in clusters (ids closer than
# CLUSTER_GAP: the parts of a split video arrive interleaved, far apart); a cluster's stretch runs from the last
# stored frame below the threshold before it to the first one after it (NULL: the video's start or end).
# Episodes are runs of frames at the threshold, so none crosses those frames, which the batch did not change:
# episodes and rows outside the stretches stay as they are (every batch leaves the rows the episodes of the frames
# stored). Overlapping stretches are merged. Only videos with a frame at the threshold in the batch, with alert
# rows, or whose rows were not made under this rule (``alert_rule_applied``: a new video, the threshold or minimum
# duration changed, frames stored while alerts were off) are recomputed, the last ones whole. Before session 20
# every batch recomputed whole videos: a long video or live source with one alert paid a pass over all its frames
# per batch. Bounds are inclusive (first_id, last_id): frame id 2^63-1 is a frame like any other.
_WINDOWS_SQL = f"""
CREATE TEMP TABLE crowd_alert_windows AS
WITH b AS (
    SELECT video_id, lo, hi, {_ROWS_NOT_UNDER_THIS_RULE_SQL} AS whole
    FROM unnest(%(videos)s::text[], %(lows)s::bigint[], %(highs)s::bigint[]) AS b(video_id, lo, hi)
),
w AS (
    SELECT video_id,
           CASE WHEN NOT whole THEN (SELECT max(f.frame_id) FROM frames f WHERE f.video_id = b.video_id
                                     AND f.frame_id < b.lo AND f.total_faces < %(threshold)s) END + 1 AS first_id,
           CASE WHEN NOT whole THEN (SELECT min(f.frame_id) FROM frames f WHERE f.video_id = b.video_id
                                     AND f.frame_id > b.hi AND f.total_faces < %(threshold)s) END - 1 AS last_id
    FROM b
    WHERE whole OR video_id = ANY(%(hot)s::text[]) OR EXISTS (SELECT 1 FROM alerts a WHERE a.video_id = b.video_id)
),
s AS (  -- first_id 0 / last_id 2^63-1: no bound
    SELECT video_id, COALESCE(first_id, 0) AS first_id, COALESCE(last_id, 9223372036854775807) AS last_id FROM w
),
m AS (  -- a stretch starting past every earlier one's end starts an island of overlapping stretches
    SELECT *, CASE WHEN first_id > COALESCE(max(last_id) OVER (PARTITION BY video_id ORDER BY first_id, last_id
                                                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), -1)
                   THEN 1 ELSE 0 END AS starts
    FROM s
),
i AS (
    SELECT *, sum(starts) OVER (PARTITION BY video_id ORDER BY first_id, last_id) AS island FROM m
)
SELECT video_id, island, min(first_id) AS first_id, max(last_id) AS last_id FROM i GROUP BY video_id, island
"""  # noqa: S608 - fixed fragments of this module, no input

_EPISODES_SQL = """
CREATE TEMP TABLE crowd_alert_episodes AS
WITH f AS (  -- an index range scan per stretch: as a plain join (or a LATERAL the planner pulls up: OFFSET 0 keeps
            -- it) the planner merged the whole frames index with the stretches, reading every frame of the table
    SELECT f.video_id, w.island, f.frame_id, f.frame_ts_ms, f.total_faces, f.total_faces >= %(threshold)s AS hot,
           row_number() OVER (PARTITION BY f.video_id, w.island ORDER BY f.frame_id) AS rn
    FROM crowd_alert_windows w
    CROSS JOIN LATERAL (
        SELECT * FROM frames f
        WHERE f.video_id = w.video_id AND f.frame_id BETWEEN w.first_id AND w.last_id
        OFFSET 0
    ) f
),
h AS (
    SELECT video_id, frame_id, frame_ts_ms, total_faces,
           island, rn - row_number() OVER (PARTITION BY video_id, island ORDER BY frame_id) AS grp
    FROM f WHERE hot
)
SELECT video_id,
       min(frame_id) AS started_frame_id, min(frame_ts_ms) AS started_ts_ms,
       max(frame_id) AS ended_frame_id, max(frame_ts_ms) AS ended_ts_ms,
       max(total_faces) AS peak_count,
       (array_agg(frame_id ORDER BY total_faces DESC, frame_id))[1] AS peak_frame_id
FROM h GROUP BY video_id, island, grp
HAVING max(frame_ts_ms) - min(frame_ts_ms) >= %(min_duration_ms)s
"""

# Each stored row in those stretches goes with the first episode it overlaps (the same crowd, seen before in part,
# or before frames split it), or with none. Per episode the oldest row stays (its alert_id is what consumers know).
_MATCH_SQL = """
CREATE TEMP TABLE crowd_alert_matches AS
SELECT a.id, a.video_id, m.episode,
       row_number() OVER (PARTITION BY a.video_id, m.episode ORDER BY a.id) AS k
FROM crowd_alert_windows w
JOIN alerts a ON a.video_id = w.video_id
    AND COALESCE(a.ended_frame_id, a.started_frame_id) >= w.first_id AND a.started_frame_id <= w.last_id
LEFT JOIN LATERAL (
    SELECT e.started_frame_id AS episode FROM crowd_alert_episodes e
    WHERE e.video_id = a.video_id AND e.started_frame_id <= COALESCE(a.ended_frame_id, a.started_frame_id)
      AND e.ended_frame_id >= a.started_frame_id
    ORDER BY e.started_frame_id LIMIT 1
) m ON true
"""

# Rows merged into an older one, and rows whose frames no longer make an episode (a re-run replaced them, or frames
# that arrived later broke the run into pieces too short): gone, so the table holds exactly the episodes. Every one
# is withdrawn through the outbox, published or not: ``published_at`` cannot tell whether consumers have it (a
# change resets it though an earlier revision was sent; a publish that failed after some acknowledgements, or a
# crash before the mark, sent rows it never marked), and a consumer ignores the withdrawal of an alert it never got.
_DROP_SQL = """
WITH gone AS (
    DELETE FROM alerts WHERE id IN (SELECT id FROM crowd_alert_matches WHERE episode IS NULL OR k > 1)
    RETURNING id, video_id
),
told AS (
    INSERT INTO alert_withdrawals (alert_id, video_id, merged_into)
    SELECT g.id, g.video_id, keep.id
    FROM gone g JOIN crowd_alert_matches m USING (id)
    LEFT JOIN crowd_alert_matches keep ON keep.video_id = m.video_id AND keep.episode = m.episode AND keep.k = 1
    ON CONFLICT (alert_id) DO NOTHING
    RETURNING alert_id
)
SELECT count(*) FILTER (WHERE m.episode IS NOT NULL),
       count(*) FILTER (WHERE m.episode IS NULL),
       (SELECT count(*) FROM told)
FROM gone g JOIN crowd_alert_matches m USING (id)
"""

# A row starting inside an episode always matches it, so moving the kept rows to their episode's start cannot collide.
# A change is a new revision, published again.
_UPDATE_SQL = """
UPDATE alerts a SET
    started_frame_id = e.started_frame_id, started_ts_ms = e.started_ts_ms,
    ended_frame_id = e.ended_frame_id, ended_ts_ms = e.ended_ts_ms,
    peak_count = e.peak_count, peak_frame_id = e.peak_frame_id,
    threshold = %(threshold)s, min_duration_ms = %(min_duration_ms)s, updated_at = now(),
    revision = a.revision + 1, published_at = NULL
FROM crowd_alert_matches m JOIN crowd_alert_episodes e ON e.video_id = m.video_id AND e.started_frame_id = m.episode
WHERE a.id = m.id AND m.k = 1
  AND (a.started_frame_id, a.started_ts_ms, a.ended_frame_id, a.ended_ts_ms, a.peak_count, a.peak_frame_id,
       a.threshold, a.min_duration_ms)
      IS DISTINCT FROM (e.started_frame_id, e.started_ts_ms, e.ended_frame_id, e.ended_ts_ms, e.peak_count,
                        e.peak_frame_id, %(threshold)s::int, %(min_duration_ms)s::float8)
"""

_INSERT_SQL = """
INSERT INTO alerts (video_id, started_frame_id, started_ts_ms, ended_frame_id, ended_ts_ms,
                    peak_count, peak_frame_id, threshold, min_duration_ms)
SELECT video_id, started_frame_id, started_ts_ms, ended_frame_id, ended_ts_ms, peak_count, peak_frame_id,
       %(threshold)s, %(min_duration_ms)s
FROM crowd_alert_episodes e
WHERE NOT EXISTS (SELECT 1 FROM crowd_alert_matches m WHERE m.video_id = e.video_id AND m.episode = e.started_frame_id)
ORDER BY video_id, started_frame_id
ON CONFLICT (video_id, started_frame_id) DO NOTHING  -- a concurrent drain of another consumer group stored it
"""


@dataclass(frozen=True)
class AlertChanges:
    """What one batch changed in the ``alerts`` table."""

    new: int = 0  #: episodes seen for the first time (rows inserted)
    updated: int = 0  #: rows whose episode changed (a new revision, published again)
    merged: int = 0  #: rows deleted because an older row's episode turned out to span them
    ended: int = 0  #: rows deleted because their frames no longer make an episode
    withdrawn: int = 0  #: withdrawal messages left pending (one per deleted row)

    @property
    def to_publish(self) -> int:
        """Messages this change left pending in the outbox."""
        return self.new + self.updated + self.withdrawn


def update_alerts(
    conn: psycopg.Connection,
    frame_keys: Collection[tuple[str, int]],
    rule: AlertRule,
    hot_video_ids: Collection[str] = (),
) -> AlertChanges:
    """Make the ``alerts`` rows the episodes the stored frames show, after the batch wrote the frames
    ``frame_keys`` (``(video_id, frame_id)``); run it inside the batch transaction. Only videos in
    ``hot_video_ids`` (a frame at the threshold in the batch), with alert rows, or whose rows were not made under
    ``rule`` are recomputed (frames below the threshold alone cannot make an episode), and of those only the
    stretches the batch's frames can change, unless the rule is new to the video (see ``_WINDOWS_SQL``).

    The result depends on the frames stored, not on the order they came in: rows one episode turned out to span are
    merged into the oldest, a row whose frames no longer make an episode is deleted. Changed rows get the next
    revision and deleted rows a withdrawal, both pending in the outbox for :func:`publish_pending_alerts`.
    """
    clusters: list[tuple[str, int, int]] = []  # (video_id, lo, hi): the batch's frame ids of a video, in clusters
    by_video: dict[str, list[int]] = {}
    for video_id, frame_id in frame_keys:
        by_video.setdefault(video_id, []).append(frame_id)
    for video_id, ids in sorted(by_video.items()):
        ids.sort()
        lo = ids[0]
        for previous, frame_id in zip(ids, ids[1:], strict=False):
            if frame_id - previous > CLUSTER_GAP:
                clusters.append((video_id, lo, previous))
                lo = frame_id
        clusters.append((video_id, lo, ids[-1]))
    params = {
        "threshold": rule.threshold,
        "min_duration_ms": rule.min_duration_ms,
        "videos": [c[0] for c in clusters],
        "lows": [c[1] for c in clusters],
        "highs": [c[2] for c in clusters],
        "hot": sorted(hot_video_ids),
        "batch_videos": sorted(by_video),
    }
    if not hot_video_ids and not (by_video and conn.execute(_ANY_TO_RECOMPUTE_SQL, params).fetchone()[0]):
        return AlertChanges()  # the common batch: nothing that could make or change an episode (no scratch tables)
    with conn.transaction():  # a savepoint inside the batch's transaction: the scratch tables go with an error too
        conn.execute(_WINDOWS_SQL, params)
        conn.execute("ANALYZE crowd_alert_windows")  # its few rows, not 1,070 guessed: the plan, and no JIT compile
        conn.execute(_EPISODES_SQL, params)
        conn.execute(_MATCH_SQL, params)
        merged, ended, withdrawn = conn.execute(_DROP_SQL).fetchone()
        updated = conn.execute(_UPDATE_SQL, params).rowcount
        inserted = conn.execute(_INSERT_SQL, params).rowcount
        conn.execute(_RULE_APPLIED_SQL, params)
        conn.execute("DROP TABLE crowd_alert_windows, crowd_alert_episodes, crowd_alert_matches")
    changes = AlertChanges(int(inserted), int(updated), int(merged), int(ended), int(withdrawn))
    if merged or ended or updated:
        log.info(
            "crowd alerts changed by frames that came late or were replaced: %d updated, %d merged into the episode "
            "they turned out to be part of, %d no longer an episode; %d withdrawal(s) to publish",
            updated,
            merged,
            ended,
            withdrawn,
        )
    return changes


def alert_message(row: dict) -> bytes:
    """JSON value of the alert message published to the alerts topic (key: ``video_id``)."""
    return json.dumps(
        {
            "type": "crowd_alert",
            "schema_version": 2,
            "alert_id": row["id"],
            "revision": row["revision"],
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
            "updated_at": row["updated_at"].isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def withdrawal_message(row: dict) -> bytes:
    """JSON value of the message withdrawing an alert (key: ``video_id``): its frames no longer make an
    episode (``merged_into`` null), or it was merged into the alert ``merged_into``."""
    return json.dumps(
        {
            "type": "crowd_alert_withdrawn",
            "schema_version": 2,
            "alert_id": row["alert_id"],
            "video_id": row["video_id"],
            "merged_into": row["merged_into"],
            "withdrawn_at": row["withdrawn_at"].isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def publish_pending_alerts(
    conn: psycopg.Connection, kafka_conn_id: str, topic: str, *, timeout_s: float = 30, limit: int = 10_000
) -> int:
    """Publish every pending alert revision and withdrawal to ``topic``, then mark them published (outbox pattern).

    The rows are held (``FOR UPDATE SKIP LOCKED``) from the read to the mark: a drain changing one meanwhile waits,
    so its new revision is pending after the mark instead of being marked as sent; rows another publisher holds
    are left to it.

    Raises:
        crowd.kafka.PublishError: a message was not acknowledged; the rows stay pending for the next try.

    Returns:
        the number of messages published.
    """
    from psycopg.rows import dict_row

    from crowd.kafka import DeliveryTracker, reliable_producer

    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        alerts = cur.execute(
            """
            SELECT a.*, v.path FROM alerts a LEFT JOIN videos v ON v.id = a.video_id
            WHERE a.published_at IS NULL ORDER BY a.id LIMIT %s FOR UPDATE OF a SKIP LOCKED
            """,
            (limit,),
        ).fetchall()
        withdrawals = cur.execute(
            """
            SELECT * FROM alert_withdrawals WHERE published_at IS NULL ORDER BY alert_id LIMIT %s
            FOR UPDATE SKIP LOCKED
            """,
            (limit,),
        ).fetchall()
        if not alerts and not withdrawals:
            return 0
        producer = reliable_producer(kafka_conn_id, timeout_s=timeout_s, linger_ms=5)
        try:
            tracker = DeliveryTracker()
            for row in alerts:
                producer.produce(
                    topic, key=row["video_id"].encode(), value=alert_message(row), on_delivery=tracker.callback
                )
            for row in withdrawals:
                producer.produce(
                    topic, key=row["video_id"].encode(), value=withdrawal_message(row), on_delivery=tracker.callback
                )
            tracker.wait(producer, timeout_s=timeout_s)
        finally:  # its threads and connections go now, not when the error that may hold it is dropped
            producer.close()
        cur.execute("UPDATE alerts SET published_at = now() WHERE id = ANY(%s)", ([r["id"] for r in alerts],))
        cur.execute(
            "UPDATE alert_withdrawals SET published_at = now() WHERE alert_id = ANY(%s)",
            ([r["alert_id"] for r in withdrawals],),
        )
    log.info(
        "published %d crowd alert(s) and %d withdrawal(s) to %s",
        len(alerts),
        len(withdrawals),
        topic,
    )
    return len(alerts) + len(withdrawals)
