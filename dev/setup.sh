#!/usr/bin/env bash
# Sets up everything crowd needs on a Debian machine, idempotently:
# Python venv (.venv, with uv), Kafka 4 broker, PostgreSQL, Airflow metadata DB, results DB schema.
#   dev/setup.sh            # runtime + test dependencies
# Services keep running afterwards; dev/stop.sh stops them.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$CROWD_ROOT"

UV_VERSION=0.13.9  # the uv these pins were resolved and installed with

ensure_venv() {
  command -v python3 >/dev/null || apt_install python3 python3-venv
  local uv=(uv)
  if ! command -v uv >/dev/null; then
    if ! python3 -m uv --version >/dev/null 2>&1; then
      log "installing uv $UV_VERSION (from PyPI)"
      python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip  # Debian's python3 comes without pip
      python3 -m pip install -q "uv==$UV_VERSION" 2>/dev/null || python3 -m pip install -q --break-system-packages "uv==$UV_VERSION"
    fi
    uv=(python3 -m uv)
  fi
  local stamp=.venv/.requirements.sha256 want
  want=$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -d' ' -f1)
  [[ -x .venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]] && return 0
  # UV_PYTHON_DOWNLOADS=never: use the machine's Python; our machines reach only package registries.
  [[ -x .venv/bin/python ]] || UV_PYTHON_DOWNLOADS=never "${uv[@]}" venv -q --python "$(command -v python3)" .venv
  log "installing Python dependencies into .venv (uv, pinned by constraints.txt)"
  UV_PYTHON_DOWNLOADS=never "${uv[@]}" pip install -q --python .venv/bin/python -r requirements-dev.txt -c constraints.txt
  echo "$want" > "$stamp"
}

ensure_test_tools() {
  # docker-compose validates docker-compose.airflow.yml offline (`config`); rabbitmq-server is the Celery
  # broker of the CeleryExecutor test profile (dev/celery.sh).
  apt_install docker-compose rabbitmq-server || log "docker-compose/rabbitmq-server not installed: their tests will be skipped"
}

ensure_browser() {
  # The dashboard test drives Debian's Chromium headless; it never downloads a browser of its own.
  command -v chromium >/dev/null || apt_install chromium || log "chromium not installed: the dashboard test will be skipped"
}

# curl: the scripts' health checks; procps: dev/stop.sh finds task processes by session (pgrep)
apt_install curl procps
ensure_venv
ensure_browser
ensure_test_tools
bash dev/kafka.sh start
bash dev/postgres.sh start
source dev/env.sh
log "migrating the Airflow metadata DB ($AIRFLOW_HOME)"
.venv/bin/airflow db migrate >"$CROWD_STATE/airflow-migrate.log" 2>&1 || { tail -30 "$CROWD_STATE/airflow-migrate.log" >&2; die "airflow db migrate failed"; }
if [[ -f plugins/crowd/storage.py ]]; then
  log "migrating the crowd results schema"
  .venv/bin/python -m crowd.storage migrate
fi
log "creating the Kafka topics (when missing)"
.venv/bin/python -m crowd.kafka ensure-topics >"$CROWD_STATE/topics.log" 2>&1 || { tail -20 "$CROWD_STATE/topics.log" >&2; die "creating Kafka topics failed"; }
log "setup done"
