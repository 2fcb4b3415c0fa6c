"""End to end against the real engine: up, status, smoke, idempotence, hardening, secrets,
persistence across down/up, down --volumes. Tests run in file order on one stack."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import docker
import pytest
import requests

from orchestrate import engine
from orchestrate.secretfiles import api_token, read_secret
from orchestrate.stack import (
    CONFIG_HASH_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    Service,
    describe_stack,
)
from tests.support import REPO, run

from .helpers import Project, labelled

pytestmark = pytest.mark.usefixtures("docker_client")
SMOKE_CHECKS = 10


def auth() -> dict[str, str]:
    """The header of the stack's API token (secrets/api_tokens exists once `up` ran)."""
    return {"Authorization": f"Bearer {api_token()}"}


def described(container: Any) -> Service:
    """The stack description's entry for a container."""
    return describe_stack().service(container.labels[SERVICE_LABEL])


def containers(client: docker.DockerClient, project: Project) -> dict[str, Any]:
    """The project's containers by name without the project: postgres, redis, service-1, ..."""
    found = client.containers.list(ignore_removed=True, all=True,
                                   filters={"label": f"{PROJECT_LABEL}={project.name}"})
    return {c.name.removeprefix(f"{project.name}-"): c for c in found}


# After the first `up`: the replicas and the change stream's readers are numbered.
RUNNING = ["postgres", "proxy", "redis", "service-1", "service-2", "stream-1", "stream-2"]


def test_up_passes_smoke_and_prints_url(stack: Project) -> None:
    out = stack.outputs[0]
    assert out.count("smoke ok") == SMOKE_CHECKS, out
    assert f"is up at {stack.url}" in out
    assert "schema up to date" in out  # what the migrate task said
    for step in ("images", "containers", "smoke checks"):
        assert f"{step}: done in" in out


def readme_api_example() -> str:
    """The README's walk-through of the API: the first sh block of its section "The API"."""
    section = (REPO / "README.md").read_text().split("\n## The API\n", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_readme_walk_through_is_true_right_after_up(stack: Project) -> None:
    """What a reader who just ran `up` gets from the README's commands, whatever ids the smoke
    checks took: the user it creates is the one it reads, changes and deletes."""
    script = readme_api_example().replace("localhost:8000", f"127.0.0.1:{stack.port}")
    result = run("bash", "-euo", "pipefail", "-c", script)  # secrets/api_tokens: from the root
    answers = re.findall(r"HTTP/1\.1 (\d+)", result.stdout)  # a body ends without a newline
    assert answers == ["200", "200", "200", "200", "204", "401"], result.stdout
    assert '"message":"created"' in result.stderr
    assert "x-cache: hit" in result.stdout.split("HTTP/", 2)[1].lower()


def test_status_shows_every_container_healthy_and_the_replicas_in_service(
    stack: Project,
) -> None:
    deadline = time.monotonic() + 30  # the service's first Docker healthcheck runs after 5s
    while True:
        result = stack.run("status")
        lines = result.stdout.splitlines()
        if sum(" healthy " in line for line in lines) == len(RUNNING) or (
                time.monotonic() > deadline):
            break
        time.sleep(1)
    assert result.returncode == 0
    rows = {line.split()[1].removeprefix(f"{stack.name}-"): line.split() for line in lines
            if not line.startswith("change stream:")}
    assert sorted(rows) == RUNNING, lines
    assert all(row[3:5] == ["running", "healthy"] for row in rows.values()), lines
    assert rows["proxy"][5] == f"127.0.0.1:{stack.port}"
    assert [rows[name][6] for name in ("service-1", "service-2")] == ["UP", "UP"], lines


def test_smoke_command(stack: Project) -> None:
    result = stack.run("smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("smoke ok") == SMOKE_CHECKS


def test_logs_command(stack: Project) -> None:
    result = stack.run("logs", "postgres")
    assert result.returncode == 0
    assert "ready to accept connections" in result.stdout


def test_containers_are_hardened(docker_client: docker.DockerClient, stack: Project) -> None:
    found = containers(docker_client, stack)
    assert sorted(found) == RUNNING
    for name, container in found.items():
        host = container.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True, name
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], name
        assert "no-new-privileges:true" in host["SecurityOpt"], name
        assert host["Memory"] > 0 and host["PidsLimit"] > 0, name
        # The service's workers follow its CPUs (docs/deploy.md): limited, not the host's.
        assert host["NanoCpus"] == (2 * 10**9 if name.startswith("service") else 0), name
        assert host["RestartPolicy"]["Name"] == "unless-stopped", name
        assert host["Privileged"] is False and host["NetworkMode"] != "host", name
        assert "/tmp" in host["Tmpfs"], name
        assert container.attrs["Config"]["User"].split(":")[0] not in ("", "0", "root"), name
        assert container.attrs["Config"]["Healthcheck"]["Test"], name
        for mount in container.attrs["Mounts"]:
            assert "docker.sock" not in mount["Source"], name
            if mount["Destination"].startswith("/run/secrets/"):
                assert mount["RW"] is False, name
        networks = set(container.attrs["NetworkSettings"]["Networks"])
        want = {f"{stack.name}_{n}" for n in described(container).networks}
        assert networks == want, name
        bindings = host["PortBindings"] or {}
        if name == "proxy":
            assert bindings == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.port)}]}
        else:
            assert not bindings, name
    for network in describe_stack(stack.name).networks:
        made = docker_client.networks.get(f"{stack.name}_{network.name}")
        assert made.attrs["Internal"] is network.internal, network.name


def test_secrets_are_files_for_the_container_user_only(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    for name, container in containers(docker_client, stack).items():
        service = described(container)
        uid = service.user.split(":")[0]
        for mount in service.secrets:
            result = container.exec_run(["stat", "-c", "%u %a", mount.target])
            assert result.output.decode().split() == [uid, "400"], name
        if service.secrets:
            # root inside the container has no capabilities left, so it cannot read them either
            denied = container.exec_run(["cat", service.secrets[0].target], user="0")
            assert denied.exit_code != 0, name


def test_up_again_keeps_every_container(docker_client: docker.DockerClient, stack: Project) -> None:
    before = {n: c.id for n, c in containers(docker_client, stack).items()}
    result = stack.run("up")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": unchanged (") == 3, result.stdout  # postgres, redis, proxy
    assert result.stdout.count(": up to date (") == 4, result.stdout  # replicas, readers
    assert {n: c.id for n, c in containers(docker_client, stack).items()} == before


def test_changed_config_recreates_only_that_container(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    before = containers(docker_client, stack)
    described = describe_stack(stack.name, stack.port)
    service = described.service("service")
    changed = dataclasses.replace(
        service, hardening=dataclasses.replace(service.hardening, mem_limit="384m")
    )
    described = dataclasses.replace(
        described, services=tuple(changed if s.name == "service" else s for s in described.services)
    )
    refs = {c.labels[SERVICE_LABEL]: c.image.id for c in before.values()}
    engine.realise(docker_client, described, refs, {})
    after = containers(docker_client, stack)
    # The replicas were replaced one by one (new numbers); nothing else was touched.
    assert sorted(after) == ["postgres", "proxy", "redis", "service-3", "service-4",
                             "stream-1", "stream-2"]
    for name in ("postgres", "redis", "proxy", "stream-1", "stream-2"):
        assert after[name].id == before[name].id, name
    for name in ("service-3", "service-4"):
        assert after[name].labels[CONFIG_HASH_LABEL] != (
            before["service-1"].labels[CONFIG_HASH_LABEL])
        assert after[name].attrs["HostConfig"]["Memory"] == 384 * 1024 * 1024


def test_no_secret_value_leaks(docker_client: docker.DockerClient, stack: Project) -> None:
    values = [read_secret(name) for name in describe_stack().secrets]
    stack.run("logs")
    found = containers(docker_client, stack)
    texts = {f"output {i}": text for i, text in enumerate(stack.outputs)}
    for name, container in found.items():
        texts[f"inspect {name}"] = json.dumps(container.attrs)
        texts[f"logs {name}"] = container.logs().decode(errors="replace")
        texts[f"history {name}"] = json.dumps(container.image.history())
        texts[f"image inspect {name}"] = json.dumps(container.image.attrs)
    filters = {"label": f"{PROJECT_LABEL}={stack.name}"}
    for network in docker_client.networks.list(filters=filters):
        texts[f"network {network.name}"] = json.dumps(network.attrs)
    for volume in docker_client.volumes.list(filters=filters):
        texts[f"volume {volume.name}"] = json.dumps(volume.attrs)
    assert len(texts) > 10
    leaks = [where for where, text in texts.items() for value in values if value in text]
    assert not leaks


def test_down_removes_the_anonymous_volumes_of_its_containers(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    """A container of the project whose image has a VOLUME nothing covers (an operator's
    one-off, say) gets an anonymous volume: `down` removes it with the container."""
    redis = containers(docker_client, stack)["redis"]  # its image has VOLUME /data
    extra = docker_client.containers.create(
        redis.image.id, ["true"], name=f"{stack.name}-extra",
        labels={PROJECT_LABEL: stack.name, SERVICE_LABEL: "extra"})
    [anonymous] = [m["Name"] for m in extra.attrs["Mounts"] if m["Type"] == "volume"]
    result = stack.run("down")
    assert result.returncode == 0, result.stderr
    assert anonymous not in {v.name for v in docker_client.volumes.list()}
    result = stack.run("up")
    assert result.returncode == 0, result.stdout + result.stderr


def test_data_survives_down_and_up(docker_client: docker.DockerClient, stack: Project) -> None:
    created = requests.post(
        f"{stack.url}/users",
        timeout=10,
        json={"username": "survivor", "email": "survivor@example.com"},
        headers=auth(),
    )
    assert created.status_code == 201, created.text
    user_id = created.json()["data"]["id"]
    result = stack.run("down")
    assert result.returncode == 0, result.stderr
    left = labelled(docker_client, stack.name)
    assert sorted(left) == [f"volume {stack.name}_pgdata"]  # Redis keeps nothing
    result = stack.run("up")
    assert result.returncode == 0, result.stdout + result.stderr
    again = requests.get(f"{stack.url}/users/{user_id}", timeout=10, headers=auth())
    assert again.status_code == 200 and again.json()["data"]["username"] == "survivor"


def test_down_volumes_removes_everything_and_second_down_is_a_no_op(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    result = stack.run("down", "--volumes")
    assert result.returncode == 0, result.stderr
    assert "removed volume" in result.stdout
    assert labelled(docker_client, stack.name) == []
    again = stack.run("down", "--volumes")
    assert again.returncode == 0
    assert "nothing to remove" in again.stdout
