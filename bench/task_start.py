"""Benchmark what a task try and a DAG parse pay for crowd's code before any work: fresh interpreters, same run.

Every Airflow task try runs in a new process that loads the plugins (for their macros), and the dag-processor
parses each DAG file in a new process. Variants, each a fresh ``python -c`` (after ``import airflow.sdk``, which
both pay anyway), timed inside the process:

* ``plugins``: ``plugins_manager.integrate_macros_plugins()``, what a task try does (the crowd plugin loaded, its
  API app not built: it is built when the api-server first reads ``fastapi_apps``);
* ``plugins_app_built``: the same plus ``get_fastapi_plugins()`` (the app built), which is what every task try paid
  until session 15, when the plugin class built the app as it was defined;
* ``parse_imports``: ``import crowd.tasks, crowd.assets`` (what the detection DAG files import at parse time);
* ``parse_imports_eager``: the same plus ``crowd.jobs`` and ``crowd.storage`` (OpenCV, numpy, psycopg), which
  ``crowd.tasks`` imported at module level until session 15.

Interleaved, ``--repeat`` times; medians and the ratios ``before / now``.

Usage: ``source dev/env.sh && python bench/task_start.py [--repeat 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = "import time, airflow.sdk, airflow.sdk.execution_time.task_runner\nt = time.perf_counter()\n"
VARIANTS = {
    "plugins": "from airflow import plugins_manager as pm\npm.integrate_macros_plugins()\n",
    "plugins_app_built": "from airflow import plugins_manager as pm\npm.integrate_macros_plugins()\n"
    "pm.get_fastapi_plugins()\n",
    "parse_imports": "import crowd.tasks, crowd.assets\n",
    "parse_imports_eager": "import crowd.tasks, crowd.assets, crowd.jobs, crowd.storage\n",
}
PAIRS = {
    "task try (plugins loaded)": ("plugins_app_built", "plugins"),
    "DAG parse": ("parse_imports_eager", "parse_imports"),
}


def _time(code: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    probe = PRELUDE + code + "print(time.perf_counter() - t)\n"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return float(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for k in range(args.repeat):
        for name in names[k % len(names) :] + names[: k % len(names)]:  # rotated order
            times[name].append(_time(VARIANTS[name]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'variant':22} {'median s':>9}  all (s)")
    for name, values in times.items():
        print(f"{name:22} {medians[name]:9.3f}  {' '.join(f'{v:.2f}' for v in values)}")
    ratios = {what: medians[before] / medians[now] for what, (before, now) in PAIRS.items()}
    for what, (before, now) in PAIRS.items():
        saved = medians[before] - medians[now]
        print(f"{what}: {before} / {now} = {ratios[what]:.1f}x ({saved:.2f} s saved per process)")
    print(json.dumps({"cores": os.cpu_count(), "medians_s": medians, "ratios": ratios, "runs": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
