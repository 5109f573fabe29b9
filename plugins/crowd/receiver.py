"""Background Kafka consumer behind ``GET /crowd/receive``: a thread that fills a bounded in-memory queue.

The seed's ``/receive`` read Kafka inside the request. Here one daemon thread per API server process reads the
messages topic with **kafka-python** and keeps the newest messages in a bounded queue; a request only takes
what is already there (optionally waiting a little), so a slow or dead broker never blocks a request.

Design decisions:

* **Full queue: the oldest message is dropped** (and counted in :attr:`ReceiverStats.dropped`). The consumer
  never pauses, so it cannot fall behind the topic indefinitely; a reader that comes back late gets the newest
  ``max_queue`` messages. Pausing would instead keep old messages and let lag grow without bound.
* **Delivered messages are removed**: :meth:`MessageReceiver.take` pops what it returns, so a message is handed
  to at most one ``/receive`` call of this process.
* **At-most-once, in memory**: offsets are auto-committed by kafka-python after they are polled, so messages
  still queued when the process stops are not read again by the group. This is the seed's chat-style API, not
  the pipeline's data path (that one, ``Faces`` -> PostgreSQL, commits offsets with the rows).
* **Several API server workers**: each worker process runs its own receiver in the same consumer group, so the
  topic's partitions are split between workers and a ``/receive`` call sees the messages of the partitions its
  worker owns. With one partition, one worker gets all messages. Use one worker (the default) for the seed's
  behaviour.
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
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_GROUP_ID = "crowd-api-receiver"
DEFAULT_MAX_QUEUE = 1000
_LAG_EVERY_S = 2.0


@dataclass
class ReceivedMessage:
    """One Kafka record as handed to ``/receive``."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: str | None
    value: Any


@dataclass
class ReceiverStats:
    """Counters of one receiver since it started (exported by ``/crowd/metrics`` and ``/crowd/health``)."""

    consumed: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: int = 0
    reconnects: int = 0
    queued: int = 0
    max_queue: int = 0
    lag: int | None = None
    connected: bool = False
    running: bool = False
    last_error: str | None = None
    assigned_partitions: list[int] = field(default_factory=list)


def decode_value(raw: bytes | None) -> Any:
    """JSON if the bytes are JSON, else the text (invalid UTF-8 replaced), else ``None``."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class MessageReceiver:
    """A kafka-python consumer thread feeding a bounded, drop-oldest queue.

    Args:
        bootstrap_servers: ``host:port[,host:port]`` of the brokers.
        topic: topic to read.
        group_id: consumer group shared by all API server processes.
        max_queue: queue bound; when full the oldest message is dropped.
        consumer_config: further ``KafkaConsumer`` keyword arguments (tests shorten timeouts).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        group_id: str = DEFAULT_GROUP_ID,
        max_queue: int = DEFAULT_MAX_QUEUE,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = group_id
        self.max_queue = max_queue
        self._consumer_config = dict(consumer_config or {})
        self._queue: deque[ReceivedMessage] = deque()
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
        """Ask the thread to stop and wait for it to close the consumer (commits the offsets read)."""
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

    def offer(self, message: ReceivedMessage) -> None:
        """Append ``message``; when the queue is full drop the oldest one and count it."""
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self._queue.popleft()
                self._stats.dropped += 1
            self._queue.append(message)
            self._stats.consumed += 1

    def take(self, limit: int) -> list[ReceivedMessage]:
        """Remove and return up to ``limit`` of the oldest queued messages (never blocks on Kafka)."""
        with self._lock:
            count = min(limit, len(self._queue))
            items = [self._queue.popleft() for _ in range(count)]
            self._stats.delivered += count
            return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def stats(self) -> ReceiverStats:
        """A snapshot of the counters."""
        with self._lock:
            snapshot = ReceiverStats(**asdict(self._stats))
            snapshot.queued = len(self._queue)
        snapshot.running = self.running
        return snapshot

    # ---- thread ----------------------------------------------------------------------------------------------

    def _make_consumer(self) -> Any:
        from kafka import KafkaConsumer

        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "group_id": self.group_id,
            "enable_auto_commit": True,
            "auto_commit_interval_ms": 1000,
            "auto_offset_reset": "earliest",
            "client_id": f"crowd-api-receiver-{threading.get_native_id()}",
            "request_timeout_ms": 30000,
            "reconnect_backoff_max_ms": 5000,
        }
        config.update(self._consumer_config)
        consumer = KafkaConsumer(**config)
        consumer.subscribe([self.topic])
        return consumer

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
                    try:
                        consumer.close(timeout_ms=5000)
                    except Exception:  # noqa: BLE001
                        log.debug("closing the receiver consumer failed", exc_info=True)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 30.0)
            with self._lock:
                self._stats.reconnects += 1
        with self._lock:
            self._stats.connected = False

    def _consume(self, consumer: Any) -> bool:
        """Poll until stopped; returns whether at least one poll succeeded (errors propagate)."""
        next_lag = 0.0
        polled = False
        while not self._stop.is_set():
            batches = consumer.poll(timeout_ms=300, max_records=500)
            polled = True
            for records in batches.values():
                for record in records:
                    self.offer(
                        ReceivedMessage(
                            topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            timestamp_ms=record.timestamp if record.timestamp is not None else None,
                            key=record.key.decode("utf-8", "replace") if record.key is not None else None,
                            value=decode_value(record.value),
                        )
                    )
            now = time.monotonic()
            if now >= next_lag:
                next_lag = now + _LAG_EVERY_S
                self._update_lag(consumer)
        return polled

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
