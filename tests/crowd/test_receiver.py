"""The ``/receive`` background consumer (:mod:`crowd.receiver`) against the real Kafka broker: nothing dropped,
nothing lost across a restart or a partition moving to another receiver, no value that stops it."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from crowd.receiver import (
    MAX_VALUE_DEPTH,
    LeaseError,
    MessageReceiver,
    decode_value_as,
    kafka_python_security,
)
from tests.conftest import create_topic

# --- pure parts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b'{"content": "hi"}', {"content": "hi"}, id="json"),
        pytest.param(b"plain text", "plain text", id="text"),
        pytest.param(b"\xff\xfe", "\ufffd\ufffd", id="not-utf8"),
        pytest.param(None, None, id="tombstone"),
        pytest.param(b"[" * 5000, "[" * 5000, id="too-deep-for-json-loads"),
        pytest.param(b"[" * 300 + b"]" * 300, "[" * 300 + "]" * 300, id="too-deep-to-serialise"),
        pytest.param(
            b"[" * MAX_VALUE_DEPTH + b"]" * MAX_VALUE_DEPTH,
            json.loads("[" * MAX_VALUE_DEPTH + "]" * MAX_VALUE_DEPTH),
            id="at-the-depth-limit",
        ),
        pytest.param(b'[{"a": [1, 2]}, {"b": {}}]', [{"a": [1, 2]}, {"b": {}}], id="nested-within-limit"),
        pytest.param(b'{"x": "\\ud800"}', '{"x": "\\ud800"}', id="lone-surrogate-escape"),  # not UTF-8 once decoded
        pytest.param(b'{"x": "\\ud83d\\ude00"}', {"x": "\U0001f600"}, id="surrogate-pair-escape"),
        pytest.param(b'{"x": NaN}', '{"x": NaN}', id="nan"),
        pytest.param(b"[Infinity]", "[Infinity]", id="infinity"),
        pytest.param(b'{"n": 1e400}', '{"n": 1e400}', id="float-overflow"),  # was {"n": inf}: null in a response
        pytest.param(b"-1e999", "-1e999", id="negative-float-overflow"),
        pytest.param(b"[1e308, 2.5e-400]", [1e308, 0.0], id="large-and-tiny-floats"),  # finite: JSON as it is
    ],
)
def test_decode_value(raw: bytes | None, expected: Any) -> None:
    assert decode_value_as(raw)[0] == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"hello", ("hello", "text"), id="text"),
        pytest.param(b'"hello"', ("hello", "json"), id="json-string"),
        pytest.param(b"42", (42, "json"), id="json-number"),
        pytest.param(b'{"x": NaN}', ('{"x": NaN}', "text"), id="not-json"),
        pytest.param(None, (None, None), id="tombstone"),
    ],
)
def test_decode_value_says_which_format_it_read(raw: bytes | None, expected: tuple[Any, str | None]) -> None:
    """/receive gave the string hello for both the bytes hello and "hello": the format tells them apart."""
    assert decode_value_as(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"x": "\\ud800"}', id="high"),
        pytest.param(b'["\\udfff", 1]', id="low"),
        pytest.param(b'{"x": NaN}', id="nan"),
        pytest.param(b'{"x": 1e400}', id="float-overflow"),
    ],
)
def test_a_value_json_cannot_carry_serialises_in_a_response(raw: bytes) -> None:
    """Such a value failed the whole /receive response (a 500), and the messages taken for it were lost."""
    from pydantic import BaseModel

    class Item(BaseModel):
        value: Any

    assert json.loads(Item(value=decode_value_as(raw)[0]).model_dump_json()) == {"value": raw.decode()}


def test_a_value_at_the_depth_limit_serialises_in_a_response() -> None:
    from pydantic import BaseModel

    class Item(BaseModel):
        value: Any

    deep, _ = decode_value_as(b"[" * MAX_VALUE_DEPTH + b"]" * MAX_VALUE_DEPTH)
    # pydantic's serialisation raises past its depth limit; within it the value comes back whole
    assert json.loads(Item(value=deep).model_dump_json())["value"] == deep


def test_connection_security_settings_reach_the_kafka_python_consumer() -> None:
    config = {
        "bootstrap.servers": "b:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "u",
        "sasl.password": "p",
        "ssl.ca.location": "/ca.pem",
        "ssl.endpoint.identification.algorithm": "none",
        "linger.ms": 5,
    }
    assert kafka_python_security(config) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
        "ssl_cafile": "/ca.pem",
        "ssl_check_hostname": False,
    }
    with pytest.raises(ValueError, match="sasl.oauthbearer.config"):
        kafka_python_security({"sasl.oauthbearer.config": "x"})


# --- against the broker ----------------------------------------------------------------------------------------


@pytest.fixture
def topic_factory(kafka_admin: Any) -> Iterator[Callable[[int], str]]:
    made: list[str] = []

    def make(partitions: int = 1) -> str:
        made.append(create_topic(kafka_admin, f"test-recv-{uuid.uuid4().hex[:10]}", partitions=partitions))
        return made[-1]

    yield make
    if made:
        kafka_admin.delete_topics(made)


@pytest.fixture
def receivers(kafka_bootstrap: str) -> Iterator[Callable[..., MessageReceiver]]:
    """Start receivers; all are stopped at the end."""
    started: list[MessageReceiver] = []

    def start(topic: str, group_id: str, **kwargs: Any) -> MessageReceiver:
        receiver = MessageReceiver(
            kafka_bootstrap,
            topic,
            group_id=group_id,
            consumer_config={"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
            **kwargs,
        )
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def _send(bootstrap: str, topic: str, values: list[bytes], partitions: int = 1) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": "lz4", "acks": "all"})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, partition=i % partitions)
    assert producer.flush(30) == 0


def _numbers(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"n": i}).encode() for i in range(start, start + n)]


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _take_until(receivers: list[MessageReceiver], count: int, timeout_s: float = 60) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        for receiver in receivers:
            got += [m.value for m in receiver.take(1000)]
        time.sleep(0.1)
    time.sleep(1.5)  # anything more (a duplicate) would come now
    for receiver in receivers:
        got += [m.value for m in receiver.take(1000)]
    return got


@pytest.mark.services
def test_a_full_queue_pauses_reading_and_drops_nothing(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    bound = 20
    topic = topic_factory(1)
    receiver = receivers(topic, f"test-recv-{uuid.uuid4().hex[:8]}", max_queue=bound)
    _send(kafka_bootstrap, topic, _numbers(5 * bound))
    _wait(lambda: receiver.stats().paused, "the receiver to pause on a full queue")
    time.sleep(1.0)  # paused: no more is read
    stats = receiver.stats()
    assert stats.queued == bound and stats.consumed == bound, stats
    got = _take_until([receiver], 5 * bound)
    assert got == [{"n": i} for i in range(5 * bound)], "lost, duplicated or out of order"
    _wait(lambda: not receiver.stats().paused and receiver.stats().lag == 0, "the receiver to catch up")


@pytest.mark.services
def test_the_queue_is_bounded_in_bytes_too(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """Large messages (any producer may write up to the broker's 1 MB): reading pauses once the queued bytes reach
    ``max_queue_bytes`` (plus at most one fetch), not only at ``max_queue`` messages, and one take returns at most
    that many bytes; nothing is lost, duplicated or reordered (before: 1000 queued messages of 1 MB, 1 GB)."""
    from confluent_kafka import Producer

    topic, bound = topic_factory(1), 16_000
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    values = [json.dumps({"n": i, "pad": os.urandom(1500).hex()}).encode() for i in range(40)]  # ~3 KB each
    for value in values:
        producer.produce(topic, value=value)
        producer.flush(30)  # a record batch each
    receiver = receivers(topic, f"test-recv-{uuid.uuid4().hex[:8]}", max_queue_bytes=bound)
    _wait(lambda: receiver.stats().paused, "the receiver to pause on the byte bound")
    stats = receiver.stats()
    assert bound <= stats.queued_bytes <= 2 * bound and stats.queued < 40, stats
    first = receiver.take(1000)
    assert 0 < sum(len(values[m.value["n"]]) for m in first) <= bound
    got = [m.value["n"] for m in first] + [v["n"] for v in _take_until([receiver], 40 - len(first))]
    assert got == list(range(40)), "lost, duplicated or out of order"


@pytest.mark.services
def test_the_queue_holds_raw_bytes_and_one_take_is_capped(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """Messages of ~900 KB of ``[{},{},...]``: the queue counted their bytes but held them decoded, ~24 times larger
    (a 64 MiB queue held 1.5 GB). Now the memory it takes is of the order of the bytes it counts (about twice them
    here, with the Kafka client's buffers), and one take hands out at most ``max_take_bytes`` of them (decoded),
    the rest staying queued."""
    import gc
    import tracemalloc

    topic, bound, take_bytes = topic_factory(1), 4 * 1024 * 1024, 2 * 1024 * 1024
    value = b"[" + b",".join([b"{}"] * 300_000) + b"]"  # 900 KB
    _send(kafka_bootstrap, topic, [value] * 8)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        receiver = receivers(
            topic, f"test-recv-{uuid.uuid4().hex[:8]}", max_queue_bytes=bound, max_take_bytes=take_bytes
        )
        _wait(lambda: receiver.stats().paused, "the receiver to pause on the byte bound")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = receiver.stats()
    assert stats.queued_bytes == stats.queued * len(value) >= bound, stats
    assert held < 4 * stats.queued_bytes, f"{held / 2**20:.0f} MiB held for {stats.queued_bytes / 2**20:.1f} MiB queued"
    first = receiver.take(1000)
    assert len(first) == take_bytes // len(value) and all(len(m.value) == 300_000 for m in first)
    assert receiver.stats().queued == stats.queued - len(first) > 0
    assert len(first) + len(_take_until([receiver], 8 - len(first))) == 8


@pytest.mark.services
def test_after_a_restart_undelivered_messages_come_again_and_delivered_ones_do_not(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group)
    _send(kafka_bootstrap, topic, _numbers(10))
    _wait(lambda: len(first) == 10, "10 queued messages")
    assert [m.value["n"] for m in first.take(4)] == [0, 1, 2, 3]
    first.stop()  # the API server stops with 6 messages queued
    second = receivers(topic, group)
    assert _take_until([second], 6) == [{"n": i} for i in range(4, 10)]


@pytest.mark.services
def test_a_partition_moving_to_another_receiver_loses_and_duplicates_nothing(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    topic, group = topic_factory(2), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group)
    _send(kafka_bootstrap, topic, _numbers(40), partitions=2)
    _wait(lambda: len(first) == 40, "40 queued messages")
    delivered = [m.value for m in first.take(10)]
    second = receivers(topic, group)  # the group rebalances: one partition moves to the second receiver
    _wait(
        lambda: len(first.stats().assigned_partitions) == len(second.stats().assigned_partitions) == 1,
        "each receiver to hold one partition",
    )
    delivered += _take_until([first, second], 30)
    assert sorted(v["n"] for v in delivered) == list(range(40)), "lost or duplicated across the rebalance"
    assert first.stats().requeued > 0, "the moved partition's queued messages were not handed over"


@pytest.mark.services
def test_messages_taken_just_before_a_rebalance_are_committed_when_their_partition_moves(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """Taken by /receive, not yet committed by the periodic commit (60 s here), when the partition moves: the
    commit made as it is revoked must land, or its new owner delivers them again (that commit always failed:
    kafka-python runs the listener on its IO thread, where a blocking commit raises)."""
    topic, group = topic_factory(2), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group, commit_every_s=60)
    _send(kafka_bootstrap, topic, _numbers(40), partitions=2)
    _wait(lambda: len(first) == 40, "40 queued messages")
    delivered = [m.value for m in first.take(40)]
    second = receivers(topic, group, commit_every_s=60)
    _wait(
        lambda: len(first.stats().assigned_partitions) == len(second.stats().assigned_partitions) == 1,
        "each receiver to hold one partition",
    )
    time.sleep(2)  # time for the moved partition's messages to reach the second receiver, if they come again
    again = [m.value for m in second.take(100)] + [m.value for m in first.take(100)]
    assert sorted(v["n"] for v in delivered) == list(range(40))
    assert again == [], f"delivered again after the rebalance: {len(again)} messages"
    assert first.stats().errors == 0, first.stats().last_error


@pytest.mark.services
def test_values_that_are_not_plain_json_neither_stop_the_consumer_nor_skip_others(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    topic = topic_factory(1)
    receiver = receivers(topic, f"test-recv-{uuid.uuid4().hex[:8]}")
    values = [b'{"n": 0}', b"[" * 5000, b"[" * 300 + b"]" * 300, b"\xff not utf-8", b'{"n": 4}']
    _send(kafka_bootstrap, topic, values)
    got = _take_until([receiver], len(values))
    assert got == [{"n": 0}, "[" * 5000, "[" * 300 + "]" * 300, "\ufffd not utf-8", {"n": 4}]
    assert receiver.stats().errors == 0


@pytest.mark.services
def test_a_lease_hides_its_messages_until_confirmed_and_hands_them_out_again_when_it_runs_out(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    receiver = receivers(topic, group, commit_every_s=0.2)
    _send(kafka_bootstrap, topic, _numbers(10))
    _wait(lambda: len(receiver) == 10, "10 queued messages")
    lost_id, lost = receiver.lease(4, lease_s=0.5)
    assert [m.value["n"] for m in lost] == [0, 1, 2, 3] and lost_id
    assert [m.value["n"] for m in receiver.take(2)] == [4, 5], "a leased message was handed out twice"
    assert receiver.stats().leased == 4
    time.sleep(0.7)
    lease_id, again = receiver.lease(100, lease_s=30)  # ran out: first again, before what was queued after them
    assert [m.value["n"] for m in again] == [0, 1, 2, 3, 6, 7, 8, 9]
    assert [m.offset for m in again[:4]] == [m.offset for m in lost]
    with pytest.raises(LeaseError) as late:
        receiver.confirm(lost_id)
    assert late.value.expired
    with pytest.raises(LeaseError) as unknown:
        receiver.confirm("never-made")
    assert not unknown.value.expired
    done = receiver.confirm(lease_id)
    assert (done.confirmed, done.returned) == (8, 0)
    assert receiver.confirm(lease_id) == done, "a repeated confirm (its first answer lost) gets the same answer"
    stats = receiver.stats()
    assert (stats.leased, stats.confirmed, stats.lease_expired) == (0, 8, 4), stats
    receiver.stop()  # everything confirmed or taken: committed on the way out, nothing comes again
    assert _take_until([receivers(topic, group)], 0, timeout_s=3) == []


@pytest.mark.services
def test_leases_that_run_out_one_after_another_hand_their_messages_out_again_in_offset_order(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """Each lease that ran out put its messages in front of the queue: a later one's went before an earlier one's
    (5, 6, 0, 1, ...), and a client keeping the highest offset seen per partition dropped 0-4 as seen."""
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    receiver = receivers(topic, group)
    _send(kafka_bootstrap, topic, _numbers(10))
    _wait(lambda: len(receiver) == 10, "10 queued messages")
    receiver.lease(5, lease_s=0.3)
    receiver.lease(2, lease_s=1.0)
    time.sleep(0.6)
    assert len(receiver) == 8  # the first lease ran out (queued again); the second has not
    time.sleep(0.8)
    _, again = receiver.lease(100, lease_s=30)
    assert [m.value["n"] for m in again] == list(range(10))


@pytest.mark.services
def test_offsets_are_not_committed_past_a_leased_message(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """A process that dies (or stops) with an open lease: the leased messages come again from the next consumer,
    and so does what was taken after them from the same partition (at least once), but nothing before them."""
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group, commit_every_s=0.2)
    _send(kafka_bootstrap, topic, _numbers(10))
    _wait(lambda: len(first) == 10, "10 queued messages")
    assert [m.value["n"] for m in first.take(3)] == [0, 1, 2]
    _lease_id, leased = first.lease(2, lease_s=60)
    assert [m.value["n"] for m in leased] == [3, 4]
    assert [m.value["n"] for m in first.take(2)] == [5, 6]
    time.sleep(1.0)  # several periodic commits
    first.stop()
    second = receivers(topic, group)
    assert _take_until([second], 7) == [{"n": i} for i in range(3, 10)]


@pytest.mark.services
def test_a_lease_whose_partition_is_revoked_returns_those_messages_and_nothing_is_lost_or_doubled(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver]
) -> None:
    """A rebalance (kafka-python revokes every partition, then assigns) takes the leased messages of the revoked
    partitions back: whoever owns them next reads them again from the committed offset, and confirming the lease
    says how many were returned so."""
    topic, group = topic_factory(2), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group, commit_every_s=0.2)
    _send(kafka_bootstrap, topic, _numbers(40), partitions=2)
    _wait(lambda: len(first) == 40, "40 queued messages")
    lease_id, leased = first.lease(40, lease_s=120)
    assert len(leased) == 40
    second = receivers(topic, group)
    _wait(
        lambda: len(first.stats().assigned_partitions) == len(second.stats().assigned_partitions) == 1,
        "each receiver to hold one partition",
    )
    done = first.confirm(lease_id)
    assert done.confirmed + done.returned == 40 and done.returned > 0, done
    again = [v["n"] for v in _take_until([first, second], done.returned)]
    assert len(again) == len(set(again)) == done.returned, "returned messages lost or doubled"
    assert set(again) <= {m.value["n"] for m in leased}


@pytest.mark.services
@pytest.mark.parametrize("later", ["taken", "leased-and-confirmed"])
def test_messages_of_a_lease_that_ran_out_are_not_committed_past_by_later_deliveries(
    kafka_bootstrap: str, topic_factory: Callable[[int], str], receivers: Callable[..., MessageReceiver], later: str
) -> None:
    """A slow reader's lease runs out after a faster one took (or leased and confirmed) the messages behind it: the
    expired ones are queued again, below what was delivered. Offsets were committed past them (to the delivered
    end), so a stop (or a partition moving) lost them for good; now the commit stops below them."""
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    first = receivers(topic, group, commit_every_s=0.2)
    _send(kafka_bootstrap, topic, _numbers(10))
    _wait(lambda: len(first) == 10, "10 queued messages")
    _slow, held = first.lease(5, lease_s=0.5)
    assert [m.value["n"] for m in held] == [0, 1, 2, 3, 4]
    if later == "taken":
        assert [m.value["n"] for m in first.take(5)] == [5, 6, 7, 8, 9]
    else:
        fast, rest = first.lease(5, lease_s=60)
        assert [m.value["n"] for m in rest] == [5, 6, 7, 8, 9]
        first.confirm(fast)
    time.sleep(1.0)  # the slow lease runs out; several periodic commits
    assert len(first) == 5
    first.stop()
    second = receivers(topic, group)  # one committed offset per partition: 5-9 come again too (at least once)
    assert _take_until([second], 10) == [{"n": i} for i in range(10)]


@pytest.mark.services
def test_leased_messages_below_later_deliveries_come_again_after_the_consumer_is_rebuilt(
    kafka_bootstrap: str,
    topic_factory: Callable[[int], str],
    receivers: Callable[..., MessageReceiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer error rebuilds the consumer and drops what was queued or leased. When its close does not reach
    the rebalance listener (it raises first, or the broker is gone), the new consumer started past the delivered
    end, skipping the leased messages below it, and committed past them."""
    made = MessageReceiver._make_consumer

    def make_consumer(self: MessageReceiver) -> Any:
        consumer = made(self)
        close = consumer.close

        def close_without_listener(*args: Any, **kwargs: Any) -> None:
            consumer._subscription.rebalance_listener = None  # as when close fails before revoking
            close(*args, **kwargs)

        consumer.close = close_without_listener
        return consumer

    monkeypatch.setattr(MessageReceiver, "_make_consumer", make_consumer)
    topic, group = topic_factory(1), f"test-recv-{uuid.uuid4().hex[:8]}"
    receiver = receivers(topic, group, commit_every_s=0.2)
    _send(kafka_bootstrap, topic, _numbers(20))
    _wait(lambda: len(receiver) == 20, "20 queued messages")
    lease_id, leased = receiver.lease(10, lease_s=120)
    assert [m.value["n"] for m in leased] == list(range(10))
    assert [m.value["n"] for m in receiver.take(10)] == list(range(10, 20))
    original = receiver._update_lag

    def fail_once(consumer: Any) -> None:
        receiver._update_lag = original  # type: ignore[method-assign]
        raise RuntimeError("the broker went away (simulated)")

    receiver._update_lag = fail_once  # type: ignore[method-assign]
    _wait(lambda: receiver.stats().reconnects >= 1, "the consumer to be rebuilt")
    again = [v["n"] for v in _take_until([receiver], 20)]
    assert again[:10] == list(range(10)), f"the leased messages did not come again: {again}"
    assert receiver.confirm(lease_id).returned == 10
