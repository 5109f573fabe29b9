"""Airflow tasks of the detection DAGs: thin wrappers that turn job results and errors into task outcomes.

A bad video (not a video, corrupt) fails its own task at once, without retries, after the registry recorded
why; a Kafka delivery failure, or a file not reachable now (moved since the scan, unreadable), fails the task so
that Airflow retries it, and the task does not record the video as failed. A file still gone when the run ends
(deleted, moved or renamed mid-run) is recorded failed by ``finish_videos``, saying so; a scan that finds it again
processes it again.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from crowd.config import ConfigError, Settings, load_settings
from crowd.models import ModelError, require_model

if TYPE_CHECKING:  # imported where they run: DAG files import this module, and parsing them needs neither
    from crowd import jobs, storage  # (OpenCV, numpy, psycopg: ~0.6 s in every parse of the two DAG files)

log = logging.getLogger(__name__)

#: Trigger-form parameters shared by the detection DAGs (checked again by ``DetectOptions.from_params``).
DETECTION_PARAMS = {
    "frame_interval": Param(None, type=["null", "integer"], minimum=1,
                            description="Process every N-th frame; empty = fps/3 (3 frames per second)."),
    "confidence": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                        description="Detection confidence threshold; empty = the model's default."),
    "tiles": Param(False, type="boolean", description="Tiled inference for small faces in large frames."),
    "model": Param(None, type=["null", "string"], enum=[None, "auto", "yolov3", "mtcnn", "yolov3-tiny"],
                   description="Empty = the deployment's CROWD_DETECTOR (auto by default); auto = YOLOv3 face "
                               "weights if installed, else the offline MTCNN face model."),
}  # fmt: skip


def detection_default_args(settings: Settings) -> dict[str, Any]:
    """``default_args`` of the detection DAGs: two retries 30 s apart, and no try longer than
    ``CROWD_DETECT_TASK_TIMEOUT_S`` (a read stalled on a share would otherwise hold the scan's one active run, and
    so every later video, for ever)."""
    return {
        "owner": "crowd",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(seconds=settings.detect_task_timeout_s),
    }


def _run_stamp() -> storage.RunStamp:
    """This task's DAG run, as the video registry records it."""
    from crowd import storage

    dag_run = get_current_context()["dag_run"]
    return storage.RunStamp(dag_run.run_id, dag_run.start_date or dag_run.run_after)


def _options(planned_model: str | None = None) -> jobs.DetectOptions:
    """The run's detection params, checked, with the model resolved (``auto``: what is installed here) and its
    files found installed; else the task fails at once (a retry cannot help). ``planned_model`` is the one the run's
    first task resolved: every part of every video of a run uses it, whatever this worker's settings or files
    would pick now (a worker without its files fails, saying so)."""
    from crowd import jobs

    try:
        options = jobs.DetectOptions.from_params(dict(get_current_context()["params"]))
        settings = load_settings()
        model = require_model(planned_model or options.model or settings.detector_backend, settings)
    except ConfigError as exc:
        raise AirflowFailException(f"invalid parameter: {exc}") from exc
    except ModelError as exc:
        raise AirflowFailException(f"model not usable: {exc}") from exc
    return dataclasses.replace(options, model=model)


def _planned(items: list[jobs.WorkItem], options: jobs.DetectOptions) -> list[dict[str, Any]]:
    """The work items as the mapped tasks get them, each naming the model this run resolved."""
    return [dataclasses.replace(item, model=options.model).to_dict() for item in items]


# the work items (up to max_map_length of them, ~300 characters each) are summed up in the log, not printed whole
@task(show_return_value_in_logs=False)
def scan_video_folders() -> list[dict[str, Any]]:
    """List the new videos under the configured roots and split them into work items."""
    from crowd import jobs

    options = _options()  # refuse bad params or a model not installed before any work
    return _planned(jobs.find_new_videos(load_settings(), run_is_active=_manual_run_is_active), options)


MANUAL_DAG_ID = "crowd_video_detect"


def _manual_run_is_active(run_id: str) -> bool:
    """Whether ``run_id`` is a queued or running run of the manual DAG (a scan's earlier runs are over: one runs
    at a time). Asked of the api-server through the task's own channel; no answer counts as not active."""
    try:
        state = get_current_context()["ti"].get_dagrun_state(dag_id=MANUAL_DAG_ID, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - not a run of that DAG (a scan's), or no answer: the claim decides
        log.info("state of run %s of %s unknown (%s): its claim decides", run_id, MANUAL_DAG_ID, exc)
        return False
    state = str(getattr(state, "value", state))  # a DagRunState
    log.info("run %s of %s is %s", run_id, MANUAL_DAG_ID, state)
    return state in ("queued", "running")


@task(show_return_value_in_logs=False)
def plan_requested_video() -> list[dict[str, Any]]:
    """Check the ``video_path`` param (an existing .mp4 inside the roots) and split it into work items."""
    from crowd import jobs

    params = get_current_context()["params"]
    options = _options()  # refuse bad params before any work
    try:
        return _planned(jobs.plan_requested_video(params["video_path"], load_settings(), _run_stamp()), options)
    except ConfigError as exc:
        raise AirflowFailException(f"invalid video_path: {exc}") from None
    except jobs.BadVideoError as exc:  # an empty or unreadable file: retrying cannot help
        raise AirflowFailException(str(exc)) from None


@task(map_index_template="{{ work_item_label }}", multiple_outputs=False)  # one XCom, not one per key
def detect_and_publish(item: dict[str, Any]) -> dict[str, Any]:
    """Detect faces on one work item's frames and publish them to the Faces topic.

    DAGs declare the topic's asset as its outlet (``crowd.assets.faces_topic_asset``) when they wire it.
    """
    from crowd import jobs

    name = item["path"].rsplit("/", 1)[-1]
    label = name if item.get("parts", 1) == 1 else f"{name} part {item['part'] + 1}/{item['parts']}"
    get_current_context()["work_item_label"] = label  # type: ignore[typeddict-unknown-key]
    work = jobs.WorkItem(**item)
    try:
        options = _options(work.model)
    except AirflowFailException as exc:
        if isinstance(exc.__cause__, ModelError):  # this worker lacks the run's model: a reason, not a silent death
            jobs.note_failure_reason(load_settings(), work, _run_stamp())
        raise
    try:
        return jobs.detect_and_publish(work, options, load_settings(), _run_stamp())
    # expected conditions: the message says it all, a chain of tracebacks around it only hid it (from None)
    except (jobs.BadVideoError, jobs.VideoChangedError) as exc:  # retrying cannot help
        raise AirflowFailException(str(exc)) from None
    except ModelError as exc:  # the files changed since the first task checked them: retrying them cannot help
        raise AirflowFailException(f"model not usable: {exc}") from None


@task(trigger_rule="all_done", multiple_outputs=False)
def finish_videos(items: list[dict[str, Any]] | None, results: list[dict[str, Any] | None]) -> dict[str, list[str]]:
    """Mark done the videos whose every part was published, failed those whose file went away during the run; fail
    (so the run shows failed) if any is not done.

    When the first task failed there are no work items (``items`` is None): fail at once with that reason, not
    with a TypeError retried twice.
    """
    from crowd import jobs

    if items is None:
        raise AirflowFailException("no work items to finish: the first task failed (its log says why)")
    # one slice: every result in one request (iterating asks for each in turn, then logs "XCom not found" for the
    # one past the end, an error line in every run's log)
    outcome = jobs.finish_videos([jobs.WorkItem(**i) for i in items], results[:], load_settings(), _run_stamp())
    incomplete, gone = outcome["incomplete"], outcome["gone"]
    if incomplete:
        names = {i["video_id"]: i["path"].rsplit("/", 1)[-1] for i in items}
        went_away = (
            f"; {len(gone)} of them failed: {'its file' if len(gone) == 1 else 'their files'} went away during the "
            f"run (the videos table names the path): {', '.join(f'{names[v]} ({v})' for v in gone)}"
            if gone
            else ""
        )
        raise AirflowFailException(
            f"{len(incomplete)} video(s) not completed (see the failed detect_and_publish tasks): "
            f"{', '.join(f'{names[v]} ({v})' for v in incomplete)}{went_away}; {len(outcome['done'])} done"
        )
    return outcome
