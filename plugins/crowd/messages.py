"""The ``Faces`` topic message: one per processed frame (a msgspec ``Struct``), plus its JSON Schema file.

The seed's fields ``frame_id``, ``total_faces`` and ``faces[]`` (``face_id``, ``bounding_box``, ``confidence``)
are kept as they were; the rest say where the frame came from and which model saw it.

One type serves both ends: detection tasks build and encode it (~1 us per message), the ingest decodes and
validates it (field constraints, unknown fields refused, then the cross-field rules of ``__post_init__``), and
the schema file is generated from it. Decoding is strict, as the schema says: ``"3"`` or ``3.0`` is no integer.

Example:
    >>> from crowd.messages import build_message, FaceMessage
    >>> msg = build_message("abc123", "v.mp4", 30, 1000.0, (480, 640, 3), [], "mtcnn-onnx")
    >>> FaceMessage.from_json(msg.to_json()).total_faces
    0

Regenerate the schema file after changing the model with ``python -m crowd schema``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "include" / "schema" / "faces-message.schema.json"
MAX_VIDEO_ID_LENGTH = 128
# what the API takes in a URL path: content hashes, `live-` ids (crowd.video.live_source_id), names without `/`
VIDEO_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

#: A frame's time from its video's start can be this far at most (100 years): a time beyond it is a broken clock or
#: producer, and would make every duration computed from it (alerts) nonsense.
MAX_FRAME_TS_MS = 100 * 365.25 * 24 * 3600 * 1000.0

#: The largest frame id: the largest integer a JSON number keeps exactly in JavaScript (a larger id came back from the
#: API rounded, and a JavaScript client paging by ``after_frame_id`` asked for the same frame again and again).
MAX_FRAME_ID = 2**53 - 1
#: ``model`` is exported to CSV: no ``;``, ``|`` or control character (a spreadsheet that splits on them would read a
#: formula from the part after it) and no formula start (``= + - @``).
MODEL_PATTERN = r"^[^=+\-@;|\x00-\x1f\x7f][^;|\x00-\x1f\x7f]*$"

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class MessageError(ValueError):
    """A message could not be parsed or is inconsistent; the text says what and where.

    ``code`` is the kind of problem (``not_utf8``, ``not_json`` or ``schema``), ``problem`` the reason alone,
    without the message preview the text adds.
    """

    def __init__(self, text: str, *, code: str = "schema", problem: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.problem = problem or text


class BoundingBox(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Box in frame pixels: top-left corner ``x, y`` and size ``width, height``."""

    x: NonNegInt
    y: NonNegInt
    width: PositiveInt
    height: PositiveInt


class Face(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One detected face. ``face_id`` is its index in the frame (faces sorted by confidence, highest first)."""

    face_id: NonNegInt
    bounding_box: BoundingBox
    confidence: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class FaceMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Detection result of one video frame, as published on the ``Faces`` topic."""

    schema_version: Literal[1] = SCHEMA_VERSION
    video_id: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_VIDEO_ID_LENGTH,
            pattern=VIDEO_ID_PATTERN,
            description="content hash of the video file ('live-' and a hash for a camera or stream); letters, digits, '_', '.', '-'",
        ),
    ]
    source: Annotated[str, msgspec.Meta(description="path or URL the frame was read from")]
    frame_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_FRAME_ID, description="index of the frame in the video")]
    frame_ts_ms: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=MAX_FRAME_TS_MS,
            description="when the frame is shown, ms from the video's start (the container's presentation time; frame_id * 1000 / fps for a stream without timestamps)",
        ),
    ]
    frame_width: PositiveInt
    frame_height: PositiveInt
    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=256,
            pattern=MODEL_PATTERN,
            description="detector id, e.g. 'yolov3-face@416'; no ';', '|' or control character, not starting with '=', '+', '-' or '@'",
        ),
    ]
    total_faces: NonNegInt
    faces: list[Face]

    def __post_init__(self) -> None:
        """The rules no single field can state; a ``ValueError`` here is a validation error when decoding."""
        faces = self.faces
        if self.video_id.endswith("\n"):  # the pattern's $ lets one through in Python (re.search), not in the API
            raise ValueError(f"video_id {self.video_id!r} must not end with a line break")
        if self.model.endswith("\n"):  # as video_id's
            raise ValueError(f"model {self.model[:80]!r} must not end with a line break")
        if self.total_faces != len(faces):
            raise ValueError(f"total_faces={self.total_faces} but faces has {len(faces)} entries")
        fw, fh = self.frame_width, self.frame_height
        for i, face in enumerate(faces):
            if face.face_id != i:
                ids = [f.face_id for f in faces]
                raise ValueError(f"face_id values must be 0..{len(ids) - 1} in order, got {ids}")
            b = face.bounding_box
            if b.x + b.width > fw or b.y + b.height > fh:
                raise ValueError(
                    f"face {i} box x={b.x} y={b.y} w={b.width} h={b.height} lies outside the {fw}x{fh} frame"
                )

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON, the Kafka message value (fields in the order above)."""
        return _encoder.encode(self)

    def to_dict(self) -> dict[str, Any]:
        """The message as plain dicts and lists, as its JSON would parse."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> FaceMessage:
        """Parse and validate a message.

        Raises:
            MessageError: not JSON, or a field is missing, unknown, out of range or inconsistent.
        """
        try:
            return _decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError included
            code, problem = _classify(data, exc)
            preview = data[:80] if isinstance(data, str) else data[:80].decode("utf-8", "replace")
            raise MessageError(
                f"invalid Faces message ({problem}); got {preview!r}", code=code, problem=problem
            ) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceMessage:
        """Validate a message given as plain dicts and lists (as :meth:`from_json`, without the JSON).

        Raises:
            MessageError: a field is missing, unknown, out of range or inconsistent.
        """
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise MessageError(f"invalid Faces message ({exc})") from None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FaceMessage)


def _classify(data: bytes | str, exc: Exception) -> tuple[str, str]:
    """The :class:`MessageError` code and reason of a failed decode."""
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad_text:
            return "not_utf8", str(bad_text)
    return ("schema" if isinstance(exc, msgspec.ValidationError) else "not_json"), str(exc)


def _clip_box(x: int, y: int, w: int, h: int, fw: int, fh: int) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, min(int(x), fw)), max(0, min(int(y), fh))
    x1, y1 = max(0, min(int(x) + int(w), fw)), max(0, min(int(y) + int(h), fh))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1 - x0, y1 - y0


#: The largest value PostgreSQL's ``integer`` columns take: the ingest rejects a message over it, so a message is
#: not built with it either (frame ids, ``bigint``, stop at :data:`MAX_FRAME_ID` before).
INT4_MAX = 2**31 - 1


def build_message(
    video_id: str,
    source: str | os.PathLike[str],
    frame_id: int,
    ts_ms: float,
    frame_shape: Sequence[int],
    detections: Sequence[Any],
    model: str,
) -> FaceMessage:
    """Build a valid message from detector output.

    ``detections`` are objects with ``x, y, width, height, confidence`` (e.g. :class:`crowd.detection.Detection`).
    Boxes are clipped to the frame (empty ones dropped), confidences clamped to [0, 1], and faces ordered by
    confidence (highest first), then by ``y, x``, so ``face_id`` is stable.

    Raises:
        MessageError: ``video_id``, ``model``, ``frame_id``, ``ts_ms`` or the frame size is not a valid value.
    """
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    frame_id, ts_ms = int(frame_id), round(float(ts_ms), 3)
    problems = [
        text
        for bad, text in (
            (
                not re.fullmatch(VIDEO_ID_PATTERN, video_id) or video_id.endswith("\n"),
                f"video_id {video_id[:140]!r} must be 1-{MAX_VIDEO_ID_LENGTH} letters, digits, '_', '.' or '-', "
                "starting with a letter or digit",
            ),
            (
                len(model) > 256 or not re.fullmatch(MODEL_PATTERN, model),  # fullmatch: no trailing line break
                f"model {model[:80]!r} must be 1-256 characters, no ';', '|' or control character, not starting "
                "with '=', '+', '-' or '@'",
            ),
            (not 0 <= frame_id <= MAX_FRAME_ID, f"frame_id {frame_id} is not in 0..{MAX_FRAME_ID}"),
            (not 0 <= ts_ms <= MAX_FRAME_TS_MS, f"ts_ms {ts_ms} is not in 0..{MAX_FRAME_TS_MS:.0f} (100 years)"),
            (fw < 1 or fh < 1, f"frame size {fw}x{fh} is empty"),
            (max(fw, fh) > INT4_MAX, f"frame size {fw}x{fh} is over {INT4_MAX} a side"),
        )
        if bad
    ]
    if problems:
        raise MessageError("cannot build a Faces message: " + "; ".join(problems))
    boxes = []
    for d in detections:
        clipped = _clip_box(d.x, d.y, d.width, d.height, fw, fh)
        if clipped is not None:
            # ordered by the confidence as published (rounded), so equal published values go by y, x
            boxes.append((round(min(1.0, max(0.0, float(d.confidence))), 4), clipped))
    boxes.sort(key=lambda item: (-item[0], item[1][1], item[1][0]))
    faces = [Face(i, BoundingBox(*box), c) for i, (c, box) in enumerate(boxes)]
    return FaceMessage(
        video_id=video_id,
        source=str(source),
        frame_id=frame_id,
        frame_ts_ms=ts_ms,
        frame_width=fw,
        frame_height=fh,
        model=model,
        total_faces=len(faces),
        faces=faces,
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of :class:`FaceMessage`, as written to the schema file."""
    (_ref,), definitions = msgspec.json.schema_components([FaceMessage], ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://crowd.local/schema/faces-message.schema.json",
        **definitions.pop("FaceMessage"),
        "$defs": definitions,
    }


def schema_text() -> str:
    """The schema file's exact content (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Write the JSON Schema file and return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(schema_text(), encoding="utf-8")
    return target


if __name__ == "__main__":
    print(write_schema())
