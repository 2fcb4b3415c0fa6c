"""The stack's one door, against a real stack: that the replicas have no route out of the host
while the proxy answers."""

from __future__ import annotations

import textwrap
from typing import Any

import docker
import pytest
import requests
from orchestrate_helpers import Project

from orchestrate.stack import PROJECT_LABEL, SERVICE_LABEL
from tests.support import require

pytestmark = pytest.mark.usefixtures("docker_client")

OUTSIDE = ("1.1.1.1", 443)  # an address beyond this host


def container(client: docker.DockerClient, project: Project, service: str) -> Any:
    found = client.containers.list(ignore_removed=True, filters={"label": [
        f"{PROJECT_LABEL}={project.name}", f"{SERVICE_LABEL}={service}"]})
    assert found, f"a running {service} container"
    return found[0]


def test_replicas_have_no_route_out_while_the_proxy_answers(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    proxy = container(docker_client, stack, "proxy")
    host, port = OUTSIDE
    control = proxy.exec_run(["socat", "-u", "OPEN:/dev/null",
                              f"TCP:{host}:{port},connect-timeout=5"])
    require(control.exit_code == 0, f"a route from this machine to {host}:{port}")
    probe = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("{host}", {port}), timeout=5).close()
            print("connected")
        except OSError as exc:
            print(type(exc).__name__)
        """)
    replica = container(docker_client, stack, "service")
    answer = replica.exec_run(["python", "-c", probe]).output.decode().strip()
    assert answer != "connected", answer
    for network in replica.attrs["NetworkSettings"]["Networks"]:
        assert docker_client.networks.get(network).attrs["Internal"] is True, network
    assert requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200
