"""The users `bench` reads: seeded straight into Postgres, written as the files of paths that
load.lua's `paths` mode reads, and read once each through the stack's port before any measured
run.

Seeding goes through `docker exec psql` as the superuser in the Postgres container, as the
tests do: a thousand inserts in one statement, where the API would take a thousand requests.
The rows are new, so no cache holds anything about them yet. They stay, as the users the
create workload makes do: their names begin with `bench_<run>_`.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from docker.models.containers import Container

from ..errors import OrchestrateError
from ..stack import DB_NAME


@dataclass(frozen=True)
class Seeded:
    """The users seeded for the reads: how many, and the names of the files (in the run's
    folder) of the paths that read them by id and by email."""

    count: int
    by_id: str
    by_email: str


def seed(postgres: Container, tag: str, count: int, work: Path) -> Seeded:
    """Insert `count` users named after `tag`; write the paths to read them by id and email."""
    sql = (f"INSERT INTO users (username, email, display_name) SELECT 'bench_{tag}_' || g, "
           f"'bench_{tag}_' || g || '@example.org', 'Bench ' || g "
           f"FROM generate_series(1, {int(count)}) g RETURNING id, email")
    result = postgres.exec_run(["psql", "-U", "postgres", "-d", DB_NAME, "-qtAc", sql],
                               user=postgres.attrs["Config"]["User"])
    output = result.output.decode(errors="replace")
    if result.exit_code != 0:
        raise OrchestrateError(f"seeding users failed: {output.strip()[-300:]}")
    rows = [line.split("|") for line in output.splitlines() if "|" in line]
    seeded = Seeded(len(rows), "by_id.txt", "by_email.txt")
    (work / seeded.by_id).write_text("".join(f"/users/{user_id}\n" for user_id, _ in rows))
    (work / seeded.by_email).write_text("".join(f"/users?email={email}\n" for _, email in rows))
    return seeded


def prewarm(url: str, context: ssl.SSLContext | None, paths: Path, token: str) -> int:
    """GET every path once through `url` (the stack's port; an https one trusted with
    `context`), one after the other on one connection, so that Redis holds every user before
    any measured run: a timed warm-up on a stack that just started may not get through them
    all. Returns how many were read."""
    parts = urlsplit(url)
    connection = (http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                              context=context) if parts.scheme == "https"
                  else http.client.HTTPConnection(parts.hostname, parts.port, timeout=10))
    headers = {"Authorization": f"Bearer {token}"}
    count = 0
    try:
        for path in paths.read_text().split():
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise OrchestrateError(f"GET {path} answered {response.status} while warming up")
            count += 1
    except (OSError, http.client.HTTPException) as exc:
        raise OrchestrateError(f"{url} stopped answering while warming up: {exc}") from None
    finally:
        connection.close()
    return count
