"""PostgreSQL faults during the drain: a crash (kill -9 of a private cluster) and a batch failing on a constraint."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from crowd import storage
from crowd.ingest import drain
from tests.crowd.test_ingest import encode, frame_dict, publish
from tests.reliability.conftest import PrivatePostgres, loss_figures, pg_counts, port_open, report, stored_offsets_sum

pytestmark = [pytest.mark.services, pytest.mark.reliability, pytest.mark.slow]

GROUP = "crowd-ingest-rel"


def backlog(n_videos: int, per_video: int, bad_every: int) -> tuple[list[dict], list[tuple[bytes, bytes]]]:
    messages = [frame_dict(f"video-{v}", i, i % 4) for v in range(n_videos) for i in range(per_video)]
    items = [(m["video_id"].encode(), encode(m)) for m in messages]
    for k in range(0, len(items), bad_every):
        items.insert(k, (b"video-0", b"not json %d" % k))
    return messages, items


def consistent() -> dict[str, int]:
    """Counts of the committed state, checking that offsets moved only with their rows."""
    counts = pg_counts()
    assert counts["frames"] == counts["consistent_frames"], counts
    assert counts["offsets"] == counts["frames"] + counts["rejected"], f"offsets moved without their rows: {counts}"
    return counts


def test_postgres_crash_mid_drain_then_rerun_is_exact(
    faces_topic: str, private_postgres: PrivatePostgres, private_pg_schema: str
) -> None:
    messages, items = backlog(6, 4000, bad_every=400)
    publish(faces_topic, items)
    total, n_bad = len(items), len(items) - len(messages)
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = drain(
                "kafka_default", "crowd_postgres", faces_topic, GROUP,
                batch_size=500, batch_wait_s=0.2, idle_timeout_s=10, max_seconds=120,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while stored_offsets_sum() < 0.3 * total and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive(), f"drain ended before the crash: {out}"
    private_postgres.kill9()
    thread.join(60)
    assert not thread.is_alive(), "the drain hangs on a dead database"
    error = out.get("error")
    assert isinstance(error, psycopg.OperationalError), out  # the task fails; Airflow retries it

    restart_s = private_postgres.start()  # crash recovery
    after_crash = consistent()
    assert 0 < after_crash["offsets"] < total

    again = drain("kafka_default", "crowd_postgres", faces_topic, GROUP, batch_size=500, batch_wait_s=0.2,
                  idle_timeout_s=5)  # fmt: skip
    final = consistent()
    assert final["frames"] == len(messages) and final["rejected"] == n_bad and final["offsets"] == total
    assert final["faces"] == sum(m["total_faces"] for m in messages)
    assert again.messages == total - after_crash["offsets"], "the rerun did not start at the stored offsets"
    report("fault-3a postgres kill -9 mid-drain", {
        "messages": total, "bad": n_bad, "drain_error": f"{type(error).__name__}: {str(error)[:160]}",
        "committed_at_crash": after_crash, "pg_restart_s": round(restart_s, 1), "rerun_messages": again.messages,
        "frames_stored": final["frames"], "rejected": final["rejected"],
        **loss_figures(final, len(messages), sum(m["total_faces"] for m in messages)),
    })  # fmt: skip


def test_batch_failing_on_a_constraint_stores_nothing_of_it_and_is_retried(faces_topic: str, pg_schema: str) -> None:
    messages, items = backlog(2, 1500, bad_every=300)
    publish(faces_topic, items)
    total, n_bad = len(items), len(items) - len(messages)
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        conn.execute(
            "ALTER TABLE frames ADD CONSTRAINT rel_no_1234 CHECK (NOT (video_id = 'video-1' AND frame_id = 1234))"
        )
        conn.commit()

    with pytest.raises(psycopg.errors.CheckViolation, match="rel_no_1234"):
        drain("kafka_default", "crowd_postgres", faces_topic, GROUP, batch_size=200, batch_wait_s=0.2, idle_timeout_s=5)
    stuck = consistent()
    assert 0 < stuck["offsets"] < total
    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as conn:
        assert (
            conn.execute("SELECT count(*) FROM frames WHERE video_id = 'video-1' AND frame_id = 1234").fetchone()[0]
            == 0
        )
    again = pytest.raises(psycopg.errors.CheckViolation)  # a retry hits the same batch: nothing moves
    with again:
        drain("kafka_default", "crowd_postgres", faces_topic, GROUP, batch_size=200, batch_wait_s=0.2, idle_timeout_s=5)
    after_retry = consistent()
    assert after_retry == stuck

    with psycopg.connect(os.environ["CROWD_PG_DSN_FOR_TESTS"], autocommit=True) as conn:
        conn.execute("ALTER TABLE frames DROP CONSTRAINT rel_no_1234")
    drain("kafka_default", "crowd_postgres", faces_topic, GROUP, batch_size=200, batch_wait_s=0.2, idle_timeout_s=5)
    final = consistent()
    assert final["frames"] == len(messages) and final["rejected"] == n_bad and final["offsets"] == total
    report("fault-3b constraint violation in a batch", {
        "messages": total, "bad": n_bad, "committed_when_stuck": stuck,
        "retry_moved": after_retry["offsets"] - stuck["offsets"], "frames_stored": final["frames"],
        "rejected": final["rejected"], **loss_figures(final, len(messages), sum(m["total_faces"] for m in messages)),
    })  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_started_with_another_port_listens_there() -> None:
    """The README's answer to 'port 5433 in use' is another CROWD_PG_PORT; the port was written into the cluster's
    configuration when it was made, so a start with another port still bound the first (and failed, or answered
    where no client looked)."""
    folder = Path(tempfile.mkdtemp(prefix="crowd-rel-pg-port-"))  # under /tmp: the postgres user can reach it
    first = PrivatePostgres(folder, port=_free_port())
    moved = PrivatePostgres(folder, port=_free_port())
    try:
        first.start()
        with pytest.raises(RuntimeError, match=f"running on port {first.port}, not CROWD_PG_PORT={moved.port}"):
            moved.start()  # a running server is not moved behind its clients' backs
        first.stop()
        moved.start()
        assert port_open(moved.port) and not port_open(first.port)
        with psycopg.connect(moved.dsn, connect_timeout=10) as conn:
            assert conn.execute("SHOW port").fetchone() == (str(moved.port),)
    finally:
        if moved.pid is not None:
            moved.stop()
        shutil.rmtree(folder, ignore_errors=True)
