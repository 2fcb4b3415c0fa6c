"""Hits through the proxy of an `up --ha` stack against the default stack's, in one run: both
stacks up at once (each round has the other's idle load beside it, as run.py's servers have
each other's), rounds alternating, the ratio of the medians (issue 20's target: >= 0.95x).
Before that, the host's CPU with each stack up alone and idle: what the HA members cost a
machine they share.

Usage: python bench/ha_hits.py [--rounds 3] [--duration 8] [--users 200]
Needs wrk on the host, like run.py; the images present (`python -m orchestrate build`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
from processes import free_port
from run import THREADS, wrk
from up_down import timed

from orchestrate.secretfiles import api_token

IDLE_SECONDS = 10


def host_busy(seconds: float) -> float:
    """Percent of the host's CPU time busy over `seconds` (200% on two cores)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait
    total, idle = sample()
    time.sleep(seconds)
    later_total, later_idle = sample()
    return 100 * (os.cpu_count() or 1) * (1 - (later_idle - idle) / (later_total - total))


class Stack:
    """A stack brought up by the orchestrator under a throwaway project, with users of its own."""

    def __init__(self, label: str, *options: str) -> None:
        self.label, self.options = label, options
        self.project, self.port = f"hahits{uuid.uuid4().hex[:6]}", free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        timed("up", "--project", self.project, "--port", str(self.port), *self.options)

    def down(self) -> None:
        timed("down", "--project", self.project, "--volumes")

    def seed(self, users: int, token: str, work: Path) -> str:
        """Create `users` users through the proxy; the file of their paths, for load.lua."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        paths = []
        for number in range(users):
            name = f"{self.project}_{number}"
            reply = session.post(f"{self.base}/users", timeout=10,
                                 json={"username": name, "email": f"{name}@example.org"})
            reply.raise_for_status()
            paths.append(f"/users/{reply.json()['data']['id']}")
        path = work / f"{self.label}.paths"
        path.write_text("\n".join(paths) + "\n")
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk round")
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    stacks = [Stack("default"), Stack("ha", "--ha")]
    for stack in stacks:  # each alone, idle
        try:
            stack.up()
            time.sleep(IDLE_SECONDS)
            print(f"{stack.label:8s} alone and idle: host busy {host_busy(IDLE_SECONDS):.1f}%")
        finally:
            stack.down()
    token = api_token()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        token_file = work / "api_tokens"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        os.environ["BENCH_TOKEN_FILE"] = str(token_file)  # for wrk's load.lua
        try:
            for stack in stacks:
                stack.up()
            paths = {stack.label: stack.seed(args.users, token, work) for stack in stacks}
            rates: dict[str, list[float]] = {stack.label: [] for stack in stacks}
            for number in range(1, args.rounds + 1):
                for stack in stacks:
                    rate = wrk(stack.base, ["paths", paths[stack.label], str(THREADS)],
                               args.duration).rps
                    rates[stack.label].append(rate)
                    print(f"  hit round {number} {stack.label:8s} {rate:8.0f} req/s")
        finally:
            for stack in stacks:
                stack.down()
    default, ha = (statistics.median(rates[label]) for label in ("default", "ha"))
    print(f"hits --ha/default = {ha:.0f}/{default:.0f} = {ha / default:.2f}x (median of "
          f"{args.rounds} rounds each, both stacks up; target >= 0.95x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
