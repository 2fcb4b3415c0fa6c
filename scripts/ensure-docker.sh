#!/usr/bin/env bash
# Make sure a Docker engine answers. If none does and we are root: install Debian's docker.io
# when dockerd is missing, start dockerd in the background (log: /var/log/dockerd.log) and wait
# for it. Otherwise say how to start Docker and exit non-zero.
# Env: DOCKER_WAIT_S (default 60) - how long to wait for a started dockerd.
set -euo pipefail

engine_answers() { docker info >/dev/null 2>&1; }

if engine_answers; then
    exit 0
fi
echo "ensure-docker: no Docker engine answers${DOCKER_HOST:+ at $DOCKER_HOST}" >&2
if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: start Docker (e.g. 'sudo systemctl start docker', or as root:" \
         "'dockerd >/var/log/dockerd.log 2>&1 &') and retry" >&2
    exit 1
fi
if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST#unix://}" = "$DOCKER_HOST" ]; then
    echo "ensure-docker: DOCKER_HOST=$DOCKER_HOST is remote; start the engine there" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure-docker: installing Debian's docker.io" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi
if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "ensure-docker: starting dockerd (log: /var/log/dockerd.log)" >&2
    nohup dockerd >/var/log/dockerd.log 2>&1 &
fi
deadline=$((SECONDS + ${DOCKER_WAIT_S:-60}))
until engine_answers; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "ensure-docker: dockerd did not answer within ${DOCKER_WAIT_S:-60}s;" \
             "last lines of /var/log/dockerd.log:" >&2
        tail -n 20 /var/log/dockerd.log >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "ensure-docker: Docker engine is up" >&2
