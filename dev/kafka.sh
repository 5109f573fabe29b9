#!/usr/bin/env bash
# Local Apache Kafka 4 (KRaft, one broker+controller) from the official jars on Maven Central.
#   dev/kafka.sh start | stop | status | restart
# Data and logs: $CROWD_STATE/kafka. Broker: 127.0.0.1:9092, controller: 127.0.0.1:9093.
# A second, private broker (fault-injection tests): CROWD_KAFKA_PORT, CROWD_KAFKA_CONTROLLER_PORT and
# CROWD_KAFKA_DIR (state folder: data, log, pid file) choose its ports and folder; the jars stay shared.
# CROWD_KAFKA_PROXIED_PORTS=LISTEN:ADVERTISED adds a listener on LISTEN that tells its clients to connect to
# ADVERTISED: a TCP proxy there puts them behind it (the network-partition tests); other clients are not affected.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KAFKA_DIR="${CROWD_KAFKA_DIR:-$CROWD_STATE/kafka}"
JARS="$CROWD_STATE/kafka/jars"
DATA="$KAFKA_DIR/data"
PIDFILE="$KAFKA_DIR/kafka.pid"
LOGFILE="$KAFKA_DIR/kafka.log"
CONF_SRC="$CROWD_ROOT/dev/kafka"
KAFKA_HOST=127.0.0.1 KAFKA_PORT="${CROWD_KAFKA_PORT:-9092}" KAFKA_CONTROLLER_PORT="${CROWD_KAFKA_CONTROLLER_PORT:-9093}"

ensure_jars() {
  command -v java >/dev/null && java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' || apt_install default-jdk-headless
  command -v mvn >/dev/null || apt_install maven
  local stamp="$JARS/.pom.sha256" want; want=$(sha256sum "$CONF_SRC/pom.xml" | cut -d' ' -f1)
  [[ -f $stamp && $(cat "$stamp") == "$want" ]] && return 0
  log "resolving Kafka jars from Maven Central (dev/kafka/pom.xml)"
  rm -rf "$JARS"; mkdir -p "$JARS"
  mvn -q -B -f "$CONF_SRC/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$JARS" -DincludeScope=runtime >"$JARS/../mvn.log" 2>&1 \
    || { tail -30 "$JARS/../mvn.log" >&2; die "mvn could not resolve the Kafka jars (log: $JARS/../mvn.log)"; }
  echo "$want" > "$stamp"
}

java_kafka() { java -Xms256m -Xmx768m -Dlog4j2.configurationFile="$CONF_SRC/log4j2.properties" -cp "$JARS/*" "$@"; }

ensure_storage() {
  sed -e "s#^log.dirs=.*##" \
      -e "s#127.0.0.1:9092#127.0.0.1:$KAFKA_PORT#g" -e "s#127.0.0.1:9093#127.0.0.1:$KAFKA_CONTROLLER_PORT#g" \
      "$CONF_SRC/server.properties" > "$KAFKA_DIR/server.properties"
  echo "log.dirs=$DATA" >> "$KAFKA_DIR/server.properties"
  if [[ -n ${CROWD_KAFKA_PROXIED_PORTS:-} ]]; then
    local listen=${CROWD_KAFKA_PROXIED_PORTS%%:*} advertised=${CROWD_KAFKA_PROXIED_PORTS##*:}
    sed -i -e "s#^listeners=.*#&,PROXIED://127.0.0.1:$listen#" -e "s#^advertised.listeners=.*#&,PROXIED://127.0.0.1:$advertised#" \
        -e "s#^listener.security.protocol.map=.*#&,PROXIED:PLAINTEXT#" "$KAFKA_DIR/server.properties"
  fi
  [[ -f $DATA/meta.properties ]] && return 0
  log "formatting KRaft storage in $DATA"
  mkdir -p "$DATA"
  java_kafka kafka.tools.StorageTool format --standalone \
      --cluster-id "$(java_kafka kafka.tools.StorageTool random-uuid | tail -1)" \
      --config "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.log" 2>&1 \
    || { cat "$KAFKA_DIR/format.log" >&2; die "formatting Kafka storage failed"; }
}

broker_ready() {
  port_open $KAFKA_HOST $KAFKA_PORT || return 1
  pid_alive "$PIDFILE" || return 0
  grep -q "Kafka Server started\|started (kafka.server" "$LOGFILE" 2>/dev/null
}

start() {
  mkdir -p "$KAFKA_DIR"
  if pid_alive "$PIDFILE"; then
    wait_for 60 kafka broker_ready || die "Kafka (pid $(cat "$PIDFILE")) runs but does not answer on $KAFKA_HOST:$KAFKA_PORT; see $LOGFILE"
    log "Kafka already running (pid $(cat "$PIDFILE")) on $KAFKA_HOST:$KAFKA_PORT"; return 0
  fi
  [[ -f $PIDFILE ]] && { log "removing stale pid file $PIDFILE (pid $(cat "$PIDFILE") is gone)"; rm -f "$PIDFILE"; }
  if port_open $KAFKA_HOST $KAFKA_PORT; then
    die "port $KAFKA_PORT is in use by another process (not ours); stop it or free the port: $(ss -ltnp "sport = :$KAFKA_PORT" 2>/dev/null | tail -n +2 | head -1)"
  fi
  ensure_jars
  ensure_storage
  log "starting Kafka 4 broker on $KAFKA_HOST:$KAFKA_PORT (log: $LOGFILE)"
  setsid bash -c 'exec java -Xms256m -Xmx768m -Dlog4j2.configurationFile="$1" -cp "$2/*" kafka.Kafka "$3"' _ \
      "$CONF_SRC/log4j2.properties" "$JARS" "$KAFKA_DIR/server.properties" >"$LOGFILE" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  if ! wait_for 90 kafka broker_ready; then
    tail -40 "$LOGFILE" >&2
    die "Kafka did not come up within 90 s (log tail above, full log: $LOGFILE)"
  fi
  log "Kafka is up (pid $(cat "$PIDFILE"))"
}

status() {
  if pid_alive "$PIDFILE" && port_open $KAFKA_HOST $KAFKA_PORT; then echo "kafka: running (pid $(cat "$PIDFILE")) on $KAFKA_HOST:$KAFKA_PORT"
  else echo "kafka: stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" kafka ;;
  restart) stop_pidfile "$PIDFILE" kafka; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
