#!/usr/bin/env bash
# Local PostgreSQL (Debian's package) in a cluster of our own under $CROWD_STATE/postgres.
#   dev/postgres.sh start | stop | status
# Listens on 127.0.0.1:$CROWD_PG_PORT (5433 by default, so a system cluster on 5432 is left alone).
# Creates the role `crowd` and the databases `crowd` (results) and `crowd_test` (tests).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The postgres user must reach the data folder: as root (our machines, CI) it lives in postgres' home,
# since a clone under a private temp folder is not traversable by that user.
if [[ $(id -u) -eq 0 ]]; then PG_DIR="${CROWD_PG_DIR:-/var/lib/postgresql/crowd-dev}"; else PG_DIR="${CROWD_PG_DIR:-$CROWD_STATE/postgres}"; fi
PGDATA="$PG_DIR/data"
LOGFILE="$PG_DIR/postgres.log"
PG_PORT="${CROWD_PG_PORT:-5433}"
PG_PASSWORD="${CROWD_PG_PASSWORD:-crowd}"   # local development only; deployments set their own

pg_bin() {
  local bin; bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [[ -n $bin ]] || { apt_install postgresql; bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1); }
  echo "$bin"
}

as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_cluster() {
  local bin=$1
  mkdir -p "$PG_DIR"
  [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$PG_DIR"
  [[ -f $PGDATA/PG_VERSION ]] && return 0
  log "initialising a PostgreSQL cluster in $PGDATA"
  as_pg "$bin/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
  cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
shared_buffers = 256MB
fsync = on
CONF
}

psql_admin() { as_pg "$(pg_bin)/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

ensure_role_and_dbs() {
  psql_admin -d postgres -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'crowd') THEN CREATE ROLE crowd LOGIN CREATEDB; END IF;
    END \$\$;" -c "ALTER ROLE crowd PASSWORD '$PG_PASSWORD'"
  for db in crowd crowd_test; do
    [[ $(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'") == 1 ]] \
      || psql_admin -d postgres -c "CREATE DATABASE $db OWNER crowd"
  done
}

start() {
  local bin; bin=$(pg_bin)
  ensure_cluster "$bin"
  if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    local running; running=$(sed -n 4p "$PGDATA/postmaster.pid" 2>/dev/null)  # the port the server listens on
    [[ $running == "$PG_PORT" ]] \
      || die "PostgreSQL of $PGDATA is running on port $running, not CROWD_PG_PORT=$PG_PORT: stop it (dev/postgres.sh stop) to move it"
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    if port_open 127.0.0.1 "$PG_PORT"; then die "port $PG_PORT is in use by another process; set CROWD_PG_PORT or free it"; fi
    rm -f "$PGDATA/postmaster.pid"  # stale after a crash or a reboot; pg_ctl status said no server runs
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: $LOGFILE)"
    touch "$LOGFILE"; [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$LOGFILE"
    # the port on the command line: a cluster made with another CROWD_PG_PORT moves to this one
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$LOGFILE" -o "-p $PG_PORT" -w -t 60 start >/dev/null \
      || { tail -30 "$LOGFILE" >&2; die "PostgreSQL did not start (log tail above)"; }
  fi
  ensure_role_and_dbs
  log "PostgreSQL is up: postgresql://crowd:***@127.0.0.1:$PG_PORT/crowd"
}

stop() {
  local bin; bin=$(pg_bin)
  if [[ -f $PGDATA/PG_VERSION ]] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "stopping PostgreSQL"; as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  else log "PostgreSQL is not running"; fi
}

status() {
  local bin; bin=$(pg_bin)
  if [[ -f $PGDATA/PG_VERSION ]] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then echo "postgres: running on 127.0.0.1:$PG_PORT"
  else echo "postgres: stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
