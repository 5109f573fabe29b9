"""Deployment tests: the compose file (static checks with a real compose implementation) and the CeleryExecutor
profile run for real by ``dev/celery.sh`` (marker ``celery``)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "celery: runs Airflow with the CeleryExecutor, RabbitMQ and two workers (dev/celery.sh)"
    )
