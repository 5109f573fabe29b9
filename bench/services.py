"""What the benchmarks need from the local services: fresh Kafka topics and PostgreSQL schemas, removed afterwards.

Kafka comes from ``AIRFLOW_CONN_KAFKA_DEFAULT`` and PostgreSQL from ``CROWD_PG_PORT`` / ``CROWD_PG_PASSWORD``
(``source dev/env.sh``); schemas live in the ``crowd_test`` database.

Example:
    >>> with Scratch() as scratch:                                  # doctest: +SKIP
    ...     topic, schema = scratch.topic("bench-x"), scratch.schema("bench_x")
    ...     scratch.use_schema(schema)   # the crowd_postgres connection now writes there
"""

from __future__ import annotations

import json
import os
import uuid

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic


class Scratch:
    """Creates topics and schemas with a random suffix and drops every one of them on :meth:`close`."""

    def __init__(self) -> None:
        self.port = int(os.environ.get("CROWD_PG_PORT", "5433"))
        self.password = os.environ.get("CROWD_PG_PASSWORD", "crowd")
        self.admin_dsn = f"postgresql://crowd:{self.password}@127.0.0.1:{self.port}/crowd_test"
        self.bootstrap = json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"]
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.topics: list[str] = []
        self.schemas: list[str] = []

    def topic(self, prefix: str, partitions: int = 3) -> str:
        """A new topic ``<prefix>-<random>``."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        for future in self.admin.create_topics([NewTopic(name, partitions, replication_factor=1)]).values():
            future.result(timeout=30)
        self.topics.append(name)
        return name

    def schema(self, prefix: str) -> str:
        """A new empty schema ``<prefix>_<random>`` in ``crowd_test``."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        self.schemas.append(name)
        return name

    def dsn(self, schema: str) -> str:
        """A libpq URL whose search_path is ``schema``."""
        return f"{self.admin_dsn}?options=-csearch_path%3D{schema}"

    def postgres_conn(self, schema: str) -> str:
        """The ``crowd_postgres`` Airflow connection (JSON) pointing at ``schema``."""
        return json.dumps(
            {"conn_type": "postgres", "host": "127.0.0.1", "port": self.port, "login": "crowd",
             "password": self.password, "schema": "crowd_test", "extra": {"options": f"-csearch_path={schema}"}}
        )  # fmt: skip

    def use_schema(self, schema: str) -> None:
        """Point this process's ``crowd_postgres`` connection at ``schema``."""
        os.environ["AIRFLOW_CONN_CROWD_POSTGRES"] = self.postgres_conn(schema)

    def close(self) -> None:
        """Delete the topics and drop the schemas created so far."""
        if self.topics:
            for future in self.admin.delete_topics(self.topics).values():
                try:
                    future.result(timeout=30)
                except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                    print(f"could not delete a bench topic: {exc}")
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.topics, self.schemas = [], []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_ratios_and_json(out: dict) -> None:
    """The closing lines of a benchmark: each ratio of ``out["ratios"]``, then ``out`` as JSON (for results.json)."""
    for key, value in out["ratios"].items():
        print(f"{key:<28}{value:>10.2f}")
    print(json.dumps(out))
