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
if ((${#apt_packages[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: missing ${apt_packages[*]}; install them (as root: apt-get install ${apt_packages[*]})" >&2
    exit 1
  fi
  echo "installing ${apt_packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

# PostgreSQL: the Debian cluster, a role and database for the tests (TEST_DATABASE_URL);
# the role may create databases, which bench/ does.
if ! pg_isready -q -h 127.0.0.1; then
  cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster start
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
fi
as_postgres() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
as_postgres psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'cachestack'" | grep -q 1 ||
  as_postgres psql -qc "CREATE ROLE cachestack LOGIN CREATEDB PASSWORD 'cachestack'"
as_postgres psql -qtAc "SELECT 1 FROM pg_database WHERE datname = 'cachestack_test'" | grep -q 1 ||
  as_postgres createdb -O cachestack cachestack_test

# Redis: the tests start private redis-server processes; only the binary is needed.
# Docker: the orchestrator, compose and swarm tests need a running engine.
bash scripts/ensure-docker.sh

python -m pip install -q -e '.[test]'
