#!/usr/bin/env bash
# Stops everything the dev scripts started: Airflow (if running), Kafka, PostgreSQL.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ -f $CROWD_ROOT/dev/airflow.sh ]] && bash "$CROWD_ROOT/dev/airflow.sh" stop || true
bash "$CROWD_ROOT/dev/kafka.sh" stop
bash "$CROWD_ROOT/dev/postgres.sh" stop
