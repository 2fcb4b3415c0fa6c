"""Faults of a running stack's Redis, under load through its proxy, every read judged as the
consistency checker judges it (consistency.py), and what each fault costs: how long until reads
are HITs again, and how many misses the cold cache of the new epoch costs per key.

    python -m bench.stack_faults --project P --mode MODE [--operations 20000] [--clients 32]
                                 [--seed 1] [--users 1000] [--no-judge] [--no-cost]

MODE, on the stack of `python -m orchestrate up`:
  redis-kill        SIGKILL of Redis's main process; the container's restart policy brings it
                    back (empty: a new epoch)
  redis-pause       SIGSTOP of Redis for longer than the service's command timeout, then SIGCONT
and on the stack of `up --ha`:
  primary-kill      SIGKILL of the primary (its restart policy brings it back: as the primary
                    again, or as the replica of the one the Sentinels promoted meanwhile)
  primary-pause     SIGSTOP of the primary until the Sentinels have promoted its replica, then
                    SIGCONT (they make it a replica)
  replica-kill      SIGKILL of the replica
  sentinel-kill     one Sentinel killed for the whole run (`docker kill`: it stays down), the
                    primary killed as in primary-kill: the other two still fail it over
  two-sentinels-kill  two Sentinels killed for the run, the primary killed: no failover without
                    a quorum, and the service keeps answering

The judged run repeats the fault every 2 s while the checker's clients race (exit 1 on a stale
read or a failed request: BYPASS is an answer). The cost is measured apart, around one fault:
readers read the same users by id for a while before and after it, and it reports when the
first HIT came after the fault, when the last BYPASS was, and the MISSes per user and per
second from then on (each a query of Postgres: a lease holds a stampede on one user to one).
Importable: `judge(...)` and `cost(...)`, which the stack tests run at CI size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import docker
import requests

from bench.background import Background
from bench.consistency import Faults, Report, container_pid, run_checker
from orchestrate import record, sentinels
from orchestrate.engine import service_url
from orchestrate.secretfiles import api_token
from orchestrate.stack import REDIS_SERVERS, SENTINELS, Stack

SINGLE_MODES = ("redis-kill", "redis-pause")
HA_MODES = ("primary-kill", "primary-pause", "replica-kill", "sentinel-kill",
            "two-sentinels-kill")
FAILOVER_WITHIN = 30.0  # seconds: the Sentinels' down-after, an election, and a retry
READERS = 8


@dataclass
class Target:
    """A running stack and how to reach its API and containers."""

    stack: Stack
    client: docker.DockerClient = field(default_factory=lambda: docker.from_env(version="auto"))

    @classmethod
    def of(cls, project: str) -> Target:
        client = docker.from_env(version="auto")
        settings = record.read(client, project)
        if settings is None:
            raise SystemExit(f"project {project} has no record: bring it up with "
                             "`python -m orchestrate up`")
        return cls(settings.stack(project), client)

    @property
    def url(self) -> str:
        return service_url(self.stack)

    @property
    def ha(self) -> bool:
        return any(s.name in REDIS_SERVERS for s in self.stack.services)

    def container(self, name: str) -> str:
        return self.stack.container_name(name)

    def primary(self) -> str:
        return sentinels.primary(self.client, self.stack)

    def replica(self) -> str:
        return next(name for name in REDIS_SERVERS if name != self.primary())

    def pid_of(self, server: Callable[[], str]) -> Callable[[], int]:
        """The process id of the server `server()` names, asked anew at each fault."""
        return lambda: container_pid(self.container(server()))()

    def failed_over(self) -> Callable[[], None]:
        """Wait until the Sentinels name another primary than the one they name now."""
        before = self.primary()

        def wait() -> None:
            deadline = time.monotonic() + FAILOVER_WITHIN
            while self.named_primary() in (before, None) and time.monotonic() < deadline:
                time.sleep(0.2)

        return wait

    def named_primary(self) -> str | None:
        """The primary the Sentinels name; None while none answers."""
        try:
            return self.primary()
        except Exception:  # noqa: BLE001 - a Sentinel busy with the failover: ask again
            return None


def faults(target: Target, mode: str) -> Faults:
    """The faults of `mode` (module doc), repeated while the checker runs."""
    if mode == "redis-kill":
        return Faults("kill", container_pid(target.container("redis")))
    if mode == "redis-pause":
        return Faults("pause", container_pid(target.container("redis")))
    if mode == "primary-pause":
        return PauseUntilFailover(target)
    if mode == "replica-kill":
        return Faults("kill", target.pid_of(target.replica))
    return Faults("kill", target.pid_of(target.primary))  # primary-kill, *sentinel*-kill


class PauseUntilFailover(Faults):
    """SIGSTOP of the primary until the Sentinels name another, then SIGCONT."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._wait: Callable[[], None] = lambda: None
        super().__init__("pause", self._pause_primary, resume=lambda: self._wait())

    def _pause_primary(self) -> int:
        self._wait = self._target.failed_over()
        return self._target.pid_of(self._target.primary)()


@contextlib.contextmanager
def sentinels_down(target: Target, mode: str) -> Iterator[list[str]]:
    """The Sentinels `mode` keeps down for the run (`docker kill`: a SIGKILL the restart policy
    leaves alone), started again afterwards; yields their names."""
    down = {"sentinel-kill": SENTINELS[:1], "two-sentinels-kill": SENTINELS[:2]}.get(mode, ())
    for name in down:
        target.client.containers.get(target.container(name)).kill()
    try:
        yield list(down)
    finally:
        for name in down:
            target.client.containers.get(target.container(name)).start()
        if down:
            wait_for_sentinels(target)


def wait_for_sentinels(target: Target, seconds: float = 60) -> None:
    """Until every Sentinel names the same primary and could agree on a failover."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            views = [sentinels.sentinel_view(target.client.containers.get(target.container(n)))
                     for n in SENTINELS]
            if len({view[0] for view in views}) == 1 and all(
                    view[2].startswith("OK 3 ") for view in views):
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Sentinels did not agree within {seconds:.0f} s")


def judge(target: Target, mode: str, operations: int, clients: int = 32,
          seed: int = 1) -> Report:
    """The checker's run with `mode`'s faults; the Sentinels it killed are back afterwards."""
    headers = {"Authorization": f"Bearer {api_token()}"}
    with sentinels_down(target, mode):
        return run_checker(target.url, operations, clients, seed, headers, faults(target, mode))


@dataclass
class Cost:
    """What one fault cost the readers (seconds from the fault)."""

    hits_again: float | None  # the first HIT after the first MISS (none: no new epoch)
    last_bypass: float | None  # the last BYPASS (none: the cache never stopped answering)
    misses_per_user: collections.Counter  # MISSes after the fault, by user
    misses_per_second: list[int]  # MISSes in each second after the fault
    reads: int  # after the fault
    failed: int  # reads that were not a 200 with the user
    primary_before: str = ""
    primary_after: str = ""

    def summary(self) -> str:
        worst = max(self.misses_per_user.values(), default=0)
        return (f"HITs again {fmt(self.hits_again)} s after the fault, last BYPASS "
                f"{fmt(self.last_bypass)} s after it; {self.reads} reads after it, "
                f"{self.failed} failed; MISSes: {sum(self.misses_per_user.values())} for "
                f"{len(self.misses_per_user)} users, at most {worst} for one user; by second: "
                f"{self.misses_per_second[:10]}"
                + (f"; primary {self.primary_before} -> {self.primary_after}"
                   if self.primary_before else ""))


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


class Readers(Background):
    """Threads reading `users` by id at random through the proxy, each read recorded as
    (time, user id, status, X-Cache)."""

    def __init__(self, url: str, users: list[dict], threads: int = READERS) -> None:
        self.url, self.users = url, users
        self.seen: list[tuple[float, int, int, str]] = []
        super().__init__(functools.partial(self._read, n) for n in range(threads))

    def _read(self, number: int) -> None:
        rng = random.Random(number)
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {api_token()}"
            while not self.stop.is_set():
                user = rng.choice(self.users)
                try:
                    reply = session.get(f"{self.url}/users/{user['id']}", timeout=10)
                    ok = reply.status_code == 200 and reply.json()["data"] == user
                    seen = (time.monotonic(), user["id"], 200 if ok else reply.status_code,
                            reply.headers.get("X-Cache", ""))
                except requests.RequestException:
                    seen = (time.monotonic(), user["id"], 0, "")
                self.seen.append(seen)


def cost(target: Target, mode: str, users: int = 200, before: float = 3.0,
         after: float = 20.0) -> Cost:
    """One fault of `mode` (killed Sentinels stay down for it) amid readers of `users` users,
    and what it cost them: see Cost."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_token()}"
    tag = f"c{random.getrandbits(32):08x}"
    made = [session.post(f"{target.url}/users", timeout=10, json={
        "username": f"{tag}_{n}", "email": f"{tag}_{n}@example.org"}).json()["data"]
        for n in range(users)]
    with sentinels_down(target, mode), Readers(target.url, made) as readers:
        time.sleep(before)
        primary_before = target.primary() if target.ha else ""
        fault_at = faults(target, mode).strike()
        time.sleep(after)
    primary_after = target.primary() if target.ha else ""
    later = [seen for seen in readers.seen if seen[0] >= fault_at]
    bypasses = [t for t, _, _, cache in later if cache == "BYPASS"]
    misses = [(t, user) for t, user, _, cache in later if cache == "MISS"]
    hits = [t for t, _, _, cache in later if cache == "HIT" and misses and t > misses[0][0]]
    per_second = collections.Counter(int(t - fault_at) for t, _ in misses)
    return Cost(
        hits_again=hits[0] - fault_at if hits else None,
        last_bypass=bypasses[-1] - fault_at if bypasses else None,
        misses_per_user=collections.Counter(user for _, user in misses),
        misses_per_second=[per_second[s] for s in range(int(after))],
        reads=len(later),
        failed=sum(1 for _, _, status, _ in later if status != 200),
        primary_before=primary_before,
        primary_after=primary_after,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="a stack `python -m orchestrate up` "
                        "brought up (with --ha for the HA modes)")
    parser.add_argument("--mode", required=True, choices=SINGLE_MODES + HA_MODES)
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--users", type=int, default=1000, help="users read around the fault")
    parser.add_argument("--no-judge", action="store_true", help="measure the cost only")
    parser.add_argument("--no-cost", action="store_true", help="run the judged run only")
    args = parser.parse_args(argv)
    target = Target.of(args.project)
    if target.ha != (args.mode in HA_MODES):
        parser.error(f"--mode {args.mode} is for a stack brought up "
                     f"{'with' if args.mode in HA_MODES else 'without'} --ha")
    ok = True
    if not args.no_judge:
        report = judge(target, args.mode, args.operations, args.clients, args.seed)
        print(report.summary(), flush=True)
        ok = report.ok and report.faults > 0
    if not args.no_cost:
        print(cost(target, args.mode, args.users).summary())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
