"""What the crowd Airflow plugin registers: the API app under ``/crowd`` and the dashboard in the UI's menu.

Kept apart from ``plugins/crowd_plugin.py`` (the file Airflow's plugin loader imports) so that tests can build
the same pieces. Building them connects to nothing: the API's lifespan does that in the API server only.
"""

from __future__ import annotations

from typing import Any

URL_PREFIX = "/crowd"


def fastapi_app_spec() -> dict[str, Any]:
    """The ``fastapi_apps`` entry: the crowd API mounted at :data:`URL_PREFIX`."""
    from crowd.api import create_app

    return {"app": create_app(), "url_prefix": URL_PREFIX, "name": "crowd API"}


def external_view_spec() -> dict[str, Any]:
    """The ``external_views`` entry: the dashboard page, embedded in the Airflow UI at ``/plugin/crowd``."""
    return {
        "name": "Crowd dashboard",
        "href": f"{URL_PREFIX}/dashboard",
        "url_route": "crowd",
        "destination": "nav",
        "category": "browse",
    }
