"""Airflow plugin of crowd: the HTTP API at ``/crowd`` and the dashboard under the UI's Browse menu.

The plugin loader imports every ``.py`` under ``plugins/`` as a top-level module; this is the one for crowd
(the ``crowd`` package itself is listed in ``plugins/.airflowignore``). Importing it connects to nothing, and
builds nothing heavy: every Airflow process loads plugins, task processes too (for their macros), and only the
api-server reads ``fastapi_apps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from crowd.plugin import external_view_spec, fastapi_app_spec


class _BuiltOnFirstRead:
    """A plugin attribute made when Airflow first reads it. The API app's imports (FastAPI, Airflow's API security,
    psycopg, Kafka clients) took ~3 s in every task try, which loads plugins but never mounts the app."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build
        self.value: Any = None

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if self.value is None:
            self.value = self.build()
        return self.value


class CrowdPlugin(AirflowPlugin):
    """Mounts :mod:`crowd.api` and adds the dashboard view."""

    name = "crowd"
    fastapi_apps = _BuiltOnFirstRead(lambda: [fastapi_app_spec()])
    external_views = [external_view_spec()]
