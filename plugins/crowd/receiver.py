"""Background Kafka consumer behind ``GET /crowd/receive``: a thread that fills a bounded in-memory queue.

The seed's ``/receive`` read Kafka inside the request. Here one daemon thread per API server process reads the
messages topic with **kafka-python** and keeps the newest messages in a bounded queue; a request only takes
what is already there (optionally waiting a little), so a slow or dead broker never blocks a request.

Design decisions:

* **At-least-once, nothing dropped**: offsets are committed (by the consumer thread, about every
  ``commit_every_s``) only up to the messages a ``/receive`` call has taken. Messages still queued when the
  process stops, or when its consumer is rebuilt after an error, are read again from there. A message taken
  by a call whose process dies before the next commit comes again (that is the "at least": a reader that
  needs exactly-once keeps the ``(topic, partition, offset)`` of what it got).
* **Full queue: reading pauses** (:attr:`ReceiverStats.paused`) until ``/receive`` takes messages; the
  backlog waits in Kafka (its retention), not in memory, and nothing is dropped.
* **Delivered messages are removed**: :meth:`MessageReceiver.take` pops what it returns, so a message is handed
  to at most one ``/receive`` call of this process.
* **Leases, for readers that cannot lose a response in transit**: :meth:`MessageReceiver.lease` hands messages out
  without removing them; they are hidden from other calls until :meth:`MessageReceiver.confirm` (then removed and
  committed) or until the lease runs out (then queued again, first, and handed out again). Offsets are never
  committed past a leased (or queued again) message, so a process that dies with open leases delivers those
  messages again too. Leases live in the process that made them (as its queue does). A rebalance (an API-server
  process starting or stopping: kafka-python revokes every partition, then assigns) returns the messages of open
  leases too: they are read again and handed out again, by whichever process owns them next (at least once).
* **Several API server workers**: each worker process runs its own receiver in the same consumer group, so the
  topic's partitions are split between workers and a ``/receive`` call sees the messages of the partitions its
  worker owns. When a partition moves to another worker, this one commits what it delivered and forgets what
  it had queued from it (the new owner reads it again). With one partition, one worker gets all messages.
* **Any bytes**: a value is JSON when it parses as JSON nested at most :data:`MAX_VALUE_DEPTH` deep, else text;
  no value stops the consumer or fails a response.
* **Memory follows the bytes**: the queue holds the records' raw bytes, decoded only when :meth:`MessageReceiver.take`
  hands them out (a 1 MB ``[{},{},...]`` is about 24 MB once decoded), so ``max_queue_bytes`` bounds what the queue
  really holds; one ``take`` returns at most ``max_take_bytes`` of them (the rest stays queued).
* **Compression**: producers here use lz4 (:data:`crowd.kafka.PRODUCER_RELIABILITY`), so kafka-python needs the
  ``lz4`` package to decode; without it every poll fails and the receiver keeps retrying (``last_error`` says so).
* **Broker restarts**: kafka-python reconnects by itself; any other error closes the consumer and a new one is
  made after a back-off (1 s doubling to 30 s), until :meth:`MessageReceiver.stop`.

Example:
    >>> receiver = MessageReceiver("127.0.0.1:9092", "messages", group_id="crowd-api-receiver", max_queue=1000)
    >>> receiver.start()
    >>> receiver.take(limit=10)
    []
    >>> receiver.stop()
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

DEFAULT_GROUP_ID = "crowd-api-receiver"
DEFAULT_MAX_QUEUE = 1000
DEFAULT_MAX_QUEUE_BYTES = 64 * 1024 * 1024  # messages of up to the broker's 1 MB: not 1000 of them
DEFAULT_MAX_TAKE_BYTES = 4 * 1024 * 1024  # one /receive response (raw bytes; decoding and JSON add to it)
MAX_VALUE_DEPTH = 64
MAX_LEASE_S = 600.0
_LEASE_IDS_KEPT = 1000  # ids remembered after they ran out or were confirmed: a late confirm says "expired",
# a repeated one (its first answer lost) gets that answer again, not "unknown"
_LAG_EVERY_S = 2.0

Partition = tuple[str, int]


@dataclass
class ReceivedMessage:
    """One Kafka record as handed to ``/receive``."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: str | None
    value: Any
    value_format: ValueFormat | None = None  # how ``value`` was read from the record's bytes (decode_value_as)
    size: int = field(default=0, repr=False, compare=False)  # bytes of key and value, for the queue's byte bound


@dataclass
class RawRecord:
    """One Kafka record as the queue holds it: its bytes, decoded into a :class:`ReceivedMessage` when taken."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None

    @property
    def size(self) -> int:
        """Bytes of key and value: what the record holds, for the queue's byte bounds."""
        return len(self.key or b"") + len(self.value or b"")

    def decode(self) -> ReceivedMessage:
        """The message handed to ``/receive``: key as text, value as :func:`decode_value_as` makes it."""
        value, value_format = decode_value_as(self.value)
        return ReceivedMessage(
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            timestamp_ms=self.timestamp_ms,
            key=self.key.decode("utf-8", "replace") if self.key is not None else None,
            value=value,
            value_format=value_format,
            size=self.size,
        )


@dataclass
class ReceiverStats:
    """Counters of one receiver since it started (exported by ``/crowd/metrics`` and ``/crowd/health``)."""

    consumed: int = 0
    delivered: int = 0
    committed: int = 0
    requeued: int = 0
    leased: int = 0  # messages held by open leases (handed out, not confirmed yet)
    confirmed: int = 0
    lease_expired: int = 0  # leased messages queued again because their lease ran out
    errors: int = 0
    reconnects: int = 0
    queued: int = 0
    max_queue: int = 0
    queued_bytes: int = 0
    lag: int | None = None
    paused: bool = False
    connected: bool = False
    running: bool = False
    last_error: str | None = None
    assigned_partitions: list[int] = field(default_factory=list)


ValueFormat = Literal["json", "text"]


def decode_value_as(raw: bytes | None) -> tuple[Any, ValueFormat | None]:
    """``(value, "json")`` if the bytes are JSON nested at most :data:`MAX_VALUE_DEPTH` deep that a response can
    carry as it is, else ``(their text, "text")`` (invalid UTF-8 replaced), else ``(None, None)``: the format tells a
    reader the bytes ``hello`` (text) from ``"hello"`` (JSON), both the string hello once decoded.

    JSON a response cannot carry stays text: a lone surrogate escape (``"\\ud800"``, not UTF-8 once decoded: it failed
    the whole response, and the messages taken for it were lost) and non-finite numbers, ``NaN``/``Infinity`` or one
    too large for a float such as ``1e400`` (not JSON: sent as null).
    """
    if raw is None:
        return None, None
    text = raw.decode("utf-8", "replace")
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
        if "\\u" in text:  # only an escape can make a lone surrogate
            json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return text, "text"
    if text.count("[") + text.count("{") > MAX_VALUE_DEPTH and _deeper_than(value, MAX_VALUE_DEPTH):
        return text, "text"
    return value, "json"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite_float(literal: str) -> float:
    """A JSON number as a float, refused when it overflows (``1e400`` would become ``inf``, then null)."""
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"{literal} is out of a float's range")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers in ``value`` nest more than ``limit`` deep (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# librdkafka connection settings (the Airflow connection's extra) that kafka-python spells differently
_KAFKA_PYTHON_NAMES = {
    "security.protocol": "security_protocol",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
    "ssl.crl.location": "ssl_crlfile",
}


def kafka_python_security(librdkafka_config: dict[str, Any]) -> dict[str, Any]:
    """The security settings of a librdkafka configuration as ``KafkaConsumer`` keyword arguments.

    Raises:
        ValueError: a ``sasl.*``/``ssl.*`` setting kafka-python has no equivalent for (the receiver would
            otherwise connect without it).
    """
    out: dict[str, Any] = {}
    for key, value in librdkafka_config.items():
        if key in _KAFKA_PYTHON_NAMES:
            out[_KAFKA_PYTHON_NAMES[key]] = value
        elif key == "ssl.endpoint.identification.algorithm":
            out["ssl_check_hostname"] = str(value).lower() != "none"
        elif key.startswith(("sasl.", "ssl.")):
            raise ValueError(
                f"Kafka connection setting {key!r} has no kafka-python equivalent for the /receive consumer; "
                f"supported: {sorted(_KAFKA_PYTHON_NAMES)} and ssl.endpoint.identification.algorithm"
            )
    return out


class LeaseError(LookupError):
    """A lease cannot be confirmed; ``expired`` tells a lease that ran out (its messages were queued again) from
    one this process never made (another API-server process's, or one made before a restart)."""

    def __init__(self, message: str, *, expired: bool) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass
class _Lease:
    deadline: float  # time.monotonic()
    records: list[RawRecord]
    handed_out: int  # how many messages it held when made (some may have moved away with their partition since)


@dataclass(frozen=True)
class Confirmation:
    """What confirming a lease did: ``confirmed`` messages removed (committed soon); ``returned`` ones had moved
    to another reader with their partition meanwhile (it delivers them again)."""

    confirmed: int
    returned: int


class MessageReceiver:
    """A kafka-python consumer thread feeding a bounded queue, committing what has been delivered.

    Args:
        bootstrap_servers: ``host:port[,host:port]`` of the brokers.
        topic: topic to read.
        group_id: consumer group shared by all API server processes.
        max_queue: queue bound; when full, reading pauses until messages are taken.
        max_queue_bytes: the same in bytes of keys and values (a full queue of large messages stays in bounds).
        max_take_bytes: one ``take`` returns at most this many bytes of keys and values, nor more than
            ``max_queue_bytes`` (at least one message), so one ``/receive`` response stays a few MiB however large
            the backlog; the rest stays queued.
        consumer_config: further ``KafkaConsumer`` keyword arguments (security settings; tests shorten timeouts).
        commit_every_s: how often the consumer thread commits the offsets of delivered messages.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        group_id: str = DEFAULT_GROUP_ID,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        max_take_bytes: int = DEFAULT_MAX_TAKE_BYTES,
        consumer_config: dict[str, Any] | None = None,
        commit_every_s: float = 0.5,
    ) -> None:
        if min(max_queue, max_queue_bytes, max_take_bytes) < 1:
            raise ValueError(
                f"max_queue={max_queue}, max_queue_bytes={max_queue_bytes} and max_take_bytes={max_take_bytes} "
                "must be >= 1"
            )
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_take_bytes = min(max_take_bytes, max_queue_bytes)
        self._queued_bytes = 0
        self.commit_every_s = commit_every_s
        self._consumer_config = dict(consumer_config or {})
        self._queue: deque[RawRecord] = deque()
        # next offset after the last message taken per partition, not yet known to be committed
        self._delivered: dict[Partition, int] = {}
        self._committed: dict[Partition, int] = {}  # what the last commit stored, while _delivered is ahead of it
        self._leases: dict[str, _Lease] = {}
        self._leased_bytes = 0
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._confirmed: OrderedDict[str, Confirmation] = OrderedDict()  # a confirm retried gets the same answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = ReceiverStats(max_queue=max_queue)

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the consumer thread (returns at once; connecting happens in the thread)."""
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"crowd-receiver-{self.topic}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the thread to stop and wait for it to commit what was delivered and close the consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("receiver thread for %s did not stop within %.0f s", self.topic, timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the consumer thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # ---- queue -----------------------------------------------------------------------------------------------

    def offer(self, record: RawRecord) -> None:
        """Append ``record`` (the consumer thread keeps the queue within its bounds by pausing)."""
        with self._lock:
            self._queue.append(record)
            self._queued_bytes += record.size
            self._stats.consumed += 1

    def take(self, limit: int) -> list[ReceivedMessage]:
        """Remove and return up to ``limit`` of the oldest queued messages, at most :attr:`max_take_bytes` of them
        (at least one), decoded; never blocks on Kafka (decoding a few MiB of JSON takes a while: not on an event
        loop).

        Their offsets are committed by the consumer thread within ``commit_every_s``.
        """
        with self._lock:
            records = self._pop(limit)
            for r in records:  # the queue is in offset order per partition (messages of a lease that ran out come
                p = (r.topic, r.partition)  # first again, below what was delivered after them: max, not the last)
                self._delivered[p] = max(self._delivered.get(p, -1), r.offset + 1)
            self._stats.delivered += len(records)
        return [r.decode() for r in records]  # outside the lock: the consumer thread goes on meanwhile

    def lease(self, limit: int, lease_s: float) -> tuple[str | None, list[ReceivedMessage]]:
        """Hand out up to ``limit`` of the oldest queued messages (as :meth:`take`) without removing them: hidden
        from other calls for ``lease_s`` seconds, removed by :meth:`confirm`, queued again (first) if not
        confirmed in time. Offsets are not committed past a leased message.

        Returns:
            (the lease's id, the messages); (None, []) when none is queued.
        """
        if not 0 < lease_s <= MAX_LEASE_S:
            raise ValueError(f"lease_s={lease_s!r} must be in (0, {MAX_LEASE_S:.0f}]")
        with self._lock:
            records = self._pop(limit)
            if not records:
                return None, []
            lease_id = secrets.token_urlsafe(18)
            self._leases[lease_id] = _Lease(time.monotonic() + lease_s, records, len(records))
            self._leased_bytes += sum(r.size for r in records)
            self._stats.delivered += len(records)
        return lease_id, [r.decode() for r in records]

    def confirm(self, lease_id: str) -> Confirmation:
        """The reader has the messages of ``lease_id``: remove them for good (their offsets are committed with the
        next commit).

        Raises:
            LeaseError: the lease ran out (its messages were queued again) or is not this process's.
        """
        with self._lock:
            self._expire_leases()
            lease = self._leases.pop(lease_id, None)
            if lease is None and lease_id in self._confirmed:  # the answer to the first confirm was lost
                return self._confirmed[lease_id]
            if lease is None:
                expired = lease_id in self._expired
                raise LeaseError(
                    "the lease ran out before it was confirmed: its messages were queued again and are (or will be) "
                    "handed out again"
                    if expired
                    else "no such lease in this API-server process (a lease lives in the process that made it, "
                    "and until it is confirmed or runs out)",
                    expired=expired,
                )
            self._leased_bytes -= sum(r.size for r in lease.records)
            for r in lease.records:
                p = (r.topic, r.partition)
                self._delivered[p] = max(self._delivered.get(p, -1), r.offset + 1)
            self._stats.confirmed += len(lease.records)
            done = Confirmation(confirmed=len(lease.records), returned=lease.handed_out - len(lease.records))
            self._confirmed[lease_id] = done
            while len(self._confirmed) > _LEASE_IDS_KEPT:
                self._confirmed.popitem(last=False)
        return done

    def _pop(self, limit: int) -> list[RawRecord]:
        """Take up to ``limit`` queued records within :attr:`max_take_bytes` (at least one); the lock held."""
        self._expire_leases()
        records: list[RawRecord] = []
        size = 0
        while (
            self._queue and len(records) < limit and (not records or size + self._queue[0].size <= self.max_take_bytes)
        ):
            records.append(self._queue.popleft())
            size += records[-1].size
        self._queued_bytes -= size
        return records

    def _expire_leases(self) -> None:
        """Queue the messages of leases that ran out again, in front (per partition in offset order, before
        anything queued after them); the lock held."""
        if not self._leases:
            return
        now = time.monotonic()
        expired = [lease_id for lease_id, lease in self._leases.items() if lease.deadline <= now]
        if not expired:
            return
        back: list[RawRecord] = []
        for lease_id in expired:
            back += self._leases.pop(lease_id).records
            self._expired[lease_id] = None
        while len(self._expired) > _LEASE_IDS_KEPT:
            self._expired.popitem(last=False)
        back.sort(key=lambda r: (r.topic, r.partition, r.offset))
        self._queue.extendleft(reversed(back))
        # leases that ran out at other times put their records in front of each other's: each partition's records
        # go back in offset order, in the places that partition holds in the queue
        queue = list(self._queue)
        partitions = {(r.topic, r.partition) for r in back}
        places = [i for i, r in enumerate(queue) if (r.topic, r.partition) in partitions]
        in_order: dict[Partition, list[RawRecord]] = {}
        for r in sorted((queue[i] for i in places), key=lambda r: (r.topic, r.partition, r.offset)):
            in_order.setdefault((r.topic, r.partition), []).append(r)
        cursors = {p: iter(records) for p, records in in_order.items()}
        for i in places:
            queue[i] = next(cursors[(queue[i].topic, queue[i].partition)])
        self._queue = deque(queue)
        size = sum(r.size for r in back)
        self._leased_bytes -= size
        self._queued_bytes += size
        self._stats.lease_expired += len(back)

    def _leased_count(self) -> int:
        return sum(len(lease.records) for lease in self._leases.values())

    def _commit_floor(self) -> dict[Partition, int]:
        """Per partition, the lowest offset still leased or queued: commits stop there, whatever was delivered
        after it (a lease that ran out puts its messages back in the queue, below later deliveries); the lock
        held. Without leases, everything queued lies past what was delivered, so this changes nothing."""
        low: dict[Partition, int] = {}
        for r in [*self._queue, *(r for lease in self._leases.values() for r in lease.records)]:
            p = (r.topic, r.partition)
            if r.offset < low.get(p, r.offset + 1):
                low[p] = r.offset
        return low

    def room(self) -> int:
        """How many more messages the queue takes before reading pauses (0 once its bytes reach their bound)."""
        with self._lock:
            self._expire_leases()
            if self._queued_bytes + self._leased_bytes >= self.max_queue_bytes:
                return 0
            return self.max_queue - len(self._queue) - self._leased_count()

    def __len__(self) -> int:
        """Messages queued (leased ones not counted; those whose lease ran out are queued again)."""
        with self._lock:
            self._expire_leases()
            return len(self._queue)

    def stats(self) -> ReceiverStats:
        """A snapshot of the counters."""
        with self._lock:
            snapshot = ReceiverStats(**asdict(self._stats))
            snapshot.queued, snapshot.queued_bytes = len(self._queue), self._queued_bytes
            snapshot.leased = self._leased_count()
        snapshot.running = self.running
        return snapshot

    def _forget_queued(self, partitions: set[Partition] | None = None) -> dict[Partition, int]:
        """Drop the undelivered (queued or leased) messages of ``partitions`` (all when None), to be read again by
        this process's next consumer; returns the first dropped offset per partition. Where one lies below what was
        delivered after it (a lease), the next consumer starts there, not past it (it seeks to the delivered end)."""
        with self._lock:
            first = self._drop_queued(partitions)
            for p, offset in first.items():
                if p in self._delivered and offset < self._delivered[p]:
                    self._delivered[p] = offset
                    self._committed.pop(p, None)
            return first

    def _drop_queued(self, partitions: set[Partition] | None) -> dict[Partition, int]:
        """:meth:`_forget_queued`, the lock held."""
        kept: deque[RawRecord] = deque()
        first: dict[Partition, int] = {}
        for m in self._queue:
            if partitions is None or (m.topic, m.partition) in partitions:
                first.setdefault((m.topic, m.partition), m.offset)
            else:
                kept.append(m)
        self._stats.requeued += len(self._queue) - len(kept)
        self._queue = kept
        self._queued_bytes = sum(m.size for m in kept)
        for lease in self._leases.values():  # read again from the committed offset, which is at or below them
            gone = [r for r in lease.records if partitions is None or (r.topic, r.partition) in partitions]
            if gone:
                lease.records = [r for r in lease.records if r not in gone]
                self._leased_bytes -= sum(r.size for r in gone)
                for r in gone:
                    p = (r.topic, r.partition)
                    first[p] = min(first.get(p, r.offset), r.offset)
        return first

    # ---- thread ----------------------------------------------------------------------------------------------

    def _make_consumer(self) -> Any:
        from kafka import AsyncConsumerRebalanceListener, KafkaConsumer

        receiver = self

        # async: kafka-python runs the listener on its IO thread, where a blocking commit raises (it always failed)
        class _Rebalance(AsyncConsumerRebalanceListener):
            restart_at: dict[Partition, int] = {}

            async def on_partitions_revoked(self, revoked: Any) -> None:
                partitions = {(tp.topic, tp.partition) for tp in revoked}
                if partitions:
                    self.restart_at = await receiver._hand_back(consumer, partitions)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                receiver._seek_assigned(consumer, {(tp.topic, tp.partition) for tp in assigned}, self.restart_at)
                self.restart_at = {}  # used once: a later assignment must not seek back to it

        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "client_id": f"crowd-api-receiver-{threading.get_native_id()}",
            "request_timeout_ms": 30000,
            "reconnect_backoff_max_ms": 5000,
        }
        # one fetch brings at most the queue's byte bound (or one record batch), so a poll cannot overshoot it far
        config["fetch_max_bytes"] = min(52_428_800, self.max_queue_bytes)
        config["max_partition_fetch_bytes"] = min(1_048_576, self.max_queue_bytes)
        config.update(self._consumer_config)
        config["enable_auto_commit"] = False  # offsets follow deliveries, not polls
        consumer = KafkaConsumer(**config)
        consumer.subscribe([self.topic], listener=_Rebalance())
        return consumer

    async def _hand_back(self, consumer: Any, partitions: set[Partition]) -> dict[Partition, int]:
        """``partitions`` are revoked (or lost): drop their queued messages and commit their delivered ones, in one
        step with respect to ``take`` (nothing taken from them after the snapshot, no stale offset of theirs left
        for a later commit to move the new owner back with). Awaited on the client's IO loop.

        Returns:
            where each partition would start again here (its first message not delivered).
        """
        from kafka import OffsetAndMetadata, TopicPartition

        with self._lock:
            first = self._drop_queued(partitions)  # their lowest queued or leased offsets: no commit past them
            delivered = {}
            for p in [p for p in self._delivered if p in partitions]:
                delivered[p] = min(self._delivered.pop(p), first.get(p, math.inf))
                self._committed.pop(p, None)
        if delivered:
            offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in delivered.items()}
            try:
                await consumer._coordinator._commit_offsets_sync_async(offsets, timeout_ms=10_000)
            except Exception as exc:  # noqa: BLE001 - at least once: their new owner delivers them again
                with self._lock:
                    self._stats.errors += 1
                    self._stats.last_error = f"commit on rebalance failed: {type(exc).__name__}: {exc}"
                log.warning(
                    "receiver could not commit %s as the partitions moved (%s): their new owner delivers those "
                    "messages again", delivered, exc,
                )  # fmt: skip
            else:
                with self._lock:
                    self._stats.committed += 1
        return {p: min(o for o in (delivered.get(p), first.get(p)) if o is not None) for p in {*delivered, *first}}

    def _seek_assigned(self, consumer: Any, assigned: set[Partition], restart_at: dict[Partition, int]) -> None:
        """After a rebalance, start each partition of ours at its first message not delivered yet: the first one
        that was queued when it was revoked, or past the delivered ones whose commit failed (else the library
        goes on from its position or the committed offset, which are then that same place)."""
        from kafka import TopicPartition

        with self._lock:
            delivered = dict(self._delivered)
            self._stats.assigned_partitions = sorted(p for _, p in assigned)
        for partition in assigned:
            position = restart_at.get(partition, delivered.get(partition))
            if position is not None:
                consumer.seek(TopicPartition(*partition), position)

    def _commit(self, consumer: Any) -> bool:
        """Commit the offsets of delivered messages; a failure is kept for the next try (and counted)."""
        from kafka import OffsetAndMetadata, TopicPartition

        with self._lock:
            low = self._commit_floor()
            pending = {}
            for p, o in self._delivered.items():
                target = min(o, low.get(p, o))  # never past a message still leased or queued again
                if self._committed.get(p) != target:
                    pending[p] = target
        if not pending:
            return True
        try:
            consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in pending.items()})
        except Exception as exc:  # noqa: BLE001 - kept pending: retried at the next commit or by the next consumer
            with self._lock:
                self._stats.errors += 1
                self._stats.last_error = f"commit failed: {type(exc).__name__}: {exc}"
            log.warning("receiver could not commit %s (%s); will retry", pending, exc)
            return False
        with self._lock:
            for p, o in pending.items():
                if self._delivered.get(p) == o:  # nothing taken (or leased in front of it) meanwhile
                    del self._delivered[p]
                    self._committed.pop(p, None)
                else:
                    self._committed[p] = o
            self._stats.committed += 1
        return True

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self._make_consumer()
                log.info("receiver consuming %s as group %s", self.topic, self.group_id)
                if self._consume(consumer):
                    backoff = 1.0  # it worked for a while: retry quickly after the next failure
            except Exception as exc:  # noqa: BLE001 - the thread must survive any client error
                with self._lock:
                    self._stats.errors += 1
                    self._stats.connected = False
                    self._stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("receiver for %s failed (%s); retrying in %.0f s", self.topic, exc, backoff)
            finally:
                if consumer is not None:
                    self._commit(consumer)
                    try:
                        consumer.close(autocommit=False, timeout_ms=5000)
                    except Exception:  # noqa: BLE001
                        log.debug("closing the receiver consumer failed", exc_info=True)
                    self._forget_queued()
            if self._stop.is_set() or self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 30.0)
            with self._lock:
                self._stats.reconnects += 1
        with self._lock:
            self._stats.connected = False

    def _consume(self, consumer: Any) -> bool:
        """Poll until stopped; returns whether at least one poll succeeded (errors propagate)."""
        next_lag = next_commit = 0.0
        polled = False
        while not self._stop.is_set():
            room = self.room()
            self._pause(consumer, room <= 0)
            batches = consumer.poll(timeout_ms=300, max_records=max(1, min(room, 500)))
            polled = True
            for records in batches.values():
                for record in records:
                    self.offer(
                        RawRecord(
                            topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            timestamp_ms=record.timestamp,
                            key=record.key,
                            value=record.value,
                        )
                    )
            now = time.monotonic()
            if now >= next_commit:
                next_commit = now + self.commit_every_s
                self._commit(consumer)
            if now >= next_lag:
                next_lag = now + _LAG_EVERY_S
                self._update_lag(consumer)
        return polled

    def _pause(self, consumer: Any, full: bool) -> None:
        """Pause every assigned partition while the queue is full, resume once there is room."""
        assigned = consumer.assignment()
        if full:
            consumer.pause(*assigned)
        elif consumer.paused():
            consumer.resume(*consumer.paused())
        with self._lock:
            self._stats.paused = full

    def _update_lag(self, consumer: Any) -> None:
        """Lag = end offset - position, summed over the assigned partitions; a failed broker call = disconnected."""
        assigned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        lag: int | None = 0
        connected = True
        try:
            ends = consumer.end_offsets(assigned, timeout_ms=1500) if assigned else {}
            for tp in assigned:
                lag += max(0, ends[tp] - consumer.position(tp, timeout_ms=1000))
        except Exception as exc:  # noqa: BLE001 - a broker that is down is a state, not an error here
            log.debug("receiver lag unknown: %s", exc)
            lag, connected = None, False
        with self._lock:
            self._stats.connected = connected
            self._stats.assigned_partitions = [tp.partition for tp in assigned]
            self._stats.lag = lag
