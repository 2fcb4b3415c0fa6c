"""stack.yml for real on a single-node swarm: deploy, smoke checks, remove; engine left as found.

The test initialises a swarm (advertised on 127.0.0.1) only when the engine is in none, and then
leaves it again. Kernels without IPVS (this VM) have no routing mesh and no service VIPs; there
the stack is deployed with DNS round robin and a host-mode port (CACHESTACK_ENDPOINT_MODE=dnsrr,
CACHESTACK_PUBLISH_MODE=host, CACHESTACK_PORT=0: a random port for the proxy), and the stack is
checked through the proxy's 127.0.0.1 port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from orchestrate.secretfiles import api_token
from orchestrate.smoke import run_smoke
from orchestrate.stack import Stack, describe_stack
from tests.support import REPO, free_port, require, run

from .helpers import image_env, tool, unique_name, wait_ready

STACK_FILE = REPO / "stack.yml"
NAMESPACE_LABEL = "com.docker.stack.namespace"
GWBRIDGE = "docker_gwbridge"
REMOVE_TIMEOUT_S = 60


@dataclass
class SwarmRun:
    stack: Stack
    urls: list[str]  # the proxy's: through the mesh, or its own host port without one

    def containers(self, client: docker.DockerClient, service: str) -> list[Any]:
        return client.containers.list(
            filters={"label": f"com.docker.swarm.service.name={self.stack.project}_{service}"},
            ignore_removed=True,  # swarm replaces tasks' containers as we look
        )


def host_ports(container: Any) -> list[int]:
    """IPv4 host ports of a container (its IPv6 binding may get a different random port)."""
    ports = container.attrs["NetworkSettings"]["Ports"] or {}
    return sorted(
        {
            int(b["HostPort"])
            for binds in ports.values()
            if binds
            for b in binds
            if ":" not in b["HostIp"]
        }
    )


def wait_for_replicas(
    client: docker.DockerClient, running: SwarmRun, service: str, count: int, host_mode: bool
) -> list[Any]:
    """A service's containers once `count` of them run healthy (tasks may restart first).

    In host mode each must also have its port; behind the mesh the containers have none.
    """
    deadline = time.monotonic() + 180
    states: list[str] = []
    while time.monotonic() < deadline:
        found = running.containers(client, service)
        states = [c.attrs["State"].get("Health", {}).get("Status", "none") for c in found]
        if states == ["healthy"] * count and all(host_ports(c) or not host_mode for c in found):
            return found
        time.sleep(1)
    raise AssertionError(f"want {count} healthy {service} replicas, have {states}")


def remove_stack(client: docker.DockerClient, name: str) -> list[str]:
    """`docker stack rm`, wait for its containers and networks, remove its volumes."""
    run(tool("docker"), "stack", "rm", name, check=False)
    namespace = {"label": f"{NAMESPACE_LABEL}={name}"}
    deadline = time.monotonic() + REMOVE_TIMEOUT_S
    while time.monotonic() < deadline and (
        client.containers.list(all=True, filters=namespace, ignore_removed=True)
        or client.networks.list(filters=namespace)
    ):
        time.sleep(1)
    for volume in client.volumes.list(filters=namespace):
        volume.remove(force=True)
    return (
        [c.name for c in client.containers.list(all=True, filters=namespace, ignore_removed=True)]
        + [n.name for n in client.networks.list(filters=namespace)]
        + [v.name for v in client.volumes.list(filters=namespace)]
        + [s.name for s in client.secrets.list(filters=namespace)]
    )


@pytest.fixture(scope="module")
def swarm(
    docker_client: docker.DockerClient, stack_images: dict[str, str], secret_files: Stack
) -> Iterator[SwarmRun]:
    docker_cli = tool("docker")
    info = docker_client.info()["Swarm"]
    state = info["LocalNodeState"]
    require(
        state == "inactive" or (state == "active" and info.get("ControlAvailable")),
        f"a Docker engine in no swarm or on a swarm manager (it is {state})",
    )
    networks_before = {n.name for n in docker_client.networks.list()}
    initialised = state == "inactive"
    name = unique_name("csds")
    try:
        if initialised:
            run(docker_cli, "swarm", "init", "--advertise-addr", "127.0.0.1")
        mesh = Path("/proc/net/ip_vs").exists()
        port = free_port() if mesh else 0
        env = {**image_env(stack_images), "CACHESTACK_PROJECT": name, "CACHESTACK_PORT": str(port)}
        if not mesh:
            env |= {"CACHESTACK_ENDPOINT_MODE": "dnsrr", "CACHESTACK_PUBLISH_MODE": "host"}
        stack = describe_stack(name, port)
        run(
            docker_cli,
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            str(STACK_FILE),
            name,
            env=env,
        )
        running = SwarmRun(stack, [])
        wait_for_replicas(docker_client, running, "service", 2, host_mode=False)
        [proxy] = wait_for_replicas(docker_client, running, "proxy", 1, host_mode=not mesh)
        running.urls = [f"http://127.0.0.1:{port if mesh else host_ports(proxy)[0]}"]
        wait_ready(running.urls[0])
        yield running
    finally:
        left = remove_stack(docker_client, name)
        if initialised:
            run(docker_cli, "swarm", "leave", "--force", check=False)
            if GWBRIDGE not in networks_before:
                for network in docker_client.networks.list(names=[GWBRIDGE]):
                    network.remove()
        assert not left, f"docker stack rm left {left}"


def test_smoke_checks_pass(swarm: SwarmRun) -> None:
    lines: list[str] = []
    assert run_smoke(swarm.urls[0], api_token(), out=lines.append), "\n".join(lines)


def test_replicas_share_the_database_and_cache(
    swarm: SwarmRun, docker_client: docker.DockerClient
) -> None:
    replicas = swarm.containers(docker_client, "service")
    assert len(replicas) == 2
    for container in replicas:
        container.reload()
        assert container.attrs["State"]["Health"]["Status"] == "healthy"
    first = last = swarm.urls[0]  # the proxy sends consecutive requests to either replica
    tag = unique_name("")
    auth = {"Authorization": f"Bearer {api_token()}"}
    created = requests.post(
        f"{first}/users",
        json={"username": f"swarm_{tag}", "email": f"{tag}@example.com"},
        headers=auth,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    user = created.json()["data"]
    read = requests.get(f"{last}/users/{user['id']}", headers=auth, timeout=10)
    assert read.status_code == 200 and read.json()["data"] == user
    deleted = requests.delete(f"{last}/users/{user['id']}", headers=auth, timeout=10)
    assert deleted.status_code == 204


def test_secrets_are_swarm_secrets_owned_by_each_container_user(
    swarm: SwarmRun, docker_client: docker.DockerClient
) -> None:
    names = {
        s.name
        for s in docker_client.secrets.list(
            filters={"label": f"{NAMESPACE_LABEL}={swarm.stack.project}"}
        )
    }
    assert names == {f"{swarm.stack.project}_{n}" for n in swarm.stack.secrets}
    for service in swarm.stack.services:
        if service.once:  # its container has exited: the next test checks it succeeded
            continue
        container = swarm.containers(docker_client, service.name)[0]
        for mount in service.secrets:
            result = container.exec_run(["stat", "-c", "%a %u %g", mount.target])
            assert result.output.decode().split() == [
                oct(mount.mode)[2:],
                str(mount.uid),
                str(mount.gid),
            ]


def test_tasks_ran_to_completion(swarm: SwarmRun, docker_client: docker.DockerClient) -> None:
    for service in swarm.stack.services:
        if service.once:
            tasks = docker_client.services.get(f"{swarm.stack.project}_{service.name}").tasks()
            assert "complete" in {task["Status"]["State"] for task in tasks}, service.name


def test_service_rolls_updates_healthy_first(
    swarm: SwarmRun, docker_client: docker.DockerClient
) -> None:
    spec = docker_client.services.get(f"{swarm.stack.project}_service").attrs["Spec"]
    assert spec["Mode"]["Replicated"]["Replicas"] == 2
    assert spec["UpdateConfig"]["Order"] == "start-first"
    assert spec["UpdateConfig"]["FailureAction"] == "rollback"
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["ReadOnly"] is True
    assert container["CapabilityDrop"] == ["ALL"]
    assert container["Healthcheck"]["Test"] == ["CMD", "python", "-m", "service.probe"]
