"""A stack brought up with settings other than the defaults (a port of its own, TLS at the proxy,
Prometheus, one replica) keeps them through every later command, which is given nothing but
the project: each finds what `up` recorded. A --port that is not the stack's is refused, and so
is a project that has containers but no record. Tests run in file order on one stack."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests

from orchestrate.bench import REPORT_DIR
from orchestrate.record import VOLUME
from orchestrate.secretfiles import secret_path
from orchestrate.stack import CA_CERT, PROJECT_LABEL, REPLICA_LABEL, SERVICE_LABEL
from tests.support import free_port

from .helpers import Project, one_line_error, orchestrate, sweep

BENCH_TIMEOUT_S = 600


@dataclass
class Kept:
    """The stack under test and what `up` brought it up with."""

    project: Project
    monitoring_port: int
    images: dict[str, str]  # service -> image id, after `up`


def containers(client: docker.DockerClient, project: str) -> dict[str, list]:
    """The project's running containers by service."""
    found: dict[str, list] = {}
    for container in client.containers.list(ignore_removed=True,
                                            filters={"label": f"{PROJECT_LABEL}={project}"}):
        found.setdefault(container.labels[SERVICE_LABEL], []).append(container)
    return found


def bindings(container: docker.models.containers.Container) -> list[tuple[str, str]]:
    ports = container.attrs["HostConfig"]["PortBindings"] or {}
    return [(b["HostIp"], b["HostPort"]) for items in ports.values() for b in items]


def assert_kept(client: docker.DockerClient, kept: Kept) -> None:
    """The stack is as `up` brought it up: its proxy on its port, speaking TLS only, Prometheus
    on its port, one replica, and every container on the image `up` made."""
    found = containers(client, kept.project.name)
    assert sorted(found) == ["postgres", "prometheus", "proxy", "redis", "service", "stream"], found
    [proxy], [prometheus] = found["proxy"], found["prometheus"]
    assert bindings(proxy) == [("127.0.0.1", str(kept.project.port))]
    assert bindings(prometheus) == [("127.0.0.1", str(kept.monitoring_port))]
    url = f"https://127.0.0.1:{kept.project.port}/readyz"
    assert requests.get(url, verify=str(secret_path(CA_CERT)), timeout=10).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{kept.project.port}/readyz", timeout=10)
    ready = requests.get(f"http://127.0.0.1:{kept.monitoring_port}/-/ready", timeout=10)
    assert ready.status_code == 200
    assert [c.labels.get(REPLICA_LABEL) is not None for c in found["service"]] == [True]
    assert {name: cs[0].image.id for name, cs in found.items()} == kept.images


def day2(kept: Kept, *args: str, timeout: float = 300) -> str:
    """`python -m orchestrate ARGS --project P`, and nothing else: its output."""
    result = orchestrate(*args, "--project", kept.project.name, timeout=timeout)
    kept.project.outputs += [result.stdout, result.stderr]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def kept(docker_client: docker.DockerClient, images_mode: str) -> Iterator[Kept]:
    project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
    monitoring_port = free_port()
    try:
        result = project.run("up", "--tls", "--monitoring", "--monitoring-port",
                             str(monitoring_port), "--replicas", "1")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        images = {name: cs[0].image.id
                  for name, cs in containers(docker_client, project.name).items()}
        yield Kept(project, monitoring_port, images)
    finally:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)
        for suffix in ("html", "png", "json"):
            (REPORT_DIR / f"bench-{project.name}.{suffix}").unlink(missing_ok=True)


def test_up_kept_what_it_was_given(docker_client: docker.DockerClient, kept: Kept) -> None:
    assert_kept(docker_client, kept)


def test_status_logs_and_smoke(docker_client: docker.DockerClient, kept: Kept) -> None:
    assert f"127.0.0.1:{kept.project.port}" in day2(kept, "status")
    assert day2(kept, "logs", "proxy")
    assert day2(kept, "smoke").count("smoke ok") == 10
    assert_kept(docker_client, kept)


def test_audit(docker_client: docker.DockerClient, kept: Kept) -> None:
    assert day2(kept, "audit").strip().endswith("wrong nobodies 0")
    assert_kept(docker_client, kept)


def test_bench(docker_client: docker.DockerClient, kept: Kept) -> None:
    out = day2(kept, "bench", "--seconds", "1", timeout=BENCH_TIMEOUT_S)
    assert f"wrote {REPORT_DIR / f'bench-{kept.project.name}.html'}" in out
    assert_kept(docker_client, kept)


def test_backup_and_restore(docker_client: docker.DockerClient, kept: Kept) -> None:
    out = day2(kept, "backup")
    dump = Path(out.split(" to ", 1)[1].split(" (", 1)[0])
    assert "restored project" in day2(kept, "restore", str(dump), "--yes")
    assert_kept(docker_client, kept)


def test_rotate(docker_client: docker.DockerClient, kept: Kept) -> None:
    assert "rotated" in day2(kept, "rotate")
    assert_kept(docker_client, kept)


def test_up_again_changes_nothing(docker_client: docker.DockerClient, kept: Kept) -> None:
    before = {c.id for cs in containers(docker_client, kept.project.name).values() for c in cs}
    out = day2(kept, "up")
    assert f"is up at https://127.0.0.1:{kept.project.port}" in out
    assert {c.id for cs in containers(docker_client, kept.project.name).values()
            for c in cs} == before
    assert_kept(docker_client, kept)


def test_a_port_that_is_not_the_stacks_is_refused(
        docker_client: docker.DockerClient, kept: Kept) -> None:
    other = str(free_port())
    for command in (["smoke"], ["rotate", "api_tokens"], ["bench", "--seconds", "1"]):
        result = orchestrate(*command, "--project", kept.project.name, "--port", other)
        line = one_line_error(result)
        assert f"brought up with --port {kept.project.port}, not {other}" in line, command
    assert_kept(docker_client, kept)


def test_a_stack_without_a_record_is_refused_until_up_records_it(
        docker_client: docker.DockerClient, kept: Kept) -> None:
    """As a stack made by compose, or by an orchestrator before the record: its commands do
    not guess its settings."""
    docker_client.volumes.get(f"{kept.project.name}_{VOLUME}").remove()
    result = orchestrate("smoke", "--project", kept.project.name)
    assert "has no record of what it was brought up with" in one_line_error(result)
    assert_kept(docker_client, kept)
    day2(kept, "up", "--port", str(kept.project.port), "--tls", "--monitoring",
         "--monitoring-port", str(kept.monitoring_port), "--replicas", "1")
    assert day2(kept, "smoke").count("smoke ok") == 10
    assert_kept(docker_client, kept)
