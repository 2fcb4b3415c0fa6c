"""Shared test helpers: missing infrastructure skips locally but fails loudly in CI; commands
run from the repository's root."""

from __future__ import annotations

import os
import subprocess

import docker
import docker.errors
import pytest

from bench.processes import free_port as free_port  # one definition, for the benchmarks and tests
from orchestrate.paths import ROOT as REPO

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(condition: bool, what: str) -> None:
    """Skip when `what` is missing on a developer's machine; fail when CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def docker_engine() -> docker.DockerClient:
    """A client of the engine at DOCKER_HOST or the local socket; skip (fail in CI) without one."""
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except docker.errors.DockerException:
        client = None
    require(client is not None, "a Docker engine (scripts/ensure-docker.sh)")
    return client


def run(
    *cmd: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository's root, capturing its output; with `check`, raise
    with that output when it fails."""
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            check=False, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}"
            f"\n{result.stderr[-3000:]}"
        )
    return result


def run_once(client: docker.DockerClient, image: str, command: list[str],
             **options: object) -> bytes:
    """Run a container of `image` to completion; its standard output. It is removed with its
    anonymous volumes (`containers.run(remove=True)` leaves those of an image's VOLUME)."""
    container = client.containers.create(image, command, **options)
    try:
        container.start()
        code = container.wait()["StatusCode"]
        output = container.logs(stdout=True, stderr=False)
        assert code == 0, container.logs().decode(errors="replace")[-3000:]
    finally:
        container.remove(force=True, v=True)
    return output
