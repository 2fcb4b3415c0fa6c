"""Helpers of the orchestrator tests: run the CLI, find and sweep a project's resources.

A plain module (not conftest) so test files can import it; pytest puts this directory on
sys.path. No tests/orchestrate/__init__.py: it would shadow the real `orchestrate` package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import docker
import docker.errors

from orchestrate.stack import PROJECT_LABEL

REPO = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 1200  # a cold offline build of every image fits in this


def orchestrate(
    *args: str, env: dict[str, str] | None = None, timeout: float = UP_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run `python -m orchestrate ARGS` from the repo root, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def labelled(client: docker.DockerClient, project: str) -> list[str]:
    """Every container, network and volume that carries the project's label."""
    filters = {"label": f"{PROJECT_LABEL}={project}"}
    return (
        [f"container {c.name}"
         for c in client.containers.list(ignore_removed=True, all=True, filters=filters)]
        + [f"network {n.name}" for n in client.networks.list(filters=filters)]
        + [f"volume {v.name}" for v in client.volumes.list(filters=filters)]
    )


def sweep(client: docker.DockerClient, project: str) -> None:
    """Last-resort cleanup of a project, by label, after `down --volumes` already ran."""
    filters = {"label": f"{PROJECT_LABEL}={project}"}
    for container in client.containers.list(ignore_removed=True, all=True, filters=filters):
        container.remove(force=True)
    for network in client.networks.list(filters=filters):
        network.remove()
    for volume in client.volumes.list(filters=filters):
        volume.remove(force=True)


@dataclass
class Project:
    """A project under test; remembers every output so leak checks can scan them."""

    name: str
    port: int
    images: str
    outputs: list[str] = field(default_factory=list)

    def run(self, command: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        options = ["--project", self.name, "--port", str(self.port)]
        if command in ("up", "build"):
            options += ["--images", self.images]
        result = orchestrate(command, *options, *args, **kwargs)
        self.outputs += [result.stdout, result.stderr]
        return result

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
