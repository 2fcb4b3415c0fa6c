"""What a new cache epoch costs under load: Redis crashes (or is flushed) while wrk reads a hot
set of users, and every key is cold at once.

Usage: python bench/epoch_change.py [--how kill|flush] [--hot 1000] [--seconds 12]

Starts its own Redis, a fresh database `bench_epoch` and the service with its defaults, seeds
--hot users and reads each once, then runs wrk (as bench/run.py does: 2 threads, 32
connections) over them for --seconds. A third of the way in, Redis is SIGKILLed and started
again (`kill`: a new run id, so a new epoch) or flushed (`flush`: the epoch's key is gone).
It samples the service's counters every SAMPLE_S and prints them as a timeline, then: how long
until reads were answered from the cache again (the first sample with hits, and the first with
99% of reads hits), the misses per second in the second after the event, and the Postgres
misses it cost against the stampede bound (a cold key costs at most two reads of Postgres:
tests/service/test_server.py); reads that bypass the cache while Redis is out of use are
counted apart.

Every process it starts is stopped on the way out, and the database dropped.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import redis
import requests
from processes import Processes, drop_database, recreate_database
from run import THREADS, wrk_argv

DATABASE = "bench_epoch"
SAMPLE_S = 0.25
COUNTERS = ("cache_hits_total", "cache_misses_total", "cache_bypasses_total", "db_queries_total")
STAMPEDE_BOUND = 2  # misses (reads of Postgres) per cold key


def counters(base: str) -> dict[str, float]:
    text = requests.get(f"{base}/metrics", timeout=5).text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in COUNTERS}


def seed(owner_url: str, base: str, hot: int, work: Path) -> str:
    """HOT users, each read once (so cached); the file of their paths for wrk."""
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (username, email) SELECT 'user' || g, 'user' || g || "
                    "'@example.com' FROM generate_series(1, %s) g RETURNING id", (hot,))
        paths = [f"/users/{row[0]}" for row in cur.fetchall()]
    session = requests.Session()
    for path in paths:
        session.get(base + path, timeout=5).raise_for_status()
    (work / "hot.txt").write_text("\n".join(paths) + "\n")
    return str(work / "hot.txt")


def timeline(base: str, seconds: float, event_at: float,
             event: Callable[[], None]) -> tuple[list[tuple[float, dict[str, float]]], float]:
    """Counter samples (seconds since the start, deltas since the last sample) while the load
    runs, `event()` called at `event_at`; and the time the event happened."""
    samples, last = [], counters(base)
    started = time.monotonic()
    happened = None
    while (now := time.monotonic() - started) < seconds:
        if happened is None and now >= event_at:
            event()
            happened = time.monotonic() - started
        time.sleep(SAMPLE_S)
        current = counters(base)
        samples.append((time.monotonic() - started, {k: current[k] - last[k] for k in COUNTERS}))
        last = current
    return samples, happened


def report(samples: list[tuple[float, dict[str, float]]], happened: float, hot: int) -> None:
    print(f"{'t s':>6} {'hits/s':>9} {'misses/s':>9} {'bypass/s':>9} {'queries/s':>9}")
    previous = 0.0
    for at, delta in samples:
        span = at - previous
        previous = at
        mark = "  <- event" if at - SAMPLE_S * 1.5 < happened <= at else ""
        print(f"{at:6.2f} {delta['cache_hits_total'] / span:9.0f} "
              f"{delta['cache_misses_total'] / span:9.0f} "
              f"{delta['cache_bypasses_total'] / span:9.0f} "
              f"{delta['db_queries_total'] / span:9.0f}{mark}")
    after = [(at, d) for at, d in samples if at > happened]
    first_hit = next((at for at, d in after if d["cache_hits_total"] > 0), None)
    settled = next((at for at, d in after if d["cache_hits_total"] >= 0.99 * sum(
        d[k] for k in COUNTERS[:3])), samples[-1][0])
    until = [d for at, d in after if at <= settled]
    total = {k: sum(d[k] for d in until) for k in COUNTERS}
    second = sum(d["cache_misses_total"] for at, d in after if at <= happened + 1 + SAMPLE_S)
    print(f"\nfirst hits {first_hit - happened:.2f} s after the event" if first_hit
          else "\nno hits after the event")
    print(f"99% of reads hits again {settled - happened:.2f} s after it; until then "
          f"{total['cache_misses_total']:.0f} misses ({second:.0f} in the first second), "
          f"{total['cache_bypasses_total']:.0f} bypasses (Redis out of use: Postgres alone) "
          f"and {total['db_queries_total']:.0f} SQL statements for them")
    per_key = total["cache_misses_total"] / hot
    verdict = "met" if per_key <= STAMPEDE_BOUND else "NOT MET"
    print(f"misses per hot key: {per_key:.2f} (stampede bound {STAMPEDE_BOUND}: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--how", choices=("kill", "flush"), default="kill")
    parser.add_argument("--hot", type=int, default=1000, help="users read, all cached")
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cachestack-epoch-") as tmp, \
            Processes(tmp) as processes:
        try:
            owner_url = recreate_database(DATABASE)
            port = processes.start_redis()
            base, _ = processes.start_service(DATABASE, f"redis://127.0.0.1:{port}/0")
            paths = seed(owner_url, base, args.hot, Path(tmp))

            def event() -> None:
                if args.how == "kill":
                    os.kill(processes.pid("redis"), signal.SIGKILL)
                    processes.restart("redis")
                else:
                    redis.Redis(port=port).flushall()

            load = subprocess.Popen(wrk_argv(base, ["paths", paths, str(THREADS)],
                                             args.seconds + 1), stdout=subprocess.DEVNULL)
            try:
                samples, happened = timeline(base, args.seconds, args.seconds / 3, event)
            finally:
                load.wait()
            print(f"{args.hot} hot users under wrk; Redis {args.how} at {happened:.2f} s")
            report(samples, happened, args.hot)
        finally:
            processes.close()
            drop_database(DATABASE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
