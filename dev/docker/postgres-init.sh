#!/bin/bash
# Runs once, when the compose PostgreSQL volume is new (docker-entrypoint-initdb.d): creates the crowd results
# role and database next to Airflow's. Names and password come from docker-compose.airflow.yml (from .env).
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v user="${CROWD_DB_USER:-crowd}" -v db="${CROWD_DB_NAME:-crowd}" -v pw="$CROWD_DB_PASSWORD" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
