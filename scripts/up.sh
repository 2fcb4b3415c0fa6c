#!/usr/bin/env bash
# One command from a machine with (or able to install) Docker to a running, checked stack.
# Arguments go to `python -m orchestrate up` (e.g. --project NAME --port N --images offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-docker.sh
exec "${PYTHON:-python3}" -m orchestrate up "$@"
