"""Smoke tests: the suite really talks to a Kafka 4 broker in KRaft mode and to PostgreSQL, through the providers."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.services


def test_broker_is_kafka_4_in_kraft_mode(kafka_bootstrap: str) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        version = admin._client.check_version()
        features = admin.describe_features()
    finally:
        admin.close()
    assert version[0] == 4, f"expected a Kafka 4.x broker, got {version}"
    assert features["kraft.version"]["finalized"][0] >= 1, f"broker is not in KRaft mode: {features}"


def test_produce_and_consume_through_the_provider_hooks(faces_topic: str) -> None:
    from airflow.providers.apache.kafka.hooks.consume import KafkaConsumerHook

    from crowd.kafka import DeliveryTracker, reliable_producer

    producer = reliable_producer("kafka_default", timeout_s=20)
    tracker = DeliveryTracker()
    sent = {f"key-{i}".encode(): f"value-{i}-{uuid.uuid4().hex}".encode() for i in range(20)}
    for key, value in sent.items():
        producer.produce(faces_topic, key=key, value=value, on_delivery=tracker.callback)
    assert tracker.wait(producer, timeout_s=20) == len(sent)

    consumer = KafkaConsumerHook([faces_topic], kafka_config_id="kafka_default").get_consumer()
    received: dict[bytes, bytes] = {}
    try:
        for _ in range(60):
            for msg in consumer.consume(num_messages=100, timeout=1.0):
                if msg.error() is None:
                    received[msg.key()] = msg.value()
            if len(received) == len(sent):
                break
    finally:
        consumer.close()
    assert received == sent


def test_publish_to_a_dead_broker_fails_at_the_producers_message_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery failure must raise (the provider's operator would succeed), and the producer's own message timeout
    (3 s here, not librdkafka's 300 s default) is what ends it: the wait, allowed 10 s, sees the delivery report
    "Message timed out", not messages still unacknowledged at its end."""
    import json

    from crowd.kafka import DeliveryTracker, PublishError, reliable_producer

    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:9", "socket.timeout.ms": 1000}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEAD", json.dumps(dead))
    producer = reliable_producer("kafka_dead", timeout_s=3)
    tracker = DeliveryTracker()
    producer.produce("Faces", key=b"k", value=b"v", on_delivery=tracker.callback)
    with pytest.raises(PublishError, match="1 of 1 message.* failed delivery: .*Message timed out"):
        tracker.wait(producer, timeout_s=10)


def test_postgres_round_trip_through_the_provider_hook(pg_schema: str) -> None:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = PostgresHook(postgres_conn_id="crowd_postgres")
    hook.run("CREATE TABLE smoke (id int PRIMARY KEY, note text)")
    hook.insert_rows("smoke", [(1, "a"), (2, "b")], target_fields=["id", "note"])
    hook.insert_rows("smoke", [(2, "c")], target_fields=["id", "note"], replace=True, replace_index="id")
    assert hook.get_records("SELECT id, note FROM smoke ORDER BY id") == [(1, "a"), (2, "c")]
    assert hook.get_first("SELECT current_schema()")[0] == pg_schema
    assert hook.get_first("SHOW server_version")[0].split(".")[0].isdigit()
