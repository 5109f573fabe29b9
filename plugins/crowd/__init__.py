"""crowd: video -> YOLOv3 face detection -> Kafka `Faces` -> PostgreSQL, run by Airflow.

The library lives here (importable as ``crowd`` because Airflow puts ``plugins/`` on ``sys.path``);
the Airflow plugin that mounts the HTTP API is the top-level ``plugins/crowd_plugin.py``.
"""

from __future__ import annotations

__version__ = "0.1.0"
