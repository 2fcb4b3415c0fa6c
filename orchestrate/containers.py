"""Containers of the stack, one at a time, with the Docker SDK: find a project's containers by
label, create one hardened as its description says, and wait for it with a deadline that fails
fast, with the container's last log lines, when it breaks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Healthcheck, Mount
from docker.utils.socket import frames_iter

from .errors import OrchestrateError, reason
from .secretfiles import secret_digest, stage_secrets
from .stack import (
    CONFIG_HASH_LABEL,
    DNS_OPTIONS,
    PROJECT_LABEL,
    REPLICA_LABEL,
    SERVICE_LABEL,
    HealthCheck,
    Service,
    Stack,
)
from .waits import until

HEALTH_DEADLINE_S = 120.0
READY_DEADLINE_S = 90.0
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
    # A container removed between the engine's list and docker-py's inspect of each (a
    # rollout or `down` at work) is no longer the project's.
    found = client.containers.list(all=True, filters=project_filter(project, service),
                                   ignore_removed=True)
    return sorted(found, key=lambda c: c.name)


def made_by(container: Container) -> str:
    """Which tool made a container of the project: compose and swarm label theirs."""
    labels = container.labels
    if "com.docker.compose.project" in labels:
        return "compose"
    if "com.docker.swarm.service.name" in labels:
        return "swarm"
    return "orchestrate"


def last_logs(container: Container, lines: int = LOG_TAIL) -> list[str]:
    try:
        text = container.logs(tail=lines).decode(errors="replace")
    except docker.errors.DockerException:
        return []
    return [f"{container.name}: {line}" for line in text.splitlines()]


def config_hash(stack: Stack, service: Service, image_id: str) -> str:
    """What the container is made of: its description and image id. Not its secrets' values:
    those change in place (`rotate`), under containers that keep running. How many replicas
    there are is not part of it either: scaling replaces nothing."""
    material = {
        "project": stack.project,
        "service": dataclasses.asdict(dataclasses.replace(service, replicas=1)),
        "image": image_id,
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
    client: docker.DockerClient, stack: Stack, service: Service, image_ref: str, digest: str,
    replica: int | None = None, binds: Sequence[Mount] = (),
) -> Container:
    """Create (not start) the hardened container for `service` (its replica number `replica`,
    for a start-first service), with its staged secrets, its volumes and `binds`."""
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
    labels = {**stack.labels(), SERVICE_LABEL: service.name, CONFIG_HASH_LABEL: digest}
    if replica is not None:
        labels[REPLICA_LABEL] = str(replica)
    # The engine (API 1.41) joins one network at creation; the others are joined before start.
    container = client.containers.create(
        image_ref,
        list(service.command),
        name=stack.container_name(service.name, replica),
        user=service.user,
        environment=dict(service.environment),
        labels=labels,
        ports={p.container: (p.host_ip, p.host) for p in service.ports},
        mounts=[*mounts, *binds],
        read_only=hard.read_only,
        tmpfs=dict(hard.tmpfs),
        cap_drop=list(hard.cap_drop),
        cap_add=list(hard.cap_add) or None,
        security_opt=["no-new-privileges:true"] if hard.no_new_privileges else None,
        mem_limit=hard.mem_limit,
        pids_limit=hard.pids_limit,
        nano_cpus=int(hard.cpus * NS) if hard.cpus else None,
        restart_policy={"Name": hard.restart},
        privileged=hard.privileged,
        healthcheck=docker_healthcheck(service.healthcheck),
        dns_opt=list(DNS_OPTIONS),
        network=networks[0],
        networking_config={networks[0]: client.api.create_endpoint_config(
            aliases=[service.name])},
        detach=True,
    )
    for network in networks[1:]:
        client.networks.get(network).connect(container, aliases=[service.name])
    return container


def remove(container: Container) -> None:
    """Remove the container, running or not, with its anonymous volumes (an image's VOLUME
    that nothing named covers); named volumes stay."""
    container.remove(force=True, v=True)


def fail_if_broken(container: Container, restarts: int = 0) -> str:
    """Reload the container; raise with its logs if it died (or Docker restarted it more than
    the `restarts` times it had been before); return its health status."""
    container.reload()
    state = container.attrs["State"]
    health = (state.get("Health") or {}).get("Status", "none")
    if (
        state["Status"] in ("exited", "dead")
        or state.get("Restarting")
        or container.attrs.get("RestartCount", 0) > restarts
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


def wait_for(container: Container, check: Callable[[str], str | None], deadline_s: float,
             what: str) -> None:
    """Until `check` (given the container's health status) returns None, check on the
    container and try again: fail at once when it breaks, or with `what` and the last state
    `check` returned once `deadline_s` passed."""
    # A container kept from before may have been restarted by Docker long ago (a Postgres
    # member that crashed and came back): only a restart while waiting counts.
    container.reload()
    restarts = container.attrs.get("RestartCount", 0)
    until(lambda: check(fail_if_broken(container, restarts)), deadline_s, what,
          logs=lambda: last_logs(container))


def wait_healthy(container: Container, deadline_s: float = HEALTH_DEADLINE_S) -> None:
    """Wait for Docker's health status `healthy`."""
    wait_for(container, lambda health: None if health == "healthy" else f"health {health}",
             deadline_s, f"{container.name} not healthy")


def wait_answering(container: Container, url: str, deadline_s: float = READY_DEADLINE_S,
                   context: ssl.SSLContext | None = None) -> None:
    """Wait until `url`, a port the container publishes, answers 200 (an https one trusted
    with `context`)."""

    def answer(health: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return None if response.status == 200 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except OSError as exc:
            return str(getattr(exc, "reason", exc))

    wait_for(container, answer, deadline_s, f"{url} not ready")


def wait_probe(container: Container, path: str, deadline_s: float = READY_DEADLINE_S) -> None:
    """Wait until the service's own probe of `path` (service.probe) passes inside the container:
    for a container that publishes no port."""

    def probe(health: str) -> str | None:
        result = container.exec_run(["python", "-m", "service.probe", path.lstrip("/")])
        return None if result.exit_code == 0 else result.output.decode(errors="replace").strip()

    wait_for(container, probe, deadline_s, f"{container.name} not ready")


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




def exec_output(
    container: Container, command: list[str], user: str
) -> Iterator[tuple[bytes, bytes]]:
    """Run `command` in the container and yield its output as it comes, as (stdout, stderr)
    chunks (either may be empty); raise OrchestrateError with its stderr unless it exits 0."""
    api = container.client.api
    exec_id = api.exec_create(container.id, command, stdout=True, stderr=True, user=user)["Id"]
    errors = b""
    for out, err in api.exec_start(exec_id, stream=True, demux=True):
        errors += err or b""
        yield out or b"", err or b""
    code = api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        raise OrchestrateError(_failed(command, code, errors))


def exec_input(container: Container, command: list[str], user: str,
               chunks: Iterable[bytes]) -> bytes:
    """Run `command` in the container with `chunks` as its standard input; return its
    output, or raise OrchestrateError with it unless it exits 0."""
    api = container.client.api
    exec_id = api.exec_create(container.id, command, stdin=True, stdout=True, stderr=True,
                              user=user)["Id"]
    stream = api.exec_start(exec_id, socket=True)
    raw = stream._sock  # docker-py hands out a SocketIO; its socket can be half-closed
    try:
        for chunk in chunks:
            raw.sendall(chunk)
        raw.shutdown(socket.SHUT_WR)
        output = b"".join(data for _, data in frames_iter(stream, tty=False))
    finally:
        stream.close()
    code = api.exec_inspect(exec_id)["ExitCode"]
    if code != 0:
        raise OrchestrateError(_failed(command, code, output))
    return output


def _failed(command: list[str], code: int, output: bytes) -> str:
    lines = output.decode(errors="replace").strip().splitlines() or ["no output"]
    return f"{command[0]} exited {code}: {lines[-1]}"
