"""A throw-away ``airflow standalone`` (scheduler, triggerer, dag-processor, api-server) in a temp AIRFLOW_HOME.

Shared by ``tests/dags/test_ingest_dag.py`` (the Kafka-triggered ingest, end to end) and ``bench/latency.py
--trigger``. The api-server gets a free port, so parallel runs do not collide; the whole process group is
killed on exit, so no scheduler or triggerer is left behind.

Example:
    >>> env = standalone_env(tmp / "airflow", ROOT / "dags", CROWD_FACES_TOPIC="t1")   # doctest: +SKIP
    >>> with running_standalone(env, tmp / "standalone.log"):                          # doctest: +SKIP
    ...     wait_for_dag(env, "crowd_faces_ingest")
    ...     airflow(env, "dags", "unpause", "crowd_faces_ingest")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def standalone_env(home: Path, dags_folder: Path, **overrides: str) -> dict[str, str]:
    """The environment for a standalone in ``home`` reading ``dags_folder``; ``overrides`` are added last.

    DAGs start paused, examples are off, parallelism is 2 (2-core machines), the DAG folder is re-listed and
    each file re-parsed every 5 s (an asset watcher is registered only by the first parse after its DAG is
    unpaused: with the default 30 s the first messages waited up to ~23 s), and the api-server listens on a
    free port.
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # standalone runs `airflow`
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=f"http://localhost:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://localhost:{port}/execution/",
    )
    env.update(overrides)
    return env


def airflow(env: dict[str, str], *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the venv's ``airflow`` CLI with ``env``; raise with its stderr if it fails and ``check``."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


@contextmanager
def running_standalone(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Migrate the metadata DB, start ``airflow standalone`` (output to ``log_path``), kill its group on exit.

    With ``CROWD_KEEP_STANDALONE_LOG`` set, the log's tail is printed on exit.
    """
    airflow(env, "db", "migrate")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            try:  # what is left of the group once its leader is gone (a triggerer still shutting down outlived a
                # test, and the next one's watcher raced it for the same events)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if os.environ.get("CROWD_KEEP_STANDALONE_LOG"):
        print(log_path.read_text(errors="replace")[-20000:])


def wait_for_dag(env: dict[str, str], dag_id: str, *, timeout_s: float = 180) -> float:
    """Wait until the dag-processor has registered ``dag_id``; returns the seconds waited."""
    start = time.monotonic()
    while True:
        listed = airflow(env, "dags", "list", "-o", "json", check=False)
        if dag_id in listed.stdout:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{dag_id} never registered: {listed.stdout[-2000:]} {listed.stderr[-2000:]}")
        time.sleep(3)


def dag_runs(env: dict[str, str], dag_id: str) -> list[dict[str, Any]]:
    """``airflow dags list-runs`` as dicts (stdout may carry log lines before the JSON array)."""
    out = airflow(env, "dags", "list-runs", dag_id, "-o", "json").stdout
    for start in ("[{", "[]"):
        if start in out:
            return json.loads(out[out.index(start) :])
    raise RuntimeError(f"no JSON list in `airflow dags list-runs {dag_id}`: {out[-2000:]}")
