"""Replicas of a start-first service, replaced one at a time without failing a request.

For each replica that is out of date (another image or setting) or missing: start a new one,
wait until it is ready and the proxy sends it requests, then take an old one out: the proxy
drains it (no new requests; the ones it has are answered), it gets SIGTERM and exits, and its
proxy slot is made ready for the next replica. Without a running proxy (the stack's first
`up`) replicas are started and stopped directly. Replica numbers only grow, so a new replica
never takes an old one's name.
"""

from __future__ import annotations

import time

import docker
from docker.models.containers import Container

from .containers import (
    config_hash,
    create_container,
    project_containers,
    remove,
    verify_secrets,
    wait_probe,
)
from .output import say
from .proxy import Proxy
from .stack import CONFIG_HASH_LABEL, REPLICA_LABEL, Service, Stack

# How long a replica may take to answer what it has after SIGTERM (granian finishes the
# requests in flight, then exits); Docker kills it after that.
STOP_GRACE_S = 30


def replicas(client: docker.DockerClient, stack: Stack, service: Service) -> list[Container]:
    """The service's containers, oldest replica first."""
    found = project_containers(client, stack.project, service.name)
    return sorted(found, key=lambda c: int(c.labels.get(REPLICA_LABEL, 0)))


def address(container: Container, stack: Stack) -> str:
    """The replica's address on the network the proxy reaches it on (what HAProxy knows it by)."""
    container.reload()
    networks = container.attrs["NetworkSettings"]["Networks"]
    return networks[stack.resource_name("frontend")]["IPAddress"]


def start(client: docker.DockerClient, stack: Stack, service: Service, image_ref: str,
          digest: str, number: int, proxy: Proxy | None) -> Container:
    container = create_container(client, stack, service, image_ref, digest, replica=number)
    container.start()
    wait_probe(container, service.ready_path or "/healthz")
    verify_secrets(container, service)
    if proxy:
        proxy.wait_serving(address(container, stack))
    say(f"{container.name}: in service ({container.short_id}, {image_ref})")
    return container


def retire(container: Container, stack: Stack, proxy: Proxy | None) -> None:
    """Take a replica out of service without cutting a request off, then remove it."""
    container.reload()
    ip = address(container, stack) if container.status == "running" else ""
    slot = proxy.drain(ip) if proxy and ip else None
    started = time.monotonic()
    container.stop(timeout=STOP_GRACE_S)
    remove(container)
    if proxy and slot:
        proxy.release(slot, ip)
    say(f"{container.name}: drained and stopped in {time.monotonic() - started:.1f}s")


def roll_out(client: docker.DockerClient, stack: Stack, service: Service, image_ref: str,
             proxy: Proxy | None) -> list[Container]:
    """Make the service's replicas `service.replicas` up-to-date ones; return them."""
    digest = config_hash(stack, service, client.images.get(image_ref).id)
    current = replicas(client, stack, service)
    fresh = [c for c in current if c.labels.get(CONFIG_HASH_LABEL) == digest]
    stale = [c for c in current if c not in fresh]
    for container in fresh:
        if container.status != "running":  # stopped (a restore) or crashed
            container.start()
            wait_probe(container, service.ready_path or "/healthz")
            if proxy:
                proxy.wait_serving(address(container, stack))
    number = max((int(c.labels.get(REPLICA_LABEL, 0)) for c in current), default=0)
    while len(fresh) < service.replicas or stale:
        if len(fresh) < service.replicas:
            number += 1
            fresh.append(start(client, stack, service, image_ref, digest, number, proxy))
        if stale:
            retire(stale.pop(0), stack, proxy)
    while len(fresh) > service.replicas:
        retire(fresh.pop(), stack, proxy)
    for container in fresh:
        say(f"{container.name}: up to date ({container.short_id})")
    return fresh
