"""`python -m orchestrate bench`: a picture of the cache at work, from a running stack.

It drives the stack with wrk and load.lua (-t2 -c32, as bench/run.py does), from a container
on the stack's own network (wrk.py), so the host needs nothing but Docker: reads by id, reads
by email and creates through the proxy, as the stack serves them; and reads by id on one
temporary container of the replicas' image each (see servers.py) with the cache on, the near
cache off and the cache off, so that what each layer of the cache buys is measured like
against like. For each: throughput, p50 and p99, the hit ratio and Postgres queries per
request from the service's own counters, and its CPU and memory.
The table goes to the terminal; build/report/ gets an HTML page, a PNG and the figures as JSON.

Nothing is left running: the temporary containers go when their workload is done, and on
the way out whatever happened (an error, Ctrl-C, SIGTERM). What stays is data, as any
client's would: the users it seeded and created (named `bench_<run>_...`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import signal
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import docker

from .. import images
from ..containers import connect
from ..engine import service_context, service_url
from ..output import say
from ..paths import BUILD
from ..progress import Progress
from ..secretfiles import api_token
from ..stack import IMAGES, Stack
from .measure import WARMUP_S, Result, Workload, measure
from .page import Run, Written, require_matplotlib, table, write
from .seed import Seeded, prewarm, seed
from .servers import (
    CACHE_OFF,
    CACHE_ON,
    NEAR_OFF,
    VARIANT_PREFIX,
    Running,
    Server,
    find_running,
    remove_variants,
    variant,
)
from .wrk import CONNECTIONS, THREADS, Generator, create_args, paths_args, prepare

REPORT_DIR = BUILD / "report"
SEED_USERS = 1000  # as many as bench/run.py's hot set: all fit in every near cache
MAX_SECONDS = 600
VARIANTS = {v.name: v for v in (CACHE_ON, NEAR_OFF, CACHE_OFF)}

__all__ = ["MAX_SECONDS", "bench"]


def workloads(seeded: Seeded, tag: str) -> tuple[Workload, ...]:
    """The stack as deployed (through the proxy), and reads by id on one container each with
    the cache on, the near cache off and the cache off: like against like, so the difference
    is the cache's alone."""
    by_id = paths_args(seeded.by_id)
    return (
        Workload("id", "reads by id (proxy)", "by id\nproxy", "replicas", by_id, True),
        Workload("id-cache-on", "reads by id, cache on (1 container)", "by id\ncache on",
                 CACHE_ON.name, by_id, True),
        Workload("id-near-off", "reads by id, near cache off (1 container)",
                 "by id\nnear off", NEAR_OFF.name, by_id, True),
        Workload("id-cache-off", "reads by id, cache off (1 container)", "by id\ncache off",
                 CACHE_OFF.name, by_id, True),
        Workload("email", "reads by email (proxy)", "by email\nproxy", "replicas",
                 paths_args(seeded.by_email), True),
        Workload("create", "creates (proxy)", "creates\nproxy", "replicas", create_args(tag),
                 False),
    )


def _load_seconds(plan: tuple[Workload, ...], seconds: int) -> float:
    return sum(seconds + (min(WARMUP_S, seconds) if w.reads else 0) for w in plan)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _terminate_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the temporary containers are removed either way."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _clean_up(client: docker.DockerClient, stack: Stack) -> None:
    """Remove the temporary containers; a second Ctrl-C does not cut this short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        remove_variants(client, stack)
    finally:
        signal.signal(signal.SIGINT, previous)


def _server(client: docker.DockerClient, stack: Stack, running: Running, workload: Workload,
            progress: Progress) -> AbstractContextManager[Server]:
    if workload.server == running.replicas.name:
        return nullcontext(running.replicas)
    progress.note(f"starting {stack.container_name(VARIANT_PREFIX + workload.server)}")
    return variant(client, stack, running, VARIANTS[workload.server])


def _run(load: Generator, running: Running, seconds: int, token: str
         ) -> tuple[Seeded, list[Result]]:
    tag = secrets.token_hex(3)
    seeded = seed(running.postgres, tag, SEED_USERS, load.work)
    prepare(load.work)
    plan = workloads(seeded, tag)
    for paths in (seeded.by_id, seeded.by_email):
        prewarm(service_url(load.stack), service_context(load.stack), load.work / paths, token)
    results = []
    with Progress(_load_seconds(plan, seconds), "s") as progress:
        progress.note(f"seeded {seeded.count} users and read each by id and by email; "
                      f"{len(plan)} workloads of {seconds} s, wrk -t{THREADS} -c{CONNECTIONS}")
        for workload in plan:
            with _server(load.client, load.stack, running, workload, progress) as server:
                results.append(measure(load, server, workload, seconds, progress))
    return seeded, results


def bench(stack: Stack, images_mode: str, seconds: int) -> Written:
    """Measure every workload on the running `stack`, print the table, write the report; the
    load generator's image is built in `images_mode`, as the stack's were."""
    require_matplotlib()
    client = connect()
    running = find_running(client, stack)
    image = images.resolve_images(client, dataclasses.replace(stack, images={"wrk": IMAGES["wrk"]}),
                                  images_mode)["wrk"]
    token = api_token()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with _terminate_interrupts(), tempfile.TemporaryDirectory(prefix="cachestack-bench-") as tmp:
        for name in remove_variants(client, stack):
            say(f"removed {name}, left by an interrupted run")
        try:
            seeded, results = _run(Generator(client, stack, image, Path(tmp)), running, seconds,
                                   token)
        finally:
            _clean_up(client, stack)
    for line in table(results):
        say(line)
    return write(results, Run(
        project=stack.project, replicas=len(running.replicas.containers), seconds=seconds,
        users=seeded.count, cores=os.cpu_count() or 1, taken_at=started,
        command=f"python -m orchestrate bench --project {stack.project} --seconds {seconds}",
        wrk=f"wrk -t{THREADS} -c{CONNECTIONS}"), REPORT_DIR)
