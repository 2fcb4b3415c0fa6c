"""Realise the stack description (orchestrate.stack) with the Docker SDK.

Small functions, each doing one thing to the engine: networks, volumes, containers (with a
config-hash label, so an unchanged container is kept and a changed one recreated), wait
strategies with deadlines that fail fast with the container's last log lines, and cleanup by
the label org.cachestack.project=<project>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Healthcheck, Mount

from . import images, smoke
from .errors import OrchestrateError, reason
from .output import say, step
from .secretfiles import (
    api_token,
    ensure_secrets,
    remove_staged,
    secret_digest,
    stage_secrets,
)
from .stack import (
    CONFIG_HASH_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    HealthCheck,
    Service,
    Stack,
)

HEALTH_DEADLINE_S = 120.0
READY_DEADLINE_S = 90.0
TASK_DEADLINE_S = 180.0
LOG_TAIL = 20
NS = 1_000_000_000


def connect(timeout_s: int = 600) -> docker.DockerClient:
    """A client for DOCKER_HOST (or the default socket), API version negotiated."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(version="auto", timeout=timeout_s)
        client.ping()
    except docker.errors.DockerException as exc:
        raise OrchestrateError(
            f"no Docker engine answers at {host}: start one with "
            f"`bash scripts/ensure-docker.sh` ({reason(exc)})"
        ) from None
    return client


def project_filter(project: str, service: str | None = None) -> dict[str, list[str]]:
    labels = [f"{PROJECT_LABEL}={project}"]
    if service:
        labels.append(f"{SERVICE_LABEL}={service}")
    return {"label": labels}


def project_containers(
    client: docker.DockerClient, project: str, service: str | None = None
) -> list[Container]:
    found = client.containers.list(all=True, filters=project_filter(project, service))
    return sorted(found, key=lambda c: c.name)


def last_logs(container: Container, lines: int = LOG_TAIL) -> list[str]:
    try:
        text = container.logs(tail=lines).decode(errors="replace")
    except docker.errors.DockerException:
        return []
    return [f"{container.name}: {line}" for line in text.splitlines()]


def ensure_network(client: docker.DockerClient, stack: Stack, name: str, internal: bool) -> str:
    full = stack.resource_name(name)
    existing = client.networks.list(names=[full])
    for net in existing:
        if net.name == full:
            if (net.attrs.get("Labels") or {}).get(PROJECT_LABEL) != stack.project:
                raise OrchestrateError(
                    f"network {full} exists but does not belong to project {stack.project}"
                )
            return full
    client.networks.create(
        full, driver="bridge", internal=internal, labels=stack.labels(), check_duplicate=True
    )
    say(f"created network {full}{' (internal)' if internal else ''}")
    return full


def ensure_volume(client: docker.DockerClient, stack: Stack, name: str) -> str:
    full = stack.resource_name(name)
    try:
        volume = client.volumes.get(full)
    except docker.errors.NotFound:
        client.volumes.create(full, labels=stack.labels())
        say(f"created volume {full}")
        return full
    if (volume.attrs.get("Labels") or {}).get(PROJECT_LABEL) != stack.project:
        raise OrchestrateError(
            f"volume {full} exists but does not belong to project {stack.project}"
        )
    return full


def config_hash(stack: Stack, service: Service, image_id: str) -> str:
    """What the container is made of: its description, image id and secret contents."""
    material = {
        "project": stack.project,
        "service": dataclasses.asdict(service),
        "image": image_id,
        "secrets": {m.secret: secret_digest(m.secret) for m in service.secrets},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def docker_healthcheck(check: HealthCheck | None) -> Healthcheck | None:
    if check is None:
        return None
    return Healthcheck(
        test=list(check.test),
        interval=int(check.interval_s * NS),
        timeout=int(check.timeout_s * NS),
        retries=check.retries,
        start_period=int(check.start_period_s * NS),
    )


def create_container(
    client: docker.DockerClient, stack: Stack, service: Service, image_ref: str, digest: str
) -> Container:
    """Create (not start) the hardened container for `service`."""
    api = client.api
    staged = stage_secrets(stack, service)
    mounts = [
        Mount(target=target, source=str(path), type="bind", read_only=True)
        for target, path in staged.items()
    ]
    mounts += [
        Mount(target=path, source=stack.resource_name(volume), type="volume")
        for volume, path in service.volumes
    ]
    hard = service.hardening
    networks = [stack.resource_name(n) for n in service.networks]
    host_config = api.create_host_config(
        mounts=mounts,
        port_bindings={p.container: (p.host_ip, p.host) for p in service.ports},
        read_only=hard.read_only,
        tmpfs=dict(hard.tmpfs),
        cap_drop=list(hard.cap_drop),
        cap_add=list(hard.cap_add) or None,
        security_opt=["no-new-privileges:true"] if hard.no_new_privileges else None,
        mem_limit=hard.mem_limit,
        pids_limit=hard.pids_limit,
        restart_policy={"Name": hard.restart},
        privileged=hard.privileged,
        network_mode=networks[0],
    )
    labels = {**stack.labels(), SERVICE_LABEL: service.name, CONFIG_HASH_LABEL: digest}
    created = api.create_container(
        image=image_ref,
        command=list(service.command),
        name=stack.container_name(service.name),
        user=service.user,
        environment=dict(service.environment),
        labels=labels,
        ports=[p.container for p in service.ports] or None,
        host_config=host_config,
        healthcheck=docker_healthcheck(service.healthcheck),
        networking_config=api.create_networking_config(
            {networks[0]: api.create_endpoint_config(aliases=[service.name])}
        ),
        detach=True,
    )
    for network in networks[1:]:
        api.connect_container_to_network(created["Id"], network, aliases=[service.name])
    return client.containers.get(created["Id"])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(client: docker.DockerClient, stack: Stack) -> None:
    """Fail before creating anything when a published port is taken by someone else."""
    for service in stack.services:
        for port in service.ports:
            ours = [
                c
                for c in project_containers(client, stack.project, service.name)
                if c.status == "running" and published_host_ports(c) == {port.host}
            ]
            if not ours and not port_free(port.host, port.host_ip):
                raise OrchestrateError(
                    f"port {port.host_ip}:{port.host} is already in use: stop what uses it "
                    f"or pick another with --port"
                )


def published_host_ports(container: Container) -> set[int]:
    bindings = container.attrs["HostConfig"].get("PortBindings") or {}
    return {int(b["HostPort"]) for items in bindings.values() for b in items or []}


def ensure_container(
    client: docker.DockerClient, stack: Stack, service: Service, image_ref: str
) -> tuple[Container, str]:
    """Keep an unchanged container, recreate a changed one; return it and what was done."""
    image_id = client.images.get(image_ref).id
    digest = config_hash(stack, service, image_id)
    action = "created"
    for old in project_containers(client, stack.project, service.name):
        if old.labels.get(CONFIG_HASH_LABEL) == digest:
            if old.status != "running":
                old.start()
                return old, "started"
            return old, "unchanged"
        old.remove(force=True)
        action = "recreated"
    name = stack.container_name(service.name)
    try:  # a container with our name but without our labels is not ours to replace
        client.containers.get(name)
        raise OrchestrateError(
            f"container {name} exists but does not belong to project {stack.project}"
        )
    except docker.errors.NotFound:
        pass
    container = create_container(client, stack, service, image_ref, digest)
    try:
        container.start()
    except docker.errors.APIError as exc:
        raise OrchestrateError(
            f"cannot start {name}: {exc.explanation or exc}", last_logs(container)
        ) from None
    return container, action


def fail_if_broken(container: Container) -> str:
    """Reload the container; raise with its logs if it died; return its health status."""
    container.reload()
    state = container.attrs["State"]
    health = (state.get("Health") or {}).get("Status", "none")
    if (
        state["Status"] in ("exited", "dead")
        or state.get("Restarting")
        or container.attrs.get("RestartCount", 0) > 0
    ):
        raise OrchestrateError(
            f"{container.name} stopped (status {state['Status']}, exit code "
            f"{state.get('ExitCode')})",
            last_logs(container),
        )
    if health == "unhealthy":
        log = (state.get("Health") or {}).get("Log") or [{}]
        output = (log[-1].get("Output") or "").strip().splitlines()
        raise OrchestrateError(
            f"{container.name} is unhealthy",
            last_logs(container) + [f"healthcheck: {o}" for o in output],
        )
    return health


def wait_healthy(container: Container, deadline_s: float = HEALTH_DEADLINE_S) -> None:
    """Wait for Docker's health status `healthy`; fail fast when the container breaks."""
    deadline = time.monotonic() + deadline_s
    while fail_if_broken(container) != "healthy":
        if time.monotonic() > deadline:
            raise OrchestrateError(
                f"{container.name} not healthy after {deadline_s:.0f}s", last_logs(container)
            )
        time.sleep(0.25)


def wait_ready(container: Container, url: str, deadline_s: float = READY_DEADLINE_S) -> None:
    """Wait until `url` answers 200, checking on the container between attempts."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while True:
        fail_if_broken(container)
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() > deadline:
            raise OrchestrateError(
                f"{url} not ready after {deadline_s:.0f}s ({last})", last_logs(container)
            )
        time.sleep(0.25)


def verify_secrets(container: Container, service: Service) -> None:
    """Read each secret back inside the container: owner, mode and content digest."""
    for mount in service.secrets:
        result = container.exec_run(
            ["sh", "-c", 'stat -c "%u:%g %a" "$1" && sha256sum < "$1"', "sh", mount.target],
            user=service.user,
        )
        lines = result.output.decode(errors="replace").split()
        expected = [f"{mount.uid}:{mount.gid}", f"{mount.mode:o}", secret_digest(mount.secret)]
        if result.exit_code != 0 or lines[:3] != expected:
            got = " ".join(lines[:2]) if result.exit_code == 0 else "unreadable"
            raise OrchestrateError(
                f"{container.name}: {mount.target} is not readable as expected "
                f"(want {expected[0]} mode {expected[1]}, got {got})"
            )


def run_task(
    client: docker.DockerClient, stack: Stack, service: Service, image_ref: str,
    deadline_s: float = TASK_DEADLINE_S,
) -> None:
    """Run a `once` service to completion and remove it; raise with its logs unless it
    exited 0 within the deadline."""
    for old in project_containers(client, stack.project, service.name):
        old.remove(force=True)  # left by an interrupted run
    container = create_container(client, stack, service, image_ref, "task")
    try:
        container.start()
        try:
            result = container.wait(timeout=deadline_s)
        except Exception as exc:  # the engine's read timed out: the task hangs
            raise OrchestrateError(
                f"{container.name} did not finish within {deadline_s:.0f}s", last_logs(container)
            ) from exc
        if result["StatusCode"] != 0:
            raise OrchestrateError(
                f"{container.name} failed (exit code {result['StatusCode']})", last_logs(container)
            )
        for line in last_logs(container):
            say(line)
    finally:
        container.remove(force=True)


def wait_running(container: Container, service: Service) -> None:
    """Wait until the container is healthy (or, when it publishes a readiness path, ready),
    then check its secrets."""
    if service.ready_path and service.ports:  # readiness is stronger than health
        port = service.ports[0]
        wait_ready(container, f"http://{port.host_ip}:{port.host}{service.ready_path}")
    else:
        wait_healthy(container)
    verify_secrets(container, service)
    say(
        f"{container.name}: healthy, {len(service.secrets)} secret(s) readable by "
        f"uid {service.user.split(':')[0]} only"
    )


def realise(
    client: docker.DockerClient, stack: Stack, refs: dict[str, str], timings: dict[str, float]
) -> dict[str, Container]:
    """Networks, volumes and containers for the stack, in order: the containers before a task
    are healthy before it runs, and the task has succeeded before the ones after it start."""
    with step("networks and volumes", timings):
        for net in stack.networks:
            ensure_network(client, stack, net.name, net.internal)
        for volume in stack.volumes:
            ensure_volume(client, stack, volume)
    containers: dict[str, Container] = {}
    waiting: list[Service] = []
    with step("containers", timings):
        for service in stack.services:
            ref = refs[service.image]
            if service.once:
                for started in waiting:
                    wait_running(containers[started.name], started)
                waiting = []
                say(f"{stack.container_name(service.name)}: running {' '.join(service.command)}")
                run_task(client, stack, service, ref)
                continue
            container, action = ensure_container(client, stack, service, ref)
            containers[service.name] = container
            waiting.append(service)
            say(f"{container.name}: {action} ({container.short_id}, {ref})")
        for started in waiting:
            wait_running(containers[started.name], started)
    return containers


def service_url(stack: Stack) -> str:
    port = next(p for s in stack.services for p in s.ports)
    return f"http://{port.host_ip}:{port.host}"


def up(stack: Stack, mode: str) -> dict[str, float]:
    """Build or pull images, run the stack, check health and run the smoke checks."""
    timings: dict[str, float] = {}
    client = connect()
    check_ports(client, stack)  # before any build: a taken port should fail in a second
    with step("secrets", timings):
        created = ensure_secrets(stack)
        say(f"generated {', '.join(created)}" if created else "secrets present")
    with step("images", timings):
        refs = images.resolve_images(client, stack, mode)
    realise(client, stack, refs, timings)
    with step("smoke checks", timings):
        if not smoke.run_smoke(service_url(stack), api_token()):
            raise OrchestrateError("smoke checks failed")
    return timings


def down(project: str, volumes: bool) -> list[str]:
    """Remove every container and network (and with `volumes` the volumes) of `project`."""
    client = connect()
    removed = []
    for container in project_containers(client, project):
        container.remove(force=True, v=False)
        removed.append(f"container {container.name}")
    for network in client.networks.list(filters=project_filter(project)):
        network.remove()
        removed.append(f"network {network.name}")
    if volumes:
        for volume in client.volumes.list(filters=project_filter(project)):
            volume.remove(force=True)
            removed.append(f"volume {volume.name}")
    if remove_staged(project):
        removed.append("staged secret copies")
    return removed


def status(project: str) -> list[dict[str, Any]]:
    """One row per container of the project: service, state, health, ports, image."""
    rows = []
    for container in project_containers(connect(), project):
        state = container.attrs["State"]
        rows.append(
            {
                "service": container.labels.get(SERVICE_LABEL, "?"),
                "container": container.name,
                "id": container.short_id,
                "state": state["Status"],
                "health": (state.get("Health") or {}).get("Status", "none"),
                "ports": ",".join(f"127.0.0.1:{p}" for p in sorted(published_host_ports(container)))
                or "-",
                "image": (container.image.tags or [container.image.short_id])[0],
            }
        )
    return rows


def logs(project: str, service: str | None, lines: int = 200) -> list[str]:
    client = connect()
    found = project_containers(client, project, service)
    if not found:
        raise OrchestrateError(
            f"no container of project {project}" + (f" for service {service}" if service else "")
        )
    return [line for c in found for line in last_logs(c, lines)]
