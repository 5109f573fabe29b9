"""Kafka clients with the reliability settings in one place.

Connection settings (``bootstrap.servers``, security, ``group.id``) come from the Airflow connection's
``extra`` through the provider's hooks, the single source of client configuration. On top of that this
module enforces what the pipeline's guarantees depend on, whatever the connection says:

* producers: ``acks=all`` and ``enable.idempotence=true`` (librdkafka leaves idempotence off), compression and
  batching, and a bounded ``message.timeout.ms`` so a dead broker fails a task in seconds, not 300 s;
* consumers: ``enable.auto.commit=false``: offsets are stored by the sink, in the same transaction as the rows.

Example:
    >>> from crowd.kafka import DeliveryTracker, reliable_producer
    >>> producer = reliable_producer("kafka_default", timeout_s=30)
    >>> tracker = DeliveryTracker()
    >>> producer.produce("Faces", key=b"video", value=b"{}", on_delivery=tracker.callback)
    >>> tracker.wait(producer, timeout_s=30)  # raises PublishError on any failed delivery
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airflow.providers.apache.kafka.hooks.client import KafkaAdminClientHook
from airflow.providers.apache.kafka.hooks.consume import KafkaConsumerHook
from airflow.providers.apache.kafka.hooks.produce import KafkaProducerHook
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

PRODUCER_RELIABILITY: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "max.in.flight.requests.per.connection": 5,
    "compression.type": "lz4",
    "linger.ms": 20,
    "batch.num.messages": 2000,
}
CONSUMER_RELIABILITY: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": True,
}

# Keys a shared connection extra may carry for consumers; librdkafka warns when a producer gets them.
_CONSUMER_ONLY = frozenset({"group.id", "enable.auto.commit", "auto.offset.reset", "enable.auto.offset.store"})


class PublishError(RuntimeError):
    """At least one message was not acknowledged by the broker; the task must fail and be retried."""


class _ReliableProducerHook(KafkaProducerHook):
    """The provider's producer hook with :data:`PRODUCER_RELIABILITY` forced on top of the connection extra."""

    def __init__(self, kafka_config_id: str, overrides: dict[str, Any]) -> None:
        super().__init__(kafka_config_id=kafka_config_id)
        self._overrides = overrides

    def _get_client(self, config: dict[str, Any]) -> Producer:
        producer_config = {k: v for k, v in config.items() if k not in _CONSUMER_ONLY}
        return Producer({**producer_config, **self._overrides})


class _AdminHook(KafkaAdminClientHook):
    """The provider's admin hook without the connection's consumer settings (librdkafka warned about each one on
    stderr at every use, which Airflow's task runner logs at ERROR: every green drain looked failed)."""

    def _get_client(self, config: dict[str, Any]) -> AdminClient:
        return super()._get_client({k: v for k, v in config.items() if k not in _CONSUMER_ONLY})


class _ManualCommitConsumerHook(KafkaConsumerHook):
    """The provider's consumer hook with :data:`CONSUMER_RELIABILITY` forced (no auto-commit)."""

    def __init__(self, kafka_config_id: str, overrides: dict[str, Any]) -> None:
        super().__init__(topics=[], kafka_config_id=kafka_config_id)
        self._overrides = overrides

    def _get_client(self, config: dict[str, Any]) -> Consumer:
        return super()._get_client({**config, **self._overrides})


def reliable_producer(
    kafka_conn_id: str,
    *,
    timeout_s: float = 30,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    **overrides: Any,
) -> Producer:
    """A confluent-kafka producer for ``kafka_conn_id`` with idempotence, ``acks=all`` and a bounded timeout.

    Args:
        kafka_conn_id: Airflow connection id of type ``kafka``.
        timeout_s: ``message.timeout.ms`` in seconds: how long one message may wait for its acknowledgement.
        on_delivery: delivery report callback for every message (set once here; passed to each ``produce``
            call instead it costs ~0.8 us a message, see bench/README.md).
        **overrides: further librdkafka settings, with dots written as underscores (``linger_ms=5``).
    """
    settings = {**PRODUCER_RELIABILITY, "message.timeout.ms": int(timeout_s * 1000)}
    settings.update({k.replace("_", "."): v for k, v in overrides.items()})
    if on_delivery is not None:
        settings["on_delivery"] = on_delivery
    return _ReliableProducerHook(kafka_conn_id, settings).get_conn


def manual_commit_consumer(kafka_conn_id: str, *, group_id: str | None = None, **overrides: Any) -> Consumer:
    """A confluent-kafka consumer for ``kafka_conn_id`` that never commits on its own (not subscribed yet).

    Args:
        kafka_conn_id: Airflow connection id of type ``kafka``.
        group_id: consumer group; defaults to the connection's ``group.id``.
        **overrides: further librdkafka settings, with dots written as underscores.
    """
    settings = dict(CONSUMER_RELIABILITY)
    if group_id:
        settings["group.id"] = group_id
    settings.update({k.replace("_", "."): v for k, v in overrides.items()})
    return _ManualCommitConsumerHook(kafka_conn_id, settings).get_conn


@dataclass
class DeliveryTracker:
    """Counts delivery reports so that one failed delivery fails the whole publish.

    Give :meth:`callback` to the producer (``reliable_producer(..., on_delivery=tracker.callback)``), or as
    ``on_delivery`` to every ``produce`` call, then call :meth:`wait`.

    With ``errors_only=True`` the producer must be made with ``delivery_report_only_error=True``: librdkafka then
    reports failed messages only (no Python call per acknowledged message); the caller counts what it hands to
    ``produce`` in :attr:`sent`, and once the flush has emptied the queue every message that did not fail was
    acknowledged, so :meth:`wait` sets ``delivered = sent - failed``.
    """

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    errors_only: bool = False
    sent: int = 0

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        """librdkafka delivery report callback."""
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(f"topic {msg.topic()} key {msg.key()!r}: {err.str()}")

    def wait(self, producer: Producer, *, timeout_s: float) -> int:
        """Flush ``producer`` and raise :class:`PublishError` unless every message was acknowledged.

        Returns:
            the number of messages delivered so far.
        """
        deadline = time.monotonic() + timeout_s
        remaining = producer.flush(timeout_s)
        while remaining and time.monotonic() < deadline:
            remaining = producer.flush(max(0.1, deadline - time.monotonic()))
        if remaining:
            producer.purge()  # drop what the broker never took: the task fails and its retry re-publishes it
            producer.flush(0)
            failures = f"; {self.failed} failed delivery: " + "; ".join(self.errors[:3]) if self.failed else ""
            raise PublishError(
                f"{remaining} message(s) still unacknowledged after {timeout_s:.0f} s{failures}; "
                "is the broker up and reachable?"
            )
        if self.failed:
            total = self.sent if self.errors_only else self.failed + self.delivered
            raise PublishError(f"{self.failed} of {total} message(s) failed delivery: " + "; ".join(self.errors))
        if self.errors_only:  # the queue is empty and no report came: every message sent was acknowledged
            self.delivered = self.sent
        return self.delivered


def ensure_topics(kafka_conn_id: str, topics: list[str], *, partitions: int = 3) -> None:
    """Create the topics that do not exist yet, ``partitions`` each (the provider's hook skips existing ones).

    Kafka partitions are how the pipeline scales out: one video's frames share a key, hence a partition.
    """
    _AdminHook(kafka_config_id=kafka_conn_id).create_topic([(t, partitions, -1) for t in topics])


def topic_id(kafka_conn_id: str, topic: str, *, timeout_s: float = 15) -> str | None:
    """The broker's id of ``topic`` (a topic deleted and made again under the same name gets a new one), or
    ``None`` when it cannot be told (no DESCRIBE right, an old broker): callers then go on without the check."""
    from confluent_kafka import TopicCollection

    try:
        admin = _AdminHook(kafka_config_id=kafka_conn_id).get_conn
        description = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout_s)[topic].result(
            timeout_s
        )
    except Exception as exc:  # noqa: BLE001 - informational: the offsets are then trusted as they are
        log.warning("cannot read the id of topic %s (%s); stored offsets are used without checking it", topic, exc)
        return None
    return str(description.topic_id) if description.topic_id is not None else None


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from crowd.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m crowd.kafka", description="Kafka set-up for crowd.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("ensure-topics", help="create the Faces, alerts and messages topics if missing")
    create.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args(argv)
    settings = load_settings()
    topics = [settings.faces_topic, settings.alerts_topic, settings.messages_topic]
    ensure_topics(settings.kafka_conn_id, topics, partitions=args.partitions)
    print(f"topics ready: {', '.join(topics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
