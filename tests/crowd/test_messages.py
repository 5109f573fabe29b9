from __future__ import annotations

import json
import random
import string

import jsonschema
import msgspec
import pytest

from crowd.detection import Detection
from crowd.messages import MAX_FRAME_TS_MS, SCHEMA_PATH, FaceMessage, MessageError, build_message, schema_text


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
    assert msgspec.structs.asdict(msg.faces[0].bounding_box) == {"x": 0, "y": 0, "width": 15, "height": 20}
    assert msgspec.structs.asdict(msg.faces[1].bounding_box) == {"x": 90, "y": 40, "width": 10, "height": 10}
    raw = msg.to_json()
    assert b" " not in raw and json.loads(raw)["frame_ts_ms"] == 1001.001
    assert FaceMessage.from_json(raw) == msg


def test_faces_with_equal_published_confidence_are_ordered_by_position() -> None:
    """face_id follows the confidence as published (4 decimals): two faces both published at 1.0 go top to bottom,
    whatever their unrounded scores (MTCNN gives many 0.9999x). Before, the unrounded order decided, so ids
    contradicted the message and could swap between runs over a difference of 1e-5."""
    for low, high in ((0.99999, 0.999996), (0.999996, 0.99999)):
        lower_face = Detection(x=10, y=300, width=20, height=20, confidence=high)
        upper_face = Detection(x=40, y=20, width=20, height=20, confidence=low)
        message = build_message("v", "/v.mp4", 0, 0.0, (480, 640, 3), [lower_face, upper_face], "m")
        assert [(f.face_id, f.bounding_box.y, f.confidence) for f in message.faces] == [(0, 20, 1.0), (1, 300, 1.0)]


@pytest.mark.parametrize(
    ("change", "text"),
    [
        pytest.param({"total_faces": 2}, "total_faces=2", id="count-mismatch"),
        pytest.param({"frame_width": 20}, "outside", id="box-outside-frame"),
        pytest.param({"frame_height": 20}, "outside", id="box-below-frame"),
        pytest.param({"schema_version": 2}, "schema_version", id="wrong-version"),
        pytest.param({"extra": 1}, "extra", id="unknown-field"),
        pytest.param({"frame_id": -1}, "frame_id", id="negative-frame"),
        pytest.param({"frame_id": 2**53}, "frame_id", id="frame-id-past-javascript-s-integers"),
        pytest.param({"model": "x;=1+1"}, "model", id="model-with-a-separator"),  # exported to CSV: a formula
        pytest.param({"model": "-2+3"}, "model", id="model-starting-a-formula"),
        pytest.param({"model": "m\n"}, "model", id="model-trailing-newline"),
        # 1e308 was stored: an alert from it lasted 10^297 years
        pytest.param({"frame_ts_ms": MAX_FRAME_TS_MS * 1.0001}, "frame_ts_ms", id="timestamp-past-100-years"),
        # the API reads a video by its id in the URL path: an id it cannot take would be stored and never readable
        pytest.param({"video_id": "rtsp://cam1/stream"}, "video_id", id="video-id-with-slash"),
        pytest.param({"video_id": "-x"}, "video_id", id="video-id-leading-dash"),
        pytest.param({"video_id": "abc\n"}, "video_id", id="video-id-trailing-newline"),
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


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{not json", "not_json"), (b"", "not_json"), (b'{"video_id": "\xff\xfe"}', "not_utf8"), (b"[1]", "schema")],
    ids=repr,
)
def test_undecodable_messages_rejected_with_their_kind(raw: bytes, code: str) -> None:
    with pytest.raises(MessageError, match="invalid Faces message") as refused:
        FaceMessage.from_json(raw)
    assert refused.value.code == code and refused.value.problem in str(refused.value)


def test_schema_file_up_to_date() -> None:
    assert SCHEMA_PATH.read_text() == schema_text(), "run `python -m crowd schema` to regenerate the schema file"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert {"frame_id", "total_faces", "faces", "video_id"} <= set(schema["required"])


def _random_text(rng: random.Random, low: int) -> str:
    alphabet = 'abcXYZ09 _-/.:é漢😀"\\\n\t\x00\x1f\u2028'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, 40)))


def _random_message(rng: random.Random) -> FaceMessage:
    fw, fh = rng.randint(1, 4000), rng.randint(1, 3000)
    dets = [
        Detection(rng.randint(-50, fw), rng.randint(-50, fh), rng.randint(0, 900), rng.randint(0, 900),
                  rng.choice([rng.random(), rng.uniform(-1, 2), 1.0, 0.0, 1e-9, float("nan")]))
        for _ in range(rng.choice([0, 1, 2, 5, 40]))
    ]  # fmt: skip
    ts = rng.choice(
        [0.0, rng.uniform(0, 1e7), 10 ** rng.uniform(-6, 12.4), MAX_FRAME_TS_MS, float(rng.randint(0, 10**9))]
    )
    return build_message(
        _random_video_id(rng), _random_text(rng, 0), rng.randint(0, 2**40), ts, (fh, fw, 3), dets,
        _random_model(rng),
    )  # fmt: skip


def _random_model(rng: random.Random) -> str:
    """Text ``model`` takes: no ';', '|' or control character, no formula start (``MODEL_PATTERN``)."""
    rest = 'abcXYZ09 _-+=@/.:é漢😀"\\,'
    return rng.choice("abcXYZ09é漢😀 ") + "".join(rng.choice(rest) for _ in range(rng.randint(0, 40)))


def _random_video_id(rng: random.Random) -> str:
    first = string.ascii_letters + string.digits
    return rng.choice(first) + "".join(rng.choices(first + "_.-", k=rng.choice([0, 1, 31, 127])))


def test_built_messages_round_trip_and_satisfy_the_schema_file() -> None:
    """3,000 random messages from ``build_message``: valid by the schema file, JSON round trip exact, key order."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    rng = random.Random(9)
    for _ in range(3000):
        msg = _random_message(rng)
        raw = msg.to_json()
        parsed = json.loads(raw)
        validator.validate(parsed)
        assert parsed == msg.to_dict()
        assert list(parsed) == list(FaceMessage.__struct_fields__)  # keys in schema order, seed fields included
        assert FaceMessage.from_json(raw) == msg == FaceMessage.from_dict(parsed)


@pytest.mark.parametrize(
    "change",
    [
        {"total_faces": 2}, {"frame_width": 20}, {"frame_height": 20}, {"schema_version": 2}, {"extra": 1}, {"frame_id": -1},
        {"frame_id": "3"}, {"video_id": ""}, {"video_id": "v" * 129}, {"video_id": "cam/1"}, {"model": ""},
        {"faces": [{"face_id": 0, "bounding_box": {"x": 1, "y": 1, "width": 0, "height": 2}, "confidence": 0.5}]},
        {"faces": [{"face_id": 0, "bounding_box": {"x": 1, "y": 1, "width": 2, "height": 2}, "confidence": 1.5}]},
        {"faces": [{"face_id": 0, "bounding_box": {"x": 1, "y": 1, "width": 2, "height": 2}}]},
    ],
    ids=lambda change: "-".join(change),
)  # fmt: skip
def test_schema_file_and_decoder_refuse_the_same_field_errors(change: dict[str, object]) -> None:
    """Every field error the schema file refuses (types, ranges, unknown fields) the decoder refuses too; the
    cross-field rules of ``__post_init__`` only the decoder knows. (Valid messages pass both: the test above.)"""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    schema_ok = validator.is_valid(_msg(**change))
    with pytest.raises(MessageError):
        FaceMessage.from_json(json.dumps(_msg(**change)))
    cross_field = {"total_faces", "frame_width", "frame_height"} & set(change)  # __post_init__'s, beyond a JSON Schema
    assert schema_ok == bool(cross_field), jsonschema.exceptions.best_match(validator.iter_errors(_msg(**change)))


@pytest.mark.parametrize(
    ("args", "text"),
    [
        pytest.param(("", 0, 0.0, (10, 10)), "video_id", id="empty-video-id"),
        pytest.param(("v" * 129, 0, 0.0, (10, 10)), "video_id", id="long-video-id"),
        pytest.param(("rtsp://a:b@cam/1", 0, 0.0, (10, 10)), "video_id", id="url-as-video-id"),
        pytest.param(("v", -1, 0.0, (10, 10)), "frame_id", id="negative-frame"),
        pytest.param(("v", 0, float("nan"), (10, 10)), "ts_ms", id="nan-timestamp"),
        pytest.param(("v", 0, 0.0, (0, 10)), "frame size", id="empty-frame"),
        # built and published, then rejected by every drain (infinity is JSON null): the frame never stored
        pytest.param(("v", 0, float("inf"), (10, 10)), "ts_ms", id="infinite-timestamp"),
        pytest.param(("v", 0, 1e400, (10, 10)), "ts_ms", id="timestamp-over-a-double"),
        pytest.param(("v", 0, MAX_FRAME_TS_MS + 1, (10, 10)), "ts_ms", id="timestamp-past-100-years"),
        pytest.param(("v", 2**63, 0.0, (10, 10)), "frame_id", id="frame-id-over-bigint"),
        pytest.param(("v", 2**53, 0.0, (10, 10)), "frame_id", id="frame-id-past-javascript-s-integers"),
        pytest.param(("v", 0, 0.0, (10, 2**31)), "frame size", id="frame-over-integer"),
    ],
)
def test_build_message_refuses_values_the_schema_forbids(args: tuple, text: str) -> None:
    video_id, frame_id, ts, shape = args
    with pytest.raises(MessageError, match=text):
        build_message(video_id, "v.mp4", frame_id, ts, shape, [], "m")
    with pytest.raises(MessageError, match="model"):
        build_message("v", "v.mp4", 0, 0.0, (10, 10), [], "")


def test_the_largest_values_built_are_taken_by_the_ingest() -> None:
    from crowd.ingest import validate

    message = build_message("v", "v.mp4", 2**53 - 1, MAX_FRAME_TS_MS, (2**31 - 1, 2**31 - 1), [], "m")
    assert validate(message.to_json()).frame_id == 2**53 - 1


def test_a_field_given_twice_counts_once_with_its_last_value() -> None:
    """What README's message section says (msgspec, as most JSON parsers): the last of duplicate keys wins."""
    raw = json.dumps(_msg(frame_id=3))[:-1] + ', "frame_id": 7}'
    assert raw.count('"frame_id"') == 2
    assert FaceMessage.from_json(raw).frame_id == 7
