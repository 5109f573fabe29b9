"""Drain the ``Faces`` topic into PostgreSQL: no message lost, none stored twice.

How:

* The consumer never commits on its own. The truth about "how far did we get" is the ``kafka_offsets`` table:
  on start the drain reads the stored next offset of every partition of the topic for its consumer group and
  ``assign()``s the partitions there (partitions never seen: from the beginning).
* Messages are consumed in batches. Every message is validated (:class:`crowd.messages.FaceMessage`); a bad one
  becomes a ``rejected_messages`` row (reason and raw bytes), a good one a ``frames`` row and its ``faces``.
* One transaction per batch: COPY into temp staging tables, ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``
  into ``frames``, faces replaced for the batch's frames, rejections, crowd alert episodes and the consumed
  offsets (last offset + 1 per partition). Rows and offsets commit together or not at all, so a crash
  anywhere replays at most the uncommitted batch, and replays overwrite the same keys.
* After the commit the offsets are also committed to Kafka (for lag monitoring only) and pending crowd alerts
  are published (outbox, see :mod:`crowd.alerts`).
* A session advisory lock per (group, topic) keeps two drains of the same group from running at once; each batch
  first takes a transaction lock per video it writes, in one order, so drains of other groups or topics writing the
  same videos wait for each other instead of deadlocking in the per-video statistics triggers.

Example:
    >>> from crowd.ingest import drain
    >>> summary = drain("kafka_default", "crowd_postgres", "Faces", "crowd-ingest", max_seconds=60)
    >>> summary.lag_left
    0
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from crowd import storage
from crowd.alerts import FORGET_RULE_SQL, AlertChanges, AlertRule, publish_pending_alerts, update_alerts
from crowd.messages import INT4_MAX, FaceMessage, MessageError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH_BYTES = 64 * 1024 * 1024  # per transaction: a batch of large messages ends here, whatever its count
DEFAULT_GROUP_ID = "crowd-ingest"

FRAME_COLUMNS = (
    "video_id",
    "frame_id",
    "frame_ts_ms",
    "total_faces",
    "model",
    "frame_width",
    "frame_height",
    "source",
    "kafka_partition",
    "kafka_offset",
)
FRAME_TYPES = ("text", "int8", "float8", "int4", "text", "int4", "int4", "text", "int4", "int8")
FACE_COLUMNS = ("video_id", "frame_id", "face_id", "x", "y", "width", "height", "confidence")
FACE_TYPES = ("text", "int8", "int4", "int4", "int4", "int4", "int4", "float4")

_STAGING_SQL = f"""
CREATE TEMP TABLE IF NOT EXISTS crowd_stage_frames (
    {", ".join(f"{c} {t}" for c, t in zip(FRAME_COLUMNS, FRAME_TYPES, strict=True))}
) ON COMMIT DELETE ROWS;
"""
_UPSERT_FRAMES_SQL = """
INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source,
                    kafka_partition, kafka_offset)
SELECT video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source,
       kafka_partition, kafka_offset
FROM crowd_stage_frames
ON CONFLICT (video_id, frame_id) DO UPDATE SET
    frame_ts_ms = EXCLUDED.frame_ts_ms, total_faces = EXCLUDED.total_faces, model = EXCLUDED.model,
    frame_width = EXCLUDED.frame_width, frame_height = EXCLUDED.frame_height, source = EXCLUDED.source,
    kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset, ingested_at = now()
"""
_DELETE_FACES_SQL = """
DELETE FROM faces f USING crowd_stage_frames s WHERE f.video_id = s.video_id AND f.frame_id = s.frame_id
"""
# keyed by the topic's id too: the rejected row is the only copy of a bad message once its topic is gone, and a
# topic made again under the same name starts its offsets over
_REJECT_SQL = """
INSERT INTO rejected_messages (topic, partition, "offset", key, raw, reason, topic_id, consumer_group)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (topic, partition, "offset", (coalesce(topic_id, ''))) DO UPDATE SET
    key = EXCLUDED.key, raw = EXCLUDED.raw, reason = EXCLUDED.reason, rejected_at = now(),
    consumer_group = EXCLUDED.consumer_group
"""
_STORE_OFFSET_SQL = """
INSERT INTO kafka_offsets (consumer_group, topic, partition, next_offset, topic_id) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET
    next_offset = EXCLUDED.next_offset, topic_id = coalesce(EXCLUDED.topic_id, kafka_offsets.topic_id), updated_at = now()
"""


# Each video's lock key is its id's hash, taken in the order of the keys, not of the ids: two ids whose hashes
# collide share a lock, and in id order two drains could take the same two keys in opposite orders (a deadlock).
_LOCK_VIDEOS_SQL = """
SELECT pg_advisory_xact_lock(hashtext('crowd.video:' || current_schema()), k)
FROM (SELECT DISTINCT hashtext(v) AS k FROM unnest(%s::text[]) AS t (v)) keys ORDER BY k
"""

# One drain per (schema, group, topic); a topic name cannot contain ":", so "group:topic" names one pair only.
DRAIN_LOCK_KEY_SQL = "hashtext(current_schema()), hashtext(%s || ':' || %s)"  # parameters: group id, topic


class IngestError(RuntimeError):
    """The drain cannot run (missing topic, unreachable broker); the message says what to fix."""


class MessagesLostError(IngestError):
    """Messages were deleted from the broker before they were stored: recorded, and past; no retry brings them
    back (a retry finds nothing lost and succeeds, which would end the run green)."""


class Rejected(ValueError):
    """A message that cannot be stored; ``reason`` starts with a short code (``not_json: ...``)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = storage.storable_text(f"{code}: {detail}")[:2000]


@dataclass
class DrainSummary:
    """What one :func:`drain` call did."""

    topic: str
    group_id: str
    topic_id: str | None = None
    messages: int = 0
    frames: int = 0
    faces: int = 0
    rejected: int = 0
    duplicates_in_batch: int = 0
    batches: int = 0
    new_alerts: int = 0
    alerts_changed: int = 0  # rows updated, merged or ended by frames that came late or were replaced
    alerts_published: int = 0  # messages: new and changed alerts, withdrawals
    lag_left: int = 0
    lag_known: bool = True  # False: the watermarks of a partition could not be read at the end
    alerts_error: str | None = None
    seconds: float = 0.0
    stopped_because: str = ""
    next_offsets: dict[int, int] = field(default_factory=dict)
    unreadable: dict[int, str] = field(default_factory=dict)  # partition -> where and why it cannot be read
    lost: int = 0  # messages deleted from the broker (retention, delete-records) before they were stored
    rejected_by_code: dict[str, int] = field(default_factory=dict)  # e.g. {"not_json": 3}
    rejected_example: dict[str, str] = field(default_factory=dict)  # code -> where and why, of its first rejection

    def count_rejected(self, rejected: list[tuple]) -> None:
        """Add a batch's ``rejected_messages`` rows to the counts, by code, with a first example of each."""
        self.rejected += len(rejected)
        for _, partition, offset, _, _, reason, _ in rejected:
            code = reason.split(":", 1)[0]
            self.rejected_by_code[code] = self.rejected_by_code.get(code, 0) + 1
            self.rejected_example.setdefault(code, f"partition {partition} offset {offset}: {reason[:300]}")

    @property
    def rows_per_s(self) -> float:
        """Frames + faces + rejections stored per second of wall time."""
        return (self.frames + self.faces + self.rejected) / self.seconds if self.seconds > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-able, string partition keys) for XCom and logs."""
        data = asdict(self)
        data["next_offsets"] = {str(k): v for k, v in self.next_offsets.items()}
        data["rows_per_s"] = round(self.rows_per_s, 1)
        data["messages_per_s"] = round(self.messages_per_s, 1)
        return data


# --- validation -----------------------------------------------------------------------------------------------


def _check_text(name: str, value: str) -> None:
    if "\x00" in value:
        raise Rejected("schema", f"{name} contains a NUL character, which PostgreSQL text cannot store")


def validate(value: bytes | None) -> FaceMessage:
    """Parse one Kafka message value into a :class:`FaceMessage`, or raise :class:`Rejected` saying why.

    Codes: ``tombstone`` (null value), ``oversize`` (> 1 MiB), ``not_utf8``, ``not_json``, ``schema`` (missing,
    extra or mistyped fields, inconsistent counts, boxes outside the frame), ``out_of_range`` (numbers the
    database columns cannot hold). The drain also checks the key (:func:`check_key`, code ``wrong_key``).
    """
    if value is None:
        raise Rejected("tombstone", "null message value")
    if len(value) > MAX_MESSAGE_BYTES:
        raise Rejected("oversize", f"{len(value)} bytes > {MAX_MESSAGE_BYTES} bytes")
    try:
        msg = FaceMessage.from_json(value)
    except MessageError as exc:
        raise Rejected(exc.code, exc.problem) from None
    for name in ("total_faces", "frame_width", "frame_height"):  # boxes lie inside the frame, so they fit too
        if getattr(msg, name) > INT4_MAX:
            raise Rejected("out_of_range", f"{name} {getattr(msg, name)} > {INT4_MAX}")
    _check_text("video_id", msg.video_id)
    _check_text("source", msg.source)
    _check_text("model", msg.model)
    return msg


def check_key(key: bytes | None, video_id: str) -> None:
    """Raise :class:`Rejected` (``wrong_key``) unless a message's Kafka key is its ``video_id``.

    The key is what keeps a video's frames in one partition, in the order they were published: two versions of a
    frame sent under other keys (or none) can land in two partitions, and the one stored would be the one fetched
    last, not the one published last.
    """
    if key != video_id.encode():
        shown = "no key" if key is None else f"key {key[:140]!r}"
        raise Rejected("wrong_key", f"{shown}, but a Faces message's key must be its video_id {video_id!r}")


# --- one batch ------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Rows of one batch, deduplicated by frame key (last message wins), and the offsets it consumed."""

    topic: str
    topic_id: str | None = None
    frames: dict[tuple[str, int], tuple[tuple, list[tuple]]] = field(default_factory=dict)
    rejected: list[tuple] = field(default_factory=list)
    next_offsets: dict[int, int] = field(default_factory=dict)
    messages: int = 0
    bytes: int = 0  # of the message values and keys taken in: what the batch holds, roughly
    duplicates: int = 0
    hot_videos: set[str] = field(default_factory=set)

    def add(self, message: Message, alert_threshold: int | None = None) -> None:
        """Validate ``message`` and add it as a frame or a rejection; record its offset either way."""
        partition, offset = message.partition(), message.offset()
        self.messages += 1
        previous = self.next_offsets.get(partition, 0)
        self.next_offsets[partition] = max(previous, offset + 1)
        value = message.value()
        self.bytes += len(value or b"") + len(message.key() or b"")
        try:
            msg = validate(value)
            check_key(message.key(), msg.video_id)
        except Rejected as exc:
            self.rejected.append((self.topic, partition, offset, message.key(), value, exc.reason, self.topic_id))
            return
        vid, fid = msg.video_id, msg.frame_id
        frame = (
            vid,
            fid,
            msg.frame_ts_ms,
            msg.total_faces,
            msg.model,
            msg.frame_width,
            msg.frame_height,
            msg.source,
            partition,
            offset,
        )
        faces = []
        for f in msg.faces:
            b = f.bounding_box
            faces.append((vid, fid, f.face_id, b.x, b.y, b.width, b.height, f.confidence))
        key = (vid, fid)
        if key in self.frames:
            self.duplicates += 1
        self.frames[key] = (frame, faces)
        if alert_threshold is not None and msg.total_faces >= alert_threshold:
            self.hot_videos.add(vid)


def _copy(cur: psycopg.Cursor, table: str, columns: tuple[str, ...], types: tuple[str, ...], rows: Iterable) -> None:
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)


def write_batch(
    conn: psycopg.Connection, batch: Batch, group_id: str, alert_rule: AlertRule | None = None
) -> tuple[int, int, AlertChanges]:
    """Store ``batch`` and its offsets in one transaction.

    Returns:
        (frames stored, faces stored, what the batch changed in the alerts).
    """
    n_faces = 0
    alerts = AlertChanges()
    with conn.transaction(), conn.cursor() as cur:
        if batch.frames:
            # drains of other groups or topics may write the same videos: each takes its videos' locks first, in
            # one order (the statistics triggers would lock them in two runs on a replay: a deadlock)
            cur.execute(_LOCK_VIDEOS_SQL, (list({vid for vid, _ in batch.frames}),))
            frame_rows = [f for f, _ in batch.frames.values()]
            face_rows = [row for _, faces in batch.frames.values() for row in faces]
            n_faces = len(face_rows)
            try:  # fast path, when every frame is new: plain COPY, inside a savepoint
                with conn.transaction():
                    _copy(cur, "frames", FRAME_COLUMNS, FRAME_TYPES, frame_rows)
                    if face_rows:
                        _copy(cur, "faces", FACE_COLUMNS, FACE_TYPES, face_rows)
            except psycopg.errors.UniqueViolation:  # a replay: upsert through staging, replace the faces
                _copy(cur, "crowd_stage_frames", FRAME_COLUMNS, FRAME_TYPES, frame_rows)
                cur.execute(_UPSERT_FRAMES_SQL)
                cur.execute(_DELETE_FACES_SQL)
                if face_rows:  # the batch is deduplicated and its frames' old faces are gone
                    _copy(cur, "faces", FACE_COLUMNS, FACE_TYPES, face_rows)
        if batch.rejected:
            cur.executemany(_REJECT_SQL, [(*row, group_id) for row in batch.rejected])
        cur.executemany(
            _STORE_OFFSET_SQL,
            [(group_id, batch.topic, p, o, batch.topic_id) for p, o in sorted(batch.next_offsets.items())],
        )
        if alert_rule is not None:
            alerts = update_alerts(conn, batch.frames.keys(), alert_rule, batch.hot_videos)
        elif batch.frames:  # stored without the rule: a later batch with alerts on recomputes these videos whole
            cur.execute(FORGET_RULE_SQL, (sorted({vid for vid, _ in batch.frames}),))
    return len(batch.frames), n_faces, alerts


# --- the drain ------------------------------------------------------------------------------------------------


def _publish_alerts(conn: psycopg.Connection, kafka_conn_id: str, topic: str, summary: DrainSummary) -> None:
    """Publish pending alerts; a failure is kept in the summary, not raised: the frames go on being stored and
    the alert rows stay pending (:func:`drain_task` fails the task at the end so that the retry publishes them).
    After a failure this drain tries no more (each try may wait out the publish timeout)."""
    if summary.alerts_error:
        return
    try:
        summary.alerts_published += publish_pending_alerts(conn, kafka_conn_id, topic)
    except Exception as exc:  # noqa: BLE001 - PublishError, KafkaException: either way the rows stay pending
        summary.alerts_error = f"{type(exc).__name__}: {exc}"
        log.error("crowd alerts not published to %s (%s); draining goes on, they stay pending", topic, exc)


def lost_ranges_since(conn: psycopg.Connection, topic: str, since: datetime, group_id: str) -> int:
    """How many ranges of ``topic`` the drains of ``group_id`` recorded lost (``rejected_messages`` rows
    ``lost: ...``) since ``since``. Another group's losses are its own: a group started on a topic whose log start
    has moved on records the deleted start as lost, which this group may have stored long ago."""
    row = conn.execute(
        "SELECT count(*) FROM rejected_messages WHERE topic = %s AND reason LIKE 'lost:%%' AND rejected_at >= %s"
        " AND consumer_group = %s",
        (topic, since, group_id),
    ).fetchone()
    return int(row[0])


def stored_offsets(conn: psycopg.Connection, group_id: str, topic: str, topic_id: str | None = None) -> dict[int, int]:
    """Next offset to read per partition, as stored by the last committed batch.

    With ``topic_id``, offsets stored for another topic of the same name (deleted and made again) are deleted
    first: they would skip as many messages of the new topic. Offsets stored without an id (it could not be read)
    are taken as this topic's and get its id, so that they are checked from then on.
    """
    with conn.transaction():
        if topic_id is not None:
            stale = conn.execute(
                "DELETE FROM kafka_offsets WHERE consumer_group = %s AND topic = %s AND topic_id <> %s "
                "RETURNING partition, next_offset, topic_id",
                (group_id, topic, topic_id),
            ).fetchall()
            if stale:
                log.warning(
                    "topic %s was made again (id %s, offsets stored for id %s): reading it from its start, not "
                    "from the old offsets %s",
                    topic, topic_id, stale[0][2], {int(p): int(o) for p, o, _ in stale},
                )  # fmt: skip
            unchecked = conn.execute(
                "UPDATE kafka_offsets SET topic_id = %s WHERE consumer_group = %s AND topic = %s AND topic_id IS NULL "
                "RETURNING partition",
                (topic_id, group_id, topic),
            ).fetchall()
            if unchecked:  # stored when the id could not be read: trusted this once, checked from now on
                log.warning(
                    "offsets of topic %s partition(s) %s were stored without the topic's id: taken as offsets of "
                    "topic id %s",
                    topic, sorted(p for (p,) in unchecked), topic_id,
                )  # fmt: skip
        rows = conn.execute(
            "SELECT partition, next_offset FROM kafka_offsets WHERE consumer_group = %s AND topic = %s",
            (group_id, topic),
        ).fetchall()
    return {int(p): int(o) for p, o in rows}


def _partitions(consumer: Consumer, topic: str, timeout_s: float = 15) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
    except Exception as exc:  # KafkaException: broker unreachable
        raise IngestError(f"cannot list topic {topic!r}: {exc}; is the broker in the Kafka connection up?") from exc
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        err = info.error if info is not None else "not in metadata"
        raise IngestError(f"topic {topic!r} is not available ({err}); create it or fix CROWD_FACES_TOPIC")
    return sorted(info.partitions)


def _lag(consumer: Consumer, topic: str, next_offsets: dict[int, int], partitions: list[int]) -> tuple[int, bool]:
    """Messages left after ``next_offsets``, and whether every partition's watermarks could be read."""
    lag, known = 0, True
    for p in partitions:
        try:  # the fetch responses of this drain carry the watermarks; ask the broker only when they are unknown
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            if low < 0 or high < 0:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
        except Exception:  # noqa: BLE001 - KafkaException: the broker is gone
            log.warning("could not read watermarks of %s[%d]", topic, p, exc_info=True)
            known = False
            continue
        lag += max(0, high - max(next_offsets.get(p, low), low))
    return lag, known


def drain(
    kafka_conn_id: str,
    postgres_conn_id: str,
    topic: str,
    group_id: str = DEFAULT_GROUP_ID,
    *,
    batch_size: int = 2000,
    max_batches: int | None = None,
    max_seconds: float | None = 600.0,
    idle_timeout_s: float = 10.0,
    linger_s: float = 0.0,
    batch_wait_s: float = 1.0,
    max_batch_bytes: int = MAX_BATCH_BYTES,
    alert_rule: AlertRule | None = None,
    alerts_topic: str | None = None,
    commit_to_kafka: bool = True,
    log_every_s: float = 5.0,
) -> DrainSummary:
    """Move every message of ``topic`` past the stored offsets of ``group_id`` into PostgreSQL.

    Stops when caught up (end of every partition) and no message came for ``linger_s``, after ``idle_timeout_s``
    without messages, after ``max_batches`` batches or ``max_seconds`` (the next run continues where this one
    stopped). ``linger_s`` > 0 keeps a caught-up drain reading a stream that trickles in, so one run (one DAG run)
    stores a whole burst of detection output instead of one run per message.

    Args:
        kafka_conn_id: Airflow Kafka connection (its ``group.id`` is overridden by ``group_id``).
        postgres_conn_id: Airflow Postgres connection; the schema is migrated first.
        topic: the Faces topic.
        group_id: consumer group: the key of the stored offsets (and of the lag-only Kafka commits).
        batch_size: messages per transaction.
        max_batch_bytes: a batch also ends once its messages hold this many bytes (large messages, many faces:
            memory stays bounded whatever ``batch_size`` says).
        linger_s: once caught up, go on reading until no message came for this long (0: stop at once).
        alert_rule: crowd alert rule, or None for no alerts.
        alerts_topic: where alert messages go (None: stored only, not published).
        commit_to_kafka: also commit offsets to Kafka after each DB commit, for lag monitoring.

    Raises:
        IngestError: the topic does not exist or the broker is unreachable; or, at the end of the drain (the other
            partitions' messages stored), a partition cannot be read past a damaged record batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    from crowd.kafka import manual_commit_consumer, topic_id

    started = time.monotonic()
    summary = DrainSummary(topic=topic, group_id=group_id)
    with storage.connect(postgres_conn_id) as conn:
        storage.migrate(conn)
        with conn.transaction():
            locked = conn.execute(f"SELECT pg_try_advisory_lock({DRAIN_LOCK_KEY_SQL})", (group_id, topic)).fetchone()[0]
        if not locked:
            log.warning("another drain of %s for group %s is running; nothing to do", topic, group_id)
            summary.stopped_because = "another drain is running"
            return summary
        try:
            conn.execute(_STAGING_SQL)
            conn.commit()
            if alert_rule is not None and alerts_topic:
                _publish_alerts(conn, kafka_conn_id, alerts_topic, summary)

            consumer = manual_commit_consumer(kafka_conn_id, group_id=group_id, fetch_wait_max_ms=100)
            try:
                partitions = _partitions(consumer, topic)
                summary.topic_id = topic_id(kafka_conn_id, topic)
                offsets = stored_offsets(conn, group_id, topic, summary.topic_id)
                consumer.assign([TopicPartition(topic, p, offsets.get(p, OFFSET_BEGINNING)) for p in partitions])
                log.info(
                    "draining %s (%d partitions) for group %s from stored offsets %s",
                    topic,
                    len(partitions),
                    group_id,
                    {p: offsets.get(p, "beginning") for p in partitions},
                )
                summary.next_offsets = dict(offsets)
                # a partition never stored expects offset 0: a log starting past it lost its first messages
                _record_deleted_ranges(consumer, conn, summary, {p: offsets.get(p, 0) for p in partitions})
                _run(
                    consumer,
                    conn,
                    summary,
                    partitions,
                    batch_size=batch_size,
                    max_batches=max_batches,
                    deadline=None if max_seconds is None else started + max_seconds,
                    idle_timeout_s=idle_timeout_s,
                    linger_s=linger_s,
                    batch_wait_s=batch_wait_s,
                    max_batch_bytes=max_batch_bytes,
                    alert_rule=alert_rule,
                    alerts_topic=alerts_topic,
                    kafka_conn_id=kafka_conn_id,
                    commit_to_kafka=commit_to_kafka,
                    log_every_s=log_every_s,
                    started=started,
                )
                summary.lag_left, summary.lag_known = _lag(consumer, topic, summary.next_offsets, partitions)
            finally:
                consumer.close()
        finally:
            _release_drain_lock(conn, group_id, topic)
    summary.seconds = time.monotonic() - started
    log.info(
        "drain of %s done (%s): %d messages, %d frames, %d faces, %d rejected, %d batches, %d new alerts, "
        "%d alerts changed, %d alert messages published, lag left %s, %.0f rows/s, %.1f s",
        topic,
        summary.stopped_because,
        summary.messages,
        summary.frames,
        summary.faces,
        summary.rejected,
        summary.batches,
        summary.new_alerts,
        summary.alerts_changed,
        summary.alerts_published,
        summary.lag_left if summary.lag_known else f"unknown (at least {summary.lag_left}: the broker did not answer)",
        summary.rows_per_s,
        summary.seconds,
    )
    if summary.rejected:  # a producer sending a broken format must not leave the runs green without a word
        log.warning(
            "%d message(s) rejected (of %d read): not stored as frames, kept with their raw bytes and reason in the "
            "rejected_messages table (topic %r); by kind: %s",
            summary.rejected, summary.messages, topic,
            "; ".join(
                f"{code} x{n}, first at {summary.rejected_example[code]}"
                for code, n in sorted(summary.rejected_by_code.items(), key=lambda kv: -kv[1])
            ),
        )  # fmt: skip
    if summary.unreadable:
        raise IngestError(
            f"{topic}: {'; '.join(summary.unreadable[p] for p in sorted(summary.unreadable))}. The record batch "
            f"there is damaged on the broker (or compressed with a codec this client lacks); the drain stored "
            f"everything else ({summary.messages} messages) and holds those partitions back from that offset, "
            "nothing skipped. Restore the partition from a replica, or give its messages up knowingly by deleting "
            "the records up to the next readable batch (kafka-delete-records.sh); the next drain goes on from there"
        )
    return summary


def _release_drain_lock(conn: psycopg.Connection, group_id: str, topic: str) -> None:
    """Release the drain's session lock before the connection closes.

    Closing a connection does not wait for the server to end the session, and the lock lives until it does: the
    next drain started at once (a retry, the next run) found it still held and failed "another drain holds its
    lock". An unlock takes effect at once whatever becomes of its transaction, so pending work is left to the
    connection's exit (committed after success, rolled back after an error). A broken connection's session ends
    on the server anyway, so a failure here is only logged.
    """
    try:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()  # the failed transaction is rolled back at exit anyway
        conn.execute(f"SELECT pg_advisory_unlock({DRAIN_LOCK_KEY_SQL})", (group_id, topic))
    except psycopg.Error as error:
        log.info("drain lock of %s for group %s left to the session's end (%s)", topic, group_id, error)


def _run(
    consumer: Consumer,
    conn: psycopg.Connection,
    summary: DrainSummary,
    partitions: list[int],
    *,
    batch_size: int,
    max_batches: int | None,
    deadline: float | None,
    idle_timeout_s: float,
    linger_s: float,
    batch_wait_s: float,
    max_batch_bytes: int,
    alert_rule: AlertRule | None,
    alerts_topic: str | None,
    kafka_conn_id: str,
    commit_to_kafka: bool,
    log_every_s: float,
    started: float,
) -> None:
    topic = summary.topic
    at_end: set[int] = set()
    threshold = alert_rule.threshold if alert_rule is not None else None
    last_log = time.monotonic()
    idle_since = time.monotonic()
    carried: list[Message] = []  # fetched, not yet in a batch: the last one reached its byte budget

    def idle_limit() -> float:
        # idle_timeout_s is for a broker that gives nothing; caught up (every partition reported its end), the
        # drain waits linger_s for more (cut at idle_timeout_s, a trickling stream got a run every 10 s)
        return max(idle_timeout_s, linger_s) if len(at_end) == len(partitions) else idle_timeout_s

    while True:
        if max_batches is not None and summary.batches >= max_batches:
            summary.stopped_because = f"max_batches={max_batches}"
            return
        if deadline is not None and time.monotonic() >= deadline:
            summary.stopped_because = "max_seconds"
            return
        batch = Batch(topic=topic, topic_id=summary.topic_id)
        fill_until = time.monotonic() + batch_wait_s
        while batch.messages < batch_size and batch.bytes < max_batch_bytes:
            # consume() blocks until it has num_messages or the timeout passes, even when every partition
            # already reported its end: short slices let the end-of-partition check stop the batch at once
            wait = min(0.05, max(0.01, fill_until - time.monotonic())) if batch.messages else 0.05
            fetched = carried or consumer.consume(num_messages=batch_size - batch.messages, timeout=wait)
            carried = []
            for i, message in enumerate(fetched):
                if batch.messages >= batch_size or batch.bytes >= max_batch_bytes:
                    carried = fetched[i:]  # the next batch starts with them (no offset of theirs is stored yet)
                    break
                err = message.error()
                if err is None:
                    at_end.discard(message.partition())
                    # a partition never stored expects offset 0 (its log start could not be read before reading)
                    expected = batch.next_offsets.get(
                        message.partition(), summary.next_offsets.get(message.partition(), 0)
                    )
                    if message.offset() > expected:
                        _note_gap(consumer, summary, batch, message.partition(), expected, message.offset())
                    batch.add(message, threshold)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                elif err.fatal() or err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
                    raise IngestError(f"Kafka error while consuming {topic!r}: {err.str()}")
                elif err.code() in _UNREADABLE and message.offset() >= 0:
                    _hold_back(consumer, summary, message)
                    at_end.add(message.partition())  # nothing more comes from it in this drain
                else:
                    log.warning("Kafka reports %s while consuming %s; retrying", err.str(), topic)
            if len(at_end) == len(partitions) and not carried:
                break
            if batch.messages and time.monotonic() >= fill_until:
                break
            if not batch.messages and time.monotonic() - idle_since >= idle_limit():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if batch.messages:
            frames, faces, alerts = write_batch(conn, batch, summary.group_id, alert_rule)
            summary.batches += 1
            summary.messages += batch.messages
            summary.frames += frames
            summary.faces += faces
            summary.count_rejected(batch.rejected)
            summary.duplicates_in_batch += batch.duplicates
            summary.new_alerts += alerts.new
            summary.alerts_changed += alerts.updated + alerts.merged + alerts.ended
            summary.next_offsets.update(batch.next_offsets)
            idle_since = time.monotonic()
            if commit_to_kafka:
                _commit_to_kafka(consumer, topic, batch.next_offsets)
            if alerts.to_publish and alerts_topic:
                _publish_alerts(conn, kafka_conn_id, alerts_topic, summary)
        now = time.monotonic()
        if now - last_log >= log_every_s:
            last_log = now
            elapsed = now - started
            log.info(
                "progress %s: %d messages, %d frames, %d faces, %d rejected in %d batches; %.0f msg/s, %.0f rows/s",
                topic,
                summary.messages,
                summary.frames,
                summary.faces,
                summary.rejected,
                summary.batches,
                summary.messages / elapsed if elapsed else 0.0,
                (summary.frames + summary.faces + summary.rejected) / elapsed if elapsed else 0.0,
            )
        if len(at_end) == len(partitions) and not carried and time.monotonic() - idle_since >= linger_s:
            summary.stopped_because = "caught up" if not linger_s else f"caught up, nothing new for {linger_s:g} s"
            return
        if not batch.messages and time.monotonic() - idle_since >= (idle_for := idle_limit()):
            summary.stopped_because = f"idle for {idle_for:g} s"
            return


# Errors about the data at an offset (a record batch the client cannot decompress or parse): librdkafka fetches
# the same offset again and again, so the partition is stuck there until the batch is repaired or deleted.
_UNREADABLE = (KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG, KafkaError._NOT_IMPLEMENTED)


def _hold_back(consumer: Consumer, summary: DrainSummary, message: Message) -> None:
    """Pause a partition stuck on data it cannot read: the others go on; :func:`drain` fails at its end."""
    partition, offset = message.partition(), message.offset()
    if partition in summary.unreadable:
        return
    summary.unreadable[partition] = f"partition {partition} at offset {offset}: {message.error().str()}"
    consumer.pause([TopicPartition(summary.topic, partition)])
    log.error(
        "%s partition %d cannot be read at offset %d (%s): the record batch there is damaged or in a format this "
        "client cannot read. Its messages from that offset on are held back (none skipped); the other partitions "
        "go on", summary.topic, partition, offset, message.error().str(),
    )  # fmt: skip


def _record_deleted_ranges(
    consumer: Consumer, conn: psycopg.Connection, summary: DrainSummary, offsets: dict[int, int]
) -> None:
    """Before reading: a partition whose log now starts past its stored offset (0 when none is stored yet) lost
    what lay between (retention, delete-records), even when nothing newer was written after it (no message would
    then show the gap). The ranges are stored as ``lost: ...`` rows with their offsets moved past them, in one
    transaction."""
    batch = Batch(topic=summary.topic, topic_id=summary.topic_id)
    for partition, stored in sorted(offsets.items()):
        try:
            low, _ = consumer.get_watermark_offsets(TopicPartition(summary.topic, partition), timeout=5, cached=False)
        except Exception as exc:  # noqa: BLE001 - KafkaException: a message past the gap still shows it (a partition
            # never stored expects offset 0); with none past it, no offset moves and the next drain checks again
            log.warning("%s[%d]: log start unknown (%s)", summary.topic, partition, exc)
            continue
        if low > stored:
            _note_gap(consumer, summary, batch, partition, stored, low, low=low)
            batch.next_offsets[partition] = low
    if batch.rejected:
        write_batch(conn, batch, summary.group_id)
        summary.next_offsets.update(batch.next_offsets)
        summary.count_rejected(batch.rejected)


def _note_gap(
    consumer: Consumer,
    summary: DrainSummary,
    batch: Batch,
    partition: int,
    expected: int,
    got: int,
    low: int | None = None,
) -> None:
    """Offsets skipped between ``expected`` and ``got``: if the broker deleted them (its log now starts past
    ``expected``: retention ran while they waited, or records were deleted), record the loss in the batch as a
    ``rejected_messages`` row (``lost: ...``) so that it is stored with the offsets and :func:`drain_task` fails the
    run saying so. A gap the log start does not explain (transaction markers) is no loss.

    Raises:
        IngestError: the log start cannot be read now: the batch is not stored (its offsets would go past a gap
            that may be a loss, never recorded then); the retry reads from the stored offsets and checks again.
    """
    try:
        if low is None:  # ``low``: the log start, when the caller read it already
            low, _ = consumer.get_watermark_offsets(TopicPartition(summary.topic, partition), timeout=5, cached=False)
    except Exception as exc:  # noqa: BLE001 - KafkaException: cannot tell now
        raise IngestError(
            f"{summary.topic}[{partition}]: offsets {expected}..{got - 1} were skipped and the log start cannot be "
            f"read now ({exc}) to tell a loss from transaction markers; nothing past offset {expected} of that "
            "partition is stored by this try, the retry checks again"
        ) from exc
    if low <= expected:
        return
    end = min(low, got)
    reason = (
        f"lost: offsets {expected}..{end - 1} ({end - expected} messages) were deleted from the broker (retention "
        "or delete-records) before they were stored"
    )
    batch.rejected.append((summary.topic, partition, expected, None, None, reason, summary.topic_id))
    summary.lost += end - expected
    log.error("%s partition %d: %s", summary.topic, partition, reason)


def _commit_to_kafka(consumer: Consumer, topic: str, next_offsets: dict[int, int]) -> None:
    """Mirror the stored offsets to Kafka, asynchronously; failures only affect lag monitoring."""
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in next_offsets.items()], asynchronous=True)
    except Exception as exc:  # the database is the truth; Kafka's copy is for dashboards
        log.warning("could not mirror offsets to Kafka (lag monitoring only): %s", exc)


# --- Airflow entry points -------------------------------------------------------------------------------------


def drain_task(
    *,
    topic: str | None = None,
    group_id: str = DEFAULT_GROUP_ID,
    batch_size: int = 2000,
    max_seconds: float = 600.0,
    idle_timeout_s: float = 10.0,
    linger_s: float = 0.0,
    alert_threshold: int | None = None,
    alert_min_duration_s: float = 0.0,
    run_started_at: datetime | None = None,
) -> dict[str, Any]:
    """Run :func:`drain` with :func:`crowd.config.load_settings` and return the summary as a dict (for XCom).

    ``run_started_at``: when the DAG run started. Losses recorded since then, by an earlier try of the run that
    ended in another error, fail this try too (see :class:`MessagesLostError`): its retry finds nothing lost.

    Raises:
        MessagesLostError: messages were deleted from the broker before they were stored (first: whatever else
            the drain met, a retry cannot bring them back).
        IngestError: the drain stopped idle with messages left, another drain holds the lock, alerts unpublished.
    """
    from crowd.config import load_settings

    settings = load_settings()
    rule = AlertRule(int(alert_threshold), float(alert_min_duration_s)) if alert_threshold else None
    summary = drain(
        settings.kafka_conn_id,
        settings.postgres_conn_id,
        topic or settings.faces_topic,
        group_id,
        batch_size=int(batch_size),
        max_seconds=float(max_seconds),
        idle_timeout_s=float(idle_timeout_s),
        linger_s=float(linger_s),
        alert_rule=rule,
        alerts_topic=settings.alerts_topic if rule else None,
    )
    if summary.stopped_because == "another drain is running":
        raise IngestError(
            f"another drain of {summary.topic!r} for group {group_id!r} holds its lock (a drain run elsewhere, or "
            "a dead one whose database session is still open: see pg_locks / pg_stat_activity); nothing was "
            "drained, the retry will try again"
        )
    cut_off = summary.stopped_because.startswith("idle") and (summary.lag_left or not summary.lag_known)
    left = f"{summary.lag_left} messages" if summary.lag_known else "an unknown number of messages"
    earlier = 0
    if run_started_at is not None and not summary.lost:
        with storage.connect(settings.postgres_conn_id) as conn:
            earlier = lost_ranges_since(conn, summary.topic, run_started_at, group_id)
    if summary.lost or earlier:
        lost = f"{summary.lost} messages" if summary.lost else f"{earlier} ranges of messages (by an earlier try)"
        raise MessagesLostError(
            f"{lost} of {summary.topic!r} were deleted from the broker before they were stored (retention shorter "
            "than an outage, or delete-records): the ranges are in rejected_messages (reason 'lost: ...'), "
            f"everything after them is stored ({summary.frames} frames)"
            + (f", but for {left} the broker did not give within {idle_timeout_s:g} s" if cut_off else "")
            + ". Lengthen the topic's retention.ms, or re-run detection for the videos concerned"
        )
    if cut_off:
        raise IngestError(
            f"{summary.frames} frames stored, then the broker gave nothing for {idle_timeout_s:g} s with {left} of "
            f"{summary.topic!r} not stored yet (Kafka down or unreachable, a partition without a leader?); the "
            "retry drains them"
        )
    if summary.alerts_error:
        raise IngestError(
            f"{summary.frames} frames stored, but crowd alerts could not be published ({summary.alerts_error}); "
            "they stay pending in the alerts table and the next run publishes them"
        )
    return summary.as_dict()


_watch_conns: dict[str, psycopg.Connection] = {}  # the watcher's connection per Airflow connection id
_TOPIC_ID_TTL_S = 1.0
# (Kafka connection, topic) -> (when read, its id): the watcher's cache
_topic_ids: dict[tuple[str, str], tuple[float, str | None]] = {}
# (postgres conn, group, topic, partition) -> (when read, stored next offset, topic id): the drain's offsets only
# grow, so a message below them is known stored without asking again for a few seconds (a watcher replaying a stored
# topic, on its first unpause, asked once per message); the TTL bounds what an operator resetting offsets waits
_STORED_NEXT_TTL_S = 5.0
_stored_next: dict[tuple[str, str, str, int], tuple[float, int, str | None]] = {}


def _current_topic_id(kafka_conn_id: str, topic: str) -> str | None:
    """The topic's id as the broker says, read at most every ``_TOPIC_ID_TTL_S`` seconds (a backlog passes through
    the watcher message by message)."""
    from crowd.kafka import topic_id

    read_at, known = _topic_ids.get((kafka_conn_id, topic), (float("-inf"), None))
    if time.monotonic() - read_at >= _TOPIC_ID_TTL_S:
        known = topic_id(kafka_conn_id, topic, timeout_s=5)
        _topic_ids[(kafka_conn_id, topic)] = (time.monotonic(), known)
    return known


def faces_pending(
    message: Message,
    postgres_conn_id: str = "crowd_postgres",
    group_id: str = DEFAULT_GROUP_ID,
    kafka_conn_id: str | None = None,
) -> dict[str, Any] | None:
    """Kafka trigger ``apply_function``: fire only for a message the drain has not stored yet.

    The watcher reads every message once in its own consumer group; already drained messages (offset below
    the stored next offset of the drain's group) are skipped, so a backlog that a running drain is storing
    does not queue a DAG run per message. Offsets stored for an earlier topic of the same name (deleted and made
    again: the broker's topic id differs, asked through ``kafka_conn_id`` at most every few seconds) say nothing
    about this one's messages: they fire. When the database cannot be asked, it fires (safe side). A message below
    the stored offsets read in the last few seconds is known stored without asking again (a watcher replaying a
    stored topic asks once per partition, not per message); one connection per ``postgres_conn_id``.

    Returns:
        the event payload (topic, partition, offset) or None to skip.
    """
    payload = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
    key = (postgres_conn_id, group_id, message.topic(), message.partition())
    read_at, stored_next, stored_topic_id = _stored_next.get(key, (float("-inf"), 0, None))
    if message.offset() < stored_next and time.monotonic() - read_at < _STORED_NEXT_TTL_S:
        return _stored_elsewhere(payload, stored_topic_id, kafka_conn_id)
    conn = _watch_conns.get(postgres_conn_id)
    try:
        if conn is None or conn.closed:
            # short timeouts: this runs on the triggerer's thread, and a silent database fires the run (safe side)
            conn = _watch_conns[postgres_conn_id] = storage.connect(
                postgres_conn_id, connect_timeout=3, tcp_user_timeout=5_000
            )
            conn.autocommit = True
        row = conn.execute(
            "SELECT next_offset, topic_id FROM kafka_offsets "
            "WHERE consumer_group = %s AND topic = %s AND partition = %s",
            (group_id, message.topic(), message.partition()),
        ).fetchone()
    except Exception as exc:
        log.warning("watcher cannot read stored offsets (%s); firing to be safe", exc)
        if conn is not None:
            conn.close()
        _watch_conns.pop(postgres_conn_id, None)
        return payload
    if row is None:
        return payload
    _stored_next[key] = (time.monotonic(), int(row[0]), row[1])
    if message.offset() >= int(row[0]):
        return payload
    return _stored_elsewhere(payload, row[1], kafka_conn_id)


def _stored_elsewhere(payload: dict[str, Any], stored_topic_id: str | None, kafka_conn_id: str | None) -> Any:
    """The watcher's answer for a message below the stored offsets: None (stored), or ``payload`` when the offsets
    are an earlier topic's of the same name (the drain starts this one from its beginning)."""
    if stored_topic_id and kafka_conn_id:
        current = _current_topic_id(kafka_conn_id, payload["topic"])
        if current and current != stored_topic_id:
            return payload
    return None
