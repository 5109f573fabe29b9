from __future__ import annotations

import json
import random

import pytest

from crowd import messages
from crowd.detection import Detection
from crowd.messages import SCHEMA_PATH, FaceMessage, MessageError, build_message, schema_text


def _msg(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schema_version": 1, "video_id": "abc", "source": "v.mp4", "frame_id": 3, "frame_ts_ms": 100.0,
        "frame_width": 100, "frame_height": 50, "model": "mtcnn-onnx", "total_faces": 1,
        "faces": [{"face_id": 0, "bounding_box": {"x": 10, "y": 5, "width": 20, "height": 20}, "confidence": 0.9}],
    }  # fmt: skip
    base.update(over)
    return base


def test_build_message_orders_clips_and_round_trips() -> None:
    dets = [Detection(90, 40, 30, 30, 0.8), Detection(-5, 0, 20, 20, 0.99), Detection(200, 200, 5, 5, 0.7)]
    msg = build_message("vid", "a.mp4", 30, 1001.0009, (50, 100, 3), dets, "m")
    assert msg.total_faces == 2  # the box outside the frame is dropped
    assert [f.confidence for f in msg.faces] == [0.99, 0.8] and [f.face_id for f in msg.faces] == [0, 1]
    assert msg.faces[0].bounding_box.model_dump() == {"x": 0, "y": 0, "width": 15, "height": 20}
    assert msg.faces[1].bounding_box.model_dump() == {"x": 90, "y": 40, "width": 10, "height": 10}
    raw = msg.to_json()
    assert b" " not in raw and json.loads(raw)["frame_ts_ms"] == 1001.001
    assert FaceMessage.from_json(raw) == msg


@pytest.mark.parametrize(
    ("change", "text"),
    [
        pytest.param({"total_faces": 2}, "total_faces=2", id="count-mismatch"),
        pytest.param({"frame_width": 20}, "outside", id="box-outside-frame"),
        pytest.param({"schema_version": 2}, "schema_version", id="wrong-version"),
        pytest.param({"extra": 1}, "extra", id="unknown-field"),
        pytest.param({"frame_id": -1}, "frame_id", id="negative-frame"),
        pytest.param(
            {"faces": [{"face_id": 0, "bounding_box": {"x": 1, "y": 1, "width": 2, "height": 2}, "confidence": 1.5}]},
            "confidence",
            id="confidence-above-1",
        ),  # fmt: skip
    ],
)
def test_invalid_messages_rejected(change: dict[str, object], text: str) -> None:
    FaceMessage.from_json(json.dumps(_msg()))  # the base is valid
    with pytest.raises(MessageError, match=text):
        FaceMessage.from_json(json.dumps(_msg(**change)))


def test_not_json_rejected() -> None:
    with pytest.raises(MessageError, match="invalid Faces message"):
        FaceMessage.from_json(b"{not json")


def test_schema_file_up_to_date() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "run `python -m crowd schema` to regenerate the schema file"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert {"frame_id", "total_faces", "faces", "video_id"} <= set(schema["required"])


def _random_text(rng: random.Random, low: int) -> str:
    alphabet = 'abcXYZ09 _-/.:é漢😀"\\\n\t\x00\x1f\u2028'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, 40)))


def test_msgspec_encoding_matches_pydantic_on_random_messages() -> None:
    """Differential: msgspec's ``to_json`` vs pydantic's ``model_dump_json`` on 3,000 random valid messages."""
    assert messages._encoder is not None, "msgspec is missing: to_json falls back to pydantic, nothing to compare"
    rng = random.Random(9)
    same_bytes = 0
    for i in range(3000):
        fw, fh = rng.randint(1, 4000), rng.randint(1, 3000)
        dets = [
            Detection(rng.randint(-50, fw), rng.randint(-50, fh), rng.randint(0, 900), rng.randint(0, 900),
                      rng.choice([rng.random(), rng.uniform(-1, 2), 1.0, 0.0, 1e-9]))
            for _ in range(rng.choice([0, 1, 2, 5, 40]))
        ]  # fmt: skip
        ts = rng.choice([0.0, rng.uniform(0, 1e7), 10 ** rng.uniform(-6, 20), 1e16, float(rng.randint(0, 10**9))])
        msg = build_message(
            _random_text(rng, 1)[:128], _random_text(rng, 0), rng.randint(0, 2**40), ts, (fh, fw, 3), dets,
            _random_text(rng, 1),
        )  # fmt: skip
        if i % 3 == 0:  # also messages made by validation, not by build_message
            msg = FaceMessage.model_validate_json(msg.model_dump_json())
        fast, slow = msg.to_json(), msg.model_dump_json().encode()
        assert json.loads(fast) == json.loads(slow), (fast, slow)
        assert FaceMessage.from_json(fast) == msg
        assert list(json.loads(fast)) == list(FaceMessage.model_fields)  # keys in schema order
        if msg.frame_ts_ms < 1e16:  # above, msgspec writes 1e16 where pydantic writes 1e+16: same number
            assert fast == slow
            same_bytes += 1
    assert same_bytes > 2000  # ~a quarter of the timestamps are >= 1e16 on purpose


def test_to_json_refuses_foreign_objects() -> None:
    with pytest.raises(NotImplementedError, match="cannot encode"):
        messages._fields(object())
