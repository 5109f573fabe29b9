"""Airflow with the CeleryExecutor for real: RabbitMQ, PostgreSQL metadata DB, two Celery workers (dev/celery.sh).

Videos dropped into the watched folder are scanned by ``crowd_video_scan`` (schedule ``@once`` here, so the run
starts when the DAG is unpaused), its mapped ``detect_and_publish`` tasks spread over both workers, the messages
go to a fresh Kafka topic, ``crowd_faces_ingest`` fires by itself (asset watcher) and a fresh results database
holds exactly one row per sampled frame. The acceptance test then follows one more video from the folder to
``GET /crowd/videos/{id}`` on the running api-server and prints the time of each stage. Then the profile's
processes are killed with ``-9`` mid-run and started again (``dev/celery.sh revive``): RabbitMQ, the scheduler, the
dag-processor, the api-server, the triggerer, and a worker half-way through a detection task (its whole session,
then its process group only); a worker is frozen (SIGSTOP) past its task's heartbeat timeout and thawed
while the retry runs; last, a worker is cut off from the api-server (not from RabbitMQ, Kafka nor PostgreSQL)
until the retried run is over. Each time no frame is lost and none stored twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import psycopg
import pytest

from crowd.video import content_hash
from dev.polling import wait_until
from tests.crowd._helpers import CARPHONE, read_frames, write_clip
from tests.reliability.partition_proxy import PartitionProxy

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.services]

ROOT = Path(__file__).resolve().parents[2]
FRAMES_PER_TASK = 40  # 120 + 90 + 60 frames -> 3 + 3 + 2 mapped detection tasks
# [scheduler] task_instance_heartbeat_timeout in the profile (Airflow's default: 300): short, so that a killed
# worker's task is retried soon, yet longer than the api-server test's outage (20 s down, then its start-up, ~20-30
# s here) plus the workers' next retry (<= 10 s), which must not fail a try
HEARTBEAT_TIMEOUT_S = 120


def _expected_frames(path: Path, frames: int) -> set[tuple[str, int]]:
    """The (video, frame) pairs a clip of ``frames`` frames of carphone (29.97 fps) publishes: every 9th frame, the
    default int(fps / 3), counted here rather than by the sampling code under test."""
    return {(content_hash(path), f) for f in range(0, frames, 9)}


def _script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "dev" / "celery.sh"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _read_env(envfile: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f"source {envfile} && env -0"], check=True, capture_output=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


class Profile:
    """The running profile: its settings (celery.env), an authenticated API client and the results DB."""

    def __init__(self, env: dict[str, str], videos: Path) -> None:
        self.env = env
        self.videos = videos
        self.url = env["CROWD_CELERY_API_URL"]
        token = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=30)
        token.raise_for_status()
        self.api = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=30
        )
        self.results_dsn = env["AIRFLOW_CONN_CROWD_POSTGRES"]

    def wait(self, what: str, check, timeout: float, interval: float = 2.0):
        logs = f"logs: {self.env['CROWD_CELERY_STATE_DIR']}/logs"
        return wait_until(what, check, timeout, every_s=interval, hint=logs)

    def unpause(self, dag_id: str) -> None:
        self.wait(f"DAG {dag_id} to be parsed", lambda: self.api.get(f"/api/v2/dags/{dag_id}").status_code == 200, 120)
        self.api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def runs(self, dag_id: str) -> list[dict]:
        resp = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "run_after", "limit": 100})
        resp.raise_for_status()
        return resp.json()["dag_runs"]

    def finished_run(self, dag_id: str, run_id: str, timeout: float) -> dict:
        def done():
            run = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()
            return run if run["state"] in ("success", "failed") else None

        return self.wait(f"{dag_id} run {run_id} to finish", done, timeout)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        resp = self.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        resp.raise_for_status()
        return resp.json()["task_instances"]

    def detection_tries(self, run_id: str) -> dict[int, tuple[str, int]]:
        """``crowd_video_detect`` run ``run_id``: map index -> (state, try number) of each detection task."""
        return {
            ti["map_index"]: (str(ti["state"]), ti["try_number"])
            for ti in self.task_instances("crowd_video_detect", run_id)
            if ti["task_id"] == "detect_and_publish"
        }

    def stored_frames(self) -> set[tuple[str, int]]:
        with psycopg.connect(self.results_dsn) as conn:
            return set(conn.execute("SELECT video_id, frame_id FROM frames").fetchall())


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, kafka_admin, postgres_admin_dsn: str) -> Iterator[Profile]:
    """Start the CeleryExecutor profile (dev/celery.sh start) on fresh databases and topics; always clean up."""
    base = tmp_path_factory.mktemp("celery")
    videos = base / "videos"
    videos.mkdir()
    suffix = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_"))}
    env.update({
        "CROWD_CELERY_STATE": str(base / "state"),
        "CROWD_VIDEO_ROOTS": str(videos),
        "CROWD_FRAMES_PER_TASK": str(FRAMES_PER_TASK),
        "CROWD_SCAN_SCHEDULE": "@once",
        "CROWD_INGEST_SWEEP_SCHEDULE": "none",  # runs come from the asset watcher only: the tests count them
        "CROWD_SCAN_MIN_AGE_S": "0",  # the clips are written right before the scan
        "CROWD_FACES_TOPIC": f"celery-faces-{suffix}",
        "CROWD_ALERTS_TOPIC": f"celery-alerts-{suffix}",
        "CROWD_DETECTOR": "mtcnn",
        "CROWD_PG_PORT": os.environ.get("CROWD_PG_PORT", "5433"),
        "CROWD_PG_PASSWORD": os.environ.get("CROWD_PG_PASSWORD", "crowd"),
        "AIRFLOW_CONN_KAFKA_DEFAULT": os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"],
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
    })  # fmt: skip
    started = time.monotonic()
    result = _script("start", env=env, timeout=360)
    print(
        f"\n[stage] start-up (RabbitMQ, databases, migrations, 6 Airflow processes): {time.monotonic() - started:.1f} s"
    )
    try:
        assert result.returncode == 0, f"dev/celery.sh start failed:\n{result.stderr[-4000:]}"
        settings = _read_env(base / "state" / "celery.env")
        settings["CROWD_CELERY_STATE_DIR"] = str(base / "state")
        yield Profile(settings, videos)
    finally:
        pgids = [int(p.read_text()) for p in (base / "state" / "pids").glob("*.pid")]
        node = (
            _read_env(base / "state" / "celery.env").get("RABBITMQ_NODENAME", "")
            if (base / "state" / "celery.env").exists()
            else ""
        )
        stopped = _script("clean", env=env, timeout=180)
        kafka_admin.delete_topics([env["CROWD_FACES_TOPIC"], env["CROWD_ALERTS_TOPIC"]])
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        # Nothing left behind: no process in the sessions we started, no RabbitMQ node, no epmd of ours.
        # Sessions, not process groups: a task process runs in a process group of its own inside its worker's.
        left = [g for g in pgids if subprocess.run(["pgrep", "-s", str(g)], capture_output=True).returncode == 0]
        if node:
            beam = subprocess.run(["pgrep", "-f", node], capture_output=True, text=True).stdout.split()
            left += [int(p) for p in beam]
        assert not left, f"processes left behind (process groups / pids): {left}"


def test_the_broker_waits_for_an_acknowledgement_longer_than_a_task_may_run(profile: Profile) -> None:
    """Airflow's Celery executor acknowledges a task's message when the task ends; the running RabbitMQ node (its
    config as dev/celery.sh writes it) must not give up on it first (RabbitMQ's default: 30 min)."""
    env = {**os.environ, **profile.env, "HOME": str(Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "rabbitmq")}
    # the real script, as dev/celery.sh starts the node: the /usr/sbin wrapper switches to the rabbitmq user's HOME
    ctl = "/usr/lib/rabbitmq/bin/rabbitmqctl"
    query = [ctl, "-q", "eval", "application:get_env(rabbit, consumer_timeout)."]
    out = subprocess.run(query, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from crowd.config import Settings

    task_timeout_s = int(profile.env.get("CROWD_DETECT_TASK_TIMEOUT_S") or Settings.detect_task_timeout_s)
    limit_ms = int(out.stdout.strip().removeprefix("{ok,").removesuffix("}"))
    assert limit_ms > task_timeout_s * 1000, out.stdout


def test_mapped_detection_spreads_over_two_workers_and_ingest_stores_every_frame(profile: Profile) -> None:
    clips = [
        shutil.copy(CARPHONE, profile.videos / "cam1.mp4"),
        write_clip(CARPHONE, profile.videos / "cam2.mp4", 90),
        write_clip(CARPHONE, profile.videos / "cam3.mp4", 60),
    ]
    expected = set().union(*(_expected_frames(Path(c), n) for c, n in zip(clips, (120, 90, 60), strict=True)))

    t0 = time.monotonic()
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_scan")  # @once: the scheduler starts the run now
    run = profile.wait("the scheduled crowd_video_scan run", lambda: profile.runs("crowd_video_scan"), 120)[0]
    assert run["run_type"] == "scheduled"
    run = profile.finished_run("crowd_video_scan", run["dag_run_id"], 300)
    detect_s = time.monotonic() - t0
    tis = profile.task_instances("crowd_video_scan", run["dag_run_id"])
    detect = [ti for ti in tis if ti["task_id"] == "detect_and_publish"]
    assert run["state"] == "success", [(ti["task_id"], ti["map_index"], ti["state"]) for ti in tis]
    assert len(detect) == 8, len(detect)  # 3 + 3 + 2 frame ranges
    hosts = {ti["hostname"].split("@")[0] for ti in detect}
    print(f"[stage] detection run: {detect_s:.1f} s; detect_and_publish per worker: "
          f"{ {h: sum(ti['hostname'].startswith(h + '@') for ti in detect) for h in sorted(hosts)} }")  # fmt: skip
    assert hosts == {"worker1", "worker2"}, [ti["hostname"] for ti in detect]

    t1 = time.monotonic()
    profile.wait("every sampled frame in PostgreSQL", lambda: profile.stored_frames() >= expected, 180)
    print(f"[stage] ingest after the detection run: {time.monotonic() - t1:.1f} s ({len(expected)} frames)")
    assert profile.stored_frames() == expected  # exactly the sampled frames: nothing missing, nothing else

    ingest_runs = profile.runs("crowd_faces_ingest")
    assert ingest_runs and all(r["run_type"] == "asset_triggered" for r in ingest_runs), ingest_runs
    with psycopg.connect(profile.results_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == len(expected)  # one row each
        assert conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0] == 0


def test_acceptance_video_in_folder_to_results_in_the_api(profile: Profile) -> None:
    """One new video: folder -> scan run (Celery) -> Kafka -> ingest -> GET /crowd/videos/{id}, timed per stage."""
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_scan")
    profile.wait(
        "no active scan run",
        lambda: all(r["state"] in ("success", "failed") for r in profile.runs("crowd_video_scan")),
        300,
    )
    video = write_clip(CARPHONE, profile.videos / "upload.mp4", 100)
    expected = _expected_frames(video, 100)
    video_id = content_hash(video)

    t0 = time.monotonic()
    resp = profile.api.post("/api/v2/dags/crowd_video_scan/dagRuns", json={"logical_date": None})
    resp.raise_for_status()
    run = profile.finished_run("crowd_video_scan", resp.json()["dag_run_id"], 300)
    assert run["state"] == "success"
    t1 = time.monotonic()

    def complete():
        r = profile.api.get(f"/crowd/videos/{video_id}")
        return r.json() if r.status_code == 200 and r.json()["frames"] == len(expected) else None

    summary = profile.wait(f"/crowd/videos/{video_id} to show {len(expected)} frames", complete, 180, interval=1.0)
    t2 = time.monotonic()
    frames = profile.api.get(f"/crowd/videos/{video_id}/frames", params={"limit": 500}).json()
    t3 = time.monotonic()
    print(f"\n[stage] detection run (trigger -> success): {t1 - t0:.1f} s")
    print(f"[stage] ingest (detection done -> all frames visible in the API): {t2 - t1:.1f} s")
    print(f"[stage] API (GET /crowd/videos/{{id}}/frames): {(t3 - t2) * 1000:.0f} ms; total {t3 - t0:.1f} s")
    assert summary["status"] == "done" and summary["frame_count"] == 100
    assert summary["run_id"] == run["dag_run_id"]  # the scan run owns the video's status
    assert {(video_id, f["frame_id"]) for f in frames["items"]} == expected
    assert summary["total_faces"] >= 0.9 * len(expected)  # a face in every frame of carphone


def _new_720p_clip(profile: Profile, name: str, frames: list) -> tuple[Path, str]:
    """``frames`` upscaled to 1280x720 (~0.15 s of MTCNN a frame, so a 40-frame task runs for seconds) in the
    watched folder as ``name``; the path and video id. Fails if that video has rows already (same frames as an
    earlier test's video): the tests' checks of what is stored would then prove nothing."""
    path = profile.videos / name
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (1280, 720))
    for frame in frames:
        writer.write(cv2.resize(frame, (1280, 720)))
    writer.release()
    video_id = content_hash(path)
    assert _stored_frame_ids(profile, video_id) == [], f"{name}: the frames of a video stored before"
    return path, video_id


def _stored_frame_ids(profile: Profile, video_id: str) -> list[int]:
    """The frame ids stored for ``video_id`` (one per row: a duplicate would show twice)."""
    with psycopg.connect(profile.results_dsn) as conn:
        return [r[0] for r in conn.execute("SELECT frame_id FROM frames WHERE video_id = %s", (video_id,))]


class _TopicReader:
    """Reads the profile's Faces topic from the start as the test goes: the frame ids published per video."""

    def __init__(self, profile: Profile) -> None:
        from confluent_kafka import Consumer, TopicPartition

        topic = profile.env["CROWD_FACES_TOPIC"]
        bootstrap = json.loads(profile.env["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.partitions = [TopicPartition(topic, p, 0) for p in partitions]
        self.consumer.assign(self.partitions)
        self.frames: dict[str, list[int]] = {}

    def _caught_up(self) -> bool:
        """Every partition read up to its end as the broker reports it now."""
        positions = self.consumer.position(self.partitions)
        ends = [self.consumer.get_watermark_offsets(p, timeout=10)[1] for p in self.partitions]
        return all(pos.offset >= end or (pos.offset < 0 and end == 0) for pos, end in zip(positions, ends, strict=True))

    def read(self, for_s: float = 0.5) -> dict[str, list[int]]:
        """What has arrived so far: read until every partition is read to its current end, for at most ``for_s``
        (messages may keep flowing while tasks run; once they are done, pass a longer time to read everything)."""
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            batch = self.consumer.consume(1000, timeout=0.1)
            for m in batch:
                if m.error() is None:
                    self.frames.setdefault(m.key().decode(), []).append(json.loads(m.value())["frame_id"])
            if not batch and self._caught_up():
                break
        return self.frames


def _kill(profile: Profile, name: str, *, whole_session: bool = True) -> int:
    """kill -9 a process of the profile (``rabbitmq``, ``worker1``, ``scheduler``, ...); its session id.

    ``whole_session``: every process it started, as when its machine or container dies. Otherwise its process
    group only: for a worker that is the worker, its pool and the task supervisor, while the task process (a
    process group of its own) is left running without them.
    """
    leader = int((Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "pids" / f"{name}.pid").read_text())
    if whole_session:
        subprocess.run(["pkill", "-KILL", "-s", str(leader)], check=True)
    else:
        os.killpg(leader, signal.SIGKILL)
    return leader


def _revive(profile: Profile, name: str) -> None:
    """``dev/celery.sh revive NAME``: the process started again, same settings and data."""
    env = {**profile.env, "CROWD_CELERY_STATE": profile.env["CROWD_CELERY_STATE_DIR"]}
    revived = _script("revive", name, env=env, timeout=240)
    assert revived.returncode == 0, revived.stderr[-3000:]


def _trigger_every_frame(profile: Profile, video: Path) -> str:
    """A manual ``crowd_video_detect`` run on ``video`` with ``frame_interval`` 1; its run id."""
    resp = profile.api.post(
        "/api/v2/dags/crowd_video_detect/dagRuns",
        json={"logical_date": None, "conf": {"video_path": str(video), "frame_interval": 1}},
    )
    resp.raise_for_status()
    return resp.json()["dag_run_id"]


def _kill_and_revive(profile: Profile, name: str, down_s: float) -> float:
    """:func:`_kill` ``name``'s whole session, :func:`_revive` it ``down_s`` later; the seconds it was down."""
    _kill(profile, name)
    killed_at = time.monotonic()
    try:
        time.sleep(down_s)
    finally:
        _revive(profile, name)
    return time.monotonic() - killed_at


def test_the_broker_killed_mid_run_loses_no_task_and_no_frame(profile: Profile) -> None:
    """kill -9 of RabbitMQ (its whole session) while detection tasks run and others wait, restarted 15 s later.

    Checked: the run succeeds and every frame is stored once. Seen in every run so far (printed, not asserted,
    as it depends on when the scheduler sends): running tasks do not need the broker and finish; tasks already
    sent wait in RabbitMQ's durable queue and run after the restart with their first try; tasks the scheduler
    tried to send during the outage fail to be sent, use up one try and run after the ``retry_delay``.
    """
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_detect")
    there_and_back = read_frames(CARPHONE, 120)
    video, video_id = _new_720p_clip(profile, "broker-outage.mp4", there_and_back + there_and_back[::-1])
    expected = list(range(240))  # 6 tasks of 40 frames
    topic = _TopicReader(profile)
    run_id = _trigger_every_frame(profile, video)

    def running_and_waiting() -> dict[int, tuple[str, int]] | None:  # one worker may be busy with the ingest
        tries = profile.detection_tries(run_id)
        states = [state for state, _ in tries.values()]
        waiting = sum(state in ("none", "None", "scheduled", "queued") for state in states)
        if len(tries) == 6 and "running" in states and waiting and len(topic.read().get(video_id, [])) >= 5:
            return tries
        return None

    try:
        at_kill = profile.wait("detection tasks running and waiting", running_and_waiting, 240, 0.3)
        killed_at = time.monotonic()
        restart_s = _kill_and_revive(profile, "rabbitmq", 15)
        run = profile.finished_run("crowd_video_detect", run_id, 400)
        tries = profile.detection_tries(run_id)
        print(
            f"\n[stage] RabbitMQ killed with (state, try) per task {at_kill}, back {restart_s:.1f} s later; run "
            f"{run['state']} {time.monotonic() - killed_at:.1f} s after the kill; (state, try) now: {tries}"
        )
        assert run["state"] == "success", tries
        profile.wait(
            "every frame of the video stored", lambda: sorted(_stored_frame_ids(profile, video_id)) == expected, 120
        )
        published = topic.read(for_s=30)[video_id]
        print(f"[stage] published {len(published)} messages for {len(expected)} frames; stored once each")
        assert sorted(set(published)) == expected
    finally:
        topic.consumer.close()


@pytest.mark.parametrize(
    ("component", "down_s"),
    [("scheduler", 10), ("dag-processor", 10), ("api-server", 20)],
)
def test_a_component_killed_mid_run_loses_no_task_and_no_frame(profile: Profile, component: str, down_s: int) -> None:
    """kill -9 of the scheduler, the dag-processor or the api-server while detection tasks run and others wait;
    started again ``down_s`` later (the api-server: ``down_s`` plus its start-up, until it answers).

    The running tasks do not need the scheduler nor the dag-processor; a new scheduler takes the run over. The
    api-server is the workers' Execution API (task start, heartbeats, XComs, task end): with the workers' retries
    of dev/env.sh (``[workers] execution_api_retries`` 30, at most 10 s apart) the tasks wait for it, and every
    task succeeds on its first try. With Airflow's default (5 tries, ~15 s) a task that ended during the restart
    failed its try (the push of its result refused) and the retry redid its part. Checked each time: the run
    succeeds and every frame is stored once (the tries printed; for the api-server, all first tries).
    """
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_detect")
    turn = {"scheduler": 0, "dag-processor": 40, "api-server": 80}[component]  # a video of its own each time
    frames = read_frames(CARPHONE, 120)
    frames = frames[turn:] + frames[:turn]
    video, video_id = _new_720p_clip(profile, f"{component}-outage.mp4", frames[::-1] + frames)
    expected = list(range(240))
    topic = _TopicReader(profile)
    run_id = _trigger_every_frame(profile, video)

    def running() -> bool:
        states = [state for state, _ in profile.detection_tries(run_id).values()]
        return "running" in states and len(topic.read().get(video_id, [])) >= 5

    try:
        profile.wait("a detection task running", running, 240, 0.3)
        killed_at = time.monotonic()
        down = _kill_and_revive(profile, component, down_s)
        run = profile.finished_run("crowd_video_detect", run_id, 400 + 2 * HEARTBEAT_TIMEOUT_S)
        tries = profile.detection_tries(run_id)
        print(
            f"\n[stage] {component} killed, back {down:.1f} s later; run {run['state']} "
            f"{time.monotonic() - killed_at:.1f} s after the kill; (state, try): {tries}"
        )
        assert run["state"] == "success", tries
        if component == "api-server":
            assert {try_number for _, try_number in tries.values()} == {1}, f"a try failed or was retried: {tries}"
        profile.wait(
            "every frame of the video stored", lambda: sorted(_stored_frame_ids(profile, video_id)) == expected, 120
        )
        published = topic.read(for_s=30)[video_id]
        per_task = [sum(i * FRAMES_PER_TASK <= f < (i + 1) * FRAMES_PER_TASK for f in published) for i in range(6)]
        print(f"[stage] published {len(published)} messages for {len(expected)} frames, per task {per_task}; "
              "stored once each")  # fmt: skip
        assert sorted(set(published)) == expected
    finally:
        topic.consumer.close()


def test_the_triggerer_killed_delays_the_ingest_and_loses_nothing(profile: Profile) -> None:
    """kill -9 of the triggerer (the Kafka watcher of ``crowd_faces_ingest``), 200 messages published meanwhile.

    Nothing is stored while it is down (with no ingest run active nor queued, only the watcher can start one);
    once it is started again it takes the watcher over, an asset-triggered ingest run stores all 200, each once.
    """
    from confluent_kafka import Producer

    from crowd.messages import build_message

    profile.unpause("crowd_faces_ingest")
    bootstrap = json.loads(profile.env["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
    producer = Producer({"bootstrap.servers": bootstrap})

    def publish(video_id: str, count: int) -> None:
        for i in range(count):
            message = build_message(video_id, "cam.mp4", i, i * 33.3, (720, 1280, 3), [], "test")
            producer.produce(profile.env["CROWD_FACES_TOPIC"], key=video_id.encode(), value=message.to_json())
        assert producer.flush(30) == 0

    publish("before-the-outage", 1)
    profile.wait("the watcher live", lambda: _stored_frame_ids(profile, "before-the-outage") == [0], 240, 0.5)

    def ingest_idle() -> bool:  # no run active, and no asset event waiting for one (detection tasks emit them too)
        queued = profile.api.get("/api/v2/dags/crowd_faces_ingest/assets/queuedEvents").json()["total_entries"]
        return queued == 0 and all(r["state"] in ("success", "failed") for r in profile.runs("crowd_faces_ingest"))

    profile.wait("the ingest idle", ingest_idle, 180)
    runs_before = len(profile.runs("crowd_faces_ingest"))
    _kill(profile, "triggerer")
    killed_at = time.monotonic()
    try:
        publish("during-the-outage", 200)
        time.sleep(10)
        stored_while_down = len(_stored_frame_ids(profile, "during-the-outage"))
    finally:
        _revive(profile, "triggerer")
    profile.wait(
        "the 200 messages stored", lambda: len(_stored_frame_ids(profile, "during-the-outage")) >= 200, 300, 1.0
    )
    print(f"\n[stage] triggerer down 10 s: stored meanwhile {stored_while_down}; all 200 stored "
          f"{time.monotonic() - killed_at:.1f} s after the kill")  # fmt: skip
    assert stored_while_down == 0
    assert sorted(_stored_frame_ids(profile, "during-the-outage")) == list(range(200))  # each once
    new_runs = profile.runs("crowd_faces_ingest")[runs_before:]
    assert new_runs and all(r["run_type"] == "asset_triggered" for r in new_runs), new_runs


def _a_worker_half_way(profile: Profile, topic: _TopicReader, run_id: str, video_id: str) -> tuple[str, int, int]:
    """Wait for a detection task of ``run_id`` half-way through its frames; its worker, map index and frames
    published so far."""

    def half_way() -> tuple[str, int, int] | None:
        published = topic.read().get(video_id, [])
        for ti in profile.task_instances("crowd_video_detect", run_id):
            if ti["task_id"] == "detect_and_publish" and ti["state"] == "running":
                first = ti["map_index"] * FRAMES_PER_TASK
                done = sum(first <= f < first + FRAMES_PER_TASK for f in published)
                if 5 <= done < FRAMES_PER_TASK - 10:
                    return ti["hostname"].split("@")[0], ti["map_index"], done
        return None

    return profile.wait("a worker half-way", half_way, 240, 0.3)


def _detection_try(profile: Profile, run_id: str, map_index: int) -> dict:
    """The task instance (as the REST API gives it) of detection part ``map_index`` of ``run_id``, as it is now."""
    (ti,) = [
        ti for ti in profile.task_instances("crowd_video_detect", run_id)
        if ti["task_id"] == "detect_and_publish" and ti["map_index"] == map_index
    ]  # fmt: skip
    return ti


def _stale_try_stopped(profile: Profile, worker: str, stale: dict, timeout: float) -> list[str]:
    """Wait for the task process of the try ``stale`` to end (Airflow titles it with the try's id); the log lines
    saying the api-server refused its heartbeat."""
    profile.wait(
        "the stale try's task process to end",
        lambda: (
            subprocess.run(["pgrep", "-f", f"airflow worker -- {stale['id']}"], capture_output=True).returncode == 1
        ),
        timeout,
        1,
    )
    return _refused_heartbeats(profile, worker, stale)


def _check_stored_once_after_a_stale_try(
    profile: Profile, topic: _TopicReader, video_id: str, frames: int, map_index: int, published_before: int
) -> None:
    """Frames 0..``frames``-1 of ``video_id`` stored once each although part ``map_index``, of which a stale try
    published ``published_before`` frames or more, was published twice; the video ``done``, nothing rejected."""
    profile.wait(
        "every frame of the video stored",
        lambda: sorted(_stored_frame_ids(profile, video_id)) == list(range(frames)),
        120,
    )
    published = topic.read(for_s=30)[video_id]
    first = map_index * FRAMES_PER_TASK
    part = [f for f in published if first <= f < first + FRAMES_PER_TASK]
    print(f"[stage] published {len(published)} messages for {frames} frames ({len(part)} for part {map_index}, "
          f"{FRAMES_PER_TASK} frames); stored once each")  # fmt: skip
    assert len(part) >= FRAMES_PER_TASK + published_before  # the stale try's messages came twice
    assert profile.api.get(f"/crowd/videos/{video_id}").json()["status"] == "done"
    with psycopg.connect(profile.results_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0] == 0


def _refused_heartbeats(profile: Profile, worker: str, stale: dict) -> list[str]:
    """The log lines saying the api-server refused a heartbeat of the try ``stale`` (a task instance as the REST
    API gives it, taken while it ran): its worker's lines naming the try's id, and its own task log's."""
    logs = Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "airflow" / "logs"
    task_log = (
        logs / f"dag_id={stale['dag_id']}" / f"run_id={stale['dag_run_id']}" / f"task_id={stale['task_id']}"
        / f"map_index={stale['map_index']}" / f"attempt={stale['try_number']}.log"
    )  # fmt: skip
    worker_log = Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "logs" / f"{worker}.log"
    lines = [line for line in worker_log.read_text(errors="replace").splitlines() if stale["id"] in line]
    if task_log.exists():
        lines += task_log.read_text(errors="replace").splitlines()
    return [line.strip()[:200] for line in lines if "shouldn't be running anymore" in line]


@pytest.mark.parametrize("how", ["host", "process"])
def test_a_worker_killed_mid_task_loses_nothing_and_stores_nothing_twice(profile: Profile, how: str) -> None:
    """kill -9 of a Celery worker half-way through a detection task (manual run, 80 frames of 720p, every frame).

    The scheduler finds the try's heartbeat gone (``task_instance_heartbeat_timeout``, 120 s here), fails it and
    retries it (the DAG's ``retries``) on the other worker; the run succeeds. What the killed try published is in
    the topic twice, the database holds every frame exactly once. The killed worker is started again afterwards.
    """
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_detect")
    start = {"host": 0, "process": 30}[how]
    video, video_id = _new_720p_clip(profile, f"long-task-{how}.mp4", read_frames(CARPHONE, 80, start=start))
    expected = list(range(80))
    topic = _TopicReader(profile)
    run_id = _trigger_every_frame(profile, video)

    # Either worker: with concurrency 1, the other one may be busy with an ingest run for a while.
    victim = None
    try:
        victim, map_index, published_before_kill = _a_worker_half_way(profile, topic, run_id, video_id)
        session = _kill(profile, victim, whole_session=how == "host")
        killed_at = time.monotonic()
        run = profile.finished_run("crowd_video_detect", run_id, 300 + 2 * HEARTBEAT_TIMEOUT_S)
        tis = profile.task_instances("crowd_video_detect", run_id)
        tries = profile.api.get(
            f"/api/v2/dags/crowd_video_detect/dagRuns/{run_id}/taskInstances/detect_and_publish/{map_index}/tries"
        ).json()["task_instances"]
        print(
            f"\n[stage] {victim} killed ({how}) with {published_before_kill} frames of part {map_index} published; "
            f"run {run['state']} {time.monotonic() - killed_at:.1f} s later; tries of that part: "
            f"{[(t['try_number'], t['state'], t['hostname']) for t in tries]}"
        )
        assert run["state"] == "success", [(ti["task_id"], ti["map_index"], ti["state"]) for ti in tis]
        assert tries[0]["hostname"].startswith(f"{victim}@") and tries[0]["state"] != "success", tries
        assert tries[-1]["state"] == "success" and not tries[-1]["hostname"].startswith(f"{victim}@"), tries

        profile.wait(
            "every frame of the video stored", lambda: sorted(_stored_frame_ids(profile, video_id)) == expected, 120
        )
        published = topic.read(for_s=30)[video_id]
        print(f"[stage] published {len(published)} messages for {len(expected)} frames; stored once each")
        assert len(published) >= len(expected) + published_before_kill  # the killed try's messages came twice
        assert profile.api.get(f"/crowd/videos/{video_id}").json()["status"] == "done"
        with psycopg.connect(profile.results_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0] == 0
        profile.wait(  # a task process that outlived its worker ends by itself (no supervisor to report to)
            "no process left of the killed worker",
            lambda: subprocess.run(["pgrep", "-s", str(session)], capture_output=True).returncode == 1,
            120,
        )
    finally:
        topic.consumer.close()
        if victim:
            _revive(profile, victim)


def test_a_frozen_worker_thawed_after_its_task_was_retried_stores_nothing_twice(profile: Profile) -> None:
    """SIGSTOP of a Celery worker's whole session half-way through a detection task (its machine frozen), longer
    than ``task_instance_heartbeat_timeout``: the scheduler fails the silent try and the other worker retries it.
    Then SIGCONT while the retry runs: the stale try, a zombie, goes on where it stopped until its supervisor's
    next heartbeat is refused, and is stopped. The run succeeds, every frame is stored once, the video ends
    ``done``, the zombie's task process ends and the thawed worker answers again.
    """
    from celery import Celery

    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_detect")
    video, video_id = _new_720p_clip(profile, "frozen-worker.mp4", read_frames(CARPHONE, 80)[::-1])
    expected = list(range(80))
    topic = _TopicReader(profile)
    run_id = _trigger_every_frame(profile, video)
    tries_url = f"/api/v2/dags/crowd_video_detect/dagRuns/{run_id}/taskInstances/detect_and_publish/{{}}/tries"
    session = None
    try:
        victim, map_index, published_before = _a_worker_half_way(profile, topic, run_id, video_id)
        stale = _detection_try(profile, run_id, map_index)
        session = int((Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "pids" / f"{victim}.pid").read_text())
        subprocess.run(["pkill", "-STOP", "-s", str(session)], check=True)
        frozen_at = time.monotonic()

        def retry_running() -> list[dict] | None:
            tries = profile.api.get(tries_url.format(map_index)).json()["task_instances"]
            retried = [t for t in tries if t["try_number"] > 1 and t["state"] in ("running", "success")]
            return tries if retried else None

        tries = profile.wait("the frozen try retried elsewhere", retry_running, 300 + 2 * HEARTBEAT_TIMEOUT_S)
        subprocess.run(["pkill", "-CONT", "-s", str(session)], check=True)
        thawed_at = time.monotonic()
        frozen_s, session = thawed_at - frozen_at, None
        print(
            f"\n[stage] {victim} frozen with {published_before} frames of part {map_index} published, for "
            f"{frozen_s:.1f} s, until: {[(t['try_number'], t['state'], t['hostname']) for t in tries]}"
        )

        refused = _stale_try_stopped(profile, victim, stale, 120)
        print(f"[stage] stale try's task process ended {time.monotonic() - thawed_at:.1f} s after the thaw: {refused}")
        assert refused, "the stale try was not stopped by its refused heartbeat"
        run = profile.finished_run("crowd_video_detect", run_id, 300)
        tries = profile.api.get(tries_url.format(map_index)).json()["task_instances"]
        print(f"[stage] run {run['state']}; tries: {[(t['try_number'], t['state'], t['hostname']) for t in tries]}")
        assert run["state"] == "success", profile.detection_tries(run_id)
        assert tries[0]["hostname"].startswith(f"{victim}@") and tries[0]["state"] != "success", tries
        assert tries[-1]["state"] == "success" and not tries[-1]["hostname"].startswith(f"{victim}@"), tries

        _check_stored_once_after_a_stale_try(profile, topic, video_id, len(expected), map_index, published_before)

        celery = Celery(broker=profile.env["AIRFLOW__CELERY__BROKER_URL"])
        answered = profile.wait(
            f"{victim} to answer a Celery ping",
            lambda: [name for reply in celery.control.ping(timeout=2) for name in reply if name.startswith(victim)],
            120,
        )
        print(f"[stage] thawed worker answers: {answered}")
    finally:
        topic.consumer.close()
        if session is not None:  # never leave a stopped session behind
            subprocess.run(["pkill", "-CONT", "-s", str(session)], check=False)


def _restart_worker(profile: Profile, name: str, execution_api_url: str | None) -> None:
    """Stop worker ``name`` warmly (SIGTERM: a task it runs ends first) and start it again, talking to the
    Execution API at ``execution_api_url`` (``None``: the api-server itself)."""
    leader = int((Path(profile.env["CROWD_CELERY_STATE_DIR"]) / "pids" / f"{name}.pid").read_text())
    os.kill(leader, signal.SIGTERM)
    profile.wait(
        f"{name} to stop",
        lambda: subprocess.run(["pgrep", "-s", str(leader)], capture_output=True).returncode == 1,
        240,
        1,
    )
    env = {**profile.env, "CROWD_CELERY_STATE": profile.env["CROWD_CELERY_STATE_DIR"]}
    if execution_api_url:
        env["CROWD_CELERY_WORKER_API_URL"] = execution_api_url
    revived = _script("revive", name, env=env, timeout=240)
    assert revived.returncode == 0, revived.stderr[-3000:]


@pytest.fixture
def gated_workers(profile: Profile) -> Iterator[dict[str, PartitionProxy]]:
    """Every worker restarted with its Execution API behind a :class:`PartitionProxy` of its own: worker name ->
    its proxy (``partition()`` cuts that worker off the api-server, ``heal()`` reconnects it). Restored after."""
    api = profile.env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]  # http://127.0.0.1:PORT/execution/
    api_port = int(api.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    gates: dict[str, PartitionProxy] = {}
    try:
        for i in range(1, int(profile.env["CROWD_CELERY_WORKERS"]) + 1):
            name = f"worker{i}"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            gates[name] = PartitionProxy(port, api_port)
            _restart_worker(profile, name, f"http://127.0.0.1:{port}/execution/")
        yield gates
    finally:
        for gate in gates.values():
            gate.heal()
        for name in gates:
            _restart_worker(profile, name, None)
        for gate in gates.values():
            gate.close()


def test_a_worker_cut_off_from_the_api_server_loses_nothing_and_stores_nothing_twice(
    profile: Profile, gated_workers: dict[str, PartitionProxy]
) -> None:
    """The network between a Celery worker and the api-server lost half-way through a detection task, while the
    worker still reaches RabbitMQ, Kafka and PostgreSQL (its Execution API goes through a proxy that stops passing
    anything: requests time out). The cut lasts until the run is over: the try's heartbeats time out, the
    scheduler fails the silent try after ``task_instance_heartbeat_timeout`` and the other worker retries it and
    the rest of the run. Then the network comes back: the stale try's next heartbeat is refused and its task
    process is stopped. The run succeeds, every frame is stored once, the video ends ``done``.
    """
    profile.unpause("crowd_faces_ingest")
    profile.unpause("crowd_video_detect")
    video, video_id = _new_720p_clip(profile, "cut-off-worker.mp4", read_frames(CARPHONE, 80, start=20)[::-1])
    expected = list(range(80))
    topic = _TopicReader(profile)
    run_id = _trigger_every_frame(profile, video)
    tries_url = f"/api/v2/dags/crowd_video_detect/dagRuns/{run_id}/taskInstances/detect_and_publish/{{}}/tries"
    gate = None
    try:
        victim, map_index, published_before = _a_worker_half_way(profile, topic, run_id, video_id)
        stale = _detection_try(profile, run_id, map_index)
        gate = gated_workers[victim]
        gate.partition()
        cut_at = time.monotonic()
        run = profile.finished_run("crowd_video_detect", run_id, 400 + 2 * HEARTBEAT_TIMEOUT_S)
        tries = profile.api.get(tries_url.format(map_index)).json()["task_instances"]
        gate.heal()
        cut_s, gate = time.monotonic() - cut_at, None
        print(
            f"\n[stage] {victim} cut off with {published_before} frames of part {map_index} published; run "
            f"{run['state']} {cut_s:.1f} s later, then the network back; tries: "
            f"{[(t['try_number'], t['state'], t['hostname']) for t in tries]}"
        )
        assert run["state"] == "success", profile.detection_tries(run_id)
        assert tries[0]["hostname"].startswith(f"{victim}@") and tries[0]["state"] != "success", tries
        assert tries[-1]["state"] == "success" and not tries[-1]["hostname"].startswith(f"{victim}@"), tries

        healed_at = time.monotonic()
        refused = _stale_try_stopped(profile, victim, stale, 300)
        print(f"[stage] stale try's task process ended {time.monotonic() - healed_at:.1f} s after the network came "
              f"back: {refused}")  # fmt: skip
        assert refused, "the stale try was not stopped by its refused heartbeat"

        _check_stored_once_after_a_stale_try(profile, topic, video_id, len(expected), map_index, published_before)
    finally:
        topic.consumer.close()
        if gate is not None:
            gate.heal()
