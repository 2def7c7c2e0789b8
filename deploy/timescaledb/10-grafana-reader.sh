#!/bin/sh
# Grafana's database role. Grafana runs whatever SQL a panel holds, so its role may
# only read: SELECT on every table the migrations create later (default privileges of
# the role that runs them), read-only transactions, and nothing else.
# The TimescaleDB image runs this once, when its data volume is first initialised
# (/docker-entrypoint-initdb.d); on an existing volume run it by hand (docs/deploy.md).
set -eu
: "${ELDERSAFE_GRAFANA_DB_PASSWORD:?set ELDERSAFE_GRAFANA_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-eldersafe}" \
    -v password="$ELDERSAFE_GRAFANA_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE grafana_reader LOGIN PASSWORD %L', :'password')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') \gexec
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
