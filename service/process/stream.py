"""`python -m service stream`: read the users table's change stream and invalidate the cache
for every committed change, whoever made it (usecases/stream.py); its metrics are served at
http://HOST:PORT/metrics. Run two or more: one reads, the others take over within seconds
when it stops. DATABASE_URL names the stream's role (REPLICATION, and SELECT on users); the
other settings are the service's."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading

from prometheus_client import start_http_server

from ..cache.policy import UserCache
from ..postgres import statements
from ..postgres.changes import ChangeStream
from ..postgres.pool import Database
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
    try:
        start_http_server(args.port, args.host)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    database = Database(settings.postgres, statements.PREPARED, name="cachestack-stream",
                        size=1, counted=False)
    # A near cache of its own would hold nothing: it only deletes.
    cache = UserCache(dataclasses.replace(settings.cache, near_size=0),
                      RedisClient(settings.redis), database)
    StreamReader(ChangeStream(settings.postgres, settings.stream_slot), cache).run(stop)
    cache.close()
    database.close()
    return 0
