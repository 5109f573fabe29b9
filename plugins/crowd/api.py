"""The crowd HTTP API: a FastAPI app that the Airflow plugin mounts under ``/crowd``.

Routes (every one needs an authenticated Airflow user; ``/send`` needs the right to trigger DAG runs):

* ``POST /send``, ``GET /receive``: the seed's message API over Kafka (topic ``settings.messages_topic``);
  ``/receive`` serves a bounded queue filled by :class:`crowd.receiver.MessageReceiver`, a background thread
  started and stopped with the app (FastAPI lifespan); with ``lease_s`` it hands messages out under a lease that
  ``POST /receive/confirm`` confirms (``/receive`` and the confirm need the right to trigger DAG runs too).
* ``GET /videos``, ``/videos/{id}``, ``/videos/{id}/frames``, ``/videos/{id}/frames/{frame_id}/faces``,
  ``/videos/{id}/frames.csv``, ``/videos/{id}/faces.csv``, ``/videos/{id}/images[/{name}]``, ``/alerts``: results
  read from PostgreSQL (parameterised SQL only) and pictures (PNG, JPEG) from ``settings.results_dir/<video_id>/``. A CSV
  export holds one PostgreSQL connection for as long as its client reads, so at most
  ``settings.max_csv_exports`` run at once per process (503 beyond).
* ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /dashboard`` (the page shown in the
  Airflow UI). OpenAPI: ``/crowd/openapi.json`` and ``/crowd/docs``.

Nothing connects at import time: the app object is cheap to build, and Kafka and PostgreSQL are reached only
from the lifespan and from requests. Blocking work runs in sync routes (FastAPI's thread pool), except the wait
for Kafka's acknowledgement: ``/send`` is async and awaits it, so that sends stalled by a broker that is down hold
none of the pool's threads, which the whole Airflow API server shares.

Example:
    >>> from crowd.api import create_app
    >>> app = create_app()  # mount it; Airflow's lifespan starts the receiver
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, closing
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import anyio
import psycopg
from confluent_kafka import KafkaException
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import NotModifiedResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crowd.config import Settings, load_settings
from crowd.ingest import stored_offsets
from crowd.messages import VIDEO_ID_PATTERN
from crowd.receiver import MAX_LEASE_S, LeaseError, MessageReceiver, ReceivedMessage, kafka_python_security

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 1000
CSV_BATCH_ROWS = 2000  # rows per fetch of a CSV export (one chunk of the response)
CSV_RETRY_AFTER_S = 10  # Retry-After of the 503 when every CSV export slot is taken
CSV_SEND_TIMEOUT_S = 60.0  # a client that takes no chunk of an export for this long loses it (and its slot)
# an export still running after this long is cut off: a client reading just fast enough never to hit the send
# timeout (~4 KB/s) held a slot and an open transaction for hours (a few of them: every export of the process 503)
CSV_EXPORT_MAX_S = 3600.0
MAX_WAIT_S = 5.0
SEND_TIMEOUT_S = 5.0
KAFKA_PROBE_TTL_S = 5.0
DASHBOARD_HTML = Path(__file__).with_name("dashboard.html")
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}

IMAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(png|jpg|jpeg)$"


class ErrorBody(BaseModel):
    """The body of every error the API answers (FastAPI's shape)."""

    detail: str | list[dict[str, Any]] = Field(
        description="what went wrong and what to do; for a 422, one entry per invalid field (`loc`, `msg`, `type`)"
    )


# answered by any route: the login and the DAG-run permissions every route checks first, always in JSON (as a
# "model", FastAPI would document them in the route's own media type: text/plain for /metrics)
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"content": _JSON_ERROR, "description": "no valid Airflow login (a bearer token, or the UI's session)"},
    403: {
        "content": _JSON_ERROR,
        "description": "the account may not read DAG runs (every route), or trigger them (/send, /receive, "
        "/receive/confirm)",
    },
}


# The answers a results route gives besides 200 and 422, for the OpenAPI document (Swagger listed only those two)
_READ_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a parameter PostgreSQL cannot take (e.g. a NUL character)"},
    503: {"model": ErrorBody, "description": "the results database cannot be reached, or the query ran out of time"},
}
_VIDEO_ERRORS: dict[int | str, dict[str, Any]] = {
    **_READ_ERRORS,
    404: {"model": ErrorBody, "description": "no video with this id"},
}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_CONSUMER_ONLY = frozenset({"group.id", "enable.auto.commit", "auto.offset.reset", "enable.auto.offset.store"})

VideoId = Annotated[str, PathParam(pattern=VIDEO_ID_PATTERN, description="video id (content hash)")]
VideoStatus = Literal["pending", "processing", "done", "failed"]  # crowd.storage.VIDEO_STATUSES


# ---- response and request models ----------------------------------------------------------------------------


class SendRequest(BaseModel):
    """Body of ``POST /send`` (the seed's fields)."""

    model_config = ConfigDict(extra="forbid")

    content: Annotated[str, Field(max_length=60_000, description="message text")]
    sender: Annotated[str, Field(min_length=1, max_length=256, description="who sends it; the Kafka key")]


class SendResponse(BaseModel):
    """Where the broker stored the message, after it acknowledged it."""

    status: str = "delivered"
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


class ReceivedItem(BaseModel):
    """One message handed out by ``/receive``."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    key: str | None = None
    value: Any = None
    value_format: Literal["json", "text"] | None = Field(
        None,
        description="json: the message's bytes were this JSON value; text: they were not JSON (a response can carry), "
        'value is their UTF-8 text (invalid bytes replaced); null: no value. Tells the bytes hello from "hello"',
    )

    @classmethod
    def of(cls, message: ReceivedMessage) -> ReceivedItem:
        """The item for one message taken from the receiver's queue (its queue bookkeeping left out)."""
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=message.timestamp_ms,
            key=message.key,
            value=message.value,
            value_format=message.value_format,
        )


class ReceiveResponse(BaseModel):
    """Messages taken from this process's queue (removed from it; with ``lease_s``, hidden until confirmed)."""

    messages: list[ReceivedItem]
    count: int
    remaining: int = Field(description="messages still queued in this API server process")
    lease: str | None = Field(
        None, description="with lease_s: confirm it (POST /receive/confirm) once the messages are safe with you"
    )
    lease_s: float | None = Field(None, description="seconds until the lease runs out and its messages come again")


class ConfirmRequest(BaseModel):
    """The lease of a ``/receive?lease_s=`` response whose messages the reader has."""

    model_config = ConfigDict(extra="forbid")

    lease: str = Field(min_length=1, max_length=64)


class ConfirmResponse(BaseModel):
    """What confirming a lease did."""

    confirmed: int = Field(description="messages removed for good (their offsets are committed)")
    returned: int = Field(
        description="messages of the lease whose partition moved to another API-server process meanwhile: "
        "it hands them out again"
    )


class VideoSummary(BaseModel):
    """One video with its per-frame statistics."""

    video_id: str
    path: str | None = Field(
        None,
        description="the video file the registry has; for a video known from its stored frames only (the CLI or "
        "another producer of the Faces topic), the `source` its last stored frame names",
    )
    status: VideoStatus | None = Field(None, description="null: the registry does not know the video")
    error: str | None = None
    model: str | None = Field(None, description="the detector (the registry's, else the last stored frame's)")
    fps: float | None = None
    frame_count: int | None = None
    width: int | None = Field(None, description="frame width in pixels (the registry's, else the last stored frame's)")
    height: int | None = Field(None, description="frame height in pixels (as width)")
    frames: int = Field(0, description="frames stored")
    total_faces: int = Field(0, description="sum of faces over the stored frames")
    max_faces: int | None = None
    mean_faces: float | None = None
    peak_frame_id: int | None = None
    peak_ts_ms: float | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    run_id: str | None = Field(None, description="the Airflow DAG run that owns the status (its task logs say more)")
    listed_at: datetime | None = Field(
        None,
        description="when the video became known (registered, or its first frame stored, whichever came first): "
        "the list's order, newest first",
    )


_NEXT_DESCRIPTION = (
    "pass as `after` for the next page (null: this is the last one); pages read that way neither skip nor repeat "
    "items while new ones arrive at the top, which offsets do"
)


class VideoList(BaseModel):
    """A page of videos, newest first."""

    items: list[VideoSummary]
    total: int
    limit: int
    offset: int
    next: str | None = Field(None, description=_NEXT_DESCRIPTION)


class FrameCount(BaseModel):
    """One stored frame and its face count."""

    frame_id: int
    frame_ts_ms: float | None = None
    total_faces: int


class FramePage(BaseModel):
    """A page of a video's frames, by frame id."""

    video_id: str
    items: list[FrameCount]
    total: int = Field(description="frames stored for the video (all of them, also with after_frame_id)")
    limit: int
    offset: int


class TimelinePoint(BaseModel):
    """A run of consecutive stored frames of a video, summarised (one point of a chart)."""

    first_frame_id: int
    last_frame_id: int
    start_ts_ms: float | None = None
    end_ts_ms: float | None = None
    frames: int = Field(description="frames stored in the run")
    max_faces: int = Field(description="most faces in one of its frames (peaks survive the summary)")
    mean_faces: float


class Timeline(BaseModel):
    """A video's face counts over time in at most ``points`` runs of frames of equal frame-id span."""

    video_id: str
    frames: int = Field(description="frames stored for the video")
    points: list[TimelinePoint]


class FaceBox(BaseModel):
    """One detected face in frame pixels."""

    face_id: int
    x: int
    y: int
    width: int
    height: int
    confidence: float


class FrameFaces(BaseModel):
    """One frame with its faces."""

    video_id: str
    frame_id: int
    frame_ts_ms: float | None = None
    total_faces: int
    frame_width: int | None = None
    frame_height: int | None = None
    model: str | None = None
    faces: list[FaceBox]


class ImageList(BaseModel):
    """Pictures (PNG, JPEG) of a video found under the results folder."""

    video_id: str
    images: list[str]


class AlertItem(BaseModel):
    """One crowd alert (an episode of ``threshold`` or more faces per frame), as the alerts table holds it now:
    the fields of its latest ``crowd_alert`` message, and whether that revision was published yet."""

    alert_id: int
    revision: int = Field(description="1, then one more per change (late or re-run frames changed the episode)")
    video_id: str
    path: str | None = None
    started_frame_id: int
    started_ts_ms: float
    ended_frame_id: int | None = Field(None, description="last frame of the episode at the threshold")
    ended_ts_ms: float | None = None
    peak_count: int = Field(description="most faces in one frame of the episode")
    peak_frame_id: int
    threshold: int
    min_duration_ms: float
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None = Field(None, description="when this revision reached the alerts topic")


class AlertList(BaseModel):
    """A page of crowd alerts, newest first (by when each was first seen)."""

    items: list[AlertItem]
    total: int
    limit: int
    offset: int
    next: str | None = Field(None, description=_NEXT_DESCRIPTION)


class ReceiverHealth(BaseModel):
    """State of this process's background consumer."""

    running: bool
    connected: bool
    topic: str | None = None
    group_id: str | None = None
    queued: int = 0
    max_queue: int = 0
    consumed: int = 0
    delivered: int = 0
    requeued: int = Field(0, description="queued messages left to be read again (consumer rebuilt, partition moved)")
    leased: int = Field(0, description="messages handed out under a lease, not confirmed yet")
    confirmed: int = Field(0, description="leased messages confirmed (removed for good)")
    lease_expired: int = Field(0, description="leased messages queued again because their lease ran out")
    paused: bool = Field(False, description="the queue is full: reading waits for /receive to take messages")
    errors: int = 0
    lag: int | None = None
    assigned_partitions: list[int] = Field(default_factory=list)
    last_error: str | None = None


class Health(BaseModel):
    """Reachability of Kafka and PostgreSQL, and consumer lag."""

    status: str = Field(description="ok when Kafka and PostgreSQL answer, else degraded")
    kafka: bool
    kafka_error: str | None = None
    postgres: bool
    postgres_error: str | None = None
    faces_topic: str
    ingest_lag: int | None = Field(None, description="Faces end offsets minus the ingest's stored offsets")
    receiver: ReceiverHealth


# ---- helpers: body limit, Kafka, PostgreSQL -----------------------------------------------------------------


class SecurityHeadersMiddleware:
    """Add ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: same-origin`` to every answer that lacks them
    (Airflow's api-server adds neither): a browser neither guesses a type from a picture's or a CSV's bytes, nor
    sends the crowd URLs (video ids) to other sites."""

    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def dashboard_policy(html: str) -> str:
    """The Content-Security-Policy of the dashboard page ``html``: its own inline script and style only (by their
    SHA-256), data from this origin, no other source, framed by the Airflow UI's origin only."""
    return (
        f"default-src 'none'; script-src {_inline_hashes(html, 'script')}; style-src {_inline_hashes(html, 'style')}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    )


def docs_policy(html: str) -> str:
    """The Content-Security-Policy of the Swagger UI page ``html``: its script and style files from this origin, its
    inline script by SHA-256, pictures from this origin and ``data:`` URLs (Swagger UI's icons), nothing else."""
    return (
        f"default-src 'none'; script-src 'self' {_inline_hashes(html, 'script')}; style-src 'self'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    )


def docs_files_dir() -> Path:
    """The folder of Swagger UI's files (``DOCS_FILES``), shipped by the pinned ``fastapi-offline`` package."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _inline_hashes(html: str, kind: str) -> str:
    """The CSP sources naming each inline ``<kind>`` element of ``html`` (no attributes) by its SHA-256."""
    bodies = re.findall(rf"<{kind}>(.*?)</{kind}>", html, re.S)
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies]
    return " ".join(hashes) or "'none'"


class BodyLimitMiddleware:
    """Answer 413 to any request whose body is larger than ``max_bytes`` (declared or streamed), and 400 to one whose
    ``Content-Length`` is not a byte count (``-1``, ``abc``: a 413 said the body was too large, which it was not).

    (uvicorn itself answers 400 to such a header before the app; other ASGI servers, and in-process clients, may
    not.)"""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():  # isdigit of bytes: ASCII digits only, no sign
            shown = declared[:40].decode("latin-1")
            await self._answer(
                send, 400, f"invalid Content-Length {shown!r}: it must be the body's size in bytes (0 or more)"
            )
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and declared is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        await self._answer(send, 413, f"request body larger than {self.max_bytes} bytes")

    @staticmethod
    async def _answer(send: Send, code: int, detail: str) -> None:
        payload = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def kafka_client_config(conn_id: str) -> dict[str, Any]:
    """librdkafka settings from the Airflow connection's extra, without consumer-only keys."""
    from airflow.models.connection import Connection

    extra = Connection.get_connection_from_secrets(conn_id).extra_dejson
    if "bootstrap.servers" not in extra:
        raise RuntimeError(f"Airflow connection {conn_id!r} has no 'bootstrap.servers' in its extra")
    return {k: v for k, v in extra.items() if k not in _CONSUMER_ONLY}


def pg_connect(settings: Settings) -> Any:
    """A psycopg 3 connection to the results database (the caller closes it); its statements are cancelled after
    ``settings.api_statement_timeout_s`` (a request's thread, shared with the whole Airflow API server, is not held
    without bound by a slow query or one waiting on a lock)."""
    from crowd import storage

    return storage.connect(settings.postgres_conn_id, statement_timeout_s=settings.api_statement_timeout_s or None)


class KafkaProbe:
    """Cached Kafka reachability and ``Faces`` end offsets (at most one broker round trip per TTL)."""

    def __init__(self, ttl_s: float = KAFKA_PROBE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._key: tuple[str, str] | None = None
        self._value: tuple[bool, str | None, dict[int, int] | None] = (False, "not probed", None)

    def check(self, conn_id: str, topic: str) -> tuple[bool, str | None, dict[int, int] | None]:
        """Return ``(reachable, error, {partition: end_offset} or None)``; never raises: errors are the answer.

        One probe at a time (the lock): callers that arrive meanwhile get its answer instead of probing again.
        """
        with self._lock:
            if self._key == (conn_id, topic) and time.monotonic() - self._at < self.ttl_s:
                return self._value
            try:
                self._value = self._probe(conn_id, topic)
            except Exception as exc:
                self._value = (False, f"Kafka probe failed: {type(exc).__name__}: {exc}", None)
            self._key, self._at = (conn_id, topic), time.monotonic()
            return self._value

    @staticmethod
    def _probe(conn_id: str, topic: str) -> tuple[bool, str | None, dict[int, int] | None]:
        from confluent_kafka import Consumer, TopicPartition

        try:
            config = kafka_client_config(conn_id)
            consumer = Consumer({**config, "group.id": "crowd-api-probe", "enable.auto.commit": False})
        except Exception as exc:  # e.g. a librdkafka property the client does not know, in the connection's extra
            return False, f"Kafka connection {conn_id!r} unusable: {type(exc).__name__}: {exc}", None
        try:
            metadata = consumer.list_topics(topic, timeout=2.0)
            info = metadata.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                return True, None, None
            ends = {}
            for partition in info.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=2.0)
                ends[partition] = high
            return True, None, ends
        except Exception as exc:
            return False, f"Kafka unreachable: {exc}", None
        finally:
            consumer.close()


class PolledProducer:
    """A confluent-kafka producer with a daemon thread of its own that serves its delivery reports.

    confluent-kafka calls ``on_delivery`` only from ``poll()`` or ``flush()`` (its Python binding has no librdkafka
    background queue for producers): this thread polls, so that an async route awaits its acknowledgement while
    holding no thread of the server's pool. The callbacks run in this thread.

    Example:
        >>> polled = PolledProducer(reliable_producer("kafka_default"))  # doctest: +SKIP
        >>> polled.producer.produce("messages", b"hi", on_delivery=report)  # doctest: +SKIP
        >>> polled.close(2.0)  # doctest: +SKIP
    """

    def __init__(self, producer: Any, *, drain_s: float = 2.0) -> None:
        self.producer = producer
        self.drain_s = drain_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crowd-api-producer-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.1)
            except Exception:  # a callback that raised: the others must still be served
                log.exception("crowd API: a Kafka delivery callback failed")
        try:  # messages still in flight get their reports (success or failure) before the thread ends
            self.producer.flush(self.drain_s)
        except Exception:
            log.exception("crowd API: flushing the Kafka producer failed")

    def retire(self) -> None:
        """Stop polling once the queued messages are reported (at most ``drain_s``); returns at once."""
        self._stop.set()

    def close(self, timeout_s: float | None = None) -> None:
        """Retire the producer and wait for its thread (blocking: call it from a worker thread)."""
        self.retire()
        self._thread.join((timeout_s if timeout_s is not None else self.drain_s) + 1.0)


class ExportSlots:
    """At most ``limit`` CSV exports at once in this process: each holds a PostgreSQL connection (and its open
    transaction) for as long as its client takes to read, so slow or stalled clients must not take them all."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def acquire(self) -> Callable[[], None]:
        """Take a slot without waiting; returns its release function (calling it again does nothing).

        Raises:
            HTTPException: 503 with ``Retry-After`` when every slot is taken.
        """
        if not self._slots.acquire(blocking=False):
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"{self.limit} CSV exports are already running in this API server process (CROWD_MAX_CSV_EXPORTS); "
                f"retry in {CSV_RETRY_AFTER_S} s",
                headers={"Retry-After": str(CSV_RETRY_AFTER_S)},
            )
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):  # the first call gives the slot back, later ones do nothing
                self._slots.release()

        return release


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that calls ``on_close`` (in the thread pool) once it ends, however it ends: sent whole,
    client gone, cancelled, or a client that stays connected but takes no chunk for :data:`CSV_SEND_TIMEOUT_S`
    (its socket full: it would hold the resources for ever) or is still reading after :data:`CSV_EXPORT_MAX_S`
    (then the transfer is cut off, which clients report as an error). A generator left unfinished runs its
    ``finally`` only when garbage-collected, and one never started not at all: its resources would stay held until
    then."""

    def __init__(self, content: Iterable[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()

        async def send_in_time(message: Message) -> None:
            left_s = CSV_EXPORT_MAX_S - (time.monotonic() - started)
            try:
                with anyio.fail_after(max(0.0, min(CSV_SEND_TIMEOUT_S, left_s))):
                    await send(message)
            except TimeoutError:
                log.warning(
                    "%s: transfer cut off after %.0f s (the client took no data for %g s, or the export ran longer "
                    "than %g s)", scope.get("path"), time.monotonic() - started, CSV_SEND_TIMEOUT_S, CSV_EXPORT_MAX_S,
                )  # fmt: skip
                raise

        try:
            await super().__call__(scope, receive, send_in_time)
        finally:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(self.on_close)


def _not_modified(request: Request, response: FileResponse) -> bool:
    """Whether the client already holds ``response``'s version of the file: ``If-None-Match`` names its ETag (weak
    comparison, as for a GET), or, without one, ``If-Modified-Since`` is not before its ``Last-Modified``
    (RFC 9110 13.1.2-3; Starlette's StaticFiles answers so, its FileResponse does not)."""
    if if_none_match := request.headers.get("if-none-match"):
        tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in tags or response.headers["etag"].removeprefix("W/") in tags
    since, modified = request.headers.get("if-modified-since"), response.headers.get("last-modified")
    if not since or not modified:
        return False
    since_at, modified_at = _http_date(since), _http_date(modified)
    return since_at is not None and modified_at is not None and since_at >= modified_at


def _http_date(value: str) -> datetime | None:
    """An HTTP date as an aware datetime, or None if it is not one (a client's header is not to be trusted)."""
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


class OpenedFileResponse(FileResponse):
    """A :class:`FileResponse` that sends a file opened already, the one that was checked: FileResponse opens its
    path again when it sends, by then perhaps swapped for a symlink leading elsewhere by a writer in the folder.
    Headers, ranges and HEAD as FileResponse's (from ``stat_result``, the open file's); the file is closed when the
    response ends, however it ends (and by garbage collection if it is never sent).

    Example:
        >>> file = open("heatmap.png", "rb")  # doctest: +SKIP
        >>> OpenedFileResponse(file, os.fstat(file.fileno()), media_type="image/png")  # doctest: +SKIP
    """

    def __init__(self, file: BinaryIO, stat_result: os.stat_result, **kwargs: Any) -> None:
        # no path: nothing may be opened by name (FileResponse would open its path if it stopped using _open_file)
        super().__init__("", stat_result=stat_result, **kwargs)
        self.file = file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # without the server's pathsend extension, which sends a file by its path
        extensions = {k: v for k, v in (scope.get("extensions") or {}).items() if k != "http.response.pathsend"}
        try:
            await super().__call__({**scope, "extensions": extensions}, receive, send)
        finally:
            self.file.close()  # after the reads: a cancelled read's thread is waited for

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        yield anyio.wrap_file(self.file)  # closed by __call__, once the response ended


def _one_name(name: str) -> str:
    """``name`` if it is one entry of a folder; NotADirectoryError otherwise (``..``, a path)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise NotADirectoryError(errno.ENOTDIR, "not one name", name)
    return name


def open_video_dir(root: Path, video_id: str) -> int:
    """A descriptor of the folder ``root/<video_id>``, opened only if it is a folder and no symlink (the caller
    closes it): a symlink could lead out of ``root``, and checking where it leads is no help, since it can be
    swapped after the check.

    Raises:
        OSError: no such folder, or a symlink (ELOOP), or a file (ENOTDIR).
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # the configured root may be (or lie behind) a symlink
    try:
        return os.open(_one_name(video_id), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    finally:
        os.close(root_fd)


def open_picture(root: Path, video_id: str, name: str) -> tuple[BinaryIO, os.stat_result] | None:
    """The file ``root/<video_id>/<name>`` open for reading, with its status, if it is a regular file reached
    through no symlink (see :func:`open_video_dir`); None otherwise. Serve that open file, never the name again.
    """
    try:
        dir_fd = open_video_dir(root, video_id)
        try:
            # O_NONBLOCK: a FIFO named like a picture would wait for a writer; fstat then refuses it
            fd = os.open(_one_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # not a missing name or a symlink
            log.warning("picture %r of video %r under %s cannot be opened: %s", name, video_id, root, exc)
        return None
    try:
        stat_result = os.fstat(fd)
        if not stat.S_ISREG(stat_result.st_mode):  # a folder, a FIFO, a device
            os.close(fd)
            return None
        return os.fdopen(fd, "rb"), stat_result  # the file closes fd when closed, or collected
    except BaseException:
        os.close(fd)
        raise


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # the request may have given up (and the future with it) already
        future.set_result(value)


def _rows(conn: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[dict[str, Any]]:
    with closing(conn.cursor()) as cur:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _cursor(at: datetime | None, key: str | int) -> str:
    """The opaque ``next`` of a page: the sort key of its last item (see :func:`_after`)."""
    raw = json.dumps([None if at is None else at.isoformat(), key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str | None, offset: int, key_type: type, *, null_at: bool = False) -> dict[str, Any]:
    """The ``after_at``/``after_id`` query parameters of a ``next`` cursor (both ``None`` without one).

    ``null_at``: the list's time may be NULL (a cursor may then hold none).

    Raises:
        HTTPException: 400 for a cursor this API did not give, or one given with an offset.
    """
    if cursor is None:
        return {"after_at": None, "after_id": None}
    if offset:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "give either after (a page's next) or offset, not both")
    try:
        at, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        after_at = None if at is None else datetime.fromisoformat(at)
        if type(key) is not key_type or (after_at.tzinfo is None if after_at is not None else not null_at):
            raise ValueError(key)
        if isinstance(key, str):
            key.encode()  # a lone surrogate (JSON "\ud800") cannot go to PostgreSQL: UnicodeEncodeError, a 400
    except (ValueError, TypeError) as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"after={cursor[:40]!r} is not a page's next cursor ({exc.__class__.__name__})"
        ) from None
    return {"after_at": after_at, "after_id": key}


def _page(rows: list[dict[str, Any]], limit: int, at_column: str, key_column: str) -> tuple[list[dict], str | None]:
    """The first ``limit`` of ``rows`` (``limit + 1`` asked for) and the cursor of the next page, if there is one."""
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], _cursor(last[at_column], last[key_column])


# Every video known from the registry (videos) or from stored frames (frames may arrive before the registry
# row), with the statistics of the storage's video_summary view (one row per video, kept by triggers on frames).
# Listed by when it became known (listed_at: registered, or its first frame stored, whichever came first): a key
# that never changes, so a page's cursor holds (a part of a split video can be stored before the part that registers
# the video, which would move it to the top and out of a walk by cursor).
_VIDEO_QUERY = """
WITH ids AS (SELECT id AS video_id FROM videos UNION SELECT video_id FROM video_summary)
SELECT i.video_id, COALESCE(v.path, f.source) AS path, v.status, v.error, COALESCE(v.model, f.model) AS model,
       v.fps, v.frame_count, COALESCE(v.width, f.frame_width) AS width, COALESCE(v.height, f.frame_height) AS height,
       COALESCE(v.created_at, s.first_ingested_at) AS created_at, v.updated_at, v.finished_at,
       v.run_id,
       COALESCE(s.frames, 0) AS frames, COALESCE(s.total_faces, 0) AS total_faces, s.max_faces, s.mean_faces,
       s.peak_frame_id, s.peak_ts_ms, LEAST(v.created_at, s.first_ingested_at) AS listed_at
FROM ids i
LEFT JOIN videos v ON v.id = i.video_id
LEFT JOIN video_summary s ON s.video_id = i.video_id
LEFT JOIN LATERAL (  -- what the registry does not say (a video known from its frames only): its last frame's
    SELECT f.source, f.model, f.frame_width, f.frame_height FROM frames f
    WHERE (v.id IS NULL OR v.model IS NULL OR v.width IS NULL) AND f.video_id = i.video_id
    ORDER BY f.frame_id DESC LIMIT 1) f ON true
WHERE (%(video_id)s::text IS NULL OR i.video_id = %(video_id)s)
  AND (%(status)s::text IS NULL OR v.status = %(status)s)
  AND (%(after_id)s::text IS NULL OR CASE
       WHEN %(after_at)s::timestamptz IS NULL THEN LEAST(v.created_at, s.first_ingested_at) IS NULL
                                                   AND i.video_id > %(after_id)s
       ELSE LEAST(v.created_at, s.first_ingested_at) IS NULL
            OR LEAST(v.created_at, s.first_ingested_at) < %(after_at)s
            OR (LEAST(v.created_at, s.first_ingested_at) = %(after_at)s AND i.video_id > %(after_id)s) END)
ORDER BY LEAST(v.created_at, s.first_ingested_at) DESC NULLS LAST, i.video_id
LIMIT %(limit)s OFFSET %(offset)s
"""
_ALERT_FILTER = "WHERE (%(video_id)s::text IS NULL OR a.video_id = %(video_id)s)"
_ALERT_QUERY = f"""
SELECT a.id AS alert_id, a.revision, a.video_id, v.path, a.started_frame_id, a.started_ts_ms, a.ended_frame_id,
       a.ended_ts_ms, a.peak_count, a.peak_frame_id, a.threshold, a.min_duration_ms, a.created_at, a.updated_at,
       a.published_at
FROM alerts a LEFT JOIN videos v ON v.id = a.video_id
{_ALERT_FILTER}
  AND (%(after_id)s::bigint IS NULL OR (a.created_at, a.id) < (%(after_at)s::timestamptz, %(after_id)s))
ORDER BY a.created_at DESC, a.id DESC
LIMIT %(limit)s OFFSET %(offset)s
"""  # noqa: S608 - a fixed filter; values are parameters
_ALERT_COUNT = f"SELECT count(*) AS n FROM alerts a {_ALERT_FILTER}"  # noqa: S608

_VIDEO_COUNT = """
WITH ids AS (SELECT id AS video_id FROM videos UNION SELECT video_id FROM video_stats)
SELECT count(*) AS n FROM ids i LEFT JOIN videos v ON v.id = i.video_id
WHERE (%(status)s::text IS NULL OR v.status = %(status)s)
"""


def connect_or_503(settings: Settings) -> Any:
    """:func:`pg_connect`, or an HTTP 503 with the reason when PostgreSQL is unreachable (the caller closes it)."""
    try:
        return pg_connect(settings)
    except Exception as exc:
        log.warning("PostgreSQL unreachable: %s", exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"PostgreSQL unreachable: {exc}") from exc


def db(request: Request) -> Iterator[Any]:
    """Dependency: one PostgreSQL connection per request, closed afterwards; 503 when unreachable.

    Its statements share one read-only snapshot (REPEATABLE READ): a page's ``total`` and its items are counted
    from the same rows even while the ingest writes (at READ COMMITTED each statement saw the rows committed
    when it began: a total of 8 beside 10 items)."""
    conn = connect_or_503(request.app.state.settings_factory())
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        yield conn
    finally:
        conn.close()


Db = Annotated[Any, Depends(db)]


# ---- the app ------------------------------------------------------------------------------------------------


def create_app(
    *,
    start_receiver: bool = True,
    max_queue: int | None = None,
    send_timeout_s: float = SEND_TIMEOUT_S,
    receiver_group_id: str | None = None,
    settings_factory: Callable[[], Settings] = load_settings,
) -> FastAPI:
    """Build the crowd API (no connections are made here).

    Args:
        start_receiver: start the background consumer in the lifespan.
        max_queue: bound of the ``/receive`` queue (default: ``settings.receiver_max_queue``).
        send_timeout_s: how long ``/send`` waits for the broker's acknowledgement before answering 503.
        receiver_group_id: consumer group of the receiver (default: ``settings.receiver_group``).
        settings_factory: where settings come from (read again at each lifespan start and each request).
    """
    from airflow.api_fastapi.core_api.security import requires_authenticated

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings = settings_factory()
        app.state.receiver = None
        app.state.receiver_error = None
        app.state.producer = None
        app.state.producer_lock = threading.Lock()
        app.state.kafka_probe = KafkaProbe()
        app.state.csv_exports = ExportSlots(settings.max_csv_exports)
        if start_receiver:
            kafka_log = logging.getLogger("kafka")
            if kafka_log.level == logging.NOTSET:  # kafka-python logs every (re)connection at INFO
                kafka_log.setLevel(logging.WARNING)
            try:
                client_config = kafka_client_config(settings.kafka_conn_id)
                receiver = MessageReceiver(
                    client_config["bootstrap.servers"],
                    settings.messages_topic,
                    group_id=receiver_group_id or settings.receiver_group,
                    max_queue=max_queue or settings.receiver_max_queue,
                    max_queue_bytes=settings.receiver_max_queue_bytes,
                    consumer_config=kafka_python_security(client_config),
                )
                receiver.start()
                app.state.receiver = receiver
            except Exception as exc:
                app.state.receiver_error = f"{type(exc).__name__}: {exc}"
                log.error("crowd receiver not started: %s", app.state.receiver_error)
        try:
            yield
        finally:
            if app.state.receiver is not None:  # stop() waits for the thread's last commit: not on the event loop
                await run_in_threadpool(app.state.receiver.stop)
            if app.state.producer is not None:
                await run_in_threadpool(app.state.producer.close, 2.0)

    app = FastAPI(
        title="crowd API",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own docs routes skip the app's dependencies: served below, behind the login
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(requires_authenticated()), Depends(requires_dag_run_read())],
        responses=_AUTH_ERRORS,
    )
    app.state.settings_factory = settings_factory
    app.add_exception_handler(psycopg.Error, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: on every answer, the body limit's 413 too
    _add_message_routes(app, send_timeout_s, settings_factory)
    _add_result_routes(app, settings_factory)
    _add_ops_routes(app, settings_factory)
    _add_docs_routes(app)
    return app


def _add_docs_routes(app: FastAPI) -> None:
    """The OpenAPI document and Swagger UI, as ordinary routes so that they need the login like every other. Swagger
    UI's script and style come from the ``fastapi-offline`` package, served here: nothing is loaded from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        # the mount prefix as the server, as FastAPI's own route does: Swagger's "Try it out" calls /crowd/videos
        prefix = request.scope.get("root_path", "").rstrip("/")
        return JSONResponse({**app.openapi(), "servers": [{"url": prefix or "/"}]})

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        files = request.scope.get("root_path", "").rstrip("/") + "/docs/files"
        page = get_swagger_ui_html(
            openapi_url=f"{files.removesuffix('/docs/files')}/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{files}/swagger-ui-bundle.js",
            swagger_css_url=f"{files}/swagger-ui.css",
            swagger_favicon_url=f"{files}/favicon.png",
        )
        html = bytes(page.body).decode()
        return HTMLResponse(html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": docs_policy(html)})

    @app.get("/docs/files/{name}", include_in_schema=False)
    def swagger_ui_file(request: Request, name: str) -> Response:
        media_type = DOCS_FILES.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no docs file {name!r}")
        path = docs_files_dir() / name
        response = FileResponse(  # stat given: its ETag and Last-Modified are set now, for the conditional GET
            path, stat_result=path.stat(), media_type=media_type, headers={"Cache-Control": "private, max-age=86400"}
        )
        return NotModifiedResponse(response.headers) if _not_modified(request, response) else response


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """psycopg errors become 503 with the reason (missing schema, server gone), never a bare 500; a value
    PostgreSQL refuses (SQLSTATE class 22, e.g. a NUL in a query parameter) is the caller's: 400."""
    code = status.HTTP_503_SERVICE_UNAVAILABLE
    if isinstance(exc, psycopg.errors.UndefinedTable):
        detail = f"results schema missing in PostgreSQL ({exc}); run the ingest DAG once, it migrates the schema"
    elif isinstance(exc, psycopg.DataError):
        code, detail = status.HTTP_400_BAD_REQUEST, f"a parameter's value cannot be used: {str(exc).strip()[:200]}"
    else:
        detail = f"PostgreSQL error: {type(exc).__name__}: {str(exc).strip()[:300]}"
    log.warning("crowd API %s %s: %s", request.method, request.url.path, detail)
    return JSONResponse({"detail": detail}, status_code=code)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422, rendered ASCII-only: its default echoes the input and fails (500) on a lone surrogate, and
    on a body that is not UTF-8 (echoed as bytes)."""
    from fastapi.encoders import jsonable_encoder

    errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})  # type: ignore[attr-defined]
    body = json.dumps({"detail": errors}, ensure_ascii=True)
    return Response(body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, media_type="application/json")


#: The DAGs whose runs make crowd's results: reading the runs of any of them is enough to read the results.
CROWD_DAG_IDS = ("crowd_video_scan", "crowd_video_detect", "crowd_faces_ingest")


def requires_dag_run_read() -> Callable[..., None]:
    """Dependency of every route: the user may read the runs of a crowd DAG (:data:`CROWD_DAG_IDS`; the results
    are what those runs made: video paths, face boxes, pictures of faces). Every SimpleAuthManager role may; with
    another auth manager (FAB, Keycloak, teams) a user without that right gets 403, not the results.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    def inner(user: Any = Depends(get_user)) -> None:  # noqa: B008 - FastAPI dependency
        manager = get_auth_manager()
        if not any(
            manager.is_authorized_dag(
                method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user
            )
            for dag_id in CROWD_DAG_IDS
        ):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, "Forbidden: crowd's results need the right to read the crowd DAGs' runs"
            )

    return inner


def requires_dag_run_trigger(action: str = "sending") -> Callable[..., None]:
    """Dependency: the user may trigger DAG runs (SimpleAuthManager: role ``user`` or above; not ``viewer``).
    ``action`` names what is refused in the 403's detail.

    Asked for all DAGs (no ``dag_id``), so a request parameter cannot narrow the check.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import get_user

    def inner(user: Any = Depends(get_user)) -> None:  # noqa: B008 - FastAPI dependency
        allowed = get_auth_manager().is_authorized_dag(
            method="POST", access_entity=DagAccessEntity.RUN, details=None, user=user
        )
        if not allowed:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: {action} needs the right to trigger DAG runs")

    return inner


def requires_token_header(action: str) -> Callable[..., None]:
    """Dependency: the request carries its token in the ``Authorization`` header, not only the browser's session
    cookie. For a GET that changes state (``/receive`` removes what it returns): browsers send the SameSite=Lax
    cookie on a cross-site link or redirect, so a page elsewhere could make a logged-in user's browser take the
    messages; no such navigation can set a header. (The POST routes take JSON bodies only, ``application/json``,
    which a page elsewhere can send only after a CORS preflight that Airflow refuses unless its
    ``access_control_allow_origins`` names that page: a form's or ``text/plain`` body answers 422. Not the cookie:
    the simple auth manager's has no SameSite attribute, and some browsers send such cookies with cross-site
    POSTs.)"""

    def inner(request: Request) -> None:
        if not request.headers.get("authorization", "").lower().startswith("bearer "):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"Forbidden: {action} needs the token in an Authorization header (Bearer ...); a session cookie "
                "alone is refused, so that a link cannot make a browser take messages",
            )

    return inner


def _add_message_routes(app: FastAPI, send_timeout_s: float, settings_factory: Callable[[], Settings]) -> None:
    from airflow.api_fastapi.core_api.security import get_user

    def producer_for(request: Request, settings: Settings) -> PolledProducer:
        state = request.app.state
        with state.producer_lock:
            if state.producer is None:
                from crowd.kafka import reliable_producer

                producer = reliable_producer(settings.kafka_conn_id, timeout_s=send_timeout_s, linger_ms=0)
                state.producer = PolledProducer(producer)
            return state.producer

    def drop_producer(request: Request, polled: PolledProducer) -> None:
        """Forget a producer that hit a fatal error (it refuses every message from then on)."""
        state = request.app.state
        with state.producer_lock:
            if state.producer is polled:
                state.producer = None
                polled.retire()
        log.error("crowd API: Kafka producer failed fatally; a new one is made for the next /send")

    @app.post(
        "/send",
        response_model=SendResponse,
        dependencies=[Depends(requires_dag_run_trigger())],
        responses={
            503: {"model": ErrorBody, "description": "Kafka did not acknowledge the message in time"},
            413: {"model": ErrorBody, "description": "the body is larger than the API takes"},
        },
        summary="Publish a message to Kafka and wait for the broker's acknowledgement",
    )
    async def send(body: SendRequest, request: Request, user: Any = Depends(get_user)) -> SendResponse:  # noqa: B008
        # ``sender`` is what the client says (the seed's field, the Kafka key); ``sent_by`` the account that sent it
        # Async: the wait for the acknowledgement (up to send_timeout_s) holds no thread of the server's pool.
        settings = settings_factory()
        try:  # making the producer reads the Airflow connection (maybe from the database): in the pool
            polled = request.app.state.producer or await run_in_threadpool(producer_for, request, settings)
        except Exception as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Kafka producer unavailable: {exc}") from exc
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[tuple[Any, Any]] = loop.create_future()

        def on_delivery(err: Any, msg: Any) -> None:  # in the producer's poll thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits for this report
                loop.call_soon_threadsafe(_settle, delivered, (err, msg))

        value = json.dumps(
            {
                "content": body.content,
                "sender": body.sender,
                "sent_by": user.get_name(),
                "sent_at": datetime.now(timezone.utc).isoformat(),
            }
        ).encode()
        try:
            polled.producer.produce(
                settings.messages_topic, key=body.sender.encode(), value=value, on_delivery=on_delivery
            )
        except BufferError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Kafka producer queue is full: {exc}") from exc
        except KafkaException as exc:
            # after a fatal error (e.g. of the idempotent producer), the next call makes a new one
            if exc.args and exc.args[0].fatal():
                await run_in_threadpool(drop_producer, request, polled)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Kafka producer failed: {exc}") from exc
        await asyncio.wait({delivered}, timeout=send_timeout_s + 1.0)
        if not delivered.done():
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"Kafka did not acknowledge the message within {send_timeout_s:.0f} s; is the broker up?",
            )
        err, msg = delivered.result()
        if err is not None:
            if err.fatal():
                await run_in_threadpool(drop_producer, request, polled)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Kafka rejected the message: {err.str()}")
        ts_type, ts = msg.timestamp()
        return SendResponse(
            topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), timestamp_ms=ts if ts_type else None
        )

    @app.get(
        "/receive",
        response_model=ReceiveResponse,
        # taking messages removes them for every other reader: a write, not for read-only viewers
        dependencies=[
            Depends(requires_dag_run_trigger("taking messages")),
            Depends(requires_token_header("taking messages")),
        ],
        responses={503: {"model": ErrorBody, "description": "the background consumer is not running"}},
        summary="Take messages read by the background consumer (delivered ones are removed)",
    )
    async def receive(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="most messages to return")] = 100,
        wait_s: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="wait this long if none is queued")] = 0,
        lease_s: Annotated[
            float | None,
            Query(
                gt=0,
                le=MAX_LEASE_S,
                description="hand the messages out under a lease of this many seconds instead of removing them: "
                "confirm it with POST /receive/confirm, or they come again (a response lost on the way loses nothing)",
            ),
        ] = None,
        *,
        response: Response,
    ) -> ReceiveResponse:
        response.headers["Cache-Control"] = "no-store"  # a GET that takes what it returns: no cache may answer it
        receiver: MessageReceiver | None = request.app.state.receiver
        if receiver is None:
            reason = request.app.state.receiver_error or "disabled"
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"message receiver is not running: {reason}")
        if not await _wait_for_messages(request, receiver, wait_s):  # nobody would read them: they would be lost
            return ReceiveResponse(messages=[], count=0, remaining=len(receiver))
        lease = None
        if lease_s is None:
            items = await run_in_threadpool(receiver.take, limit)  # decodes up to a few MiB of JSON
        else:
            lease, items = await run_in_threadpool(receiver.lease, limit, lease_s)
        stats = receiver.stats()
        return ReceiveResponse(
            messages=[ReceivedItem.of(m) for m in items],
            count=len(items),
            remaining=stats.queued,
            lease=lease,
            lease_s=lease_s if lease else None,
        )

    @app.post(
        "/receive/confirm",
        response_model=ConfirmResponse,
        dependencies=[Depends(requires_dag_run_trigger("confirming messages"))],
        responses={
            404: {"model": ErrorBody, "description": "no such lease in this API-server process"},
            409: {"model": ErrorBody, "description": "the lease ran out: its messages were queued again"},
            503: {"model": ErrorBody, "description": "the background consumer is not running"},
        },
        summary="Confirm a /receive lease: its messages are removed for good",
    )
    def confirm(body: ConfirmRequest, request: Request) -> ConfirmResponse:
        receiver: MessageReceiver | None = request.app.state.receiver
        if receiver is None:
            reason = request.app.state.receiver_error or "disabled"
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"message receiver is not running: {reason}")
        try:
            done = receiver.confirm(body.lease)
        except LeaseError as exc:
            raise HTTPException(
                status.HTTP_409_CONFLICT if exc.expired else status.HTTP_404_NOT_FOUND, str(exc)
            ) from None
        return ConfirmResponse(confirmed=done.confirmed, returned=done.returned)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _wait_for_messages(request: Request, receiver: MessageReceiver, wait_s: float) -> bool:
    """Wait up to ``wait_s`` until ``receiver`` has messages; returns False when the client hung up meanwhile (a
    long-poll client whose own timeout is shorter), so that nothing is taken for nobody.

    The disconnect is awaited, not polled: ``Request.is_disconnected`` misses it behind a ``BaseHTTPMiddleware``
    (Airflow's API server has several): its already-cancelled scope interrupts their ``receive``.
    """
    if wait_s <= 0 or len(receiver):
        return True
    gone = anyio.Event()

    async def listen() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    deadline = time.monotonic() + wait_s
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(listen)
        while not len(receiver) and time.monotonic() < deadline and not gone.is_set():
            await _sleep(0.05)
        await anyio.sleep(0)  # a disconnect that came with the last message is seen now
        task_group.cancel_scope.cancel()
    return not gone.is_set()


# a formula start after a separator a spreadsheet may split on (';' in many locales, tab, '|'), maybe quoted
_FORMULA_AFTER_SEPARATOR = re.compile(r"""([;|\t][\s"']*)([=+\-@])""")


def _spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula: text starting with ``= + - @``, tab or CR gets a
    leading ``'`` (OWASP, CSV injection), and so does a formula start after a ``;``, tab or ``|`` inside it (a
    spreadsheet splitting on those would start a cell there). Text comes from any producer of the Faces topic (the
    ``model`` field: refused with those characters since session 23, but stored before)."""
    if not isinstance(value, str):
        return value
    if value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        value = "'" + value
    return _FORMULA_AFTER_SEPARATOR.sub(r"\1'\2", value) if ("\t" in value or ";" in value or "|" in value) else value


def _add_result_routes(app: FastAPI, settings_factory: Callable[[], Settings]) -> None:
    def one_video(conn: Any, video_id: str) -> dict[str, Any]:
        params = {"video_id": video_id, "status": None, "limit": 1, "offset": 0, "after_at": None, "after_id": None}
        rows = _rows(conn, _VIDEO_QUERY, params)
        if not rows:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no video with id {video_id!r}")
        return rows[0]

    @app.get(
        "/videos",
        response_model=VideoList,
        responses=_READ_ERRORS,
        summary="Videos with status, frames, max/mean faces, peak time",
    )
    def list_videos(
        conn: Db,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        status_filter: Annotated[VideoStatus | None, Query(alias="status")] = None,
        after: Annotated[str | None, Query(max_length=400, description="the `next` of the previous page")] = None,
    ) -> VideoList:
        params = {"video_id": None, "status": status_filter, "limit": limit + 1, "offset": offset}
        params |= _after(after, offset, str, null_at=True)
        total = _rows(conn, _VIDEO_COUNT, params)[0]["n"]
        rows, next_page = _page(_rows(conn, _VIDEO_QUERY, params), limit, "listed_at", "video_id")
        return VideoList(
            items=[VideoSummary(**r) for r in rows], total=total, limit=limit, offset=offset, next=next_page
        )

    @app.get("/videos/{video_id}", response_model=VideoSummary, responses=_VIDEO_ERRORS, summary="One video's summary")
    def get_video(video_id: VideoId, conn: Db) -> VideoSummary:
        return VideoSummary(**one_video(conn, video_id))

    @app.get(
        "/videos/{video_id}/frames",
        response_model=FramePage,
        responses=_VIDEO_ERRORS,
        summary="A video's frames with face counts",
    )
    def list_frames(
        video_id: VideoId,
        conn: Db,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 500,
        offset: Annotated[int, Query(ge=0, le=100_000_000)] = 0,
        after_frame_id: Annotated[
            int | None,
            Query(
                ge=-1,
                le=2**63 - 1,
                description="only frames after this one (the last frame_id of the previous page): pages that neither "
                "skip nor repeat frames while late frames of a split video arrive, which offsets do",
            ),
        ] = None,
    ) -> FramePage:
        total = one_video(conn, video_id)["frames"]
        rows = _rows(
            conn,
            "SELECT frame_id, frame_ts_ms, total_faces FROM frames WHERE video_id = %s AND frame_id > %s"
            " ORDER BY frame_id LIMIT %s OFFSET %s",
            (video_id, -1 if after_frame_id is None else after_frame_id, limit, offset),
        )
        return FramePage(
            video_id=video_id, items=[FrameCount(**r) for r in rows], total=total, limit=limit, offset=offset
        )

    @app.get(
        "/videos/{video_id}/timeline",
        response_model=Timeline,
        responses=_VIDEO_ERRORS,
        summary="Face counts over time, summarised into at most `points` runs of frames (a chart's points)",
    )
    def timeline(video_id: VideoId, conn: Db, points: Annotated[int, Query(ge=1, le=10_000)] = 800) -> Timeline:
        frames = one_video(conn, video_id)["frames"]
        rows = _rows(
            conn,
            """
            WITH span AS (SELECT min(frame_id)::numeric AS lo, max(frame_id)::numeric + 1 AS hi
                          FROM frames WHERE video_id = %(video_id)s)
            SELECT min(f.frame_id) AS first_frame_id, max(f.frame_id) AS last_frame_id,
                   min(f.frame_ts_ms) AS start_ts_ms, max(f.frame_ts_ms) AS end_ts_ms, count(*) AS frames,
                   max(f.total_faces) AS max_faces, avg(f.total_faces)::float8 AS mean_faces
            FROM frames f, span
            WHERE f.video_id = %(video_id)s
            GROUP BY width_bucket(f.frame_id::numeric, span.lo, span.hi, %(points)s)
            ORDER BY first_frame_id
            """,
            {"video_id": video_id, "points": points},
        )
        return Timeline(video_id=video_id, frames=frames, points=[TimelinePoint(**r) for r in rows])

    @app.get(
        "/videos/{video_id}/frames/{frame_id}/faces",
        response_model=FrameFaces,
        responses={
            **_READ_ERRORS,
            404: {"model": ErrorBody, "description": "no video with this id, or no such frame of it"},
        },
        summary="One frame's faces",
    )
    def frame_faces(video_id: VideoId, frame_id: Annotated[int, PathParam(ge=0, le=2**63 - 1)], conn: Db) -> FrameFaces:
        frames = _rows(
            conn,
            "SELECT frame_id, frame_ts_ms, total_faces, frame_width, frame_height, model FROM frames"
            " WHERE video_id = %s AND frame_id = %s",
            (video_id, frame_id),
        )
        if not frames:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no frame {frame_id} for video {video_id!r}")
        faces = _rows(
            conn,
            "SELECT face_id, x, y, width, height, confidence FROM faces WHERE video_id = %s AND frame_id = %s"
            " ORDER BY face_id",
            (video_id, frame_id),
        )
        return FrameFaces(video_id=video_id, **frames[0], faces=[FaceBox(**f) for f in faces])

    def csv_response(request: Request, video_id: str, name: str, sql: str, header: list[str]) -> StreamingResponse:
        """Stream a query's rows as CSV, on one connection that checks the video exists (404), runs the query and
        reads its first rows before the response starts: a database that fails it (an outage, a statement timeout)
        gives a 503, not a 200 with a cut-off file. A failure later, mid-file, aborts the transfer (no final chunk),
        which clients report as an error.

        The connection stays open (idle in transaction) while the client reads: it takes one of the process's
        export slots (:class:`ExportSlots`; 503 when none is free), given back with the connection when the
        response ends, however it ends."""
        release = request.app.state.csv_exports.acquire()
        conn: Any = None

        def finish() -> None:
            try:
                if conn is not None:
                    conn.close()
            finally:
                release()

        try:
            conn = connect_or_503(settings_factory())
            one_video(conn, video_id)
            cur = conn.cursor(f"crowd_csv_{uuid.uuid4().hex}")  # server side: rows come in batches
            cur.execute(sql, (video_id,))
            first = cur.fetchmany(CSV_BATCH_ROWS)
        except BaseException:
            finish()
            raise

        def generate() -> Iterator[str]:
            try:
                buffer = io.StringIO()
                writer = csv.writer(buffer)
                writer.writerow(header)
                batch = first
                while batch:
                    writer.writerows([[_spreadsheet_safe(v) for v in row] for row in batch])
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
                    batch = cur.fetchmany(CSV_BATCH_ROWS)
                if buffer.tell():
                    yield buffer.getvalue()
            except Exception:
                log.exception(
                    "CSV export of video %s (%s) failed after it started: the transfer is cut off", video_id, name
                )
                raise
            finally:
                finish()

        return ClosingStreamingResponse(
            generate(),
            on_close=finish,
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{video_id}-{name}.csv"'},
        )

    csv_doc: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/csv": {}}, "description": "CSV with a header row"},
        404: {"model": ErrorBody, "description": "no video with this id"},
        503: {
            "model": ErrorBody,
            "description": "PostgreSQL unavailable, or every CSV export slot of this process taken (Retry-After)",
        },
    }

    @app.get("/videos/{video_id}/frames.csv", response_class=StreamingResponse, responses=csv_doc)
    def frames_csv(video_id: VideoId, request: Request) -> StreamingResponse:
        """Export a video's frames as CSV."""
        header = ["video_id", "frame_id", "frame_ts_ms", "total_faces", "frame_width", "frame_height", "model"]
        sql = f"SELECT {', '.join(header)} FROM frames WHERE video_id = %s ORDER BY frame_id"  # noqa: S608 - fixed names
        return csv_response(request, video_id, "frames", sql, header)

    @app.get("/videos/{video_id}/faces.csv", response_class=StreamingResponse, responses=csv_doc)
    def faces_csv(video_id: VideoId, request: Request) -> StreamingResponse:
        """Export a video's faces as CSV."""
        header = ["video_id", "frame_id", "face_id", "x", "y", "width", "height", "confidence"]
        sql = f"SELECT {', '.join(header)} FROM faces WHERE video_id = %s ORDER BY frame_id, face_id"  # noqa: S608
        return csv_response(request, video_id, "faces", sql, header)

    @app.get(
        "/alerts",
        response_model=AlertList,
        responses=_READ_ERRORS,
        summary="Crowd alerts, newest first (all videos, or one)",
    )
    def list_alerts(
        conn: Db,
        video_id: Annotated[str | None, Query(pattern=VIDEO_ID_PATTERN, description="only this video's alerts")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        after: Annotated[str | None, Query(max_length=400, description="the `next` of the previous page")] = None,
    ) -> AlertList:
        params = {"video_id": video_id, "limit": limit + 1, "offset": offset} | _after(after, offset, int)
        total = _rows(conn, _ALERT_COUNT, params)[0]["n"]
        rows, next_page = _page(_rows(conn, _ALERT_QUERY, params), limit, "created_at", "alert_id")
        return AlertList(items=[AlertItem(**r) for r in rows], total=total, limit=limit, offset=offset, next=next_page)

    @app.get(
        "/videos/{video_id}/images",
        response_model=ImageList,
        responses={
            503: _READ_ERRORS[503],
            404: {"model": ErrorBody, "description": "no pictures, and no video with this id"},
        },
        summary="The pictures of a video (PNG, JPEG)",
    )
    def list_images(video_id: VideoId) -> ImageList:
        """The pictures in the video's results folder; none yet for a known video (still processing): an empty
        list; no folder and no such video: 404, like the video's other routes. Only the pictures the picture route
        serves: regular files, in a folder that is no symlink."""
        try:
            dir_fd = open_video_dir(settings_factory().results_dir, video_id)
        except OSError:  # no folder (or a symlink, or a file)
            with closing(connect_or_503(settings_factory())) as conn:
                one_video(conn, video_id)
            return ImageList(video_id=video_id, images=[])
        try:
            with os.scandir(dir_fd) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if re.fullmatch(IMAGE_NAME_PATTERN, e.name) and e.is_file(follow_symlinks=False)
                )
        finally:
            os.close(dir_fd)
        return ImageList(video_id=video_id, images=names)

    @app.get(
        "/videos/{video_id}/images/{name}",
        response_class=FileResponse,
        responses={
            200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the picture"},
            304: {"description": "the version the request's If-None-Match or If-Modified-Since names is current"},
            404: {"model": ErrorBody, "description": "no such picture of this video"},
        },
        summary="One picture, PNG or JPEG (heatmap, annotated peak frame, faces over time)",
    )
    def get_image(
        request: Request, video_id: VideoId, name: Annotated[str, PathParam(pattern=IMAGE_NAME_PATTERN)]
    ) -> Response:
        # served from the file opened here, never by name again: a symlink swapped in meanwhile leads nowhere
        media_type = IMAGE_TYPES.get(Path(name).suffix.lower())
        opened = open_picture(settings_factory().results_dir, video_id, name) if media_type else None
        if opened is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no picture {name!r} for video {video_id!r}")
        file, stat_result = opened
        try:
            response = OpenedFileResponse(
                file, stat_result, media_type=media_type, headers={"Cache-Control": "private, max-age=60"}
            )
            if not _not_modified(request, response):
                return response
        except BaseException:
            file.close()
            raise
        file.close()  # the client has this version (its ETag or date): headers only
        return NotModifiedResponse(response.headers)


def _add_ops_routes(app: FastAPI, settings_factory: Callable[[], Settings]) -> None:
    def receiver_health(request: Request) -> ReceiverHealth:
        receiver: MessageReceiver | None = request.app.state.receiver
        if receiver is None:
            return ReceiverHealth(running=False, connected=False, last_error=request.app.state.receiver_error)
        s = receiver.stats()
        return ReceiverHealth(
            running=s.running,
            connected=s.connected,
            topic=receiver.topic,
            group_id=receiver.group_id,
            queued=s.queued,
            max_queue=s.max_queue,
            consumed=s.consumed,
            delivered=s.delivered,
            requeued=s.requeued,
            leased=s.leased,
            confirmed=s.confirmed,
            lease_expired=s.lease_expired,
            paused=s.paused,
            errors=s.errors,
            lag=s.lag,
            assigned_partitions=s.assigned_partitions,
            last_error=s.last_error,
        )

    def collect(request: Request) -> tuple[Health, dict[str, Any]]:
        settings = settings_factory()
        kafka_ok, kafka_error, ends = request.app.state.kafka_probe.check(settings.kafka_conn_id, settings.faces_topic)
        pg_ok, pg_error, counts, ingest_lag = False, None, {}, None
        try:
            with closing(pg_connect(settings)) as conn:
                counts = _rows(
                    conn,
                    # frames and faces from the per-video statistics: count(*) would read both tables whole on
                    # every scrape; a stored frame's total_faces is the number of its faces rows (validated)
                    "SELECT (SELECT coalesce(sum(frames), 0) FROM video_stats)::bigint AS frames,"
                    " (SELECT coalesce(sum(total_faces), 0) FROM video_stats)::bigint AS faces,"
                    " (SELECT count(*) FROM rejected_messages) AS rejected, (SELECT count(*) FROM alerts) AS alerts,"
                    " (SELECT count(*) FROM videos) AS videos",
                )[0]
                counts["videos_by_status"] = _rows(conn, "SELECT status, count(*) AS n FROM videos GROUP BY status")
                if ends is not None:
                    stored = stored_offsets(conn, settings.ingest_group, settings.faces_topic)
                    ingest_lag = sum(max(0, high - stored.get(p, 0)) for p, high in ends.items())
                pg_ok = True
        except Exception as exc:
            pg_error = f"{type(exc).__name__}: {exc}".strip()[:500]
        health = Health(
            status="ok" if kafka_ok and pg_ok else "degraded",
            kafka=kafka_ok,
            kafka_error=kafka_error,
            postgres=pg_ok,
            postgres_error=pg_error,
            faces_topic=settings.faces_topic,
            ingest_lag=ingest_lag,
            receiver=receiver_health(request),
        )
        return health, counts

    @app.get("/health", response_model=Health, summary="Kafka and PostgreSQL reachability, consumer lag")
    def health(request: Request) -> Health:
        return collect(request)[0]

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
        summary="Prometheus metrics",
    )
    def metrics(request: Request) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST

        health, counts = collect(request)
        return PlainTextResponse(render_metrics(health, counts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard", response_class=HTMLResponse, summary="The dashboard page shown in the Airflow UI")
    def dashboard() -> HTMLResponse:
        html = DASHBOARD_HTML.read_text(encoding="utf-8")
        return HTMLResponse(
            html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": dashboard_policy(html)}
        )


def render_metrics(health: Health, counts: dict[str, Any]) -> str:
    """Prometheus text exposition of the health snapshot and the stored counts."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Snapshot:
        def collect(self) -> Iterator[Any]:
            yield GaugeMetricFamily("crowd_kafka_up", "1 if the Kafka broker answered", value=int(health.kafka))
            yield GaugeMetricFamily("crowd_postgres_up", "1 if PostgreSQL answered", value=int(health.postgres))
            if health.postgres:
                yield GaugeMetricFamily("crowd_frames_stored", "frames stored in PostgreSQL", value=counts["frames"])
                yield GaugeMetricFamily("crowd_faces_stored", "faces stored in PostgreSQL", value=counts["faces"])
                yield GaugeMetricFamily(
                    "crowd_messages_rejected", "Faces messages the ingest rejected", value=counts["rejected"]
                )
                yield GaugeMetricFamily("crowd_alerts", "crowd alerts raised", value=counts["alerts"])
                videos = GaugeMetricFamily("crowd_videos", "videos by status", labels=["status"])
                for row in counts["videos_by_status"]:
                    videos.add_metric([str(row["status"])], row["n"])
                yield videos
            if health.ingest_lag is not None:
                yield GaugeMetricFamily(
                    "crowd_ingest_lag", "Faces messages not yet stored by the ingest", value=health.ingest_lag
                )
            r = health.receiver
            yield CounterMetricFamily(
                "crowd_receiver_messages_consumed", "messages read by this process's receiver", value=r.consumed
            )
            yield CounterMetricFamily(
                "crowd_receiver_messages_delivered", "messages handed out by /receive", value=r.delivered
            )
            yield CounterMetricFamily(
                "crowd_receiver_messages_requeued", "queued messages left to be read again", value=r.requeued
            )
            yield GaugeMetricFamily("crowd_receiver_leased", "messages handed out under a lease", value=r.leased)
            yield CounterMetricFamily(
                "crowd_receiver_messages_confirmed", "leased messages confirmed (removed)", value=r.confirmed
            )
            yield CounterMetricFamily(
                "crowd_receiver_lease_expired", "leased messages queued again (lease ran out)", value=r.lease_expired
            )
            yield GaugeMetricFamily("crowd_receiver_paused", "1 while the queue is full", value=int(r.paused))
            yield GaugeMetricFamily("crowd_receiver_queue_depth", "messages waiting in the queue", value=r.queued)
            if r.lag is not None:
                yield GaugeMetricFamily("crowd_receiver_lag", "receiver consumer lag (messages)", value=r.lag)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    return generate_latest(registry).decode()
