"""docker-compose.yml for real: config, up with the orchestrator's images, smoke checks, down -v.

Runs with the compose installed here (Debian's docker-compose 1.29; `docker compose` v2 reads the
same files). Each run has its own project name and 127.0.0.1 port; the finalizer removes the
containers, networks, volumes and staged secrets even when a test failed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import yaml

from orchestrate.proxy import Proxy
from orchestrate.secretfiles import (
    api_token,
    ensure_secrets,
    port_context,
    read_secret,
    remove_staged,
    secret_path,
    stage_secrets,
)
from orchestrate.smoke import run_smoke
from orchestrate.stack import CA_CERT, IMAGES, Service, Stack, describe_stack
from tests.stores import redis_cli
from tests.support import REPO, free_port, run

from .helpers import compose_down, image_env, tool, unique_name, wait_ready

FILES = ("docker-compose.yml", "compose.offline.yml")
DEV_FILE = "compose.dev.yml"
TLS_FILE = "compose.tls.yml"
# `config` only renders: any reference will do, but every image of the stack needs one.
PLACEHOLDER_IMAGES = image_env({key: f"{key}:1" for key in IMAGES})
COMPOSE_LABEL = "com.docker.compose.project"


@dataclass
class ComposeRun:
    stack: Stack
    command: list[str]
    env: dict[str, str]

    def every_container(self, client: docker.DockerClient) -> list[tuple[Service, Any]]:
        """Each container that keeps running (a task's has exited), with its service."""
        return [(s, c) for s in self.stack.services if not s.once
                for c in self.containers(client, s.name)]

    @property
    def url(self) -> str:
        return self.stack.service("proxy").ports[0].url

    def container(self, client: docker.DockerClient, service: str) -> Any:
        [container] = self.containers(client, service)
        return container

    def containers(self, client: docker.DockerClient, service: str) -> list[Any]:
        """The service's containers (each replica of a scaled one)."""
        return client.containers.list(ignore_removed=True,
            all=True,
            filters={
                "label": [
                    f"{COMPOSE_LABEL}={self.stack.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )


# docker-compose 1.29 (Debian's) and Compose v2 (scripts/install-compose-v2.sh): both read
# the same files, and the tests that run a project run with each.
COMPOSES = {"v1": ("docker-compose",), "v2": ("docker", "compose")}


def compose_command(*files: str, binary: str = "v1") -> list[str]:
    command = [tool(COMPOSES[binary][0]), *COMPOSES[binary][1:]]
    for name in files:
        command += ["-f", str(REPO / name)]
    return command


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    filters = {"label": f"{COMPOSE_LABEL}={project}"}
    return (
        [c.name for c in client.containers.list(ignore_removed=True, all=True, filters=filters)]
        + [n.name for n in client.networks.list(filters=filters)]
        + [v.name for v in client.volumes.list(filters=filters)]
    )


@contextmanager
def compose_up(
    client: docker.DockerClient,
    images: dict[str, str],
    files: tuple[str, ...],
    extra_env: dict[str, str] | None = None,
    binary: str = "v1",
    tls: bool = False,
) -> Iterator[ComposeRun]:
    """`up -d` a fresh project (with `tls`, as `up --tls` describes it), wait until /readyz
    answers; `down -v` and check nothing is left."""
    stack = describe_stack(unique_name("csdc"), free_port(), tls=tls)
    ensure_secrets(stack)  # the proxy's certificate, with tls
    env = {
        **image_env(images),
        "COMPOSE_PROJECT_NAME": stack.project,
        "CACHESTACK_PORT": str(stack.service("proxy").ports[0].host),
        **(extra_env or {}),
    }
    running = ComposeRun(stack, compose_command(*files, binary=binary), env)
    try:
        for service in stack.services:
            stage_secrets(stack, service)
        run(*running.command, "up", "-d", "--no-build", env=env)
        wait_ready(running.url, verify=str(secret_path(CA_CERT)))
        # Ready means one replica answers; the tests want the proxy to send to every one.
        proxy = Proxy(running.container(client, "proxy"))
        replicas = stack.service("service").replicas
        deadline = time.monotonic() + 60
        while sum(slot.up for slot in proxy.slots().values()) < replicas:
            assert time.monotonic() < deadline, f"want {replicas} replicas in the proxy"
            time.sleep(0.5)
        yield running
    finally:
        compose_down(lambda: run(*running.command, "down", "--volumes", "--remove-orphans",
                                 "--timeout", "10", env=env, check=False))
        remove_staged(stack.project)
        left = leftovers(client, stack.project)
        assert not left, f"compose down left {left}"


@pytest.fixture(scope="module", params=sorted(COMPOSES))
def compose(
    request: pytest.FixtureRequest, docker_client: docker.DockerClient,
    stack_images: dict[str, str], secret_files: Stack,
) -> Iterator[ComposeRun]:
    with compose_up(docker_client, stack_images, FILES, binary=request.param) as running:
        yield running


@pytest.mark.parametrize(
    "files",
    [("docker-compose.yml",), FILES, (*FILES, DEV_FILE)],
    ids=["official", "offline", "offline+dev"],
)
def test_config_is_valid(files: tuple[str, ...]) -> None:
    run(*compose_command(*files), "config", "--quiet", env=PLACEHOLDER_IMAGES)


def test_dev_override_runs_the_working_tree_with_reload() -> None:
    rendered = run(*compose_command(*FILES, DEV_FILE), "config", env=PLACEHOLDER_IMAGES).stdout
    service = yaml.safe_load(rendered)["services"]["service"]
    assert "--reload" in service["command"]
    assert f"{REPO / 'service'}:/src/service:ro" in service["volumes"]
    assert service["environment"]["PYTHONPATH"] == "/src"


def test_smoke_checks_pass(compose: ComposeRun) -> None:
    lines: list[str] = []
    assert run_smoke(compose.url, api_token(), out=lines.append), "\n".join(lines)


def test_secrets_are_files_only_the_container_user_can_read(
    compose: ComposeRun, docker_client: docker.DockerClient
) -> None:
    values = {name: read_secret(name) for name in compose.stack.secrets}
    for service, container in compose.every_container(docker_client):
        for mount in service.secrets:
            result = container.exec_run(["stat", "-c", "%a %u %g", mount.target])
            assert result.exit_code == 0, result.output
            assert result.output.decode().split() == [
                oct(mount.mode)[2:],
                str(mount.uid),
                str(mount.gid),
            ]
        config = docker_client.api.inspect_container(container.id)["Config"]
        dumped = json.dumps({"env": config["Env"], "cmd": config["Cmd"]})
        assert not any(value in dumped for value in values.values()), service.name


def test_only_the_proxy_is_published_and_only_on_loopback(
    compose: ComposeRun, docker_client: docker.DockerClient
) -> None:
    for service, container in compose.every_container(docker_client):
        ports = docker_client.api.inspect_container(container.id)["NetworkSettings"]["Ports"] or {}
        bindings = [b for binds in ports.values() if binds for b in binds]
        want = [("127.0.0.1", str(p.host)) for p in service.ports]
        assert [(b["HostIp"], b["HostPort"]) for b in bindings] == want, service.name


def test_containers_are_hardened(compose: ComposeRun, docker_client: docker.DockerClient) -> None:
    for service, container in compose.every_container(docker_client):
        info = docker_client.api.inspect_container(container.id)
        host = info["HostConfig"]
        assert info["Config"]["User"] == service.user
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert sorted(host["Tmpfs"]) == sorted(path for path, _ in service.hardening.tmpfs)
        assert info["Config"]["Labels"]["org.cachestack.project"] == compose.stack.project


def test_tasks_ran_before_the_service_and_succeeded(
    compose: ComposeRun, docker_client: docker.DockerClient
) -> None:
    service = min(c.attrs["State"]["StartedAt"]
                  for c in compose.containers(docker_client, "service"))
    for task in compose.stack.services:
        if task.once:
            state = compose.container(docker_client, task.name).attrs["State"]
            assert (state["Status"], state["ExitCode"]) == ("exited", 0), task.name
            assert state["FinishedAt"] < service, f"{task.name} finished before the service"


def test_the_orchestrator_sees_a_compose_project_and_says_compose_made_it(
    compose: ComposeRun,
) -> None:
    project = ["--project", compose.stack.project]
    rows = run(sys.executable, "-m", "orchestrate", "status", *project).stdout.splitlines()
    assert {row.split()[0] for row in rows} >= {s.name for s in compose.stack.services}
    assert all(row.split()[7] == "compose" for row in rows), rows
    logs = run(sys.executable, "-m", "orchestrate", "logs", "postgres", *project).stdout
    assert "ready to accept connections" in logs


def test_redis_saves_nothing_and_has_the_cache_functions(
        compose: ComposeRun, docker_client: docker.DockerClient) -> None:
    redis = compose.container(docker_client, "redis")
    assert redis_cli(redis, "admin", "CONFIG", "GET", "appendonly")[1].split() == [
        "appendonly", "no"]
    assert redis_cli(redis, "admin", "CONFIG", "GET", "save")[1].split() == ["save"]
    assert "cachestack_read" in redis_cli(redis, "admin", "FUNCTION", "LIST")[1]


@pytest.mark.parametrize("binary", sorted(COMPOSES))
def test_tls_override_serves_tls_only(
    docker_client: docker.DockerClient, stack_images: dict[str, str], secret_files: Stack,
    binary: str,
) -> None:
    """-f compose.tls.yml: the port answers TLS with the project CA's certificate for
    127.0.0.1 and localhost (wait_ready verified the first), plain HTTP gets no answer, and
    /metrics is not served."""
    with compose_up(docker_client, stack_images, (*FILES, TLS_FILE), binary=binary,
                    tls=True) as running:
        port = running.stack.service("proxy").ports[0]
        ca = str(secret_path(CA_CERT))
        assert requests.get(f"https://localhost:{port.host}/readyz", verify=ca,
                            timeout=10).status_code == 200
        assert requests.get(f"{port.url}/metrics", verify=ca, timeout=10).status_code == 404
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port.host}/readyz", timeout=10)
        lines: list[str] = []
        assert run_smoke(port.url, api_token(), out=lines.append,
                         context=port_context(port)), "\n".join(lines)


def test_dev_override_reloads_changed_code(
    docker_client: docker.DockerClient, stack_images: dict[str, str], secret_files: Stack
) -> None:
    """Change a copy of service/ under the running dev server: the new code serves requests."""
    build = REPO / "build"
    build.mkdir(exist_ok=True)
    source = Path(tempfile.mkdtemp(prefix="dev-source-", dir=build))
    try:
        source.chmod(0o755)  # the container's uid 10001 reads the bind mount
        shutil.copytree(
            REPO / "service", source / "service", ignore=shutil.ignore_patterns("__pycache__")
        )
        extra = {"CACHESTACK_DEV_SOURCE": str(source / "service")}
        with compose_up(docker_client, stack_images, (*FILES, DEV_FILE), extra) as running:
            url = f"{running.url}/__dev_reload_check"
            auth = {"Authorization": f"Bearer {api_token()}"}  # every path but the probes'
            assert requests.get(url, headers=auth, timeout=5).status_code == 404
            with open(source / "service" / "wsgi.py", "a") as wsgi:
                wsgi.write('\napp.add_url_rule("/__dev_reload_check", "dev", lambda: "reloaded")\n')
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if requests.get(url, headers=auth, timeout=2).text == "reloaded":
                        return
                except requests.RequestException:
                    pass  # the server is restarting
                time.sleep(0.5)
            raise AssertionError("the dev server did not pick up the changed code in 60 s")
    finally:
        shutil.rmtree(source)
