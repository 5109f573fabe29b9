"""Run one drain in its own process, so the crash test can ``kill -9`` it; prints the summary as JSON.

Usage: ``python tests/crowd/ingest_worker.py TOPIC GROUP BATCH_SIZE`` with the Airflow connections in the
environment (``AIRFLOW_CONN_KAFKA_DEFAULT``, ``AIRFLOW_CONN_CROWD_POSTGRES``).
"""

from __future__ import annotations

import json
import logging
import sys


def main(argv: list[str]) -> int:
    from crowd.ingest import drain

    topic, group, batch_size = argv[0], argv[1], int(argv[2])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    summary = drain(
        "kafka_default",
        "crowd_postgres",
        topic,
        group,
        batch_size=batch_size,
        batch_wait_s=0.2,
        idle_timeout_s=5,
        max_seconds=120,
        log_every_s=1,
    )
    print(json.dumps(summary.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
