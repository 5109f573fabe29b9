#!/usr/bin/env bash
# Sets everything up (dev/setup.sh) and runs the whole test suite against the real services.
#   dev/test.sh [pytest args...]     e.g. dev/test.sh -k ingest -x
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$CROWD_ROOT"
bash dev/setup.sh
source dev/env.sh
log "running the test suite"
exec .venv/bin/python -m pytest "$@"
