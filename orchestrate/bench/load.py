"""The load: users to read, seeded straight into Postgres, and wrk driving bench/wrk/load.lua,
the script every benchmark of this repository uses, so these figures compare with
bench/README.md's.

Seeding goes through `docker exec psql` as the superuser in the Postgres container, as the
tests do: a thousand inserts in one statement, where the API would take a thousand requests.
The rows are new, so no cache holds anything about them yet. They stay, as the users the
create workload makes do: their names begin with `bench_<run>_`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from docker.models.containers import Container

from ..errors import OrchestrateError
from ..secretfiles import ROOT
from ..stack import DB_NAME
from .progress import Progress

LUA = ROOT / "bench" / "wrk" / "load.lua"
THREADS, CONNECTIONS = 2, 32  # as bench/run.py drives the service
POLL_S = 0.25


@dataclass(frozen=True)
class Seeded:
    """The users seeded for the reads, as the path files load.lua's `paths` mode reads."""

    count: int
    by_id: Path
    by_email: Path


@dataclass(frozen=True)
class Wrk:
    """What wrk measured in one run (load.lua's BENCH line)."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers and socket errors

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def require_wrk() -> None:
    """Fail before anything starts when wrk or its script is missing."""
    if shutil.which("wrk") is None:
        raise OrchestrateError("wrk is not installed: `apt-get install -y wrk`")
    if not LUA.is_file():
        raise OrchestrateError(f"{LUA} is missing: run bench from a checkout of the repository")


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
    by_id, by_email = work / "by_id.txt", work / "by_email.txt"
    by_id.write_text("".join(f"/users/{user_id}\n" for user_id, _ in rows))
    by_email.write_text("".join(f"/users?email={email}\n" for _, email in rows))
    return Seeded(len(rows), by_id, by_email)


def prewarm(url: str, paths: Path, token: str) -> int:
    """GET every path once, one after the other on one connection, so that Redis holds every
    user before any measured run: a timed warm-up on a stack that just started may not get
    through them all. Returns how many were read."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
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


def paths_args(paths: Path) -> tuple[str, ...]:
    """load.lua's `paths` mode: each thread walks its share of the file, round and round."""
    return ("paths", str(paths), str(THREADS))


def create_args(tag: str) -> tuple[str, ...]:
    """load.lua's `create` mode: a user with a new username and email on every request."""
    return ("create", "ours", str(THREADS), f"bench_{tag}_c")


def parse(output: str) -> Wrk:
    """load.lua's BENCH line (its done() writes the figures as JSON)."""
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise OrchestrateError("wrk printed no figures", output.strip().splitlines()[-5:])
    figures = json.loads(line.removeprefix("BENCH "))
    return Wrk(requests=figures["requests"], seconds=figures["duration_us"] / 1e6,
               p50_ms=figures["p50_us"] / 1000, p99_ms=figures["p99_us"] / 1000,
               errors=figures["status_errors"] + figures["socket_errors"])


def wrk(url: str, args: tuple[str, ...], seconds: int, token: str, progress: Progress,
        label: str) -> Wrk:
    """Drive `url` for `seconds` with wrk and load.lua, redrawing the progress as it runs.
    The token goes to load.lua in its environment, never on a command line."""
    command = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
               "-s", str(LUA), url, "--", *args]
    env = {**os.environ, "BENCH_AUTHORIZATION": f"Bearer {token}"}
    progress.start(label, seconds)
    started = time.monotonic()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True) as proc:
        try:
            while proc.poll() is None:
                progress.show(label, time.monotonic() - started, seconds)
                time.sleep(POLL_S)
            out, err = proc.communicate()
        finally:
            if proc.poll() is None:  # interrupted: wrk goes with us
                proc.kill()
    progress.finish(label, seconds)
    if proc.returncode != 0:
        raise OrchestrateError(f"wrk exited {proc.returncode} on {url}",
                               (err or out).strip().splitlines()[-5:])
    return parse(out)
