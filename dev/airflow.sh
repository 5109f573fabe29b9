#!/usr/bin/env bash
# Local Airflow 3 (`airflow standalone`: API server + UI, scheduler, dag-processor, triggerer; LocalExecutor).
#   dev/airflow.sh start | stop | status
# Logins (local only): admin/admin and viewer/viewer, seeded into SimpleAuthManager's password file.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$CROWD_ROOT/dev/env.sh"

PIDFILE="$CROWD_STATE/airflow.pid"
LOGFILE="$CROWD_STATE/airflow.log"
URL="http://127.0.0.1:${AIRFLOW__API__PORT}"

api_healthy() { curl -fsS "$URL/api/v2/monitor/health" >/dev/null 2>&1; }
healthy_or_dead() { api_healthy || ! pid_alive "$PIDFILE" || grep -q "Traceback" "$LOGFILE"; }

start() {
  if pid_alive "$PIDFILE"; then
    wait_for 120 api api_healthy || die "Airflow (pid $(cat "$PIDFILE")) runs but $URL does not answer; see $LOGFILE"
    log "Airflow already running (pid $(cat "$PIDFILE")) at $URL"; return 0
  fi
  rm -f "$PIDFILE"
  port_open 127.0.0.1 "$AIRFLOW__API__PORT" && die "port $AIRFLOW__API__PORT is in use; set AIRFLOW__API__PORT or free it"
  # Fixed local passwords instead of generated ones (SimpleAuthManager reads this file).
  printf '{"admin": "admin", "viewer": "viewer"}\n' > "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
  log "starting Airflow standalone at $URL (log: $LOGFILE)"
  setsid "$CROWD_ROOT/.venv/bin/airflow" standalone >"$LOGFILE" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  wait_for 240 api healthy_or_dead || true
  if ! api_healthy; then
    tail -40 "$LOGFILE" >&2
    die "Airflow did not answer at $URL within 240 s (log tail above)"
  fi
  log "Airflow is up at $URL  (login admin / admin)"
}

case "${1:-}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" airflow ;;
  status) if pid_alive "$PIDFILE" && api_healthy; then echo "airflow: running at $URL"; else echo "airflow: stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
