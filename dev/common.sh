# Shared helpers for the dev/ scripts. Source it; it sets paths and defines small functions.
# Everything the scripts create lives under $CROWD_STATE (git-ignored .local/ by default).
set -euo pipefail

CROWD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CROWD_STATE="${CROWD_STATE:-$CROWD_ROOT/.local}"
mkdir -p "$CROWD_STATE"

log() { printf '\033[1m[crowd]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[crowd] error:\033[0m %s\n' "$*" >&2; exit 1; }

# apt_install PKG...: install Debian packages that are missing (we run as root on our machines).
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# pid_alive PIDFILE: true when the pid file names a running process.
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or time runs out.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

# stop_pidfile PIDFILE NAME: stop the process group started by us, then the process, and remove the pid file.
stop_pidfile() {
  local pidfile=$1 name=$2
  if ! pid_alive "$pidfile"; then
    # it died (a crash): what it left in its session, in groups of their own, may still run
    [[ -f $pidfile ]] && stop_session "$(cat "$pidfile")" "$name"
    rm -f "$pidfile"; log "$name is not running"; return 0
  fi
  local pid; pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name did not stop in 30 s, killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  stop_session "$pid" "$name"
  rm -f "$pidfile"
}

# stop_session SID NAME: the processes left in the session we started with setsid, in process groups of their own
# (Airflow's supervisor puts each task process in one): a signal to our group does not reach them.
stop_session() {
  local sid=$1 name=$2
  command -v pgrep >/dev/null || return 0
  pgrep -s "$sid" >/dev/null 2>&1 || return 0
  log "stopping what $name left running (task processes)"
  pkill -TERM -s "$sid" 2>/dev/null || true
  for _ in $(seq 1 20); do pgrep -s "$sid" >/dev/null 2>&1 || return 0; sleep 0.5; done
  pkill -KILL -s "$sid" 2>/dev/null || true
}
