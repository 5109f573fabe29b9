"""DAG integrity: every DAG file imports cleanly, carries tags, an owner, retries and docs, and opens no
connection at parse time (the Astro project template's first test)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS_FOLDER.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dag_bag(airflow_db):
    from airflow.models import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_there_are_dag_files() -> None:
    assert DAG_FILES, f"no DAG files in {DAGS_FOLDER}"


def test_every_dag_file_imports_without_errors(dag_bag) -> None:
    assert dag_bag.import_errors == {}, "\n".join(f"{k}: {v}" for k, v in dag_bag.import_errors.items())
    assert {Path(d.fileloc).name for d in dag_bag.dags.values()} == {p.name for p in DAG_FILES}


def test_every_dag_is_documented_tagged_owned_and_retried(dag_bag) -> None:
    problems = []
    for dag_id, dag in dag_bag.dags.items():
        if not dag.tags:
            problems.append(f"{dag_id}: no tags")
        if not (dag.doc_md or "").strip():
            problems.append(f"{dag_id}: no doc_md")
        for task in dag.tasks:
            if task.owner in (None, "", "airflow"):
                problems.append(f"{dag_id}.{task.task_id}: owner is {task.owner!r}")
            if task.retries is None or not 0 <= task.retries <= 5:
                problems.append(f"{dag_id}.{task.task_id}: retries={task.retries}")
    assert not problems, "\n".join(problems)


def test_parsing_opens_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse the DAG files with the network and the connections poisoned: parse time must touch neither."""
    from airflow.models import DagBag

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was opened at parse time: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for key in [k for k in os.environ if k.startswith("AIRFLOW_CONN_")]:
        monkeypatch.setenv(key, '{"conn_type": "generic", "host": "parse-time.invalid"}')
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}, bag.import_errors


HEAVY_MODULES = ("cv2", "numpy", "psycopg", "fastapi", "crowd.api", "crowd.jobs", "crowd.detection", "crowd.storage")


def _imported_by(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after ``code`` (this test process has them all)."""
    import json
    import subprocess
    import sys

    probe = f"{code}\nimport json, sys; print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=os.environ)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_parsing_and_loading_plugins_import_no_heavy_module(airflow_db) -> None:
    """The dag-processor parses each DAG file in a new process (every min_file_process_interval), and every task
    try loads the plugins (for their macros): before, parsing imported OpenCV, numpy and psycopg (~0.6 s a file,
    per parse), and loading the plugin built the API app (FastAPI, Airflow's API security: ~3 s a task try)."""
    parse = f"from airflow.models import DagBag; assert not DagBag(dag_folder={str(DAGS_FOLDER)!r}).import_errors"
    assert _imported_by(parse) == []
    load = "from airflow import plugins_manager as pm; pm.integrate_macros_plugins(); assert 'crowd' in [p.name for p in pm._get_plugins()[0]]"
    assert _imported_by(load) == []
    mount = "from airflow import plugins_manager as pm; apps, _ = pm.get_fastapi_plugins(); assert apps[0]['url_prefix'] == '/crowd'"
    assert "crowd.api" in _imported_by(mount)  # the api-server reads fastapi_apps: the app is built then


def test_every_declaration_of_an_asset_is_identical(dag_bag) -> None:
    """Airflow keeps one definition per asset: an outlet declared without the watcher would unregister it."""
    from airflow.sdk import Asset

    declared: dict[str, list[tuple[str, Asset]]] = {}
    for dag_id, dag in dag_bag.dags.items():
        condition = getattr(dag.timetable, "asset_condition", None)  # AssetAll of the schedule's assets
        for asset in getattr(condition, "objects", []):
            declared.setdefault(asset.name, []).append((f"{dag_id} schedule", asset))
        for task in dag.tasks:
            for asset in task.outlets:
                if isinstance(asset, Asset):
                    declared.setdefault(asset.name, []).append((f"{dag_id}.{task.task_id} outlet", asset))
    assert "crowd_faces_topic" in declared
    for name, places in declared.items():
        shapes = {(a.uri, tuple(w.name for w in a.watchers)) for _, a in places}
        assert len(shapes) == 1, f"asset {name} is declared differently: {[(p, a.uri, a.watchers) for p, a in places]}"


def test_planning_tasks_do_not_print_their_work_items(dag_bag) -> None:
    """Airflow logs a task's return value whole: a scan's list of up to max_map_length work items was one line of
    ~300 KB in every run's log (the planning itself logs a summary)."""
    planners = {
        ("crowd_video_scan", "scan_video_folders"),
        ("crowd_video_detect", "plan_requested_video"),
    }
    for dag_id, task_id in planners:
        task = dag_bag.get_dag(dag_id).get_task(task_id)
        assert task.show_return_value_in_logs is False, f"{dag_id}.{task_id}"
