# Environment for running Airflow and the tests locally. Source it: `source dev/env.sh`.
# Connections are defined once, here, as AIRFLOW_CONN_* (the deployment sets the same names its own way).
CROWD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CROWD_STATE="${CROWD_STATE:-$CROWD_ROOT/.local}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$CROWD_STATE/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$CROWD_ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$CROWD_ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="${AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG:-2}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-False}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin,viewer:viewer}"
# Local only (Kafka and PostgreSQL listen on 127.0.0.1 too): the dev users' passwords are not secrets.
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# Derived from the port: Airflow's defaults say 8080, so task processes would talk to whatever holds 8080.
export AIRFLOW__API__BASE_URL="${AIRFLOW__API__BASE_URL:-http://127.0.0.1:$AIRFLOW__API__PORT}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW__API__PORT/execution/}"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-10}"
# An asset's Kafka watcher is registered by the next parse of its DAG file after an unpause (at most once per
# min_file_process_interval, 30 s by default): 10 s bounds that wait for dev (bench/README.md, latency).
export AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="${AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL:-10}"
# Workers reach the api-server (the Execution API) for every task start, heartbeat, XCom and end. Airflow's default
# (5 tries, ~15 s) fails a task that ends while the api-server restarts, and the retry redoes its whole part: 30
# tries at most 10 s apart ride out ~2 minutes (README, "The api-server restarted"; tests/deploy/test_celery.py).
export AIRFLOW__WORKERS__EXECUTION_API_RETRIES="${AIRFLOW__WORKERS__EXECUTION_API_RETRIES:-30}"
export AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX="${AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX:-10}"
export PYTHONPATH="$CROWD_ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$CROWD_ROOT/.venv/bin:$PATH"   # airflow standalone starts its components as `airflow ...`

# Local services started by dev/kafka.sh and dev/postgres.sh. The password is for the local cluster only.
export CROWD_PG_PORT="${CROWD_PG_PORT:-5433}"
# CROWD_KAFKA_PORT moves the broker dev/kafka.sh starts (9092 by default); the connections follow it.
_kafka_conn='{"conn_type": "kafka", "extra": {"bootstrap.servers": "127.0.0.1:'"${CROWD_KAFKA_PORT:-9092}"'", "group.id": "crowd-ingest", "enable.auto.commit": false, "auto.offset.reset": "earliest"}}'
export AIRFLOW_CONN_KAFKA_DEFAULT="${AIRFLOW_CONN_KAFKA_DEFAULT:-$_kafka_conn}"
# The ingest DAG's Kafka watcher (in the triggerer) commits what it reads: it needs a group of its own.
export AIRFLOW_CONN_KAFKA_WATCH="${AIRFLOW_CONN_KAFKA_WATCH:-${_kafka_conn/crowd-ingest/crowd-ingest-watch}}"
export AIRFLOW_CONN_CROWD_POSTGRES="${AIRFLOW_CONN_CROWD_POSTGRES:-postgresql://crowd:${CROWD_PG_PASSWORD:-crowd}@127.0.0.1:${CROWD_PG_PORT}/crowd}"

# Pipeline settings (see plugins/crowd/config.py for every CROWD_* variable).
export CROWD_VIDEO_ROOTS="${CROWD_VIDEO_ROOTS:-$CROWD_STATE/videos}"
export CROWD_RESULTS_DIR="${CROWD_RESULTS_DIR:-$CROWD_STATE/results}"
export CROWD_MODEL_CACHE="${CROWD_MODEL_CACHE:-$CROWD_STATE/models}"
mkdir -p "$AIRFLOW_HOME" "$CROWD_VIDEO_ROOTS" "$CROWD_RESULTS_DIR" "$CROWD_MODEL_CACHE"
