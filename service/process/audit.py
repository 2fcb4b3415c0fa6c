"""`python -m service audit`: one full consistency pass over every key the cache holds
(cache/audit.py's full_pass), in paced batches, from outside the serving processes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from ..cache import policy
from ..cache.audit import BATCH, BATCH_PAUSE_SECONDS, KINDS, Auditor, full_pass, own_database
from ..cache.policy import CacheUnavailable, UserCache
from ..postgres.pool import DatabaseUnavailable
from ..wire.client import RedisClient
from . import logs
from .config import ConfigError, Settings


def main(argv: list[str]) -> int:
    """`python -m service audit`: one full pass; exit 1 if it found any inconsistency (with
    --json, progress and the counts as JSON lines, and 0 whenever the pass completed)."""
    parser = argparse.ArgumentParser(prog="python -m service audit",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true",
                        help='JSON lines: {"done", "total"} after each batch, then {"found"}')
    parser.add_argument("--batch", type=int, default=BATCH, help="keys per batch (default 100)")
    parser.add_argument("--pause", type=float, default=BATCH_PAUSE_SECONDS,
                        help="seconds between batches (default 0.2)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        if args.json:
            print(json.dumps({"done": done, "total": total}), flush=True)

    logs.configure()  # each repair is one line on stderr, by key
    # An unreachable Redis is this command's one error line, not the service's warning.
    logging.getLogger(policy.__name__).setLevel(logging.ERROR)
    database = own_database(settings.postgres)
    # A near cache of its own would have nothing in it to check.
    cache = dataclasses.replace(settings.cache, near_size=0)
    auditor = Auditor(UserCache(cache, RedisClient(settings.redis), database), database)
    try:
        found = full_pass(auditor, progress, max(1, args.batch), max(0.0, args.pause))
    except (CacheUnavailable, DatabaseUnavailable) as exc:
        print(f"error: the audit could not finish: {exc}", file=sys.stderr)
        return 2
    finally:
        database.close()
    if args.json:
        print(json.dumps({"found": dict(found)}), flush=True)
        return 0
    print(", ".join(f"{kind} {found[kind]}" for kind in KINDS))
    return 1 if sum(found.values()) else 0
