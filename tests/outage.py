"""Load through a stack's published port while something happens to its database, and what
it cost, for the tests of Postgres's faults (tests/orchestrate/test_postgres_faults.py,
test_ha.py), which print the figures bench/RESULTS.md reports.

The load is bench/consistency.py's: clients racing creates, versioned updates, deletes and
reads, every read judged afterwards against the writes acknowledged before it. Beside them,
readers ask again and again for users the cache holds, counting how many are answered, and a
creator makes users of names nobody else uses (the clients' collide on purpose). The
outcome: the checker's violations, every failure that is not a 503 (a 500, a hang, a refused
connection), the share of cached reads answered, the longest stretch with no write
acknowledged, and the users whose creation was acknowledged and that no delete touched (each
must be in the database afterwards).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

import requests

from bench.consistency import FOREVER, MIX, Checker, Client, History

NS = 1_000_000_000


@dataclass
class Outcome:
    operations: int
    violations: list[str]
    failures: list[str]  # answers other than the request's own and 503: none is allowed
    statuses: collections.Counter
    cached_reads: int
    cached_answered: int
    # The cached reads not answered: their statuses (0: no answer) and the seconds from the
    # start of the load of the first and the last of them.
    cached_unanswered: collections.Counter
    cached_unanswered_span: tuple[float, float] | None
    longest_write_gap: float  # seconds with no write acknowledged
    created: list[int]  # acknowledged creates no delete touched
    # The display name each user must have in the database at the end: that of its last
    # write, where that write was acknowledged and began after every other was acknowledged.
    final: dict[int, str]

    @property
    def cached_share(self) -> float:
        return self.cached_answered / max(1, self.cached_reads)

    def summary(self) -> str:
        return (f"{self.operations} operations, {len(self.violations)} stale or wrong reads, "
                f"{len(self.failures)} failures other than 503 "
                f"({self.statuses.get('503', 0)} 503s); cached reads answered "
                f"{self.cached_answered}/{self.cached_reads} ({self.cached_share:.2%}"
                f"{self._unanswered()}); "
                f"longest write outage {self.longest_write_gap:.1f} s; "
                f"{len(self.created)} acknowledged creates")

    def _unanswered(self) -> str:
        if self.cached_unanswered_span is None:
            return ""
        first, last = self.cached_unanswered_span
        statuses = ", ".join(f"{count} x {status or 'no answer'}"
                             for status, count in sorted(self.cached_unanswered.items()))
        return f"; not: {statuses}, from {first:.1f} s to {last:.1f} s"


@dataclass
class UnderLoad:
    """`clients` checker clients and `readers` readers of `cached` users the cache holds,
    through `url` with `token`, from `__enter__` to `__exit__`."""

    url: str
    token: str
    clients: int = 8
    readers: int = 2
    cached: int = 40
    seed: int = 1
    history: History = field(default_factory=lambda: History(f"o{random.getrandbits(32):08x}"))
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _cached_results: list[tuple[int, int]] = field(default_factory=list)  # (when, status)
    _created: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: int = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def __enter__(self) -> UnderLoad:
        ids = self._warm_cache()
        rng = random.Random(self.seed)
        self._started = time.monotonic_ns()
        for number in range(self.clients):
            client = Client(self.url, self.history, random.Random(rng.random()), number,
                            self.headers)
            self._spawn(self._operate, client, random.Random(rng.random()))
        for number in range(self.readers):
            self._spawn(self._read_cached, ids[number::self.readers])
        self._spawn(self._create)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _warm_cache(self) -> list[int]:
        """Users of their own, written through to the cache, and read once more."""
        session = requests.Session()
        session.headers.update(self.headers)
        ids = []
        for number in range(self.cached):
            name = f"cached{random.getrandbits(32):08x}{number}"
            reply = session.post(f"{self.url}/users", timeout=10,
                                 json={"username": name, "email": f"{name}@example.org"})
            assert reply.status_code == 201, reply.text
            ids.append(reply.json()["data"]["id"])
        for user_id in ids:
            assert session.get(f"{self.url}/users/{user_id}", timeout=10).status_code == 200
        return ids

    def _operate(self, client: Client, rng: random.Random) -> None:
        kinds, weights = zip(*MIX, strict=True)
        while not self._stop.is_set():
            getattr(client, rng.choices(kinds, weights)[0])()

    def _read_cached(self, ids: list[int]) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        while not self._stop.is_set():
            for user_id in ids:
                try:
                    status = session.get(f"{self.url}/users/{user_id}", timeout=10).status_code
                except requests.RequestException:
                    status = 0
                with self._lock:
                    self._cached_results.append((time.monotonic_ns(), status))

    def _create(self) -> None:
        session = requests.Session()
        session.headers.update(self.headers)
        tag = f"new{random.getrandbits(32):08x}"
        number = 0
        while not self._stop.is_set():
            number += 1
            name = f"{tag}_{number}"
            try:
                reply = session.post(f"{self.url}/users", timeout=10,
                                     json={"username": name, "email": f"{name}@example.org"})
            except requests.RequestException as exc:
                with self.history.lock:
                    self.history.errors.append(f"POST /users {name} -> {exc!r}")
                continue
            if reply.status_code == 201:
                with self._lock:
                    self._created.append(reply.json()["data"]["id"])
            elif reply.status_code != 503:
                with self.history.lock:
                    self.history.errors.append(f"POST /users {name} -> {reply.status_code} "
                                               f"{reply.text[:200]}")

    def until_writes(self, count: int, deadline_s: float = 120) -> None:
        """Wait until `count` more writes are acknowledged than now."""
        target = self.acknowledged_writes() + count
        deadline = time.monotonic() + deadline_s
        while self.acknowledged_writes() < target:
            assert time.monotonic() < deadline, f"no {count} acknowledged writes in {deadline_s} s"
            time.sleep(0.1)

    def elapsed(self) -> float:
        """Seconds since the load began (what the outcome's times count from)."""
        return (time.monotonic_ns() - self._started) / NS

    def acknowledged_writes(self) -> int:
        with self.history.lock:
            return sum(1 for write in self.history.writes if write.ack != FOREVER)

    def outcome(self) -> Outcome:
        """Call after `__exit__`."""
        history = self.history
        checker = Checker(history.writes)
        violations = [v for v in map(checker.check, history.reads) if v]
        failures = [e for e in history.errors if " -> 503 " not in e]
        statuses = collections.Counter()
        for kind_status, count in history.statuses.items():
            statuses[kind_status.rsplit(" ", 1)[1]] += count
        acks = sorted([self._started] + [w.ack for w in history.writes if w.ack != FOREVER])
        gap = max((later - earlier for earlier, later in zip(acks, acks[1:], strict=False)),
                  default=0)
        unanswered = [(at, status) for at, status in self._cached_results if status != 200]
        span = ((unanswered[0][0] - self._started) / NS, (unanswered[-1][0] - self._started) / NS
                ) if unanswered else None
        return Outcome(sum(history.statuses.values()), violations, failures, statuses,
                       len(self._cached_results),
                       len(self._cached_results) - len(unanswered),
                       collections.Counter(status for _, status in unanswered), span,
                       gap / NS, sorted(history.live | set(self._created)),
                       final_states(history.writes))


def final_states(writes: list) -> dict[int, str]:
    """The display name of each user whose last write surely came last (see Outcome)."""
    by_user: dict[int, list] = collections.defaultdict(list)
    for write in writes:
        if write.user_id is not None:
            by_user[write.user_id].append(write)
    final = {}
    for user_id, theirs in by_user.items():
        last = max(theirs, key=lambda w: w.ack)
        others = [w for w in theirs if w is not last]
        if last.ack != FOREVER and last.state and all(w.ack < last.start for w in others):
            final[user_id] = last.state["display_name"]
    return final
