"""`python -m service migrate`: bring the schema up to date and set the service role's rights.

Run as the database's owner, before the service starts (the service itself runs no DDL), with
the service's own settings: DATABASE_URL and DATABASE_PASSWORD (or their _FILE forms) name the
owner, DATABASE_APP_ROLE the role the service runs as. It waits for Postgres up to --wait
seconds, so it may start together with it. Idempotent: a second run applies nothing and sets
the same rights. Exit status 0 with one summary line on stdout; 1 with one `error:` line on
stderr when Postgres does not answer in time or refuses; 2 for bad settings.
"""

from __future__ import annotations

import argparse
import sys
import time

import psycopg2
import psycopg2.extensions

from ..postgres import schema
from ..postgres.pool import first_line
from .config import ConfigError, Settings

RETRY_SECONDS = 0.5


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service migrate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for Postgres to answer (default 60)")
    return parser.parse_args(argv)


def connect(settings: Settings, wait: float) -> psycopg2.extensions.connection:
    """A connection as the owner, retried until `wait` seconds have passed. Says once that
    it waits, and why (a wrong password shows at once, not after the wait)."""
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        try:
            return psycopg2.connect(settings.postgres.url, application_name="cachestack-migrate",
                                    connect_timeout=settings.postgres.connect_timeout)
        except psycopg2.OperationalError as exc:
            reason = first_line(exc)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionError(f"could not connect to postgres within {wait:g} s: {reason}")
        if not waiting:
            print(f"waiting up to {wait:g} s for postgres: {reason}", file=sys.stderr, flush=True)
            waiting = True
        time.sleep(min(RETRY_SECONDS, remaining))


def run(settings: Settings, wait: float) -> str:
    """Migrate and grant; returns the summary line."""
    conn = connect(settings, wait)
    try:
        applied = schema.migrate(conn, settings.app_role, settings.stream_role)
    finally:
        conn.close()
    done = f"applied {', '.join(applied)}" if applied else "nothing to apply"
    return (f"schema up to date ({done}); {settings.app_role} may use "
            f"{', '.join(schema.GRANTS)} and nothing else")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        print(run(Settings.from_env(), args.wait))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, schema.MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except psycopg2.Error as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 1
    return 0
