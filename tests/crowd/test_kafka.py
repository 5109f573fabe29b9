"""crowd.kafka against the real broker: the reliability settings win over whatever the connection's extra says."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition

from crowd.kafka import DeliveryTracker, manual_commit_consumer, reliable_producer

pytestmark = pytest.mark.services


def _connection(monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, **extra: object) -> str:
    """Point ``kafka_careless`` at the broker with ``extra`` on top (dots written as underscores)."""
    settings = {"bootstrap.servers": kafka_bootstrap, "group.id": "crowd-test-careless"}
    settings.update({k.replace("_", "."): v for k, v in extra.items()})
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_CARELESS", json.dumps({"conn_type": "kafka", "extra": settings}))
    return "kafka_careless"


def test_the_producer_waits_for_the_broker_whatever_acks_the_connection_asks_for(
    faces_topic: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``acks=0`` in a connection would make every delivery report a success nobody checked (librdkafka reports
    no offset then): the producer must still get ``acks=all`` and idempotence, so the reports carry offsets."""
    conn_id = _connection(monkeypatch, kafka_bootstrap, acks="0", enable_idempotence="false")
    reports = []
    producer = reliable_producer(conn_id, timeout_s=20, on_delivery=lambda err, msg: reports.append((err, msg)))
    for i in range(5):
        producer.produce(faces_topic, key=b"k", value=b"%d" % i)
    assert producer.flush(30) == 0
    assert [err for err, _ in reports] == [None] * 5
    assert {msg.offset() for _, msg in reports} == {0, 1, 2, 3, 4}, "the broker did not acknowledge them"


def test_the_consumer_commits_nothing_even_when_the_connection_asks_for_auto_commit(
    faces_topic: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offsets are the sink's to store (in PostgreSQL, with the rows): a connection extra turning auto-commit on
    must not make the consumer commit what it merely read."""
    conn_id = _connection(
        monkeypatch,
        kafka_bootstrap,
        enable_auto_commit="true",
        auto_commit_interval_ms="100",
        enable_auto_offset_store="true",
    )
    producer = reliable_producer(conn_id, timeout_s=20)
    tracker = DeliveryTracker()
    for i in range(6):
        producer.produce(faces_topic, key=b"%d" % i, value=b"x", on_delivery=tracker.callback)
    assert tracker.wait(producer, timeout_s=30) == 6

    group = f"crowd-test-careless-{faces_topic}"
    consumer = manual_commit_consumer(conn_id, group_id=group)
    consumer.subscribe([faces_topic])
    read, deadline = 0, time.monotonic() + 30
    while read < 6 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            read += 1
    time.sleep(1.0)  # ten auto-commit intervals
    consumer.close()
    assert read == 6

    checker = manual_commit_consumer(conn_id, group_id=group)
    try:
        committed = checker.committed([TopicPartition(faces_topic, p) for p in range(3)], timeout=15)
    finally:
        checker.close()
    assert [tp.offset for tp in committed] == [OFFSET_INVALID] * 3, committed


def test_admin_calls_do_not_warn_about_the_connections_consumer_settings(
    faces_topic: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The connection carries the drain's consumer settings; the admin client (topic ids at every drain, topic
    creation) passed them on and librdkafka printed a CONFWARN per setting on stderr, which Airflow's task runner
    logs at ERROR: every green drain showed three errors."""
    from crowd.kafka import ensure_topics, topic_id

    conn_id = _connection(monkeypatch, kafka_bootstrap, enable_auto_commit="false", auto_offset_reset="earliest")
    capfd.readouterr()
    assert topic_id(conn_id, faces_topic)
    ensure_topics(conn_id, [faces_topic])
    time.sleep(0.5)  # librdkafka logs from its own threads
    err = capfd.readouterr().err
    assert "CONFWARN" not in err, err
