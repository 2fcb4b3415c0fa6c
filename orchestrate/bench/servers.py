"""What `bench` measures: the stack's own replicas behind its proxy, and temporary containers
of the same service image (with the replicas' settings, with the near cache off, with Redis
out of reach), with what each one counted and used while it was driven.

A temporary container is the replicas' own description (orchestrate.stack) with another
environment and a port published on 127.0.0.1, made by the same create_container, so it is
hardened exactly as they are. It is named and labelled `<project>-bench-<variant>` in the
project, so `down` removes it like any other container; `bench` itself removes it when the
workload is done, or on the way out whatever happened.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import docker
from docker.models.containers import Container

from ..containers import create_container, project_containers, remove, wait_answering
from ..engine import published_host_ports, running_proxy, service_url
from ..errors import OrchestrateError
from ..secretfiles import STAGE_ROOT
from ..stack import REPLICA_LABEL, SERVICE_LABEL, Port, Service, Stack

SERVICE = "service"
SERVICE_PORT = 8000
VARIANT_PREFIX = "bench-"
# Nothing listens on port 1 inside a service container: the client's connections are refused
# at once, so the service's breaker answers every read from Postgres, as when Redis is down.
NO_REDIS = "redis://127.0.0.1:1/0"
COUNTERS = ("cache_hits_total", "cache_misses_total", "cache_bypasses_total",
            "db_queries_total")
SCRAPE = ("import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen("
          f"'http://127.0.0.1:{SERVICE_PORT}/metrics', timeout=5).read())")


@dataclass(frozen=True)
class Variant:
    """A temporary container: the replicas' settings with `environment` changed."""

    name: str
    environment: Mapping[str, str]


# The replicas' settings unchanged: what the two others are compared with, one container
# reached directly (the replicas share the machine with the proxy and with each other).
CACHE_ON = Variant("cache-on", {})
NEAR_OFF = Variant("near-off", {"NEAR_CACHE_SIZE": "0"})
CACHE_OFF = Variant("cache-off", {"REDIS_URL": NO_REDIS})


@dataclass(frozen=True)
class Server:
    """Where a workload's requests go (`url`, a 127.0.0.1 port) and the containers that
    answer them. The replicas publish no port, so their /metrics is read inside each one;
    a temporary container's through its published port."""

    name: str
    url: str
    containers: tuple[Container, ...]
    published: bool


@dataclass(frozen=True)
class Resources:
    """CPU time since start and memory in use, summed over a server's containers."""

    cpu_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class Running:
    """The parts of a running stack that `bench` needs."""

    replicas: Server
    postgres: Container
    image: str  # the image id the replicas run


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(client: docker.DockerClient, project: str, service: str) -> list[Container]:
    return [c for c in project_containers(client, project, service) if c.status == "running"]


def find_running(client: docker.DockerClient, stack: Stack) -> Running:
    """The stack's proxy (on the port asked for), replicas and Postgres, all running; or one
    error that says what is missing."""
    proxy = running_proxy(client, stack)
    replicas = [c for c in _running(client, stack.project, SERVICE) if c.labels.get(REPLICA_LABEL)]
    postgres = _running(client, stack.project, "postgres")
    if proxy is None or not replicas or not postgres:
        missing = "proxy" if proxy is None else "replicas" if not replicas else "postgres"
        raise OrchestrateError(
            f"project {stack.project} has no running stack (no {missing}): start it with "
            f"`python -m orchestrate up --project {stack.project}`")
    url = service_url(stack)
    published = published_host_ports(proxy.container)
    if url.rsplit(":", 1)[1] not in {str(p) for p in published}:
        raise OrchestrateError(
            f"project {stack.project}'s proxy publishes 127.0.0.1:"
            f"{','.join(map(str, sorted(published)))}, not {url}: pass that --port")
    _check_ready(url)
    return Running(Server("replicas", url, tuple(replicas), published=False), postgres[0],
                   replicas[0].image.id)


def _check_ready(url: str) -> None:
    """The stack answers /readyz through its port: load on a stack that does not would
    measure errors."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5):
            return
    except urllib.error.HTTPError as exc:
        state = f"HTTP {exc.code}"
    except OSError as exc:
        state = str(getattr(exc, "reason", exc))
    raise OrchestrateError(f"{url}/readyz does not answer 200 ({state}): see "
                           "`python -m orchestrate status`")


def _metrics_text(server: Server, container: Container) -> str:
    if server.published:
        try:
            with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as response:
                return response.read().decode()
        except OSError as exc:
            raise OrchestrateError(f"cannot read {server.url}/metrics: "
                                   f"{getattr(exc, 'reason', exc)}") from None
    result = container.exec_run(["python", "-c", SCRAPE])
    if result.exit_code != 0:
        raise OrchestrateError(f"cannot read {container.name}'s /metrics",
                               result.output.decode(errors="replace").splitlines()[-5:])
    return result.output.decode()


def parse_counters(text: str) -> dict[str, float]:
    """The COUNTERS in a Prometheus exposition (the service's are unlabelled)."""
    found = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


def counters(server: Server) -> dict[str, float]:
    """COUNTERS summed over the server's containers: through the proxy, /metrics would come
    from either replica."""
    total = dict.fromkeys(COUNTERS, 0.0)
    for container in server.containers:
        for name, value in parse_counters(_metrics_text(server, container)).items():
            total[name] += value
    return total


def _container_resources(container: Container) -> Resources:
    """One reading of the stats API; memory as `docker stats` counts it, without the page
    cache the kernel could drop."""
    stats = container.client.api.stats(container.id, stream=False, one_shot=True)
    memory = stats.get("memory_stats") or {}
    detail = memory.get("stats") or {}
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    return Resources(stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9,
                     max(0, memory.get("usage", 0) - cache))


def resources(server: Server) -> Resources:
    readings = [_container_resources(c) for c in server.containers]
    return Resources(sum(r.cpu_seconds for r in readings), sum(r.memory_bytes for r in readings))


def _variant_service(stack: Stack, variant: Variant, port: int) -> Service:
    """The replicas' description with the variant's settings: the same image, secrets and
    hardening, but a name of its own (the proxy finds replicas by the name `service`, so it
    never sends this one a request) and a port on 127.0.0.1 for the load, which Docker
    publishes only from a network that is not internal (the edge network, the proxy's)."""
    replica = stack.service(SERVICE)
    environment = {**dict(replica.environment), **variant.environment}
    return dataclasses.replace(
        replica, name=VARIANT_PREFIX + variant.name, environment=tuple(environment.items()),
        networks=("backend", "edge"), ports=(Port(container=SERVICE_PORT, host=port),),
        replicas=1, update_order="stop-first")


@contextmanager
def variant(client: docker.DockerClient, stack: Stack, running: Running,
            which: Variant) -> Iterator[Server]:
    """A temporary container of `which`, ready on its own port; removed on the way out."""
    port = free_port()
    service = _variant_service(stack, which, port)
    try:
        container = create_container(client, stack, service, running.image, "bench")
        container.start()
        try:
            wait_answering(container, f"http://127.0.0.1:{port}{service.ready_path}")
        except OrchestrateError as exc:  # its logs are in the error already
            raise OrchestrateError(f"{container.name}: {exc.message}", exc.log_lines) from None
        yield Server(which.name, f"http://127.0.0.1:{port}", (container,), published=True)
    finally:
        remove_variants(client, stack)


def remove_variants(client: docker.DockerClient, stack: Stack) -> list[str]:
    """Remove every temporary container of the project (and its staged secret copies); return
    their names. Also what an interrupted run left behind."""
    removed = []
    for container in project_containers(client, stack.project):
        if container.labels.get(SERVICE_LABEL, "").startswith(VARIANT_PREFIX):
            remove(container)
            removed.append(container.name)
    staged = STAGE_ROOT / stack.project
    for directory in staged.glob(f"{VARIANT_PREFIX}*") if staged.is_dir() else ():
        shutil.rmtree(directory)
    return removed
