"""Helpers of the orchestrator tests: run the CLI, find and sweep a project's resources."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container

from orchestrate.secretfiles import api_token
from orchestrate.stack import PROJECT_LABEL, SERVICE_LABEL
from tests.stores import psql
from tests.support import run

UP_TIMEOUT_S = 1200  # a cold offline build of every image fits in this


def orchestrate(
    *args: str, env: dict[str, str] | None = None, timeout: float = UP_TIMEOUT_S,
    under: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run `python -m orchestrate ARGS` from the repo root (under a command that starts it, if
    given), capturing its output."""
    return run(*under, sys.executable, "-m", "orchestrate", *args, env=env, timeout=timeout,
               check=False)


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


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line a failed command printed on stderr (it must be one, and no
    traceback)."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def container(client: docker.DockerClient, project: Project, service: str) -> Container:
    """A running container of `service` (of a replicated one, any replica)."""
    found = client.containers.list(ignore_removed=True, filters={"label": [
        f"{PROJECT_LABEL}={project.name}", f"{SERVICE_LABEL}={service}"]})
    assert found, f"a running {service} container"
    return found[0]


class Api:
    """The stack's API, with its token."""

    def __init__(self, project: Project) -> None:
        self.url = project.url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_token()}"

    def create(self, name: str) -> dict[str, Any]:
        reply = self.session.post(f"{self.url}/users", timeout=10,
                                  json={"username": name, "email": f"{name}@example.org"})
        assert reply.status_code == 201, reply.text
        return reply.json()["data"]

    def read(self, user: dict[str, Any], by: str) -> tuple[str, list[dict[str, Any]]]:
        """(X-Cache, the users found) for a lookup of `user` by id, username or email."""
        if by == "id":
            reply = self.session.get(f"{self.url}/users/{user['id']}", timeout=10)
            found = [reply.json()["data"]] if reply.status_code == 200 else []
        else:
            reply = self.session.get(f"{self.url}/users", params={by: user[by]}, timeout=10)
            found = reply.json()["data"]
        assert reply.status_code in (200, 404), reply.text
        return reply.headers.get("X-Cache", ""), found


def backed_up(project: Project) -> Path:
    """The file a `backup` of the project wrote."""
    result = project.run("backup")
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.split(" to ", 1)[1].split(" (", 1)[0])


def database_oid(postgres: Container) -> str:
    """The identity of the stack's database: a restore that switched over changes it."""
    [(oid,)] = psql(postgres, "SELECT oid FROM pg_catalog.pg_database "
                              "WHERE datname = pg_catalog.current_database()")
    return oid


def until(condition: Callable[[], bool], what: str, seconds: float = 120) -> None:
    """Wait for `condition`, by its progress rather than a time: a busy machine is slow."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.1)


def kill_main_process(container: Container) -> float:
    """SIGKILL the container's main process from the host, as a crash would (the restart
    policy applies; `docker kill` would count as a manual stop); returns when."""
    container.reload()
    os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
    return time.monotonic()


def absent(postgres: Container, ids: list[int]) -> list[int]:
    """Those of `ids` that no row of users has, asked of `postgres`."""
    if not ids:
        return []
    listed = ",".join(map(str, ids))
    rows = psql(postgres, f"SELECT id FROM users WHERE id = ANY('{{{listed}}}'::bigint[])")
    return sorted(set(ids) - {int(row[0]) for row in rows})


def derived_image(client: docker.DockerClient, base: str, tag: str) -> str:
    """`base` plus one layer: to the orchestrator, an image of new code."""
    recipe = f"FROM {base}\nLABEL org.cachestack.test-generation={time.time_ns()}\n".encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(recipe)
        tar.addfile(info, io.BytesIO(recipe))
    context.seek(0)
    image, _ = client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True)
    return image.id


def not_as_written(postgres: Container, final: dict[int, str]) -> list[int]:
    """The users whose row in `postgres` is gone or has another display name than `final`
    says it must."""
    if not final:
        return []
    listed = ",".join(map(str, final))
    rows = psql(postgres, "SELECT id, display_name FROM users "
                          f"WHERE id = ANY('{{{listed}}}'::bigint[])")
    found = {int(row[0]): row[1] for row in rows}
    return sorted(user for user, name in final.items() if found.get(user) != name)
