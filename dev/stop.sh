#!/usr/bin/env bash
# Stops everything the dev scripts started: the CeleryExecutor profile (dev/celery.sh: its Airflow processes, workers
# and RabbitMQ; its databases stay, `dev/celery.sh clean` drops them), Airflow standalone, Kafka, PostgreSQL.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# The Celery profile first: it uses Kafka and PostgreSQL. It returns at once when it is not running.
[[ -f $CROWD_ROOT/dev/celery.sh ]] && bash "$CROWD_ROOT/dev/celery.sh" stop || true
[[ -f $CROWD_ROOT/dev/airflow.sh ]] && bash "$CROWD_ROOT/dev/airflow.sh" stop || true
bash "$CROWD_ROOT/dev/kafka.sh" stop
bash "$CROWD_ROOT/dev/postgres.sh" stop
