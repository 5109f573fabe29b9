"""The crowd plugin's HTTP API, in the Airflow API server app (plugins loaded), against real Kafka and PostgreSQL."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.crowd.api_fixtures import *  # noqa: F403 - the fixtures
from tests.crowd.api_fixtures import (
    FRAME_STEP,
    SEED_COUNTS,
    SEED_RUN_ID,
    SEED_VIDEO,
    auth,
    seed_results,
    token,
    wait_receiver_ready,
)

pytestmark = [pytest.mark.services]

V = SEED_VIDEO
# Every plugin route with a request that reaches it. test_every_route_is_listed keeps this complete.
ROUTES = [
    pytest.param("POST", "/crowd/send", {"content": "hi", "sender": "t"}, id="send"),
    pytest.param("GET", "/crowd/receive", None, id="receive"),
    pytest.param("POST", "/crowd/receive/confirm", {"lease": "not-a-lease"}, id="confirm"),
    pytest.param("GET", "/crowd/videos", None, id="videos"),
    pytest.param("GET", f"/crowd/videos/{V}", None, id="video"),
    pytest.param("GET", f"/crowd/videos/{V}/frames", None, id="frames"),
    pytest.param("GET", f"/crowd/videos/{V}/frames/0/faces", None, id="faces"),
    pytest.param("GET", f"/crowd/videos/{V}/timeline", None, id="timeline"),
    pytest.param("GET", f"/crowd/videos/{V}/frames.csv", None, id="frames-csv"),
    pytest.param("GET", f"/crowd/videos/{V}/faces.csv", None, id="faces-csv"),
    pytest.param("GET", f"/crowd/videos/{V}/images", None, id="images"),
    pytest.param("GET", f"/crowd/videos/{V}/images/heatmap.png", None, id="image"),
    pytest.param("GET", "/crowd/alerts", None, id="alerts"),
    pytest.param("GET", "/crowd/health", None, id="health"),
    pytest.param("GET", "/crowd/metrics", None, id="metrics"),
    pytest.param("GET", "/crowd/dashboard", None, id="dashboard"),
    pytest.param("GET", "/crowd/openapi.json", None, id="openapi"),
    pytest.param("GET", "/crowd/docs", None, id="docs"),
    pytest.param("GET", "/crowd/docs/files/swagger-ui.css", None, id="docs-file"),
]


@contextmanager
def open_client(app: Any):
    """A TestClient whose lifespan starts after the test changed the environment."""
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


def call(client: Any, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.request(method, path, json=body, headers=headers or {})


def test_every_route_is_listed(airflow_app: Any) -> None:
    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    mount = next(r for r in airflow_app.routes if isinstance(r, Mount) and r.path == "/crowd")
    served = {(m, "/crowd" + r.path) for r in mount.app.routes if isinstance(r, APIRoute) for m in r.methods}
    listed = {(p.values[0], p.values[1].replace(V, "{video_id}").replace("/0/", "/{frame_id}/")) for p in ROUTES}
    listed = {(m, re.sub(r"/(images|files)/[^/]+$", r"/\1/{name}", p)) for m, p in listed}
    assert served == listed


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_route_needs_a_token(client: Any, method: str, path: str, body: Any) -> None:
    response = call(client, method, path, body)
    assert response.status_code == 401, response.text
    bad = call(client, method, path, body, {"Authorization": "Bearer not-a-jwt"})
    assert bad.status_code in (401, 403), bad.text


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_viewer_reads_but_cannot_send_or_take_messages(client: Any, method: str, path: str, body: Any) -> None:
    """``/receive`` removes what it returns (for every other reader too): a viewer may not take messages."""
    response = call(client, method, path, body, auth(client, "viewer"))
    if path in ("/crowd/send", "/crowd/receive", "/crowd/receive/confirm"):
        assert response.status_code == 403, response.text
        assert "trigger DAG runs" in response.json()["detail"]
    else:
        assert response.status_code in (200, 404), response.text


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_a_user_who_may_not_read_dag_runs_gets_no_results(
    client: Any, method: str, path: str, body: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an auth manager that gives some users no read access to DAG runs (FAB roles, teams), being logged in is
    not enough: the results are the crowd DAGs' output (paths, face boxes, pictures of faces)."""
    from airflow.api_fastapi.app import get_auth_manager

    manager = get_auth_manager()
    headers = auth(client, "admin")
    allowed = manager.is_authorized_dag

    def no_dag_runs(*, method: str, access_entity: Any = None, details: Any = None, user: Any) -> bool:
        return (
            False
            if str(getattr(access_entity, "value", access_entity)).lower().endswith("run")
            else allowed(method=method, access_entity=access_entity, details=details, user=user)
        )

    monkeypatch.setattr(manager, "is_authorized_dag", no_dag_runs)
    response = call(client, method, path, body, headers)
    assert response.status_code == 403, response.text

    def one_crowd_dag_only(*, method: str, access_entity: Any = None, details: Any = None, user: Any) -> bool:
        return method == "GET" and getattr(details, "id", None) == "crowd_video_detect"

    monkeypatch.setattr(manager, "is_authorized_dag", one_crowd_dag_only)  # a team's user who may read one crowd DAG
    if method == "GET" and path != "/crowd/receive":  # /receive also needs the right to trigger runs
        response = call(client, method, path, body, headers)
        assert response.status_code in (200, 404), response.text


@pytest.mark.parametrize("username", [pytest.param(u, id=u) for u in ("user", "op", "admin")])
def test_roles_that_trigger_dags_can_send(client: Any, messages_topic: str, username: str) -> None:
    response = client.post("/crowd/send", json={"content": "x", "sender": username}, headers=auth(client, username))
    assert response.status_code == 200, response.text
    assert response.json()["topic"] == messages_topic


def test_send_then_receive_round_trip(client: Any, messages_topic: str) -> None:
    headers = auth(client, "user")
    wait_receiver_ready(client, headers)
    sent = []
    for i in range(3):
        response = client.post("/crowd/send", json={"content": f"hello {i}", "sender": "alice"}, headers=headers)
        assert response.status_code == 200, response.text
        sent.append(response.json())
    assert [s["partition"] for s in sent] == [0, 0, 0]
    assert [s["offset"] for s in sent] == [sent[0]["offset"] + i for i in range(3)]

    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(received) < 3 and time.monotonic() < deadline:
        received += client.get("/crowd/receive", params={"limit": 10, "wait_s": 2}, headers=headers).json()["messages"]
    assert [m["offset"] for m in received] == [s["offset"] for s in sent]
    assert [m["value"]["content"] for m in received] == ["hello 0", "hello 1", "hello 2"]
    assert all(m["key"] == "alice" and m["topic"] == messages_topic for m in received)
    # "sender" is what the client says; "sent_by" the account the server authenticated, which a body cannot set
    assert all(m["value"]["sender"] == "alice" and m["value"]["sent_by"] == "user" for m in received)
    forged = client.post("/crowd/send", json={"content": "x", "sender": "alice", "sent_by": "admin"}, headers=headers)
    assert forged.status_code == 422, forged.text

    again = client.get("/crowd/receive", params={"wait_s": 1}, headers=headers)
    assert again.json()["messages"] == [] and again.json()["remaining"] == 0, "delivered messages came back"
    assert again.headers["cache-control"] == "no-store"  # it takes what it returns: no cache may answer it


def test_a_session_cookie_alone_cannot_take_messages(client: Any, messages_topic: str) -> None:
    """``GET /receive`` removes what it returns, and Airflow also takes its ``_token`` session cookie, which
    browsers send on a cross-site link (SameSite=Lax): any page could make a logged-in user's browser take (and so
    lose) the queued messages. The token must come in the Authorization header; nothing is taken otherwise."""
    headers = auth(client, "user")
    wait_receiver_ready(client, headers)
    sent = client.post("/crowd/send", json={"content": "keep me", "sender": "alice"}, headers=headers)
    assert sent.status_code == 200, sent.text
    cookie_only = client.get(
        "/crowd/receive", params={"limit": 10, "wait_s": 2}, cookies={"_token": headers["Authorization"][7:]}
    )
    assert cookie_only.status_code == 403 and "Authorization header" in cookie_only.json()["detail"], cookie_only.text
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while not received and time.monotonic() < deadline:
        received += client.get("/crowd/receive", params={"limit": 10, "wait_s": 2}, headers=headers).json()["messages"]
    assert [m["value"]["content"] for m in received] == ["keep me"]
    assert [m["offset"] for m in received] == [sent.json()["offset"]]
    client.cookies.clear()


def test_a_frame_above_2_to_the_31_is_readable(client: Any, pg_schema: str) -> None:
    """``frames.frame_id`` is a bigint and the message puts no bound on it: ``/frames`` listed frame 3,000,000,000
    and its faces route answered 422 (at most 2**31 - 1)."""
    from crowd import storage

    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        conn.execute(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source)"
            " VALUES ('bigframe01', 3000000000, 1.0, 1, 'm', 10, 10, 's')"
        )
        conn.execute("INSERT INTO faces VALUES ('bigframe01', 3000000000, 0, 1, 1, 2, 2, 0.9)")
        conn.commit()
    viewer = auth(client, "viewer")
    listed = client.get("/crowd/videos/bigframe01/frames", headers=viewer)
    assert [f["frame_id"] for f in listed.json()["items"]] == [3_000_000_000], listed.text
    response = client.get("/crowd/videos/bigframe01/frames/3000000000/faces", headers=viewer)
    assert response.status_code == 200, response.text
    assert [f["width"] for f in response.json()["faces"]] == [2]


def _insert_frames(video_id: str, frame_ids: list[int]) -> None:
    from crowd import storage

    with storage.connect("crowd_postgres") as conn:
        conn.execute(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source)"
            " SELECT %s, f, f * 33.3, 1, 'm', 10, 10, 's' FROM unnest(%s::bigint[]) f",
            (video_id, frame_ids),
        )
        conn.commit()


def test_frame_pages_by_frame_id_neither_skip_nor_repeat_while_late_frames_arrive(client: Any) -> None:
    """Frames of a split video arrive out of order: with offsets, frame 10 stored between two pages moved frame 20
    onto the second page too (and the dashboard, stopping at ``total``, dropped the last frame)."""
    _insert_frames("pagedvideo", [0, 20, 40, 60])
    viewer = auth(client, "viewer")
    first = client.get("/crowd/videos/pagedvideo/frames", params={"limit": 2}, headers=viewer).json()
    assert [f["frame_id"] for f in first["items"]] == [0, 20]
    _insert_frames("pagedvideo", [10])
    after = first["items"][-1]["frame_id"]
    second = client.get(
        "/crowd/videos/pagedvideo/frames", params={"limit": 2, "after_frame_id": after}, headers=viewer
    ).json()
    assert [f["frame_id"] for f in second["items"]] == [40, 60] and second["total"] == 5
    by_offset = client.get("/crowd/videos/pagedvideo/frames", params={"limit": 2, "offset": 2}, headers=viewer).json()
    assert [f["frame_id"] for f in by_offset["items"]] == [20, 40]  # what offsets do (kept for old clients)


def test_a_timeline_summarises_a_long_video_keeping_its_peaks(client: Any) -> None:
    """The dashboard drew the first 20,000 frames of a video and clamped later alerts to its edge; a timeline
    summarises every stored frame into at most ``points`` runs, each keeping its most faces."""
    from crowd import storage

    _insert_frames("longvideo", list(range(0, 90_000, 3)))  # 30,000 frames, one face each
    with storage.connect("crowd_postgres") as conn:
        conn.execute("UPDATE frames SET total_faces = 50 WHERE video_id = 'longvideo' AND frame_id = 71001")
        conn.commit()
    viewer = auth(client, "viewer")
    body = client.get("/crowd/videos/longvideo/timeline", params={"points": 800}, headers=viewer).json()
    points = body["points"]
    assert body["frames"] == 30_000 and 700 <= len(points) <= 800
    assert sum(p["frames"] for p in points) == 30_000
    assert [p["first_frame_id"] for p in points] == sorted(p["first_frame_id"] for p in points)
    assert all(a["last_frame_id"] < b["first_frame_id"] for a, b in zip(points, points[1:], strict=False))
    (peak,) = [p for p in points if p["max_faces"] == 50]  # the one frame with 50 faces is not averaged away
    assert peak["first_frame_id"] <= 71_001 <= peak["last_frame_id"]
    assert peak["start_ts_ms"] == pytest.approx(peak["first_frame_id"] * 33.3)
    assert points[-1]["last_frame_id"] == 89_997
    one = client.get("/crowd/videos/longvideo/timeline", params={"points": 1}, headers=viewer).json()["points"]
    assert [(p["frames"], p["max_faces"]) for p in one] == [(30_000, 50)]
    assert client.get("/crowd/videos/nosuchvideo/timeline", headers=viewer).status_code == 404


@pytest.mark.parametrize(
    ("path", "count"),
    [
        pytest.param("/crowd/videos", lambda body: len(body["items"]), id="videos"),
        pytest.param("/crowd/videos/racevideo/frames", lambda body: len(body["items"]), id="frames"),
    ],
)
def test_a_page_and_its_total_come_from_the_same_rows(
    client: Any, path: str, count: Callable[[dict[str, Any]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The total and the page were two statements at READ COMMITTED: a drain committing between them gave a total
    that disagreed with the items (36 of 200 responses under a writer, in a review). A frame is stored after each
    request's first statement here: the response must not count it on one side only."""
    from crowd import api

    _insert_frames("racevideo", [0, 1, 2])
    real_rows = api._rows
    calls: list[int] = []

    def rows_then_a_write(conn: Any, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        result = real_rows(conn, sql, params)
        calls.append(1)
        if len(calls) == 1:
            _insert_frames("racevideo" if "frames" in path else f"racevideo{len(calls)}x", [100 + len(calls)])
        return result

    monkeypatch.setattr(api, "_rows", rows_then_a_write)
    body = client.get(path, params={"limit": 1000}, headers=auth(client, "viewer")).json()
    assert len(calls) >= 2 and body["total"] == count(body), body


def test_a_leased_receive_loses_nothing_when_its_response_is_lost(client: Any, messages_topic: str) -> None:
    """``/receive`` removed what it returned: a response lost on the way (client timeout, proxy, crash) lost its
    messages. With ``lease_s`` they stay hidden until confirmed, come again when the lease runs out, and a
    confirmation after that says so."""
    headers = auth(client, "user")
    wait_receiver_ready(client, headers)
    for i in range(3):
        assert (
            client.post("/crowd/send", json={"content": f"m{i}", "sender": "bob"}, headers=headers).status_code == 200
        )

    def leased(lease_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            body = client.get(
                "/crowd/receive", params={"limit": 10, "wait_s": 2, "lease_s": lease_s}, headers=headers
            ).json()
            if body["count"] == 3 or time.monotonic() > deadline:
                return body
            assert body["count"] == 0, body  # all three came in one poll, or none yet

    first = leased(1.0)  # this response is "lost": never confirmed
    assert first["count"] == 3 and first["lease"] and first["lease_s"] == 1.0, first
    hidden = client.get("/crowd/receive", params={"limit": 10}, headers=headers).json()
    assert hidden["count"] == 0, "leased messages were handed out to another call"
    time.sleep(1.2)
    second = leased(30.0)
    assert [m["offset"] for m in second["messages"]] == [m["offset"] for m in first["messages"]]
    assert [m["value"]["content"] for m in second["messages"]] == ["m0", "m1", "m2"]

    late = client.post("/crowd/receive/confirm", json={"lease": first["lease"]}, headers=headers)
    assert late.status_code == 409 and "ran out" in late.json()["detail"], late.text
    done = client.post("/crowd/receive/confirm", json={"lease": second["lease"]}, headers=headers)
    assert done.status_code == 200 and done.json() == {"confirmed": 3, "returned": 0}, done.text
    again = client.post("/crowd/receive/confirm", json={"lease": second["lease"]}, headers=headers)
    assert again.json() == done.json(), "a confirm repeated (its first answer lost) gets the same answer"
    unknown = client.post("/crowd/receive/confirm", json={"lease": "never-made"}, headers=headers)
    assert unknown.status_code == 404, unknown.text
    assert client.get("/crowd/receive", params={"wait_s": 1}, headers=headers).json()["count"] == 0
    receiver = client.get("/crowd/health", headers=headers).json()["receiver"]
    assert receiver["confirmed"] == 3 and receiver["lease_expired"] == 3 and receiver["leased"] == 0, receiver
    bad = client.get("/crowd/receive", params={"lease_s": 0}, headers=headers)
    assert bad.status_code == 422, bad.text


def test_a_value_json_cannot_carry_comes_back_as_text_and_loses_nothing(client: Any, messages_topic: str) -> None:
    """Another producer's JSON with a lone surrogate escape (or NaN) between good messages: /receive answered 500 and
    the messages taken for that response were lost. A number too large for a float (``1e400``) came out as null."""
    from crowd.kafka import DeliveryTracker, reliable_producer

    headers = auth(client, "user")
    wait_receiver_ready(client, headers)
    values = [b'{"n": 0}', b'{"x": "\\ud800"}', b'{"n": NaN}', b'{"n": 1e400}', b'{"n": 3}', b"hello", b'"hello"']
    producer, tracker = reliable_producer("kafka_default", timeout_s=20), DeliveryTracker()
    for value in values:
        producer.produce(messages_topic, value=value, on_delivery=tracker.callback)
    tracker.wait(producer, timeout_s=20)
    received: list[Any] = []
    deadline = time.monotonic() + 20
    while len(received) < len(values) and time.monotonic() < deadline:
        response = client.get("/crowd/receive", params={"limit": 10, "wait_s": 2}, headers=headers)
        assert response.status_code == 200, response.text
        received += [(m["value"], m["value_format"]) for m in response.json()["messages"]]
    # the format tells what the bytes were: hello and "hello" are both the string hello once read
    assert received == [({"n": 0}, "json"), ('{"x": "\\ud800"}', "text"), ('{"n": NaN}', "text"),
                        ('{"n": 1e400}', "text"), ({"n": 3}, "json"), ("hello", "text"), ("hello", "json")]  # fmt: skip


def test_receive_is_non_blocking_by_default(client: Any) -> None:
    spec = client.get("/crowd/openapi.json", headers=auth(client, "viewer")).json()
    params = {p["name"]: p for p in spec["paths"]["/receive"]["get"]["parameters"]}
    assert params["wait_s"]["schema"]["default"] == 0  # FastAPI passes the declared default (no timing asserted)
    response = client.get("/crowd/receive", headers=auth(client, "user"))
    assert response.status_code == 200 and response.json()["messages"] == []


def test_queue_bound_holds_under_a_burst(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crowd.kafka import DeliveryTracker, reliable_producer

    bound = 20
    monkeypatch.setenv("CROWD_RECEIVER_MAX_QUEUE", str(bound))
    with open_client(airflow_app) as c:
        headers = auth(c, "viewer")
        wait_receiver_ready(c, headers)
        producer, tracker = reliable_producer("kafka_default", timeout_s=20), DeliveryTracker()
        for i in range(5 * bound):
            producer.produce(messages_topic, value=json.dumps({"n": i}).encode(), on_delivery=tracker.callback)
        tracker.wait(producer, timeout_s=20)
        deadline = time.monotonic() + 20
        while not (receiver := c.get("/crowd/health", headers=headers).json()["receiver"])["paused"]:
            assert time.monotonic() < deadline, f"receiver did not pause on a full queue: {receiver}"
            time.sleep(0.2)
        assert receiver["queued"] == bound, receiver
        assert "crowd_receiver_paused 1.0" in c.get("/crowd/metrics", headers=headers).text
        got: list[int] = []
        deadline = time.monotonic() + 30
        while len(got) < 5 * bound and time.monotonic() < deadline:
            body = c.get("/crowd/receive", params={"limit": 1000, "wait_s": 1}, headers=auth(c, "user")).json()
            assert body["count"] <= bound
            got += [m["value"]["n"] for m in body["messages"]]
        assert got == list(range(5 * bound)), "the queue bound lost, duplicated or reordered messages"


def _produce(topic: str, values: list[bytes]) -> None:
    from crowd.kafka import DeliveryTracker, reliable_producer

    producer, tracker = reliable_producer("kafka_default", timeout_s=20), DeliveryTracker()
    for value in values:
        producer.produce(topic, value=value, on_delivery=tracker.callback)
    tracker.wait(producer, timeout_s=20)


def test_a_message_arriving_after_the_client_gave_up_goes_to_the_next_receive(
    live_server: str, messages_topic: str
) -> None:
    """A long-poll /receive whose client hung up (a client timeout shorter than wait_s) while it waited: the message
    that came meanwhile was taken for nobody, committed, and lost. Real HTTP: the disconnect must reach the route."""
    import httpx

    with httpx.Client(base_url=live_server, timeout=60) as http:
        headers = auth(http, "user")
        wait_receiver_ready(http, headers)
        host, port = urlsplit(live_server).hostname, urlsplit(live_server).port
        request = (
            f"GET /crowd/receive?wait_s=5 HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n\r\n"
        )
        with socket.create_connection((host, port)) as gone:
            gone.sendall(request.encode())
            time.sleep(1.0)  # the request is waiting for a message
        _produce(messages_topic, [b'{"hello": "after the hang-up"}'])
        deadline = time.monotonic() + 30
        while http.get("/crowd/health", headers=headers).json()["receiver"]["consumed"] < 1:
            assert time.monotonic() < deadline, "the receiver did not read the message"
            time.sleep(0.1)
        time.sleep(0.5)  # the abandoned request (which polls every 50 ms) takes it now if it is going to
        got = http.get("/crowd/receive", params={"wait_s": 5}, headers=headers).json()
    assert [m["value"] for m in got["messages"]] == [{"hello": "after the hang-up"}], got


def test_one_receive_response_is_capped_in_bytes(client: Any, messages_topic: str) -> None:
    """A backlog of large messages (up to the broker's 1 MB each) came out in one response of up to the queue's
    64 MiB; now a response carries at most a few MiB, and ``remaining`` counts the rest, taken by the next calls."""
    from crowd.receiver import DEFAULT_MAX_TAKE_BYTES

    headers = auth(client, "user")
    wait_receiver_ready(client, headers)
    big = 900_000
    count = DEFAULT_MAX_TAKE_BYTES // big + 2
    _produce(messages_topic, [json.dumps({"n": i, "pad": "x" * big}).encode() for i in range(count)])
    deadline = time.monotonic() + 30
    while client.get("/crowd/health", headers=headers).json()["receiver"]["queued"] < count:
        assert time.monotonic() < deadline, "the receiver did not queue the backlog"
        time.sleep(0.2)
    first = client.get("/crowd/receive", params={"limit": 1000}, headers=headers).json()
    assert 0 < first["count"] < count and first["remaining"] == count - first["count"], first["count"]
    assert sum(len(json.dumps(m["value"])) for m in first["messages"]) <= DEFAULT_MAX_TAKE_BYTES
    got = [m["value"]["n"] for m in first["messages"]]
    while len(got) < count and time.monotonic() < deadline:
        got += [m["value"]["n"] for m in client.get("/crowd/receive", headers=headers).json()["messages"]]
    assert got == list(range(count)), "lost, duplicated or reordered"


def test_the_receiver_is_stopped_off_the_event_loop(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MessageReceiver.stop`` waits for the consumer thread's last commit and close (seconds with a slow broker):
    called on the event loop, it stopped every other request of the API server meanwhile."""
    import asyncio

    from crowd.receiver import MessageReceiver

    on_loop: list[bool] = []
    real_stop = MessageReceiver.stop

    def stop(self: MessageReceiver, *args: Any, **kwargs: Any) -> None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread: a worker thread
            on_loop.append(False)
        real_stop(self, *args, **kwargs)

    monkeypatch.setattr(MessageReceiver, "stop", stop)
    with open_client(airflow_app) as c:
        wait_receiver_ready(c, auth(c, "viewer"))
    assert on_loop == [False]
    assert not any(t.name == f"crowd-receiver-{messages_topic}" for t in threading.enumerate())


def test_receiver_stops_with_the_server(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path
) -> None:
    with open_client(airflow_app) as c:
        wait_receiver_ready(c, auth(c, "viewer"))
        assert any(t.name == f"crowd-receiver-{messages_topic}" for t in threading.enumerate())
    assert not any(t.name == f"crowd-receiver-{messages_topic}" for t in threading.enumerate())


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        pytest.param(
            b'{"content": "' + b"x" * (64 * 1024) + b'", "sender": "a"}', "application/json", 413, id="over-64k"
        ),
        pytest.param(json.dumps({"content": 5, "sender": "a"}).encode(), "application/json", 422, id="content-not-str"),
        pytest.param(json.dumps({"content": "x"}).encode(), "application/json", 422, id="no-sender"),
        pytest.param(json.dumps({"content": "x", "sender": ""}).encode(), "application/json", 422, id="empty-sender"),
        pytest.param(json.dumps({"content": "x", "sender": "a", "x": 1}).encode(), "application/json", 422, id="extra"),
        pytest.param(b"not json", "application/json", 422, id="not-json"),
        pytest.param(b'{"content": "x", "sender": "\\ud800"}', "application/json", 422, id="lone-surrogate"),
        pytest.param(b"\xff\xfe", "text/plain", 422, id="not-utf8-text"),  # echoed as bytes: a 500 before
        pytest.param(b"\xff\xfe", "application/json", 422, id="not-utf8-json"),
    ],
)
def test_send_validates_input(client: Any, body: bytes, content_type: str, expected: int) -> None:
    headers = {**auth(client, "user"), "Content-Type": content_type}
    response = client.post("/crowd/send", content=body, headers=headers)
    assert response.status_code == expected, response.text


@pytest.mark.parametrize("declared", ["-1", "abc", "+5", "1.5"])  # the ids are the values
def test_a_content_length_that_is_no_byte_count_is_a_400_not_a_413(client: Any, declared: str) -> None:
    """It answered 413 (body too large), which it was not. In process: over a socket, uvicorn answers such a
    header with a 400 of its own before the app sees it."""
    headers = {**auth(client, "user"), "Content-Type": "application/json", "Content-Length": declared}
    response = client.post("/crowd/send", content=b"", headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(f"invalid Content-Length {declared!r}"), response.text


def test_send_answers_503_when_the_broker_is_down(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(How long it waits is the producer's message timeout; no timing is asserted here: the machines are noisy.)"""
    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:1", "group.id": "x"}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(dead))
    with open_client(airflow_app) as c:
        response = c.post("/crowd/send", json={"content": "x", "sender": "a"}, headers=auth(c, "user"))
        assert response.status_code == 503, response.text
        assert "Kafka" in response.json()["detail"]
        health = c.get("/crowd/health", headers=auth(c, "viewer")).json()
        assert health["kafka"] is False and health["status"] == "degraded"


def test_sends_waiting_for_the_broker_hold_no_server_thread(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the broker down, /send calls waiting for their acknowledgement (~6 s each) hold none of the threads
    that serve the sync routes of the whole API server: with 3 times more of them in flight than the pool has
    threads, the crowd dashboard and Airflow's own /api/v2/version still answer before any send gives up."""
    from anyio import to_thread

    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:1", "group.id": "x"}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(dead))
    pool_threads = 4
    with open_client(airflow_app) as c:
        user, viewer = auth(c, "user"), auth(c, "viewer")
        limiter = c.portal.call(to_thread.current_default_thread_limiter)  # the pool of the app's event loop
        c.portal.call(setattr, limiter, "total_tokens", pool_threads)
        finished: list[float] = []

        def send(i: int) -> Any:
            response = c.post("/crowd/send", json={"content": f"x{i}", "sender": "a"}, headers=user)
            finished.append(time.monotonic())
            return response

        with ThreadPoolExecutor(3 * pool_threads) as pool:
            sends = [pool.submit(send, i) for i in range(3 * pool_threads)]
            time.sleep(1.0)  # every send is now waiting for the broker
            dashboard = c.get("/crowd/dashboard", headers=viewer)
            version = c.get("/api/v2/version", headers=viewer)
            answered = time.monotonic()
            responses = [s.result() for s in sends]
    assert dashboard.status_code == 200 and version.status_code == 200, (dashboard.text, version.text)
    assert answered < min(finished), "sync routes waited for /send calls to give up: they held the thread pool"
    assert [r.status_code for r in responses] == [503] * len(responses), [r.text for r in responses]
    assert all("Kafka" in r.json()["detail"] for r in responses)


def test_health_reports_a_kafka_setting_the_client_rejects(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"bootstrap.servers": "127.0.0.1:9092", "group.id": "x", "no.such.property": "1"}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps({"conn_type": "kafka", "extra": extra}))
    with open_client(airflow_app) as c:
        response = c.get("/crowd/health", headers=auth(c, "viewer"))
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["kafka"] is False and health["status"] == "degraded", health
    assert "no.such.property" in health["kafka_error"], health


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/crowd/videos?limit=1001", 422, id="page-too-big"),
        pytest.param("/crowd/videos?limit=0", 422, id="page-zero"),
        pytest.param(f"/crowd/videos/{V}/frames?limit=5000", 422, id="frames-page-too-big"),
        pytest.param("/crowd/receive?limit=100000", 422, id="receive-too-many"),
        pytest.param("/crowd/receive?wait_s=60", 422, id="wait-too-long"),
        pytest.param("/crowd/videos/no-such-video", 404, id="unknown-video"),
        pytest.param("/crowd/videos/no-such-video/images", 404, id="unknown-video-images"),  # was 200 []
        pytest.param(f"/crowd/videos/{V}/frames/-1/faces", 422, id="negative-frame"),
        pytest.param("/crowd/videos/..%2fsecrets/images", 404, id="encoded-traversal"),  # lists secret.png
        pytest.param(f"/crowd/videos/{V}/images/..%2f..%2fsecrets%2fsecret.png", 404, id="image-traversal"),
        pytest.param(f"/crowd/videos/{V}/images/notes.txt", 422, id="not-a-picture"),
        pytest.param(f"/crowd/videos/{V}/images/missing.png", 404, id="missing-picture"),
        pytest.param("/crowd/videos/%27%3B%20DROP%20TABLE%20frames%3B--", 422, id="sql-in-id"),
        pytest.param("/crowd/videos?status=%00", 422, id="nul-in-query"),  # not a status (was PostgreSQL's 400)
        pytest.param("/crowd/videos?after=%00", 400, id="nul-in-cursor"),
    ],
)
def test_input_limits(client: Any, results_dir: Path, path: str, expected: int) -> None:
    """Each refused with its status; the traversals find a picture outside the results folder where they lead."""
    (results_dir / V).mkdir()
    (results_dir / V / "heatmap.png").write_bytes(b"\x89PNG")
    (results_dir.parent / "secrets").mkdir()
    (results_dir.parent / "secrets" / "secret.png").write_bytes(b"\x89PNG secret")
    response = client.get(path, headers=auth(client, "user"))
    assert response.status_code == expected and b"secret" not in response.content, response.text


def test_symlink_out_of_results_dir_is_not_served(client: Any, results_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    (results_dir / V).mkdir()
    (results_dir / V / "leak.png").symlink_to(secret)
    (results_dir / "escape").symlink_to(tmp_path)
    headers = auth(client, "viewer")
    assert client.get(f"/crowd/videos/{V}/images/leak.png", headers=headers).status_code == 404
    assert client.get("/crowd/videos/escape/images/secret.png", headers=headers).status_code == 404


def test_a_symlinked_video_folder_is_not_served_even_inside_the_results_dir(client: Any, results_dir: Path) -> None:
    """A folder reached through a symlink can be swapped for one leading out between a check and the open: no
    symlink is followed under the results folder, and the list names no picture that its route refuses."""
    (results_dir / V).mkdir()
    (results_dir / V / "heatmap.png").write_bytes(b"\x89PNG")
    (results_dir / V / "copy.png").symlink_to(results_dir / V / "heatmap.png")
    (results_dir / "alias").symlink_to(results_dir / V)
    headers = auth(client, "viewer")
    assert client.get("/crowd/videos/alias/images/heatmap.png", headers=headers).status_code == 404
    assert client.get("/crowd/videos/alias/images", headers=headers).status_code == 404  # no video 'alias'
    assert client.get(f"/crowd/videos/{V}/images/copy.png", headers=headers).status_code == 404
    assert client.get(f"/crowd/videos/{V}/images", headers=headers).json()["images"] == ["heatmap.png"]


def test_a_picture_swapped_for_a_symlink_after_its_check_is_not_served(
    client: Any, results_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route checked where the picture's name led, then FileResponse opened the name again: a writer in the
    results folder who swapped the picture for a symlink leading out in between had the outside file served. The
    swap here comes as soon as the server has looked at the picture (a stat of its name, or of what it opened)."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG top secret")
    (results_dir / V).mkdir()
    picture = results_dir / V / "heatmap.png"
    picture.write_bytes(b"\x89PNG the heatmap")
    seen = picture.stat()
    swapped: list[str] = []

    def swap_after(look: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def looked(*args: Any, **kwargs: Any) -> os.stat_result:
            result = look(*args, **kwargs)
            if (result.st_dev, result.st_ino) == (seen.st_dev, seen.st_ino) and not swapped:
                swapped.append(look.__name__)
                link = picture.with_name("swap.tmp")
                link.symlink_to(secret)
                link.replace(picture)
            return result

        return looked

    headers = auth(client, "viewer")
    monkeypatch.setattr(os, "stat", swap_after(os.stat))
    monkeypatch.setattr(os, "fstat", swap_after(os.fstat))
    response = client.get(f"/crowd/videos/{V}/images/heatmap.png", headers=headers)
    assert swapped, "the server never looked at the picture: nothing was swapped"
    assert b"secret" not in response.content, f"the file outside the results folder was served (swap after {swapped})"
    assert response.status_code == 200 and response.content == b"\x89PNG the heatmap", response.status_code
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["cache-control"] == "private, max-age=60" and response.headers["etag"]
    assert client.get(f"/crowd/videos/{V}/images/heatmap.png", headers=headers).status_code == 404  # the symlink now


def test_a_picture_name_that_is_no_regular_file_is_a_404(client: Any, results_dir: Path) -> None:
    """Not a hang: opening a FIFO waits for a writer (the route opens without waiting, then refuses it)."""
    (results_dir / V).mkdir()
    os.mkfifo(results_dir / V / "pipe.png")
    (results_dir / V / "folder.png").mkdir()
    headers = auth(client, "viewer")
    for name in ("pipe.png", "folder.png"):
        assert client.get(f"/crowd/videos/{V}/images/{name}", headers=headers).status_code == 404, name
    assert client.get(f"/crowd/videos/{V}/images", headers=headers).json()["images"] == []


def test_a_picture_the_client_holds_already_is_answered_304(client: Any, results_dir: Path) -> None:
    """The dashboard's browser asks again after max-age with the picture's ETag (or date): the same version gets a
    304 without its bytes (the whole picture was sent again), a changed one the new bytes, and the picture is
    closed either way."""
    (results_dir / V).mkdir()
    picture = results_dir / V / "heatmap.png"
    picture.write_bytes(b"\x89PNG first")
    headers = auth(client, "viewer")
    url = f"/crowd/videos/{V}/images/heatmap.png"
    first = client.get(url, headers=headers)
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    for condition in ({"If-None-Match": etag}, {"If-None-Match": f'"other", W/{etag}'}, {"If-None-Match": "*"},
                      {"If-Modified-Since": modified}):  # fmt: skip
        again = client.get(url, headers={**headers, **condition})
        assert (again.status_code, again.content) == (304, b""), condition
        assert again.headers["etag"] == etag and again.headers["cache-control"] == "private, max-age=60", condition
        assert "content-length" not in again.headers or again.headers["content-length"] == "0", condition
    for condition in ({"If-None-Match": '"other"'}, {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
                      {"If-Modified-Since": "not a date"}):  # fmt: skip
        again = client.get(url, headers={**headers, **condition})
        assert (again.status_code, again.content) == (200, b"\x89PNG first"), condition
    picture.write_bytes(b"\x89PNG second, longer")
    os.utime(picture, (time.time() + 5, time.time() + 5))
    changed = client.get(url, headers={**headers, "If-None-Match": etag})
    assert (changed.status_code, changed.content) == (200, b"\x89PNG second, longer")
    assert _descriptors_open_on(picture) == 0


def _descriptors_open_on(path: Path) -> int:
    """How many descriptors of this process are open on ``path`` (Linux's /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone already
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_a_picture_is_closed_however_its_transfer_ends(live_server: str, results_dir: Path) -> None:
    """The route opens the picture itself (the response sends that open file): it is closed once the picture went
    whole, and when the client hangs up mid-transfer, or each such client would cost the server a descriptor."""
    import httpx

    (results_dir / V).mkdir()
    picture = results_dir / V / "big.png"
    picture.write_bytes(b"\x89PNG" + bytes(16 << 20))  # far more than the socket buffers
    with httpx.Client(base_url=live_server, timeout=60) as http:
        bearer = token(http, "viewer")
        whole = http.get(f"/crowd/videos/{V}/images/big.png", headers={"Authorization": f"Bearer {bearer}"})
    assert whole.status_code == 200 and len(whole.content) == picture.stat().st_size
    assert _descriptors_open_on(picture) == 0, "the picture stayed open after it was sent"
    url = urlsplit(live_server)
    with socket.create_connection((url.hostname, url.port)) as gone:
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        gone.sendall(f"GET /crowd/videos/{V}/images/big.png HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{bearer}\r\n\r\n".encode())  # fmt: skip
        assert gone.recv(100).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 30
        while _descriptors_open_on(picture) != 1:  # sending: the count sees the open picture
            assert time.monotonic() < deadline, "the picture is not open while it is sent: nothing is counted"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while _descriptors_open_on(picture):
        assert time.monotonic() < deadline, "the picture stayed open after its client hung up"
        time.sleep(0.2)


def test_results_routes_return_what_the_ingest_stored(client: Any, faces_topic: str, results_dir: Path) -> None:
    seeded = seed_results(faces_topic, results_dir)
    headers = auth(client, "viewer")
    mean = sum(SEED_COUNTS) / len(SEED_COUNTS)

    videos = client.get("/crowd/videos", headers=headers).json()
    assert videos["total"] == 1
    video = videos["items"][0]
    assert video["video_id"] == V and video["status"] == "done" and video["frames"] == len(SEED_COUNTS)
    assert video["run_id"] == SEED_RUN_ID
    assert video["max_faces"] == 5 and video["total_faces"] == seeded["faces"]
    assert video["mean_faces"] == pytest.approx(mean)
    assert video["peak_frame_id"] == 4 * FRAME_STEP and video["peak_ts_ms"] == pytest.approx(4000.0)
    assert client.get("/crowd/videos?status=failed", headers=headers).json()["total"] == 0
    for wrong in ("DONE", "finished"):  # was 200 with no video: a typo looked like "none of them"
        answer = client.get(f"/crowd/videos?status={wrong}", headers=headers)
        assert answer.status_code == 422 and "'pending', 'processing', 'done' or 'failed'" in answer.text, answer.text
    assert client.get(f"/crowd/videos/{V}", headers=headers).json() == video

    page = client.get(f"/crowd/videos/{V}/frames", params={"limit": 4, "offset": 4}, headers=headers).json()
    assert page["total"] == len(SEED_COUNTS)
    assert [f["frame_id"] for f in page["items"]] == [40, 50, 60, 70]
    assert [f["total_faces"] for f in page["items"]] == SEED_COUNTS[4:8]

    frame = client.get(f"/crowd/videos/{V}/frames/40/faces", headers=headers).json()
    assert frame["total_faces"] == 5 and [f["face_id"] for f in frame["faces"]] == [0, 1, 2, 3, 4]
    assert frame["faces"][0] | {"confidence": 0} == {
        "face_id": 0,
        "x": 10,
        "y": 20,
        "width": 40,
        "height": 40,
        "confidence": 0,
    }
    assert client.get(f"/crowd/videos/{V}/frames/41/faces", headers=headers).status_code == 404

    frames_csv = client.get(f"/crowd/videos/{V}/frames.csv", headers=headers)
    assert frames_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(frames_csv.text)))
    assert [int(r["total_faces"]) for r in rows] == SEED_COUNTS
    faces_rows = list(csv.DictReader(io.StringIO(client.get(f"/crowd/videos/{V}/faces.csv", headers=headers).text)))
    assert len(faces_rows) == seeded["faces"]

    images = client.get(f"/crowd/videos/{V}/images", headers=headers).json()["images"]
    assert {"heatmap.png", "annotated.jpg", "faces_over_time.png"} <= set(images)
    png = client.get(f"/crowd/videos/{V}/images/heatmap.png", headers=headers)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    jpg = client.get(f"/crowd/videos/{V}/images/annotated.jpg", headers=headers)
    assert jpg.headers["content-type"] == "image/jpeg" and jpg.content.startswith(b"\xff\xd8")

    health = client.get("/crowd/health", headers=headers).json()
    assert health["postgres"] and health["kafka"] and health["ingest_lag"] == 0, health
    metrics = client.get("/crowd/metrics", headers=headers)
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert f"crowd_frames_stored {len(SEED_COUNTS)}.0" in text
    assert f"crowd_faces_stored {seeded['faces']}.0" in text
    assert "crowd_messages_rejected 0.0" in text and "crowd_ingest_lag 0.0" in text
    assert 'crowd_videos{status="done"} 1.0' in text


def test_alerts_route_returns_the_alerts_table(
    client: Any, faces_topic: str, kafka_admin: Any, results_dir: Path
) -> None:
    """Two videos with the seed's face counts and a rule of 3 faces: episodes at frames 20, 40-50 and 90 each.
    The route gives every row as the table holds it, newest first (latest episode of a video first), per video
    on request, in pages; a video with no alert gives an empty page, a bad id a 422."""
    from crowd import storage
    from crowd.alerts import AlertRule
    from tests.crowd.test_ingest import new_topic

    alerts_topic = new_topic(kafka_admin, "test-alerts", partitions=1)
    rule = AlertRule(threshold=3, min_duration_s=0)
    try:
        seed_results(faces_topic, results_dir, alert_rule=rule, alerts_topic=alerts_topic)
        seed_results(faces_topic, results_dir, video_id="seedvideo02")  # no rule: no alerts
        seed_results(faces_topic, results_dir, video_id="seedvideo03", alert_rule=rule, alerts_topic=alerts_topic)
    finally:
        kafka_admin.delete_topics([alerts_topic])
    with storage.connect("crowd_postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT id, video_id, revision, published_at FROM alerts")
        table = {row[0]: row[1:] for row in cur.fetchall()}
    headers = auth(client, "viewer")

    everything = client.get("/crowd/alerts", headers=headers).json()
    items = everything["items"]
    assert everything["total"] == len(items) == len(table) == 6
    assert {a["alert_id"]: (a["video_id"], a["revision"]) for a in items} == {k: v[:2] for k, v in table.items()}
    assert all(a["published_at"] is not None for a in items)  # sent to the alerts topic, and marked
    episodes = [
        (a["video_id"], a["started_frame_id"], a["ended_frame_id"], a["peak_count"], a["peak_frame_id"]) for a in items
    ]
    assert episodes == [
        (video, *episode)
        for video in ("seedvideo03", V)
        for episode in ((90, 90, 3, 90), (40, 50, 5, 40), (20, 20, 3, 20))
    ]
    first = items[0]
    assert first["path"] == "/videos/seedvideo03.mp4" and first["threshold"] == 3 and first["min_duration_ms"] == 0
    assert first["started_ts_ms"] == pytest.approx(9000.0) and first["ended_ts_ms"] == pytest.approx(9000.0)

    mine = client.get("/crowd/alerts", params={"video_id": V}, headers=headers).json()
    assert mine["total"] == 3 and [a["alert_id"] for a in mine["items"]] == [a["alert_id"] for a in items[3:]]
    page = client.get("/crowd/alerts", params={"limit": 2, "offset": 2}, headers=headers).json()
    assert page["total"] == 6 and page["items"] == items[2:4]
    assert [len(p) for p in _walk(client, "/crowd/alerts", headers, 4)] == [4, 2]
    assert [a for p in _walk(client, "/crowd/alerts", headers, 2) for a in p] == items  # by cursor: the same
    assert [a for p in _walk(client, "/crowd/alerts", headers, 1, video_id=V) for a in p] == mine["items"]
    assert client.get("/crowd/alerts?video_id=seedvideo02", headers=headers).json() == {
        "items": [],
        "total": 0,
        "limit": 100,
        "offset": 0,
        "next": None,
    }
    assert client.get("/crowd/alerts?video_id=../x", headers=headers).status_code == 422


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(client: Any, faces_topic: str, results_dir: Path) -> None:
    """Stored before messages refused such a ``model`` (since session 23 the schema does: no formula start, no ';',
    '|' or control character), or written by another writer: the export still defuses it."""
    from crowd import storage

    model = '=HYPERLINK("http://evil.example","x")'
    seed_results(faces_topic, results_dir, video_id="csvformula01", model="m")
    with storage.connect("crowd_postgres") as conn:
        conn.execute("UPDATE frames SET model = %s WHERE video_id = 'csvformula01'", (model,))
    response = client.get("/crowd/videos/csvformula01/frames.csv", headers=auth(client, "viewer"))
    assert response.status_code == 200, response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows and {r["model"] for r in rows} == {"'" + model}
    assert rows[0]["frame_id"] == "0"  # numbers untouched
    # a formula after a separator a spreadsheet may split on (';' in many locales, tab): passed the first-character
    # guard, and "=1+1" became a cell of its own
    for hidden in ("x;=1+1", 'x; "=1+1"', "y\t@SUM(A1)", "z|+1"):
        with storage.connect("crowd_postgres") as conn:
            conn.execute("UPDATE frames SET model = %s WHERE video_id = 'csvformula01'", (hidden,))
        text = client.get("/crowd/videos/csvformula01/frames.csv", headers=auth(client, "viewer")).text
        for delimiter in (";", "\t", "|"):
            cells = [c.strip().strip('"') for row in csv.reader(io.StringIO(text), delimiter=delimiter) for c in row]
            assert not [c for c in cells if c[:1] in "=+-@" and c], (hidden, delimiter, text[:300])


def test_csv_exports_come_in_batches_and_one_the_database_cannot_answer_is_a_503_not_a_cut_off_file(
    client: Any, faces_topic: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export's query runs before the response starts: a failing one (here a statement timeout behind a lock
    on ``faces``) answers 503 with the reason; before, the 200 and the header row went out first, then the file
    ended."""
    import crowd.api
    from crowd import storage

    seeded = seed_results(faces_topic, results_dir)
    headers = auth(client, "viewer")
    monkeypatch.setattr(crowd.api, "CSV_BATCH_ROWS", 3)  # several batches, and a last one that is not full
    faces = client.get(f"/crowd/videos/{V}/faces.csv", headers=headers)
    assert faces.status_code == 200, faces.text
    rows = list(csv.DictReader(io.StringIO(faces.text)))
    assert len(rows) == seeded["faces"] > 3 and len({(r["frame_id"], r["face_id"]) for r in rows}) == len(rows)

    conn = json.loads(os.environ["AIRFLOW_CONN_CROWD_POSTGRES"])
    conn["extra"]["options"] += " -cstatement_timeout=1000"
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn))
    with storage.connect("crowd_postgres") as locker:
        locker.execute("LOCK TABLE faces IN ACCESS EXCLUSIVE MODE")
        blocked = client.get(f"/crowd/videos/{V}/faces.csv", headers=headers)
        assert client.get(f"/crowd/videos/{V}", headers=headers).status_code == 200  # the video itself answers
    assert blocked.status_code == 503, (blocked.status_code, blocked.text[:200])
    assert "statement timeout" in blocked.json()["detail"], blocked.text
    assert client.get(f"/crowd/videos/{V}/faces.csv", headers=headers).text == faces.text  # lock gone: whole again


def test_a_results_query_stuck_behind_a_lock_is_cancelled_after_the_api_statement_timeout(
    client: Any, faces_topic: str, results_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No statement timeout was set: a query waiting on a lock (a migration, a maintenance job) or running long held
    its request's thread, one of the pool the whole Airflow API server shares, without bound. Now it answers 503
    after ``CROWD_API_STATEMENT_TIMEOUT_S``; the lock here is released after 20 s, so without the timeout the
    request succeeds late and the test fails."""
    from crowd import storage

    seed_results(faces_topic, results_dir)
    headers = auth(client, "viewer")
    monkeypatch.setenv("CROWD_API_STATEMENT_TIMEOUT_S", "1")
    with storage.connect("crowd_postgres") as locker:
        locker.execute("LOCK TABLE frames IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(20, locker.rollback)
        release.start()
        try:
            started = time.monotonic()
            blocked = client.get(f"/crowd/videos/{V}/frames", headers=headers)
            waited = time.monotonic() - started
        finally:
            release.cancel()
            locker.rollback()
    assert blocked.status_code == 503, (blocked.status_code, blocked.text[:200], waited)
    assert "statement timeout" in blocked.json()["detail"], blocked.text
    assert client.get(f"/crowd/videos/{V}/frames", headers=headers).status_code == 200


def test_the_picture_list_names_only_pictures_it_serves(client: Any, results_dir: Path) -> None:
    """A name ending in a newline passed the list's check (Python's ``$`` matches before a last newline), not the
    picture route's: the dashboard drew a broken picture."""
    (results_dir / V).mkdir()
    for name in ("heatmap.png", "b.png\n", ".hidden.png", "notes.txt"):
        (results_dir / V / name).write_bytes(b"\x89PNG")
    headers = auth(client, "viewer")
    listed = client.get(f"/crowd/videos/{V}/images", headers=headers).json()["images"]
    assert listed == ["heatmap.png"]
    assert all(client.get(f"/crowd/videos/{V}/images/{n}", headers=headers).status_code == 200 for n in listed)


def test_images_of_an_unknown_video_are_404_and_of_a_known_one_without_pictures_empty(client: Any) -> None:
    """Like the video's other routes (before: 200 with no pictures for any id)."""
    from crowd import storage

    with storage.connect("crowd_postgres") as conn:
        conn.execute("INSERT INTO videos (id, path, status) VALUES ('nopictures01', '/v/n.mp4', 'processing')")
        conn.commit()
    headers = auth(client, "viewer")
    unknown = client.get("/crowd/videos/no-such-video/images", headers=headers)
    assert unknown.status_code == 404 and "no-such-video" in unknown.json()["detail"], unknown.text
    known = client.get("/crowd/videos/nopictures01/images", headers=headers)
    assert known.status_code == 200 and known.json() == {"video_id": "nopictures01", "images": []}, known.text


CSV_ROWS = 200_000  # ~10 MB of CSV: far more than the socket buffers, so a client that stops reading stalls it


def _idle_connections(application_name: str) -> tuple[int, int, int]:
    """(all, active, idle in transaction) PostgreSQL backends of ``application_name``."""
    import psycopg

    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE state = 'active'),"
            " count(*) FILTER (WHERE state = 'idle in transaction') FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()


def _seed_big_video(video_id: str) -> None:
    """Register ``video_id`` with CSV_ROWS frames: its CSV export is far larger than the socket buffers."""
    from crowd import storage

    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        conn.execute("INSERT INTO videos (id, path, status) VALUES (%s, '/v/big.mp4', 'done')", (video_id,))
        conn.execute(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source)"
            " SELECT %s, f, f * 33.3, mod(f, 7), 'some-model', 640, 480, 's' FROM generate_series(0, %s) f",
            (video_id, CSV_ROWS - 1),
        )
        conn.commit()


def _start_export(live_server: str, bearer: str, video_id: str) -> tuple[socket.socket, bytes]:
    """Start the frames.csv export of ``video_id`` over a raw socket with a small receive buffer (a client reading
    slowly, or not at all, soon stalls the server's sending); returns the socket and the answer's first bytes."""
    url = urlsplit(live_server)
    sock = socket.create_connection((url.hostname, url.port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /crowd/videos/{video_id}/frames.csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{bearer}\r\n\r\n".encode())  # fmt: skip
        return sock, sock.recv(100)
    except BaseException:
        sock.close()
        raise


@contextmanager
def _big_export(request: pytest.FixtureRequest, video_id: str) -> Iterator[tuple[socket.socket, Any]]:
    """Seed ``video_id`` (:func:`_seed_big_video`), start the live server and the video's export over a raw socket
    (:func:`_start_export`; its answer a 200, and the rest left to the test to read or not); yields that socket,
    closed on leaving, and an httpx client of the server logged in as viewer."""
    import httpx

    _seed_big_video(video_id)
    live_server = request.getfixturevalue("live_server")  # after the test's settings: its lifespan reads them
    with httpx.Client(base_url=live_server, timeout=60) as http:
        bearer = token(http, "viewer")
        http.headers["Authorization"] = f"Bearer {bearer}"
        sock, head = _start_export(live_server, bearer, video_id)
        try:
            assert head.startswith(b"HTTP/1.1 200"), head
            yield sock, http
        finally:
            sock.close()


def test_csv_exports_hold_one_connection_each_and_are_capped_per_process(
    request: pytest.FixtureRequest, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slow clients that stop reading a CSV export: each held two connections idle in transaction (the existence
    check's and the streaming one) for as long as they stalled, and any number of them could. Now one each, at most
    ``CROWD_MAX_CSV_EXPORTS`` at once (503 with Retry-After beyond), and both come back when the clients go."""
    import httpx

    cap = 2
    monkeypatch.setenv("CROWD_MAX_CSV_EXPORTS", str(cap))
    app_name = f"crowd-csv-test-{pg_schema}"  # only this test's connections (others share the database)
    conn_json = json.loads(os.environ["AIRFLOW_CONN_CROWD_POSTGRES"])
    conn_json["extra"]["options"] += f" -capplication_name={app_name}"
    monkeypatch.setenv("AIRFLOW_CONN_CROWD_POSTGRES", json.dumps(conn_json))
    _seed_big_video("bigvideo01")
    live_server = request.getfixturevalue("live_server")  # its lifespan reads the cap
    with httpx.Client(base_url=live_server, timeout=60) as http:
        bearer = token(http, "viewer")

    stalled: list[socket.socket] = []  # clients that stop reading once the export's first bytes came
    try:
        sock, head = _start_export(live_server, bearer, "bigvideo01")
        stalled.append(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        deadline = time.monotonic() + 60
        while (counts := _idle_connections(app_name))[1]:  # until the export waits for its client
            assert time.monotonic() < deadline, counts
            time.sleep(0.2)
        assert counts == (1, 0, 1), f"(connections, active, idle in transaction) for one stalled export: {counts}"

        for _ in range(cap - 1):
            sock, head = _start_export(live_server, bearer, "bigvideo01")
            stalled.append(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
        with httpx.Client(base_url=live_server, timeout=60) as http:
            refused = http.get("/crowd/videos/bigvideo01/frames.csv", headers={"Authorization": f"Bearer {bearer}"})
        assert refused.status_code == 503, refused.text[:200]
        assert "CROWD_MAX_CSV_EXPORTS" in refused.json()["detail"] and int(refused.headers["Retry-After"]) > 0
    finally:
        for sock in stalled:
            sock.close()
    with httpx.Client(base_url=live_server, timeout=60, headers={"Authorization": f"Bearer {bearer}"}) as http:
        deadline = time.monotonic() + 60
        while (again := http.get("/crowd/videos/bigvideo01/frames.csv")).status_code != 200:
            assert time.monotonic() < deadline, f"the slots did not come back: {again.text[:200]}"
            time.sleep(0.5)
    assert again.text.count("\n") == CSV_ROWS + 1
    deadline = time.monotonic() + 60
    while (counts := _idle_connections(app_name))[0]:
        assert time.monotonic() < deadline, f"connections left open after the clients went: {counts}"
        time.sleep(0.5)


def test_a_client_that_stops_reading_an_export_loses_it_after_the_send_timeout(
    request: pytest.FixtureRequest, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that stays connected but takes nothing (its receive window shut) held its export slot and its
    connection for ever: with CROWD_MAX_CSV_EXPORTS such clients, every export of the process got 503 for good."""
    from crowd import api

    monkeypatch.setenv("CROWD_MAX_CSV_EXPORTS", "1")
    monkeypatch.setattr(api, "CSV_SEND_TIMEOUT_S", 2.0)
    with _big_export(request, "bigvideo02") as (_stalled, http):  # it reads no more, and stays connected
        deadline = time.monotonic() + 60  # a liveness bound: the old code never gave the slot back
        while (again := http.get("/crowd/videos/bigvideo02/frames.csv")).status_code == 503:
            assert time.monotonic() < deadline, "the stalled client kept the only export slot"
            time.sleep(0.5)
        assert again.status_code == 200 and again.text.count("\n") == CSV_ROWS + 1


def test_a_client_reading_an_export_too_slowly_loses_it_after_the_export_time_limit(
    request: pytest.FixtureRequest, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client taking a little now and then, never silent for the send timeout, held its export slot (and an open
    transaction) until the whole file went through: hours for a big video. The export is cut off after
    ``CSV_EXPORT_MAX_S`` and the slot comes back."""
    from crowd import api

    monkeypatch.setenv("CROWD_MAX_CSV_EXPORTS", "1")
    monkeypatch.setattr(api, "CSV_EXPORT_MAX_S", 3.0)
    with _big_export(request, "bigvideo03") as (slow, http):
        slow.settimeout(1.0)
        received, started = 0, time.monotonic()
        for i in itertools.count():  # ~20 KB/s: 10 MB would take ~8 min, and it never stops reading for long
            assert time.monotonic() - started < 60, f"the slow client kept the only export slot ({received} B)"
            with contextlib.suppress(TimeoutError):
                received += len(slow.recv(2048))
            time.sleep(0.1)
            if i % 10 == 9 and (again := http.get("/crowd/videos/bigvideo03/frames.csv")).status_code != 503:
                break
        assert again.status_code == 200 and again.text.count("\n") == CSV_ROWS + 1
        assert time.monotonic() - started >= 3 and received < 5_000_000, "the slow client was not the one cut off"


def _store_frames_without_registry(faces_topic: str, video_id: str, frame_ids: range) -> None:
    """Frames of a video the registry does not know (another producer of the Faces topic), stored by a drain."""
    from crowd.ingest import drain
    from crowd.kafka import DeliveryTracker, reliable_producer
    from crowd.messages import build_message

    producer, tracker = reliable_producer("kafka_default", timeout_s=20), DeliveryTracker()
    for frame_id in frame_ids:
        message = build_message(video_id, f"/elsewhere/{video_id}.mp4", frame_id, frame_id * 100.0, (240, 320), [], "m")
        producer.produce(faces_topic, key=video_id.encode(), value=message.to_json(), on_delivery=tracker.callback)
    tracker.wait(producer, timeout_s=20)
    producer.close()
    summary = drain("kafka_default", "crowd_postgres", faces_topic, "crowd-ingest", idle_timeout_s=3, max_seconds=60)
    assert summary.frames == len(frame_ids), summary


def test_videos_the_registry_lacks_keep_their_place_while_their_frames_arrive(client: Any, faces_topic: str) -> None:
    """Listed by when their first frame was stored (before: by their last one, so a video being ingested jumped to
    the top of the first page at every batch, and pages showed it twice or skipped others)."""
    _store_frames_without_registry(faces_topic, "loose-older", range(0, 10))
    time.sleep(0.05)  # a later first frame
    _store_frames_without_registry(faces_topic, "loose-newer", range(0, 10))
    headers = auth(client, "viewer")
    before = client.get("/crowd/videos", headers=headers).json()["items"]
    _store_frames_without_registry(faces_topic, "loose-older", range(10, 20))  # more of the older one arrives
    after = client.get("/crowd/videos", headers=headers).json()["items"]
    assert [v["video_id"] for v in before] == [v["video_id"] for v in after] == ["loose-newer", "loose-older"]
    assert [v["created_at"] for v in after] == [v["created_at"] for v in before]
    assert [v["frames"] for v in after] == [10, 20]
    pages = [client.get(f"/crowd/videos?limit=1&offset={k}", headers=headers).json()["items"] for k in (0, 1)]
    assert [page[0]["video_id"] for page in pages] == ["loose-newer", "loose-older"]


def test_a_video_known_from_its_frames_only_shows_what_they_say(client: Any, faces_topic: str) -> None:
    """Frames from the CLI or another producer, no registry row: the video's model, source and frame size come
    from its last stored frame (the list showed null for each, the model's fallback read the registry again)."""
    _store_frames_without_registry(faces_topic, "loose", range(0, 3))
    headers = auth(client, "viewer")
    (listed,) = client.get("/crowd/videos", headers=headers).json()["items"]
    one = client.get("/crowd/videos/loose", headers=headers).json()
    for video in (listed, one):
        seen = {k: video[k] for k in ("path", "model", "width", "height", "status", "frames")}
        assert seen == {"path": "/elsewhere/loose.mp4", "model": "m", "width": 320, "height": 240, "status": None,
                        "frames": 3}, video  # fmt: skip


def test_a_video_registered_after_its_frames_keeps_its_place_in_a_walk_by_cursor(client: Any, faces_topic: str) -> None:
    """A later part of a split video can be stored before the part that registers the video: the registration
    moved the video to the top of the list, out of a walk by cursor already past that place (it was never shown)."""
    from crowd import storage

    _store_frames_without_registry(faces_topic, "split-part", range(0, 10))
    time.sleep(0.05)
    _store_frames_without_registry(faces_topic, "after-split", range(0, 10))
    headers = auth(client, "viewer")

    def register_split_part() -> None:
        with storage.connect("crowd_postgres") as conn:
            conn.execute(
                "INSERT INTO videos (id, path, status) VALUES ('split-part', '/v/split-part.mp4', 'processing')"
            )
            conn.commit()

    pages = _walk(client, "/crowd/videos", headers, 1, between=register_split_part)
    assert [v["video_id"] for page in pages for v in page] == ["after-split", "split-part"]
    listed = client.get("/crowd/videos", headers=headers).json()["items"]
    assert [v["video_id"] for v in listed] == ["after-split", "split-part"]  # the order the list shows: listed_at
    assert listed[0]["listed_at"] > listed[1]["listed_at"] and listed[1]["created_at"] > listed[1]["listed_at"]


def _b64(value: object) -> str:
    """A cursor as the API spells one (base64 of JSON), holding ``value``."""
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _walk(client: Any, path: str, headers: dict[str, str], limit: int, **params: Any) -> list[list[dict]]:
    """Every page of ``path``, each asked for with the previous page's ``next``; between pages ``between()``."""
    between = params.pop("between", lambda: None)
    pages, after = [], None
    while True:
        response = client.get(path, params={**params, "limit": limit, **({"after": after} if after else {})},
                              headers=headers)  # fmt: skip
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        after = body["next"]
        if after is None:
            return pages
        assert len(pages) < 50, "the cursor does not move on"
        between()


def test_video_pages_read_by_cursor_neither_skip_nor_repeat_while_videos_arrive(client: Any) -> None:
    """Offset pages of the newest-first list shifted by one at each new video: the next page repeated the last
    video of the previous one (and an offset page past a deleted row skipped one). ``next`` continues after the
    last video shown, also among videos registered at the same instant."""
    from crowd import storage

    def register(video_id: str, created_at: str) -> None:
        with storage.connect("crowd_postgres") as conn:
            conn.execute(
                "INSERT INTO videos (id, path, status, created_at) VALUES (%s, %s, 'done', %s)",
                (video_id, f"/videos/{video_id}.mp4", created_at),
            )
            conn.commit()

    for video_id in ("same-b", "same-a", "same-c"):
        register(video_id, "2026-01-02 00:00:00+00")  # one instant: ordered by id
    register("older", "2026-01-01 00:00:00+00")
    arrivals = iter(["new-1", "new-2", "new-3"])
    headers = auth(client, "viewer")
    pages = _walk(
        client, "/crowd/videos", headers, 1, between=lambda: register(next(arrivals, "new-x"), "2026-06-01 00:00:00+00")
    )
    assert [v["video_id"] for page in pages for v in page] == ["same-a", "same-b", "same-c", "older"]
    first = client.get("/crowd/videos?limit=2", headers=headers).json()["items"]
    register("new-4", "2026-06-02 00:00:00+00")  # how offsets repeat a video: the cursor's reason to be
    second = client.get("/crowd/videos?limit=2&offset=2", headers=headers).json()["items"]
    assert second[0]["video_id"] == first[1]["video_id"] == "new-2"
    everything = client.get("/crowd/videos?limit=1000", headers=headers).json()
    assert everything["next"] is None and len(everything["items"]) == everything["total"] == 8


def test_a_cursor_holding_a_lone_surrogate_is_a_400_not_a_500(client: Any) -> None:
    """A JSON cursor can spell a lone surrogate ("\\ud800"), which psycopg cannot encode: the request ended in 500."""
    response = client.get(f"/crowd/videos?after={_b64(['2026-01-01T00:00:00+00:00', chr(0xD800)])}",
                          headers=auth(client, "viewer"))  # fmt: skip
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("after=bm90LWEtY3Vyc29y", id="not-json"),
        pytest.param("after=WyJ4IiwxXQ", id="bad-time"),
        pytest.param("after=WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwieCJd", id="time-without-zone"),
        pytest.param("after=WzEsMiwzXQ", id="three-values"),
        pytest.param("after=%25%25", id="not-base64"),
        pytest.param("after=WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwieCJd&offset=5", id="with-offset"),
        pytest.param(f"after={_b64([None, 5])}&video_id=x", id="no-time"),  # alerts: 200 with nothing (a last page)
    ],
)
def test_a_cursor_the_api_did_not_give_is_a_400(client: Any, query: str) -> None:
    headers = auth(client, "viewer")
    for path in ("/crowd/videos", "/crowd/alerts"):
        if "video_id" in query and path == "/crowd/videos":
            continue
        response = client.get(f"{path}?{query}", headers=headers)
        assert response.status_code == 400 and "after" in response.json()["detail"], (path, response.text)
    assert (
        client.get("/crowd/videos?after=WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwieCJd", headers=headers).status_code
        == 200
    )


def test_results_routes_answer_503_without_the_schema(
    airflow_app: Any, messages_topic: str, pg_schema: str, results_dir: Path
) -> None:
    with open_client(airflow_app) as c:
        response = c.get("/crowd/videos", headers=auth(c, "viewer"))
        assert response.status_code == 503
        assert "schema missing" in response.json()["detail"]


def test_openapi_is_served_under_the_prefix(client: Any) -> None:
    headers = auth(client, "viewer")
    spec = client.get("/crowd/openapi.json", headers=headers).json()
    assert "/send" in spec["paths"] and "/videos/{video_id}/frames" in spec["paths"]
    assert "/openapi.json" not in spec["paths"] and "/docs" not in spec["paths"]
    assert spec["servers"] == [{"url": "/crowd"}]  # Swagger's "Try it out" sent /videos to the Airflow UI
    docs = client.get("/crowd/docs", headers=headers)
    assert docs.status_code == 200 and "/crowd/openapi.json" in docs.text


def test_swagger_ui_is_served_from_the_package_not_a_cdn(client: Any) -> None:
    """The docs page loaded Swagger UI from cdn.jsdelivr.net (unpinned, no integrity check, and unreachable from
    machines without the internet: a blank page). Its files now come from the pinned fastapi-offline package."""
    from crowd.api import DOCS_FILES, docs_files_dir

    headers = auth(client, "viewer")
    docs = client.get("/crowd/docs", headers=headers)
    sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sorted(sources) == sorted(f"/crowd/docs/files/{name}" for name in DOCS_FILES)
    assert "script-src 'self' 'sha256-" in docs.headers["content-security-policy"]
    for name, media_type in DOCS_FILES.items():
        served = client.get(f"/crowd/docs/files/{name}", headers=headers)
        assert served.status_code == 200 and served.headers["content-type"].startswith(media_type), name
        assert served.content == (docs_files_dir() / name).read_bytes(), name
        again = client.get(f"/crowd/docs/files/{name}", headers={**headers, "If-None-Match": served.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", name
    bundle = client.get("/crowd/docs/files/swagger-ui-bundle.js", headers=headers).text
    assert re.search(r'"5\.\d+\.\d+"', bundle), "Swagger UI 5 (OpenAPI 3.1 documents) expected"
    for name in ("core.py", "..%2Fcore.py", "redoc.standalone.js", "%2E%2E", "%2Fetc%2Fpasswd"):
        assert client.get(f"/crowd/docs/files/{name}", headers=headers).status_code == 404, name


def test_openapi_lists_the_answers_the_routes_give(client: Any) -> None:
    """The results routes documented 200 and 422 only: their 404 for an unknown video and the 503 of a database
    that cannot answer were missing from Swagger."""
    headers = auth(client, "viewer")
    spec = client.get("/crowd/openapi.json", headers=headers).json()
    for path in ("/videos/{video_id}", "/videos/{video_id}/frames", "/videos/{video_id}/timeline",
                 "/videos/{video_id}/frames/{frame_id}/faces", "/videos/{video_id}/images"):  # fmt: skip
        assert {"404", "503"} <= set(spec["paths"][path]["get"]["responses"]), path
        url = "/crowd" + path.replace("{video_id}", "no-such-video").replace("{frame_id}", "0")
        assert client.get(url, headers=headers).status_code == 404, path
    for path in ("/videos", "/alerts"):
        assert {"400", "503"} <= set(spec["paths"][path]["get"]["responses"]), path
    assert client.get("/crowd/videos?after=%00", headers=headers).status_code == 400
    # every operation documents the login's 401 and the permissions' 403, and each error's body
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert {"401", "403"} <= set(answers), (method, path)
            for code, answer in answers.items():
                if code.startswith(("4", "5")) and code != "422":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert error_body["required"] == ["detail"]
    unauthenticated = client.get("/crowd/videos")
    assert unauthenticated.status_code == 401 and isinstance(unauthenticated.json()["detail"], str)


def test_schemathesis_finds_no_server_errors(client: Any, faces_topic: str, results_dir: Path) -> None:
    """Property-based cases from the plugin's own OpenAPI, sent in-process with a valid token: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    seed_results(faces_topic, results_dir)
    headers = auth(client, "user")
    spec = client.get("/crowd/openapi.json", headers=headers).json()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    calls = 0

    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            nonlocal calls
            calls += 1
            kwargs = case.as_transport_kwargs(base_url="http://testserver/crowd", headers=headers)
            if case.path == "/receive":  # keep the run quick: no waiting for messages
                kwargs["params"] = {**(kwargs.get("params") or {}), "wait_s": 0}
            kwargs = {
                k: v
                for k, v in kwargs.items()
                if k in ("method", "url", "headers", "params", "json", "content", "data", "cookies")
            }
            response = client.request(**kwargs)
            if response.status_code >= 500:
                failures.append(f"{case.method} {response.url} -> {response.status_code}: {response.text[:200]}")

        check()
    assert calls >= 200, calls
    assert not failures, "\n".join(failures[:10])


def test_the_status_filter_takes_the_statuses_the_registry_has() -> None:
    from typing import get_args

    from crowd.api import VideoStatus
    from crowd.storage import VIDEO_STATUSES

    assert get_args(VideoStatus) == VIDEO_STATUSES
