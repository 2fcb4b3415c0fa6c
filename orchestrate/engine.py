"""Realise the stack description (orchestrate.stack) with the Docker SDK.

Small functions, each doing one thing to the engine: networks, volumes, containers (with a
config-hash label, so an unchanged container is kept and a changed one replaced: stop-first,
or start-first one replica at a time, see orchestrate.rollout), tasks run to completion, and
cleanup by the label org.cachestack.project=<project>.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from . import images, patroni, record, rollout, sentinels, smoke
from .containers import (
    config_hash,
    connect,
    create_container,
    last_logs,
    made_by,
    project_containers,
    project_filter,
    remove,
    verify_secrets,
    wait_answering,
    wait_healthy,
)
from .errors import OrchestrateError, reason
from .output import say, step
from .proxy import Proxy
from .secretfiles import (
    api_token,
    changed_since_staged,
    ensure_secrets,
    port_context,
    remove_staged,
)
from .stack import (
    CONFIG_HASH_LABEL,
    ETCD_MEMBERS,
    PATRONI_MEMBERS,
    PROJECT_LABEL,
    REDIS_SERVERS,
    REPLICA_LABEL,
    SENTINELS,
    SERVICE_LABEL,
    Port,
    Service,
    Settings,
    Stack,
)
from .waits import until

TASK_DEADLINE_S = 180.0
NETWORK_DEADLINE_S = 30.0

__all__ = ["connect", "down", "logs", "realise", "service_context", "service_url", "status",
           "up"]


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
                option = "--monitoring-port" if service.name == "prometheus" else "--port"
                raise OrchestrateError(
                    f"port {port.host_ip}:{port.host} is already in use: stop what uses it "
                    f"or pick another with {option}"
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
        patroni.before_replacing(client, stack.project, service, old)
        sentinels.before_replacing(client, stack, service, old)
        remove(old)
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


def run_task(
    client: docker.DockerClient, stack: Stack, service: Service, image_ref: str,
    deadline_s: float = TASK_DEADLINE_S,
) -> None:
    """Run a `once` service to completion and remove it; raise with its logs unless it
    exited 0 within the deadline."""
    for old in project_containers(client, stack.project, service.name):
        remove(old)  # left by an interrupted run
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
        remove(container)


def wait_running(container: Container, service: Service) -> None:
    """Wait until the container is healthy (or, when it publishes a readiness path, ready),
    then check its secrets."""
    if service.ready_path and service.ports:  # readiness is stronger than health
        port = service.ports[0]
        wait_answering(container, port.url + service.ready_path, context=port_context(port))
    else:
        wait_healthy(container)
    verify_secrets(container, service)
    say(
        f"{container.name}: healthy, {len(service.secrets)} secret(s) readable by "
        f"uid {service.user.split(':')[0]} only"
    )


def running_proxy(client: docker.DockerClient, stack: Stack) -> Proxy | None:
    """The project's proxy, if one runs (not on a stack's first `up`)."""
    found = [c for c in project_containers(client, stack.project, "proxy")
             if c.status == "running"]
    return Proxy(found[0]) if found else None


# The members of `up --ha`'s clusters: replaced one at a time, each back before the next.
CLUSTER_MEMBERS = (*PATRONI_MEMBERS, *ETCD_MEMBERS, *REDIS_SERVERS, *SENTINELS)


def realise(
    client: docker.DockerClient, stack: Stack, refs: dict[str, str], timings: dict[str, float]
) -> dict[str, list[Container]]:
    """Networks, volumes and containers for the stack, in order: the containers before a task
    are healthy before it runs, and the task has succeeded before the ones after it start."""
    with step("networks and volumes", timings):
        for net in stack.networks:
            ensure_network(client, stack, net.name, net.internal)
        for volume in stack.volumes:
            ensure_volume(client, stack, volume)
    containers: dict[str, list[Container]] = {}
    waiting: list[Service] = []
    with step("containers", timings):
        for service in stack.services:
            ref = refs[service.image]
            if service.once:
                for started in waiting:
                    wait_running(containers[started.name][0], started)
                waiting = []
                patroni.wait_led(client, stack.project)
                say(f"{stack.container_name(service.name)}: running {' '.join(service.command)}")
                run_task(client, stack, service, ref)
            elif service.update_order == "start-first":
                # The proxy takes part only for what it balances (the stream's readers it never
                # sees).
                proxy = running_proxy(client, stack) if service.rotation_path else None
                containers[service.name] = rollout.roll_out(client, stack, service, ref, proxy)
            else:
                container, action = ensure_container(client, stack, service, ref)
                containers[service.name] = [container]
                say(f"{container.name}: {action} ({container.short_id}, {ref})")
                if action == "recreated" and service.name in CLUSTER_MEMBERS:
                    # One member of a cluster at a time: the next waits until this one is back.
                    wait_running(container, service)
                    if service.name in PATRONI_MEMBERS:
                        patroni.wait_rejoined(client, stack.project, service.name)
                    elif service.name in (*REDIS_SERVERS, *SENTINELS):
                        sentinels.wait_rejoined(client, stack, service.name)
                else:
                    waiting.append(service)
        for started in waiting:
            wait_running(containers[started.name][0], started)
        remove_orphans(client, stack)
    return containers


def remove_orphans(client: docker.DockerClient, stack: Stack) -> None:
    """Containers of the project whose service the stack no longer has (Prometheus after an
    `up` without --monitoring) go."""
    wanted = {s.name for s in stack.services}
    for container in project_containers(client, stack.project):
        if container.labels.get(SERVICE_LABEL) not in wanted:
            remove(container)
            say(f"{container.name}: removed (not in the stack any more)")


def _api_port(stack: Stack) -> Port:
    return stack.service("proxy").ports[0]


def service_url(stack: Stack) -> str:
    """Where the stack serves its API: the proxy's published port."""
    return _api_port(stack).url


def service_context(stack: Stack) -> ssl.SSLContext | None:
    """How the orchestrator's own requests to service_url trust it (None: plain HTTP)."""
    return port_context(_api_port(stack))


def up(stack: Stack, settings: Settings) -> dict[str, float]:
    """Build or pull images, record `settings` (with the image mode chosen), run the stack,
    check health and run the smoke checks."""
    timings: dict[str, float] = {}
    client = connect()
    check_ports(client, stack)  # before any build: a taken port should fail in a second
    with step("secrets", timings):
        created = ensure_secrets(stack)
        say(f"generated {', '.join(created)}" if created else "secrets present")
        changed = changed_since_staged(stack)
        if changed:
            raise OrchestrateError(
                f"{', '.join(changed)} changed in secrets/ while the stack runs with the old "
                f"value: apply it with `python -m orchestrate rotate {' '.join(changed)}`, "
                "or put the old value back")
    with step("images", timings):
        mode = images.choose_mode(client, stack, settings.images)
        refs = images.resolve_images(client, stack, mode)
    record.write(client, stack, dataclasses.replace(settings, images=mode))
    realise(client, stack, refs, timings)
    with step("smoke checks", timings):
        if not smoke.run_smoke(service_url(stack), api_token(), context=service_context(stack)):
            raise OrchestrateError("smoke checks failed")
    return timings


def remove_network(network: Network) -> None:
    """Remove `network`, asking again while Docker 20.10 still counts an endpoint of a container
    it has just removed (moby/moby#43286: "has active endpoints", gone a moment later)."""

    def pending() -> str | None:
        try:
            network.remove()
        except docker.errors.APIError as exc:
            if "active endpoints" not in str(exc):
                raise
            return reason(exc)
        return None

    until(pending, NETWORK_DEADLINE_S, f"network {network.name} was not removed")


def down(project: str, volumes: bool) -> list[str]:
    """Remove every container (with its anonymous volumes) and network of `project`, its
    record, and with `volumes` its named volumes."""
    client = connect()
    removed = []
    for container in project_containers(client, project):
        remove(container)
        removed.append(f"container {container.name} (made by {made_by(container)})")
    for network in client.networks.list(filters=project_filter(project)):
        remove_network(network)
        removed.append(f"network {network.name}")
    forgotten = record.forget(client, project)
    if forgotten:
        removed.append(f"volume {forgotten} (the record of its settings)")
    if volumes:
        for volume in client.volumes.list(filters=project_filter(project)):
            volume.remove(force=True)
            removed.append(f"volume {volume.name}")
    if remove_staged(project):
        removed.append("staged secret copies")
    return removed


def status(stack: Stack) -> list[dict[str, Any]]:
    """One row per container of the project: service, state, health, ports, image, and for a
    replica what the proxy does with it (UP: takes requests, DOWN: failed its checks, DRAIN)."""
    client = connect()
    proxy = running_proxy(client, stack)
    slots = proxy.slots() if proxy else {}
    rows = []
    for container in project_containers(client, stack.project):
        state = container.attrs["State"]
        address = ((container.attrs["NetworkSettings"]["Networks"] or {})
                   .get(stack.resource_name("frontend"), {}).get("IPAddress"))
        slot = slots.get(address) if container.labels.get(REPLICA_LABEL) else None
        rows.append(
            {
                "service": container.labels.get(SERVICE_LABEL, "?"),
                "container": container.name,
                "id": container.short_id,
                "state": state["Status"],
                "health": (state.get("Health") or {}).get("Status", "none"),
                "ports": ",".join(f"127.0.0.1:{p}" for p in sorted(published_host_ports(container)))
                or "-",
                "proxy": "-" if slot is None else "DRAIN" if slot.draining
                else "UP" if slot.up else "DOWN",
                "by": made_by(container),
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
