"""``[core] hostname_callable`` of dev/celery.sh's workers: ``worker1@host``, ``worker2@host``.

Several Celery workers on one machine share its FQDN; with this callable each task instance records the worker
that ran it (``CROWD_CELERY_WORKER_NAME``, set per worker by dev/celery.sh), in the UI and the metadata DB.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return f"{os.environ.get('CROWD_CELERY_WORKER_NAME', 'worker')}@{socket.getfqdn()}"
