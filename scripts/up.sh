#!/usr/bin/env bash
# One command from a machine with (or able to install) Docker to a running, checked stack.
# Arguments go to `python -m orchestrate up` (e.g. --project NAME --port N --images offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-docker.sh
# Without a registry every image is built from Debian packages, starting with debootstrap.
if ! command -v debootstrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "up: installing debootstrap (for the offline images)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi
python=${PYTHON:-python3}
if ! "$python" -c "import docker, yaml, orchestrate" >/dev/null 2>&1; then
    echo "up: installing the orchestrator (pip install -e '.[orchestrate]')" >&2
    "$python" -m pip install -q -e '.[orchestrate]'
fi
exec "$python" -m orchestrate up "$@"
