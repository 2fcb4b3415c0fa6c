"""One workload measured on one server: wrk's throughput and latency, and over the same window
the deltas of the service's own counters and of its containers' CPU time, so that the hit
ratio and the queries per request are what the service did for exactly that load."""

from __future__ import annotations

from dataclasses import dataclass

from ..progress import Progress
from .servers import Server, counters, resources
from .wrk import Generator, Wrk

WARMUP_S = 2  # the near caches filled, connections open, before the measured run


@dataclass(frozen=True)
class Workload:
    """What to send (load.lua's arguments) to which server (`server`: a Server's name)."""

    key: str
    title: str
    label: str  # the title in two short lines, under a bar of the plot
    server: str
    args: tuple[str, ...]
    reads: bool  # reads have a hit ratio; creates do not


@dataclass(frozen=True)
class Result:
    """A workload's figures: wrk's, and what the server's containers counted and used."""

    workload: Workload
    load: Wrk
    hits: int
    misses: int
    bypasses: int
    queries: int
    cpu_seconds: float
    memory_mib: float

    @property
    def reads(self) -> int:
        return self.hits + self.misses + self.bypasses

    @property
    def hit_ratio(self) -> float | None:
        """Hits (near cache or Redis) per read the service counted; None for creates."""
        return self.hits / self.reads if self.workload.reads and self.reads else None

    @property
    def bypass_ratio(self) -> float | None:
        """Reads answered by Postgres alone, Redis out of reach (or the breaker open)."""
        return self.bypasses / self.reads if self.workload.reads and self.reads else None

    @property
    def queries_per_request(self) -> float:
        return self.queries / self.load.requests if self.load.requests else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_seconds / self.load.requests if self.load.requests else 0.0

    def as_dict(self) -> dict[str, object]:
        """The figures as plain data, for the JSON beside the page."""
        return {
            "workload": self.workload.key, "title": self.workload.title,
            "server": self.workload.server, "requests": self.load.requests,
            "seconds": round(self.load.seconds, 3), "rps": round(self.load.rps, 1),
            "p50_ms": self.load.p50_ms, "p99_ms": self.load.p99_ms,
            "errors": self.load.errors, "hits": self.hits, "misses": self.misses,
            "bypasses": self.bypasses, "queries": self.queries,
            "hit_ratio": self.hit_ratio, "bypass_ratio": self.bypass_ratio,
            "queries_per_request": self.queries_per_request,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_ms_per_request": self.cpu_ms_per_request, "memory_mib": self.memory_mib,
        }


def measure(load: Generator, server: Server, workload: Workload, seconds: int,
            progress: Progress) -> Result:
    """Warm up (reads only), then one measured wrk run. The counters are read first and last
    and the CPU time just inside them: reading /metrics inside a container runs a process
    there, whose CPU time stays out of the window, and it counts no cache or database work."""
    if workload.reads:
        load.run(server.url, workload.args, min(WARMUP_S, seconds), progress,
                 f"{workload.title}: warm-up")
    counted = counters(server)
    used = resources(server)
    figures = load.run(server.url, workload.args, seconds, progress, workload.title)
    used_after = resources(server)
    counted_after = counters(server)

    def delta(name: str) -> int:
        return round(counted_after[name] - counted[name])

    return Result(
        workload=workload, load=figures, hits=delta("cache_hits_total"),
        misses=delta("cache_misses_total"), bypasses=delta("cache_bypasses_total"),
        queries=delta("db_queries_total"),
        cpu_seconds=used_after.cpu_seconds - used.cpu_seconds,
        memory_mib=used_after.memory_bytes / 2**20,
    )
