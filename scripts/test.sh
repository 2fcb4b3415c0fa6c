#!/usr/bin/env bash
# The test command: prepare the servers the tests need, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-services.sh
bash scripts/install-linters.sh
python -m ruff check .
python -m pytest "$@"
