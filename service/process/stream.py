"""`python -m service stream`: read the users table's change stream and invalidate the cache
for every committed change, whoever made it (usecases/stream.py); its metrics are served at
http://HOST:PORT/metrics. Run two or more: one reads, the others take over within seconds
when it stops. DATABASE_URL names the stream's role (REPLICATION, and SELECT on users); the
other settings are the service's.

http://HOST:PORT/readyz answers 200 once the reader has taken its turn: it reads the slot (a
new cache epoch begun, if one was due) or found another reader on it; 503 before, and while it
cannot reach Postgres or Redis. What starts the readers waits for that, one reader after the
other, so that nothing is served from a cache a reader is about to begin anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler

from ..cache.policy import UserCache
from ..postgres import statements
from ..postgres.changes import ChangeStream
from ..postgres.pool import Database, DatabaseUnavailable
from ..usecases.stream import StreamReader
from ..wire.client import RedisClient
from . import logs
from .config import ConfigError, Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service stream",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address of the metrics")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9101")),
                        help="port of the metrics (default: PORT, or 9101)")
    return parser.parse_args(argv)


class ReaderState:
    """The reader's state as gauges, taken at each scrape: whether it has the slot, and the
    bytes of WAL not yet confirmed (Postgres's view of the slot, the same from every reader)."""

    def __init__(self, reader: StreamReader, database: Database, slot: str) -> None:
        self.reader, self.database, self.slot = reader, database, slot

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("stream_reading", "1 while this reader has the slot",
                                value=float(self.reader.reading))
        yield GaugeMetricFamily("stream_behind_bytes",
                                "Bytes of WAL the slot's reader has not confirmed yet "
                                "(NaN: no slot, or Postgres does not answer)",
                                value=self._behind())

    def _behind(self) -> float:
        try:
            state = statements.stream_state(self.database, self.slot)
        except DatabaseUnavailable:
            return math.nan
        return float(state[1]) if state else math.nan


def serve(host: str, port: int, reader: StreamReader) -> None:
    """/readyz (see the module's docstring) and the metrics at every other path, from a thread.
    Raises OSError when it cannot listen."""

    class Handler(MetricsHandler):
        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/readyz":
                super().do_GET()
                return
            body = json.dumps({"reading": reader.reading}).encode()
            self.send_response(200 if reader.settled else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    database = Database(settings.postgres, statements.PREPARED, name="cachestack-stream",
                        size=1, counted=False)
    # A near cache of its own would hold nothing: it only deletes.
    cache = UserCache(dataclasses.replace(settings.cache, near_size=0),
                      RedisClient(settings.redis), database)
    reader = StreamReader(ChangeStream(settings.postgres, settings.stream_slot), cache)
    try:
        serve(args.host, args.port, reader)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        code = 2
    else:
        REGISTRY.register(ReaderState(reader, database, settings.stream_slot))
        reader.run(stop)
        code = 0
    cache.close()
    database.close()
    return code
