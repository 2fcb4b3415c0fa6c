#!/bin/sh
# Entry point of the offline PostgreSQL image. On first start (empty $PGDATA) it runs initdb
# with the superuser $POSTGRES_USER whose password is read from $POSTGRES_PASSWORD_FILE (the
# value never reaches argv or the environment), creates $POSTGRES_DB, allows scram-sha-256
# logins from the network, then execs the server.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD_FILE:-}" ] || [ ! -r "$POSTGRES_PASSWORD_FILE" ]; then
        echo "error: POSTGRES_PASSWORD_FILE must name a readable file" >&2
        exit 1
    fi
    initdb --username="$POSTGRES_USER" --pwfile="$POSTGRES_PASSWORD_FILE" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\" OWNER \"$POSTGRES_USER\";" \
            | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "database initialised in $PGDATA"
fi
exec "$@"
