"""Smoke tests: the suite really talks to a Kafka 4 broker in KRaft mode and to PostgreSQL, through the providers."""

from __future__ import annotations

import uuid
from pathlib import Path

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


@pytest.mark.parametrize("service", ["running", "crashed"])
def test_stopping_a_service_stops_the_task_processes_it_left_in_groups_of_their_own(
    service: str, tmp_path: Path
) -> None:
    """dev/stop.sh signals the process group of what dev/*.sh started with setsid; Airflow's supervisor puts each
    task process in a group of its own, which outlived the stop (still running with Kafka and PostgreSQL gone).
    A stand-in: a session leader whose child moves to its own group, as a task process does; also when the leader
    itself died first (a crashed standalone or worker: "not running", and its tasks went on)."""
    import os
    import subprocess
    import sys
    import threading
    import time

    root = Path(__file__).resolve().parents[1]
    pidfile, childfile = tmp_path / "svc.pid", tmp_path / "child.pid"
    child = f"import os, time; os.setpgid(0, 0); open({str(childfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    leader = subprocess.Popen(
        ["setsid", "bash", "-c", f'"{sys.executable}" -c "{child}" & wait'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=False,
    )  # fmt: skip
    threading.Thread(target=leader.wait, daemon=True).start()  # reaped at once: a zombie still answers kill -0
    deadline = time.monotonic() + 10
    while not childfile.exists() or not childfile.read_text():
        assert time.monotonic() < deadline, "the stand-in task process did not start"
        time.sleep(0.05)
    child_pid = int(childfile.read_text())
    leader_pid = int(subprocess.run(["ps", "-o", "sid=", "-p", str(child_pid)], capture_output=True, text=True).stdout)
    assert os.getpgid(child_pid) == child_pid != leader_pid  # its own group, the leader's session
    pidfile.write_text(str(leader_pid))
    if service == "crashed":
        os.kill(leader_pid, 9)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{leader_pid}").exists():  # reaped, not a zombie (kill -0 still finds a zombie)
            assert time.monotonic() < deadline, "the stand-in leader was not reaped"
            time.sleep(0.05)
        dead = subprocess.run(["bash", "-c", f"kill -0 {leader_pid}"], capture_output=True)
        assert dead.returncode != 0, "kill -0 still finds the crashed leader"
    try:
        subprocess.run(
            ["bash", "-c", f'source {root}/dev/common.sh && stop_pidfile "$1" stand-in', "_", str(pidfile)],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the task process in a group of its own outlived stop_pidfile"
    finally:
        for pid in (child_pid, leader_pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
