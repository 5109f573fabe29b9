"""Airflow plugin of crowd: the HTTP API at ``/crowd`` and the dashboard under the UI's Browse menu.

The plugin loader imports every ``.py`` under ``plugins/`` as a top-level module; this is the one for crowd
(the ``crowd`` package itself is listed in ``plugins/.airflowignore``). Importing it connects to nothing.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from crowd.plugin import external_view_spec, fastapi_app_spec


class CrowdPlugin(AirflowPlugin):
    """Mounts :mod:`crowd.api` and adds the dashboard view."""

    name = "crowd"
    fastapi_apps = [fastapi_app_spec()]
    external_views = [external_view_spec()]
