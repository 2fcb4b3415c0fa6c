"""The change stream's lag: from a commit made behind the service's back to a read that sees it.

Usage: python bench/stream_lag.py [--users 20000] [--seconds 10] [--rates 100,2000]
                                  [--backlog 200000]

Starts its own Redis, a fresh database `bench_stream`, the service and its change stream
(`python -m service stream`), seeds --users users and reads each once through the service, so
that Redis holds them all. Then:

1. For each rate: writer threads update random users by plain SQL at that rate for --seconds
   while PROBES probe threads each, in turn, read a user of their own (cached), change its
   display name by plain SQL and read it through the service every POLL_S until the answer
   has the new name. The lag is the time from the commit's acknowledgement to the start of
   that read; p50 and p99 over every probe.
2. The rate the consumer sustains: with the stream stopped, --backlog row changes are
   committed (1,000 rows a statement); the stream is started again and reads them; the rate
   is the rows over the time from its taking the slot to its confirming the last commit.

Every process it starts is stopped on the way out, and the database dropped.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import tempfile
import threading
import time

import psycopg2
import requests
from background import Background
from processes import Processes, drop_database, recreate_database, stream_caught_up

DATABASE = "bench_stream"
WRITERS = 4  # threads sharing a rate's updates (one commit each)
PROBES = 2
POLL_S = 0.001
BATCH_ROWS = 1000  # rows a backlog statement changes


def seed(owner_url: str, base: str, users: int) -> list[int]:
    """USERS rows, each read once through the service (so cached); their ids."""
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (username, email, display_name) SELECT 'user' || g,"
                    " 'user' || g || '@example.com', 'User ' || g FROM generate_series(1, %s) g",
                    (users,))
        cur.execute("SELECT id FROM users ORDER BY id")
        ids = [row[0] for row in cur.fetchall()]
    session = requests.Session()
    for user_id in ids:
        session.get(f"{base}/users/{user_id}", timeout=5).raise_for_status()
    return ids


class Updates(Background):
    """WRITERS threads updating random users of `ids` by plain SQL, `rate` a second in all."""

    def __init__(self, owner_url: str, ids: list[int], rate: float) -> None:
        self.owner_url, self.ids, self.rate = owner_url, ids, rate
        self.done = 0
        self._lock = threading.Lock()
        super().__init__(functools.partial(self._run, n) for n in range(WRITERS))

    def __enter__(self) -> Updates:
        self.started = time.monotonic()
        return super().__enter__()

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self.seconds = time.monotonic() - self.started

    def _run(self, number: int) -> None:
        conn = psycopg2.connect(self.owner_url)
        conn.autocommit = True
        every = WRITERS / self.rate
        due = self.started + number * every / WRITERS
        try:
            with conn.cursor() as cur:
                for n in itertools.count():
                    if self.stop.wait(max(0.0, due - time.monotonic())):
                        return
                    cur.execute("UPDATE users SET display_name = %s WHERE id = %s",
                                (f"w{number}-{n}", self.ids[(n * WRITERS + number) * 7919
                                                            % len(self.ids)]))
                    with self._lock:
                        self.done += 1
                    due += every
        finally:
            conn.close()


def probe(owner_url: str, base: str, ids: list[int], until: float, lags: list[float]) -> None:
    """Change each of `ids` in turn by plain SQL and time until a read through the service
    sees it, until `until`."""
    conn = psycopg2.connect(owner_url)
    conn.autocommit = True
    session = requests.Session()
    try:
        with conn.cursor() as cur:
            for n, user_id in enumerate(itertools.cycle(ids)):
                if time.monotonic() > until:
                    return
                url, name = f"{base}/users/{user_id}", f"probe-{n}"
                session.get(url, timeout=5).raise_for_status()  # cached, in Redis and near
                cur.execute("UPDATE users SET display_name = %s WHERE id = %s", (name, user_id))
                committed = time.monotonic()
                while True:
                    started = time.monotonic()
                    if session.get(url, timeout=5).json()["data"]["display_name"] == name:
                        lags.append(started - committed)
                        break
                    time.sleep(POLL_S)
    finally:
        conn.close()


def lag_at(owner_url: str, base: str, ids: list[int], rate: float, seconds: float) -> str:
    """Probe the lag while Updates run at `rate`; a line of figures."""
    probed, updated = ids[:PROBES * 50], ids[PROBES * 50:]
    lags: list[float] = []
    with Updates(owner_url, updated, rate) as updates:
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=probe, args=(owner_url, base,
                                                       probed[n::PROBES], until, lags))
                   for n in range(PROBES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    cuts = statistics.quantiles(lags, n=100)
    return (f"rate {rate:6.0f}/s (made {updates.done / updates.seconds:6.0f}/s): lag p50 "
            f"{1000 * statistics.median(lags):6.1f} ms, p99 {1000 * cuts[98]:6.1f} ms, "
            f"max {1000 * max(lags):6.1f} ms over {len(lags)} probes")


def sustained(processes: Processes, owner_url: str, redis_url: str, ids: list[int],
              rows: int) -> str:
    """Commit `rows` row changes with the stream stopped, then time its catching up."""
    processes.stop("stream")
    made = time.monotonic()
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        conn.autocommit = True
        first, last = ids[0], ids[-1]
        for n in range(-(-rows // BATCH_ROWS)):
            low = first + (n * BATCH_ROWS) % (last - first + 1 - BATCH_ROWS)
            cur.execute("UPDATE users SET display_name = %s WHERE id BETWEEN %s AND %s",
                        (f"backlog-{n}", low, low + BATCH_ROWS - 1))
    made = time.monotonic() - made
    processes.start_stream(DATABASE, redis_url)
    seconds = stream_caught_up(DATABASE, timeout=600)
    return (f"backlog of {rows} row changes (committed in {made:.1f} s): read in "
            f"{seconds:.2f} s = {rows / seconds:.0f} row changes/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per rate")
    parser.add_argument("--rates", default="100,2000", help="outside updates a second")
    parser.add_argument("--backlog", type=int, default=200_000, help="row changes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cachestack-stream-") as tmp, \
            Processes(tmp) as processes:
        try:
            owner_url = recreate_database(DATABASE)
            redis_url = f"redis://127.0.0.1:{processes.start_redis()}/0"
            base, _ = processes.start_service(DATABASE, redis_url)
            processes.start_stream(DATABASE, redis_url)
            ids = seed(owner_url, base, args.users)
            print(f"{args.users} users seeded and cached; service {base}", flush=True)
            for rate in (float(r) for r in args.rates.split(",")):
                print(lag_at(owner_url, base, ids, rate, args.seconds), flush=True)
                stream_caught_up(DATABASE)
            print(sustained(processes, owner_url, redis_url, ids, args.backlog), flush=True)
        finally:
            processes.close()
            drop_database(DATABASE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
