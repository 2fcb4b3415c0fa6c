"""What `bench` measures: the stack's own replicas behind its proxy, and temporary containers
of the same service image (with the replicas' settings, with the near cache off, with Redis
out of reach), with what each one counted and used while it was driven.

The load reaches them on the stack's frontend network (orchestrate/bench/wrk.py), where a
temporary container answers to its own name: the proxy finds replicas by the name `service`,
so it never sends one a request. A temporary container is the replicas' own description
(orchestrate.stack) with another environment, made by the same create_container, so it is
hardened exactly as they are. It is named and labelled `<project>-bench-<variant>` in the
project, so `down` removes it like any other container; `bench` itself removes it when the
workload is done, or on the way out whatever happened.
"""

from __future__ import annotations

import dataclasses
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import docker
from docker.models.containers import Container

from ..containers import create_container, project_containers, remove, wait_probe
from ..engine import running_proxy, service_context, service_url
from ..errors import OrchestrateError
from ..secretfiles import STAGE_ROOT
from ..stack import REPLICA_LABEL, SERVICE_LABEL, Service, Stack

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
    """Where a workload's requests go (`url`, on the stack's frontend network) and the
    containers that answer them."""

    name: str
    url: str
    containers: tuple[Container, ...]


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


def _running(client: docker.DockerClient, project: str, service: str) -> list[Container]:
    return [c for c in project_containers(client, project, service) if c.status == "running"]


def find_running(client: docker.DockerClient, stack: Stack) -> Running:
    """The stack's proxy, replicas and Postgres, all running and answering; or one error that
    says what is missing."""
    proxy = running_proxy(client, stack)
    replicas = [c for c in _running(client, stack.project, SERVICE) if c.labels.get(REPLICA_LABEL)]
    postgres = _running(client, stack.project, "postgres")
    if proxy is None or not replicas or not postgres:
        missing = "proxy" if proxy is None else "replicas" if not replicas else "postgres"
        raise OrchestrateError(
            f"project {stack.project} has no running stack (no {missing}): start it with "
            f"`python -m orchestrate up --project {stack.project}`")
    _check_ready(stack)
    port = stack.service("proxy").ports[0]
    inside = f"{'https' if port.tls else 'http'}://proxy:{port.container}"
    return Running(Server("replicas", inside, tuple(replicas)), postgres[0], replicas[0].image.id)


def _check_ready(stack: Stack) -> None:
    """The stack answers /readyz through its port: load on a stack that does not would
    measure errors."""
    url = f"{service_url(stack)}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5, context=service_context(stack)):
            return
    except urllib.error.HTTPError as exc:
        state = f"HTTP {exc.code}"
    except OSError as exc:
        state = str(getattr(exc, "reason", exc))
    raise OrchestrateError(f"{url} does not answer 200 ({state}): see "
                           "`python -m orchestrate status`")


def _metrics_text(container: Container) -> str:
    """The container's /metrics, read inside it: the replicas publish no port."""
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
        for name, value in parse_counters(_metrics_text(container)).items():
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


def _variant_service(stack: Stack, variant: Variant) -> Service:
    """The replicas' description with the variant's settings: the same image, secrets, networks
    and hardening, but a name of its own."""
    replica = stack.service(SERVICE)
    environment = {**dict(replica.environment), **variant.environment}
    return dataclasses.replace(
        replica, name=VARIANT_PREFIX + variant.name, environment=tuple(environment.items()),
        replicas=1, update_order="stop-first")


@contextmanager
def variant(client: docker.DockerClient, stack: Stack, running: Running,
            which: Variant) -> Iterator[Server]:
    """A temporary container of `which`, ready; removed on the way out."""
    service = _variant_service(stack, which)
    try:
        container = create_container(client, stack, service, running.image, "bench")
        container.start()
        try:
            wait_probe(container, service.ready_path or "/readyz")
        except OrchestrateError as exc:  # its logs are in the error already
            raise OrchestrateError(f"{container.name}: {exc.message}", exc.log_lines) from None
        yield Server(which.name, f"http://{service.name}:{SERVICE_PORT}", (container,))
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
