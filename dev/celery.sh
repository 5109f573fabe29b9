#!/usr/bin/env bash
# Airflow with the CeleryExecutor for real, as plain processes (the test profile of tests/deploy/test_celery.py):
# RabbitMQ (Debian's rabbitmq-server, own node, port and data dir) as the Celery broker, PostgreSQL (dev/postgres.sh)
# as Airflow metadata DB and Celery result backend, and the api-server, scheduler, dag-processor, triggerer and
# CROWD_CELERY_WORKERS Celery workers (worker1@host, worker2@host, concurrency 1 each).
#
#   dev/celery.sh start     # start everything (creates fresh databases airflow_celery_<id> and crowd_celery_<id>)
#   dev/celery.sh status    # what runs
#   dev/celery.sh stop      # stop every process started (process groups), RabbitMQ and its epmd
#   dev/celery.sh clean     # stop, drop the two databases and remove the state folder
#   dev/celery.sh revive NAME  # start one process again after it died: rabbitmq, worker1, scheduler, triggerer...
#                              # (a worker with CROWD_CELERY_WORKER_API_URL set talks to the api-server there)
#
# Kafka (dev/kafka.sh) and PostgreSQL (dev/postgres.sh) must run (started here when they do not answer).
# Everything lives under $CROWD_CELERY_STATE (default .local/celery); $CROWD_CELERY_STATE/celery.env holds the
# settings of the running profile (ports, databases, AIRFLOW_* and CROWD_*): `source` it to talk to it.
# Settings read at start (all optional): CROWD_CELERY_WORKERS (2), CROWD_CELERY_API_PORT / CROWD_CELERY_AMQP_PORT
# (free ports), CROWD_VIDEO_ROOTS, CROWD_FRAMES_PER_TASK, CROWD_SCAN_SCHEDULE, CROWD_SCAN_MIN_AGE_S, CROWD_FACES_TOPIC,
# CROWD_INGEST_SWEEP_SCHEDULE,
# CROWD_DETECTOR, AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT (300: how long a task whose worker died stays
# "running").
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STATE="${CROWD_CELERY_STATE:-$CROWD_STATE/celery}"
ENVFILE="$STATE/celery.env"
PY="$CROWD_ROOT/.venv/bin/python"
COMPONENTS=(api-server scheduler dag-processor triggerer)

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rand_hex() { "$PY" -c 'import secrets; print(secrets.token_hex(int(__import__("sys").argv[1])))' "$1"; }

ensure_rabbitmq() { command -v rabbitmq-server >/dev/null || [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || apt_install rabbitmq-server; }

# pg_admin SQL...: run statements as role crowd on the crowd database (autocommit: CREATE/DROP DATABASE).
pg_admin() {
  "$PY" - "$@" <<'PY'
import os, sys, psycopg
dsn = f"postgresql://crowd:{os.environ.get('CROWD_PG_PASSWORD', 'crowd')}@127.0.0.1:{os.environ.get('CROWD_PG_PORT', '5433')}/crowd"
with psycopg.connect(dsn, autocommit=True) as conn:
    for sql in sys.argv[1:]:
        conn.execute(sql)
PY
}

write_env() {
  local id=$1 amqp=$2 api=$3 pg_port=${CROWD_PG_PORT:-5433} pg_pw=${CROWD_PG_PASSWORD:-crowd}
  local meta="airflow_celery_$id" results="crowd_celery_$id" rabbit_pw; rabbit_pw=$(rand_hex 12)
  local pg="crowd:$pg_pw@127.0.0.1:$pg_port"
  mkdir -p "$STATE/airflow" "$STATE/videos" "$STATE/results" "$STATE/rabbitmq" "$STATE/logs" "$STATE/pids"
  cat > "$ENVFILE" <<ENV
# Written by dev/celery.sh start: the settings of the running CeleryExecutor profile. Source it.
export CROWD_CELERY_ID=$id
export CROWD_CELERY_META_DB=$meta
export CROWD_CELERY_RESULTS_DB=$results
export CROWD_CELERY_AMQP_PORT=$amqp
export CROWD_CELERY_API_URL=http://127.0.0.1:$api
export CROWD_CELERY_WORKERS=${CROWD_CELERY_WORKERS:-2}
export RABBITMQ_NODENAME=crowd-celery-$id@localhost
export RABBITMQ_NODE_PORT=$amqp
export RABBITMQ_DIST_PORT=$(free_port)
export ERL_EPMD_PORT=$(free_port)
export RABBITMQ_MNESIA_BASE=$STATE/rabbitmq/mnesia
export RABBITMQ_LOG_BASE=$STATE/rabbitmq/log
export RABBITMQ_CONFIG_FILE=$STATE/rabbitmq/rabbitmq.conf
export RABBITMQ_ENABLED_PLUGINS_FILE=$STATE/rabbitmq/enabled_plugins
export RABBITMQ_CONF_ENV_FILE=$STATE/rabbitmq/rabbitmq-env.conf
export RABBITMQ_PID_FILE=$STATE/rabbitmq/rabbitmq.pid
export CROWD_CELERY_RABBIT_PASSWORD=$rabbit_pw
export AIRFLOW_HOME=$STATE/airflow
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://$pg/$meta
export AIRFLOW__CELERY__BROKER_URL=amqp://crowd:$rabbit_pw@127.0.0.1:$amqp//
export AIRFLOW__CELERY__RESULT_BACKEND=db+postgresql+psycopg2://$pg/$meta
export AIRFLOW__CELERY__WORKER_CONCURRENCY=1
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG=4
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=True
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$api/execution/
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin,viewer:viewer
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$api
export AIRFLOW__API__BASE_URL=http://127.0.0.1:$api
export AIRFLOW__API__WORKERS=1
export AIRFLOW__API__SECRET_KEY=$(rand_hex 16)
export AIRFLOW__API_AUTH__JWT_SECRET=$(rand_hex 32)
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$(free_port)
export AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=$(free_port)
export AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC=2
export AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC=2
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=${AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT:-300}
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5
export AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES=1
export AIRFLOW_CONN_CROWD_POSTGRES=postgresql://$pg/$results
export AIRFLOW_CONN_KAFKA_DEFAULT='$(kafka_conn "crowd-ingest-$id")'
export AIRFLOW_CONN_KAFKA_WATCH='$(kafka_conn "crowd-ingest-watch-$id")'
export CROWD_VIDEO_ROOTS=${USER_VIDEO_ROOTS:-$STATE/videos}
export CROWD_RESULTS_DIR=$STATE/results
export CROWD_FRAMES_PER_TASK=${CROWD_FRAMES_PER_TASK:-3000}
export CROWD_SCAN_SCHEDULE='${CROWD_SCAN_SCHEDULE:-*/5 * * * *}'
export CROWD_SCAN_MIN_AGE_S=${CROWD_SCAN_MIN_AGE_S:-60}
export CROWD_INGEST_SWEEP_SCHEDULE='${CROWD_INGEST_SWEEP_SCHEDULE:-*/15 * * * *}'
export CROWD_FACES_TOPIC=${CROWD_FACES_TOPIC:-Faces}
export CROWD_ALERTS_TOPIC=${CROWD_ALERTS_TOPIC:-crowd-alerts}
export CROWD_DETECTOR=${CROWD_DETECTOR:-auto}
export CROWD_INGEST_GROUP=crowd-ingest-$id
export CROWD_RECEIVER_GROUP=crowd-api-receiver-$id
ENV
}

kafka_conn() {
  local bootstrap
  bootstrap=$("$PY" -c 'import json, os; print(json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"])')
  printf '{"conn_type": "kafka", "extra": {"bootstrap.servers": "%s", "group.id": "%s", "enable.auto.commit": false, "auto.offset.reset": "earliest"}}' "$bootstrap" "$1"
}

load_env() {
  [[ -f $ENVFILE ]] || return 1
  # dev/env.sh first (folders, PYTHONPATH, PATH), then the profile's own settings on top.
  export AIRFLOW_HOME="$STATE/airflow"
  source "$CROWD_ROOT/dev/env.sh"
  # shellcheck disable=SC1090
  source "$ENVFILE"
}

# spawn NAME COMMAND...: run COMMAND in a process group of its own, pid in $STATE/pids/NAME.pid.
spawn() {
  local name=$1; shift
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}

start_rabbitmq() {
  ensure_rabbitmq
  mkdir -p "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
  : > "$RABBITMQ_CONF_ENV_FILE"   # keep /etc/rabbitmq/rabbitmq-env.conf out
  echo "[]." > "$RABBITMQ_ENABLED_PLUGINS_FILE"
  cat > "$RABBITMQ_CONFIG_FILE" <<CONF
listeners.tcp.default = 127.0.0.1:$RABBITMQ_NODE_PORT
default_user = crowd
default_pass = $CROWD_CELERY_RABBIT_PASSWORD
loopback_users = none
log.console = false
log.file.level = warning
consumer_timeout = 25200000
CONF
  port_open 127.0.0.1 "$RABBITMQ_NODE_PORT" && die "port $RABBITMQ_NODE_PORT is in use; set CROWD_CELERY_AMQP_PORT"
  log "starting RabbitMQ $RABBITMQ_NODENAME on 127.0.0.1:$RABBITMQ_NODE_PORT (data: $STATE/rabbitmq)"
  # The /usr/sbin wrapper switches to the rabbitmq user and its HOME; the real script runs as we are, with the
  # Erlang cookie in our own HOME so that rabbitmqctl (same HOME) can talk to the node.
  HOME="$STATE/rabbitmq" spawn rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server
  if ! wait_for 90 rabbitmq port_open 127.0.0.1 "$RABBITMQ_NODE_PORT"; then
    tail -30 "$STATE/logs/rabbitmq.log" >&2; die "RabbitMQ did not listen on $RABBITMQ_NODE_PORT within 90 s"
  fi
}

# start_worker I: Celery worker I (worker<I>@host, concurrency 1), in a session and process group of its own.
# CROWD_CELERY_WORKER_API_URL, when set, is the Execution API URL of this worker only (the tests send one worker
# through tests/reliability/partition_proxy.py to cut it off the api-server).
start_worker() {
  # Task instances record "worker<i>@host" as their hostname (dev/celery/worker_hostname.py).
  CROWD_CELERY_WORKER_NAME="worker$1" AIRFLOW__CORE__HOSTNAME_CALLABLE=worker_hostname.hostname \
    AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${CROWD_CELERY_WORKER_API_URL:-$AIRFLOW__CORE__EXECUTION_API_SERVER_URL}" \
    PYTHONPATH="$CROWD_ROOT/dev/celery:$PYTHONPATH" \
    spawn "worker$1" airflow celery worker -H "worker$1@%h" -c 1 --skip-serve-logs --without-gossip --without-mingle
}

# revive NAME: start one process of the running profile again (same settings and data) after it died or was
# killed; NAME is rabbitmq, worker<I>, or one of the components (api-server, scheduler, dag-processor, triggerer).
revive() {
  local name=${1:?usage: dev/celery.sh revive rabbitmq|worker<I>|api-server|scheduler|dag-processor|triggerer}
  load_env || die "the Celery profile is not running (no $ENVFILE)"
  pid_alive "$STATE/pids/$name.pid" && { log "$name already runs"; return 0; }
  case $name in
    rabbitmq) start_rabbitmq ;;
    worker[0-9]*)
      start_worker "${name#worker}"
      wait_for 180 "$name" worker_ready "${name#worker}" || { tail -30 "$STATE/logs/$name.log" >&2; die "$name did not get ready"; } ;;
    api-server)
      spawn api-server airflow api-server
      wait_for 240 api-server airflow_up || { tail -30 "$STATE/logs/api-server.log" >&2; die "the api-server did not answer"; } ;;
    scheduler | dag-processor | triggerer) spawn "$name" airflow "$name" ;;
    *) die "unknown process $name (rabbitmq, worker<I>, ${COMPONENTS[*]})" ;;
  esac
  log "$name started again"
}

airflow_up() { curl -fsS "$CROWD_CELERY_API_URL/api/v2/monitor/health" >/dev/null 2>&1; }
worker_ready() { grep -q "worker$1@.* ready" "$STATE/logs/worker$1.log" 2>/dev/null; }

start() {
  if [[ -f $ENVFILE ]] && load_env && pid_alive "$STATE/pids/scheduler.pid"; then
    log "the Celery profile already runs at $CROWD_CELERY_API_URL (dev/celery.sh stop first)"; return 0
  fi
  [[ -x $PY ]] || die "no .venv: run dev/setup.sh first"
  [[ -f $ENVFILE ]] && clean   # a stopped profile left behind: drop its databases first
  USER_VIDEO_ROOTS=${CROWD_VIDEO_ROOTS:-}   # before dev/env.sh sets its own default
  source "$CROWD_ROOT/dev/env.sh"
  local kafka_host_port; kafka_host_port=$("$PY" -c 'import json, os; print(json.loads(os.environ["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]["bootstrap.servers"])')
  port_open "${kafka_host_port%:*}" "${kafka_host_port##*:}" || bash "$CROWD_ROOT/dev/kafka.sh" start
  port_open 127.0.0.1 "${CROWD_PG_PORT:-5433}" || bash "$CROWD_ROOT/dev/postgres.sh" start
  rm -rf "$STATE"
  write_env "$(rand_hex 4)" "${CROWD_CELERY_AMQP_PORT:-$(free_port)}" "${CROWD_CELERY_API_PORT:-$(free_port)}"
  load_env
  start_rabbitmq

  log "creating databases $CROWD_CELERY_META_DB (Airflow metadata + Celery results) and $CROWD_CELERY_RESULTS_DB (crowd results)"
  pg_admin "CREATE DATABASE $CROWD_CELERY_META_DB OWNER crowd" "CREATE DATABASE $CROWD_CELERY_RESULTS_DB OWNER crowd"
  printf '{"admin": "admin", "viewer": "viewer"}\n' > "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
  log "migrating the Airflow metadata DB, the crowd schema, the Kafka topics"
  (airflow db migrate && "$PY" -m crowd.storage migrate && "$PY" -m crowd.kafka ensure-topics) >"$STATE/logs/init.log" 2>&1 \
    || { tail -30 "$STATE/logs/init.log" >&2; die "initialisation failed (log tail above)"; }

  for c in "${COMPONENTS[@]}"; do spawn "$c" airflow "$c"; done
  local i
  for i in $(seq 1 "$CROWD_CELERY_WORKERS"); do start_worker "$i"; done
  log "waiting for the api-server at $CROWD_CELERY_API_URL and $CROWD_CELERY_WORKERS Celery workers"
  if ! wait_for 240 api-server airflow_up; then tail -30 "$STATE/logs/api-server.log" >&2; die "the api-server did not answer"; fi
  for i in $(seq 1 "$CROWD_CELERY_WORKERS"); do
    wait_for 180 "worker$i" worker_ready "$i" || { tail -30 "$STATE/logs/worker$i.log" >&2; die "worker$i did not get ready"; }
  done
  for c in "${COMPONENTS[@]}"; do pid_alive "$STATE/pids/$c.pid" || { tail -30 "$STATE/logs/$c.log" >&2; die "$c exited"; }; done
  log "CeleryExecutor profile up: $CROWD_CELERY_API_URL (admin/admin); settings: source $ENVFILE"
}

stop() {
  load_env || { log "the Celery profile is not running (no $ENVFILE)"; return 0; }
  local name i
  # Scheduler first (no new work), then the workers, then the rest.
  for name in scheduler $(for i in $(seq 1 "$CROWD_CELERY_WORKERS"); do echo "worker$i"; done) triggerer dag-processor api-server; do
    [[ -f $STATE/pids/$name.pid ]] && stop_pidfile "$STATE/pids/$name.pid" "$name"
  done
  if [[ -f $STATE/pids/rabbitmq.pid ]]; then
    HOME="$STATE/rabbitmq" timeout 30 rabbitmqctl -q stop >/dev/null 2>&1 || true
    stop_pidfile "$STATE/pids/rabbitmq.pid" rabbitmq
  fi
  # epmd daemonises out of our process groups; it is ours (own port), stop it.
  HOME="$STATE/rabbitmq" epmd -port "$ERL_EPMD_PORT" -kill >/dev/null 2>&1 || true
  return 0
}

clean() {
  stop
  if load_env; then
    log "dropping databases $CROWD_CELERY_META_DB and $CROWD_CELERY_RESULTS_DB"
    pg_admin "DROP DATABASE IF EXISTS $CROWD_CELERY_META_DB WITH (FORCE)" "DROP DATABASE IF EXISTS $CROWD_CELERY_RESULTS_DB WITH (FORCE)" || true
  fi
  rm -rf "$STATE"
}

status() {
  load_env || { echo "celery profile: stopped"; return 1; }
  local rc=0 name
  for name in rabbitmq "${COMPONENTS[@]}" $(for i in $(seq 1 "$CROWD_CELERY_WORKERS"); do echo "worker$i"; done); do
    if pid_alive "$STATE/pids/$name.pid"; then echo "$name: running (pid $(cat "$STATE/pids/$name.pid"))"; else echo "$name: stopped"; rc=1; fi
  done
  echo "api: $CROWD_CELERY_API_URL  broker: amqp://127.0.0.1:$CROWD_CELERY_AMQP_PORT  metadata: $CROWD_CELERY_META_DB  results: $CROWD_CELERY_RESULTS_DB"
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  clean) clean ;;
  status) status ;;
  revive) revive "${2:-}" ;;
  *) echo "usage: $0 start|stop|status|clean|revive NAME" >&2; exit 2 ;;
esac
