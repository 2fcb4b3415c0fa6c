#!/usr/bin/env bash
# Install and start what the test suite talks to, on Debian 12 as root: PostgreSQL and
# Redis from Debian's packages (on 127.0.0.1), the Docker engine, and the Python package
# with its test extras. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
command -v pg_ctlcluster >/dev/null || apt_packages+=(postgresql)
command -v redis-server >/dev/null || apt_packages+=(redis-server)
command -v docker-compose >/dev/null || apt_packages+=(docker-compose)
command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
command -v docker-registry >/dev/null || apt_packages+=(docker-registry)
command -v curl >/dev/null || apt_packages+=(curl)  # the README's walk-through, as a test runs it
if ((${#apt_packages[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: missing ${apt_packages[*]}; install them (as root: apt-get install ${apt_packages[*]})" >&2
    exit 1
  fi
  echo "installing ${apt_packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

# PostgreSQL: the Debian cluster with TLS on (Debian's self-signed "snakeoil" certificate),
# and the roles of the stack: cachestack_owner owns the test database and runs the
# migrations; cachestack_app is the least-privileged role the service runs as
# (TEST_DATABASE_URL, TEST_OWNER_DATABASE_URL); cachestack_stream reads the change stream
# (REPLICATION). The role cachestack may create databases, which bench/ does.
as_postgres() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
sql() { as_postgres psql -qtAc "$1"; }
if [[ ! -e /etc/ssl/certs/ssl-cert-snakeoil.pem && $(id -u) -eq 0 ]]; then
  make-ssl-cert generate-default-snakeoil
fi
if ! pg_isready -q -h 127.0.0.1; then
  cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
fi
if [[ $(sql "SHOW ssl") != on ]]; then
  sql "ALTER SYSTEM SET ssl = on" >/dev/null
  sql "SELECT pg_reload_conf()" >/dev/null
fi
# The change stream's tests read logical replication, which takes a restart to turn on.
if [[ $(sql "SHOW wal_level") != logical ]]; then
  sql "ALTER SYSTEM SET wal_level = logical" >/dev/null
  cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster restart
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
fi
ensure_role() {  # NAME ATTRIBUTES...: created if missing, its attributes and password set again
  local name=$1; shift
  sql "SELECT 1 FROM pg_roles WHERE rolname = '$name'" | grep -q 1 ||
    sql "CREATE ROLE $name" >/dev/null
  sql "ALTER ROLE $name LOGIN $* PASSWORD '$name'" >/dev/null
}
ensure_role cachestack CREATEDB
ensure_role cachestack_owner NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
ensure_role cachestack_app NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
ensure_role cachestack_stream REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS
# The test database starts empty on every run (test data only): a database another checkout
# migrated could hold a schema this one does not know. Its replication slots go first (Postgres
# will not drop a database a slot reads).
sql "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
     WHERE database = 'cachestack_test' AND active_pid IS NOT NULL" >/dev/null
sql "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
     WHERE database = 'cachestack_test'" >/dev/null
sql "DROP DATABASE IF EXISTS cachestack_test WITH (FORCE)" >/dev/null
as_postgres createdb -O cachestack_owner cachestack_test

# Redis: the tests start private redis-server processes; only the binary is needed.
# Docker: the orchestrator, compose and swarm tests need a running engine.
bash scripts/ensure-docker.sh
# Compose v2 beside docker-compose 1.29: the compose tests run with both.
bash scripts/install-compose-v2.sh

python -m pip install -q -e '.[test]'
