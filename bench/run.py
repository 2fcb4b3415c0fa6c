"""Side-by-side wrk benchmark: our service, the Express reference and a constant-JSON baseline.

Usage: python bench/run.py [--duration S] [--rounds N] [--tls-rounds N] [--audit-off-rounds N]
                           [--stream-off-rounds N] [--only hit|miss|create] [--users N]

Starts its own redis-server (no persistence), our service (`python -m service`, default settings,
an API token required as in the stack) and the Express peer on fresh databases of the local
Postgres, seeds both with the same number of users, then drives each workload with wrk (2 threads,
32 connections), alternating rounds of ours / reference / baseline so that drift of the machine
hits all three alike. A second instance of ours, "ours+tls", has TLS on both of its connections
(a TLS-only redis-server with a certificate of a CA made for the run; Postgres with
sslmode=require, which the host's Postgres answers with its own certificate) and runs right after
ours in the first --tls-rounds rounds; a third, "ours-noaudit", has the consistency auditor off
(CACHE_AUDIT_PER_SECOND=0) and runs in the first --audit-off-rounds rounds, to show what the
auditor costs. Ours runs with its change stream (`python -m service stream`), as deployed;
"ours-nostream" is ours with the stream stopped, in the first --stream-off-rounds rounds (the
stream then catches up before the next round), to show what the stream costs. Medians are
reported with the targets (bench/README.md, "Targets").
Every process it starts is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psycopg2
import redis
import requests
from processes import (
    PEER_SOURCE,
    Processes,
    drop_database,
    recreate_database,
    stream_caught_up,
    tree_memory,
)

from orchestrate.bench.wrk import SCRIPT

THREADS, CONNECTIONS = 2, 32
HOT_IDS = 1000
OURS_DB, PEER_DB = "bench", "seedpeer"
# Ours against the reference (and create p99); ours+tls against ours; ours against ours-noaudit
# (hits lose at most 3% with the auditor on); ours against the baseline, hit p99 and memory.
TARGETS = {
    "hit_vs_ref": 3.0, "miss_vs_ref": 1.25, "create_vs_ref": 1.2, "create_p99_ms": 10.0,
    "miss_tls_vs_plain": 0.9, "create_tls_vs_plain": 0.9, "hit_audit_vs_noaudit": 0.97,
    "create_stream_vs_nostream": 0.95, "hit_vs_baseline": 0.8, "hit_p99_ms": 5.0,
    "memory_mb": 150.0,
}
# The host's Postgres offers TLS, and libpq's default (prefer) would take it: ours says which.
PLAIN_DATABASE, TLS_DATABASE = "?sslmode=disable", "?sslmode=require"


@dataclass
class Round:
    """One wrk run: throughput, latency, errors, and cache hits/misses counted while it ran."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cache_hits: int
    cache_misses: int
    used: int
    wraps: int


@dataclass
class Series:
    rounds: list[Round] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.rounds)

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.rounds)

    def hit_ratio(self) -> str:
        hits, misses = self.total("cache_hits"), self.total("cache_misses")
        return f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"


Counters = Callable[[], tuple[int, int]]


def metrics_counters(base: str) -> Counters:
    """Our service's own cache_hits_total / cache_misses_total (summed over its workers)."""
    def read() -> tuple[int, int]:
        values = dict(line.rsplit(" ", 1) for line in requests.get(f"{base}/metrics", timeout=5)
                      .text.splitlines() if line.startswith(("cache_hits_total ",
                                                             "cache_misses_total ")))
        return int(float(values["cache_hits_total"])), int(float(values["cache_misses_total"]))
    return read


def redis_counters(cache: redis.Redis) -> Counters:
    """Redis keyspace hits/misses: the reference does one GET per read, nothing else."""
    def read() -> tuple[int, int]:
        stats = cache.info("stats")
        return stats["keyspace_hits"], stats["keyspace_misses"]
    return read


def no_counters() -> tuple[int, int]:
    return 0, 0


def wrk_argv(base: str, args: list[str], duration: float) -> list[str]:
    """wrk with load.lua (orchestrate/bench), its arguments `args`, for `duration` seconds."""
    return ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency",
            "-s", str(SCRIPT), base, "--", *args]


def wrk(base: str, args: list[str], duration: int, counters: Counters = no_counters) -> Round:
    """Run wrk once; read the figures from the script's BENCH line."""
    before = counters()
    out = subprocess.run(wrk_argv(base, args, duration), capture_output=True, text=True,
                         check=True).stdout
    after = counters()
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    figures = json.loads(line[len("BENCH "):])
    return Round(
        rps=figures["requests"] / (figures["duration_us"] / 1e6),
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=figures["status_errors"] + figures["socket_errors"],
        cache_hits=after[0] - before[0],
        cache_misses=after[1] - before[1],
        used=figures["max_pos"] * THREADS,
        wraps=figures["wraps"],
    )


def write_paths(path: Path, paths: list[str]) -> str:
    path.write_text("\n".join(paths) + "\n")
    return str(path)


def seed(ours_url: str, peer_url: str, users: int, work: Path) -> dict[str, str]:
    """Insert USERS rows in each database; write the path files the wrk script reads."""
    with psycopg2.connect(ours_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (username, email, display_name) SELECT 'user' || g,"
                    " 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, %s) g",
                    (users,))
        cur.execute("SELECT id FROM users ORDER BY id")
        ours = [f"/users/{row[0]}" for row in cur.fetchall()]
    with psycopg2.connect(peer_url) as conn, conn.cursor() as cur:
        cur.execute((PEER_SOURCE / "schema.sql").read_text())
        cur.execute("INSERT INTO users (username, email, password) SELECT 'user' || g,"
                    " 'user' || g || '@example.com', 'secret123' FROM generate_series(1, %s) g",
                    (users,))
        cur.execute("SELECT id FROM users ORDER BY id")
        peer = [f"/query?id={row[0]}" for row in cur.fetchall()]
    for url in (ours_url, peer_url):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE users")
        conn.close()
    return {
        "ours_hot": write_paths(work / "ours_hot.txt", ours[:HOT_IDS]),
        "peer_hot": write_paths(work / "peer_hot.txt", peer[:HOT_IDS]),
        "ours_cold": write_paths(work / "ours_cold.txt", ours[HOT_IDS:]),
        "peer_cold": write_paths(work / "peer_cold.txt", peer[HOT_IDS:]),
        "baseline": write_paths(work / "baseline.txt", ["/healthz"]),
    }


def prewarm(session: requests.Session, base: str, paths_file: str) -> None:
    """Read every hot path once so that the measured round reads them from the cache."""
    for path in Path(paths_file).read_text().split():
        session.get(base + path, timeout=5).raise_for_status()


# Which database and path files each server uses; the variants of ours share its database, so
# their creates get names of their own.
SIDES = {"ours": "ours", "ours+tls": "ours", "ours-noaudit": "ours", "ours-nostream": "ours",
         "reference": "peer"}
CREATE_TAGS = {"ours": "r", "ours+tls": "s", "ours-noaudit": "a", "ours-nostream": "n",
               "reference": "r"}


class Variant(NamedTuple):
    """A variant of ours, reported as a ratio: the key of its targets, its label, and whether
    it is ours with something off (the ratio is then ours to it, else it to ours)."""

    key: str
    label: str
    off: bool


VARIANTS = {"ours+tls": Variant("tls_vs_plain", "ours+tls/ours", off=False),
            "ours-noaudit": Variant("audit_vs_noaudit", "ours/ours-noaudit", off=True),
            "ours-nostream": Variant("stream_vs_nostream", "ours/ours-nostream", off=True)}


@dataclass
class Targets:
    bases: dict[str, str]  # server -> base URL
    counters: dict[str, Counters]
    files: dict[str, str]
    duration: int
    rounds: int
    variant_rounds: dict[str, int]  # variant of ours -> in how many of the first rounds it runs
    headers: dict[str, str]
    # What a server's rounds run inside (ours-nostream: the stream stopped), if anything.
    around: dict[str, Callable[[], contextlib.AbstractContextManager]]
    cold_offset: dict[str, int] = field(default_factory=lambda: {"ours": 0, "peer": 0})

    def _servers(self, number: int) -> list[str]:
        variants = [who for who, rounds in self.variant_rounds.items() if number < rounds]
        return ["ours", *variants, "reference"]

    def _wrk_args(self, name: str, who: str, number: int) -> list[str]:
        side = SIDES[who]
        if name == "hit":
            return ["paths", self.files[f"{side}_hot"], str(THREADS)]
        if name == "miss":  # every server walks on where the last round of its database stopped
            return ["paths", self.files[f"{side}_cold"], str(THREADS), str(self.cold_offset[side])]
        return ["create", side, str(THREADS), f"{CREATE_TAGS[who]}{number}"]

    def scenario(self, name: str) -> dict[str, Series]:
        """Alternate ours / its variants / reference / baseline rounds of one workload."""
        session = requests.Session()
        session.headers.update(self.headers)
        series = {who: Series() for who in [*self._servers(0), "baseline"]}
        for number in range(self.rounds):
            for who in self._servers(number):
                base = self.bases[who]
                if name == "hit":
                    prewarm(session, base, self.files[f"{SIDES[who]}_hot"])
                counted = self.counters[who] if name != "create" else no_counters
                with self.around.get(who, contextlib.nullcontext)():
                    result = wrk(base, self._wrk_args(name, who, number), self.duration,
                                 counted)
                if name == "miss":
                    self.cold_offset[SIDES[who]] += result.used + THREADS
                series[who].rounds.append(result)
                print(f"  {name} round {number + 1} {who:9} {result.rps:9.0f} req/s", flush=True)
            result = wrk(self.bases["ours"], ["paths", self.files["baseline"], str(THREADS)],
                         self.duration)
            series["baseline"].rounds.append(result)
            print(f"  {name} round {number + 1} baseline  {result.rps:9.0f} req/s", flush=True)
        return series


@contextlib.contextmanager
def stream_stopped(processes: Processes, redis_url: str) -> Iterator[None]:
    """Ours without its change stream; afterwards it is started again and catches up, so that
    the next round pays nothing for what this one wrote."""
    processes.stop("stream")
    try:
        yield
    finally:
        processes.start_stream(OURS_DB, redis_url)
        stream_caught_up(OURS_DB, timeout=600)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(results: dict[str, dict[str, Series]], memory: tuple[int, int, int]) -> None:
    print(f"\nwrk -t{THREADS} -c{CONNECTIONS}, median of rounds; "
          "hit% = cache hits while the rounds ran (ours: /metrics, reference: Redis INFO)")
    print(f"{'workload':8} {'server':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'hit%':>7}")
    for name, series in results.items():
        for who, s in series.items():
            print(f"{name:8} {who:10} {s.median('rps'):9.0f} {s.median('p50_ms'):8.2f} "
                  f"{s.median('p99_ms'):8.2f} {s.total('errors'):7d} {s.hit_ratio():>7}")
        if name == "miss" and any(r.wraps for who in ("ours", "reference")
                                  for r in series[who].rounds):
            print(f"{name:8} WARNING: the key space ran out; some reads repeated (raise --users)")
    print("\nratios and targets (bench/README.md, \"Targets\")")
    for name, series in results.items():
        ours, ref, base = (series[k].median("rps") for k in ("ours", "reference", "baseline"))
        target = TARGETS[f"{name}_vs_ref"]
        print(f"{name:8} ours/reference = {ours:.0f}/{ref:.0f} = {ours / ref:.2f}x "
              f"(target >= {target}x: {verdict(ours / ref >= target)})")
        line = f"{name:8} ours/baseline  = {ours:.0f}/{base:.0f} = {ours / base:.2f}x"
        if name == "hit":
            target = TARGETS["hit_vs_baseline"]
            line += f" (target >= {target}x: {verdict(ours / base >= target)})"
        print(line)
        for variant, (key, label, off) in VARIANTS.items():
            if variant not in series:
                continue
            other = series[variant].median("rps")
            ratio = ours / other if off else other / ours
            line = (f"{name:8} {label} = {ratio:.2f}x "
                    f"({len(series[variant].rounds)} round(s) of {variant})")
            target = TARGETS.get(f"{name}_{key}")
            if target:
                line += f" (target >= {target}x: {verdict(ratio >= target)})"
            print(line)
        if name in ("hit", "create"):
            p99 = series["ours"].median("p99_ms")
            limit = TARGETS[f"{name}_p99_ms"]
            print(f"{name:8} ours p99 = {p99:.2f} ms "
                  f"(target <= {limit} ms: {verdict(p99 <= limit)})")
    processes, rss, pss = memory
    mb = rss / 2**20
    print(f"memory   service RSS after the run = {mb:.1f} MB over {processes} processes "
          f"(PSS {pss / 2**20:.1f} MB) (target <= {TARGETS['memory_mb']:.0f} MB: "
          f"{verdict(mb <= TARGETS['memory_mb'])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server and workload")
    parser.add_argument("--only", choices=["hit", "miss", "create"], action="append",
                        help="run only this workload (repeatable)")
    parser.add_argument("--users", type=int, default=300_000, help="users seeded per server")
    parser.add_argument("--tls-rounds", type=int, default=1,
                        help="rounds of each workload that also run ours+tls (default 1; 0: none)")
    parser.add_argument("--audit-off-rounds", type=int, default=1,
                        help="rounds of each workload that also run ours-noaudit (default 1)")
    parser.add_argument("--stream-off-rounds", type=int, default=1,
                        help="rounds of each workload that also run ours-nostream (default 1)")
    parser.add_argument("--peer-dir", type=Path, default=Path("/tmp/express-seed"),
                        help="where the Express peer is (copied and npm-installed if missing)")
    args = parser.parse_args(argv)
    workloads = args.only or ["hit", "miss", "create"]
    with (tempfile.TemporaryDirectory(prefix="cachestack-bench-") as tmp,
          Processes(tmp) as processes):
        work = Path(tmp)
        guarded = {"API_TOKENS_FILE": str(work / "api_tokens")}  # as in the stack
        token = secrets.token_urlsafe(24)
        (work / "api_tokens").write_text(token + "\n")
        os.environ["BENCH_TOKEN_FILE"] = str(work / "api_tokens")  # for wrk's load.lua
        redis_port = processes.start_redis()
        ours_redis = f"redis://127.0.0.1:{redis_port}/0"
        ours_db, peer_db = recreate_database(OURS_DB), recreate_database(PEER_DB)
        try:
            ours, service = processes.start_service(OURS_DB, ours_redis,
                                                    database_options=PLAIN_DATABASE, env=guarded)
            processes.start_stream(OURS_DB, ours_redis)
            peer = processes.start_peer(args.peer_dir, peer_db, f"redis://127.0.0.1:{redis_port}/1")
            bases = {"ours": ours, "reference": peer}
            if args.tls_rounds:
                bases["ours+tls"], _ = processes.start_service(
                    OURS_DB, processes.start_tls_redis(), name="service-tls",
                    database_options=TLS_DATABASE, env=guarded)
            if args.audit_off_rounds:
                bases["ours-noaudit"], _ = processes.start_service(
                    OURS_DB, f"redis://127.0.0.1:{redis_port}/2", name="service-noaudit",
                    database_options=PLAIN_DATABASE,
                    env={**guarded, "CACHE_AUDIT_PER_SECOND": "0"})
            if args.stream_off_rounds:
                bases["ours-nostream"] = ours
            started = time.monotonic()
            files = seed(ours_db, peer_db, args.users, work)
            stream_caught_up(OURS_DB, timeout=600)
            print(f"seeded {args.users} users per server in {time.monotonic() - started:.1f} s; "
                  + ", ".join(f"{who} {base}" for who, base in bases.items()), flush=True)
            counters = {who: metrics_counters(base) for who, base in bases.items()}
            counters["reference"] = redis_counters(redis.Redis(port=redis_port))
            variant_rounds = {"ours+tls": args.tls_rounds, "ours-noaudit": args.audit_off_rounds,
                              "ours-nostream": args.stream_off_rounds}
            targets = Targets(bases, counters, files, args.duration, args.rounds,
                              {who: n for who, n in variant_rounds.items() if who in bases},
                              {"Authorization": f"Bearer {token}"},
                              {"ours-nostream": lambda: stream_stopped(processes, ours_redis)})
            for who, base in bases.items():  # warm up every server, untimed
                if who != "ours-nostream":  # ours itself
                    wrk(base, ["paths", files[f"{SIDES[who]}_hot"], str(THREADS)], 3)
            results = {name: targets.scenario(name) for name in workloads}
            memory = tree_memory(service.pid)
            report(results, memory)
        finally:
            processes.close()
            drop_database(OURS_DB)
            drop_database(PEER_DB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
