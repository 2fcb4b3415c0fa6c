#!/usr/bin/env bash
# Make the locks the images install from, each version pinned with the sha256 of its files,
# from pyproject.toml (with uv, a test extra):
#   requirements/service.lock  the service's dependencies
#   requirements/setup.lock    those and the orchestrator's (compose's set-up image)
# Each also holds the build backend (build-system in pyproject.toml), with which the image's
# builder installs the package itself without fetching anything unpinned.
# Run it after changing a dependency in pyproject.toml; a version already locked is kept while it
# still fits. Arguments go to `uv pip compile`: `--upgrade` takes every newest release,
# `--upgrade-package NAME` one.
# The locks are resolved for Debian bookworm's python3 (CPython 3.11.2, glibc 2.36, x86_64),
# the offline base's and the oldest Python the images run: below 3.11.3 redis-py needs
# async-timeout, which the official Python image (a later 3.11) installs but does not use.
set -euo pipefail
cd "$(dirname "$0")/.."

build_backend=$(python3 -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')

compile() {  # OUTPUT, then more arguments of uv pip compile
    local output=$1
    shift
    python3 -m uv pip compile --quiet --no-config --generate-hashes \
        --python-version 3.11.2 --python-platform x86_64-manylinux_2_36 \
        --custom-compile-command "bash scripts/lock.sh" --output-file "$output" \
        pyproject.toml - "$@" <<<"$build_backend"
}

compile requirements/service.lock "$@"
# The set-up's shared dependencies at the service's versions: one version of each in the repo.
compile requirements/setup.lock --extra orchestrate --constraints requirements/service.lock "$@"
