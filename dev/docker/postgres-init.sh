#!/bin/bash
# Runs once when the compose PostgreSQL volume is new: creates the crowd results role and database.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$CROWD_DB_PASSWORD" <<'SQL'
CREATE ROLE crowd LOGIN PASSWORD :'pw';
CREATE DATABASE crowd OWNER crowd;
SQL
