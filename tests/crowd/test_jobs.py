"""crowd.jobs publishing: a full local producer queue waits for deliveries instead of failing the task."""

from __future__ import annotations

import pytest

from crowd.jobs import _Publisher
from crowd.kafka import reliable_producer
from crowd.messages import FaceMessage

pytestmark = pytest.mark.services


def test_publisher_survives_a_full_local_queue(faces_topic: str, kafka_bootstrap: str) -> None:
    producer = reliable_producer("kafka_default", timeout_s=20, queue_buffering_max_messages=5, linger_ms=50)
    publisher = _Publisher(producer, faces_topic)
    for frame_id in range(200):  # 40x the queue: produce() raises BufferError many times
        publisher(FaceMessage(video_id="v", source="s.mp4", frame_id=frame_id, frame_ts_ms=frame_id * 40.0,
                              frame_width=64, frame_height=48, model="m", total_faces=0, faces=[]))  # fmt: skip
    assert publisher.tracker.wait(producer, timeout_s=20) == 200
    assert publisher.sent == 200 and publisher.tracker.failed == 0
