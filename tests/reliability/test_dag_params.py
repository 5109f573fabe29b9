"""Hostile params of the manual DAG (crowd_video_detect): refused with the param's name, nothing published.

tests/dags/test_detection_dags.py covers outside-roots, ``..``, missing and non-.mp4 paths; these are the rest:
wrong types, negative/zero intervals, out-of-range confidence, unknown model, and paths that make ``Path``
itself fail (NUL byte, over-long name, symlink loop, a directory).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dags.test_detection_dags import (
    CARPHONE,
    _assert_only_the_first_task_failed,
    _consume_all,
    _dag,
    _task_states,
    _try_numbers,
)
from tests.reliability.conftest import report

pytestmark = [pytest.mark.services, pytest.mark.airflow, pytest.mark.reliability]

OUTCOMES: dict[str, str] = {}  # case -> what happened, filled by the tests and reported after the last one


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes() -> Iterator[None]:
    yield
    if OUTCOMES:
        report("manual DAG params", {"cases": len(OUTCOMES), "outcomes": OUTCOMES})


@pytest.fixture
def env(airflow_db, faces_topic, pg_schema, kafka_bootstrap, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    root = tmp_path / "videos"
    root.mkdir()
    monkeypatch.setenv("CROWD_VIDEO_ROOTS", str(root))
    monkeypatch.setenv("CROWD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CROWD_DETECTOR", "mtcnn")
    video = shutil.copy(CARPHONE, root / "ok.mp4")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    (root / "folder.mp4").mkdir()
    return {"root": root, "video": str(video), "topic": faces_topic, "bootstrap": kafka_bootstrap}


FORM_REFUSES = [  # the trigger form (param schema) refuses these before a run exists
    pytest.param({"frame_interval": -5}, "frame_interval", id="negative-interval"),
    pytest.param({"frame_interval": 0}, "frame_interval", id="zero-interval"),
    pytest.param({"frame_interval": "ten"}, "frame_interval", id="interval-not-a-number"),
    pytest.param({"frame_interval": 2.5}, "frame_interval", id="interval-not-whole"),
    pytest.param({"confidence": 0}, "confidence", id="confidence-zero"),
    pytest.param({"confidence": 1.5}, "confidence", id="confidence-above-1"),
    pytest.param({"confidence": "high"}, "confidence", id="confidence-not-a-number"),
    pytest.param({"model": "resnet"}, "model", id="unknown-model"),
    pytest.param({"tiles": "yes"}, "tiles", id="tiles-not-boolean"),
    pytest.param({"video_path": 123}, "video_path", id="path-not-a-string"),
    pytest.param({"video_path": ""}, "video_path", id="path-empty"),
    pytest.param({"video_path": None}, "video_path", id="path-null"),
]


@pytest.mark.parametrize(("conf", "param"), FORM_REFUSES)
def test_trigger_form_refuses_bad_params_naming_them(env: dict, conf: dict, param: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=param) as refused:
        _dag("crowd_video_detect").test(run_conf={"video_path": env["video"], **conf})
    OUTCOMES[f"{conf}"] = f"refused by the form: {str(refused.value)[:160]}"


PLAN_REFUSES = [  # valid strings ending in .mp4 that the first task refuses with the reason
    pytest.param(lambda root: f"{root}/nul\x00byte.mp4", "cannot be resolved", id="nul-byte"),
    pytest.param(lambda root: f"{root}/{'a' * 300}.mp4", "cannot be checked", id="name-too-long"),
    pytest.param(lambda root: f"{root}/loop.mp4", "cannot be resolved", id="symlink-loop"),
    pytest.param(lambda root: f"{root}/folder.mp4", "not a regular file", id="directory"),
    pytest.param(lambda root: f"{root}/../../../../etc/shadow.mp4", "outside the video roots", id="traversal"),
]


@pytest.mark.parametrize(("make_path", "reason"), PLAN_REFUSES)
def test_first_task_refuses_bad_paths_with_the_reason(env: dict, make_path, reason: str) -> None:
    from crowd.config import ConfigError, load_settings
    from crowd.jobs import plan_requested_video

    path = make_path(env["root"])
    with pytest.raises(ConfigError, match=reason):
        plan_requested_video(path, load_settings())
    run = _dag("crowd_video_detect").test(run_conf={"video_path": path})  # with the DAG's retries
    _assert_only_the_first_task_failed(run, "plan_requested_video")
    assert _consume_all(env["topic"], env["bootstrap"]) == []
    OUTCOMES[repr(path[-40:])] = f"first task failed: ConfigError matching {reason!r}"


@pytest.mark.parametrize("dag_id", ["crowd_video_detect", "crowd_video_scan"])
def test_a_model_that_is_not_installed_fails_the_first_task_once(
    env: dict, dag_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its files missing, every detection task would fail three times each: the first task says so, once."""
    monkeypatch.setenv("CROWD_MODEL_DIR", str(tmp_path / "no-models"))
    first = "plan_requested_video" if dag_id == "crowd_video_detect" else "scan_video_folders"
    conf = {"video_path": env["video"], "model": "yolov3"} if first == "plan_requested_video" else {"model": "yolov3"}
    _assert_only_the_first_task_failed(_dag(dag_id).test(run_conf=conf), first)
    assert _consume_all(env["topic"], env["bootstrap"]) == []
    OUTCOMES[f"{dag_id} model=yolov3 not installed"] = f"{first} failed once"


def test_face_weights_that_do_not_fit_their_cfg_fail_the_first_task_once(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default model (``auto``): before, OpenCV loaded them without a word, every video was published
    with 0 faces and recorded done (and, known by its content, never computed again)."""
    from tests.crowd.test_detection import FACE_CFG

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(FACE_CFG, models / "yolov3-face.cfg")
    (models / "face.names").write_text("face\n")
    (models / "yolov3-face.weights").write_bytes(b"\0" * 10_000)  # a download cut off early
    monkeypatch.setenv("CROWD_MODEL_DIR", str(models))
    monkeypatch.setenv("CROWD_DETECTOR", "auto")
    _assert_only_the_first_task_failed(_dag("crowd_video_scan").test(run_conf={"model": "auto"}), "scan_video_folders")
    assert _consume_all(env["topic"], env["bootstrap"]) == []
    OUTCOMES["crowd_video_scan, face weights cut off"] = "scan_video_folders failed once"


def test_a_model_that_cannot_be_loaded_by_a_detection_task_fails_it_without_retries(
    env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first task found the model; a mapped task cannot load it (its files changed in between): retrying the
    same files cannot help (before: two more tries each)."""
    import crowd.jobs
    from crowd.models import ModelError

    def unloadable(*args, **kwargs):
        raise ModelError("OpenCV cannot load yolov3-face.cfg (test)")

    monkeypatch.setattr(crowd.jobs, "build_detector", unloadable)
    run = _dag("crowd_video_detect").test(run_conf={"video_path": env["video"]})
    assert str(run.state) == "failed"
    assert _task_states(run)["detect_and_publish"] == ["failed"]
    assert _try_numbers(run, "detect_and_publish") == [1], "a model that cannot be loaded was retried"
