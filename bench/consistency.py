"""Consistency checker: many concurrent clients race creates, updates, deletes and reads over a
small pool of users; afterwards every read is checked against the acknowledged writes.

The rule: no read that started after a write was acknowledged may return data older
than that write. Every write sets `display_name` to a unique token, so each state a read returns
names the write that produced it. Writes whose order the client cannot know (they overlap) are
treated conservatively: the read may return any of them. Usage:

    python bench/consistency.py [--url URL [--token-file F]] [--operations N] [--clients C]
                                [--seed S] [--fault kill|pause [--redis-container NAME]]
                                [--outside [--outside-dsn DSN] [--lag S]]

Without --url it starts its own Redis, a fresh Postgres database, `python -m service` with its
default (fastest) settings and its change stream (`python -m service stream`). A service that
asks for API tokens gets the first one of --token-file (an API_TOKENS_FILE). --outside also
changes rows by plain SQL behind the service's back (with --url, as --outside-dsn's role); each
such change must be seen by every read that starts --lag seconds after its commit.
Importable: `run_checker(base_url, operations, clients, seed, headers, faults, outside)`.
Exit status 1 when there is a violation or a server error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

FOREVER = 2**63  # the acknowledgement time of a write whose outcome is unknown
POOL = 40  # usernames and emails in play: small, so that creates and renames collide
RECENT = 80  # clients pick ids among the most recently created ones
FIRST_UNBORN = 2**53  # far above any id a test's or a bench's database has handed out
OUTSIDE_ROWS = 16  # rows the outside writer inserts, then changes by plain SQL
OUTSIDE_READS = 0.3  # the share of reads that ask for them, once there are some
OUTSIDE_EVERY = 0.02  # seconds between the outside writer's updates
LAG_BOUND = 1.0  # seconds an outside change may take to reach the cache (the stream's bound)
MIX = (("create", 0.10), ("update", 0.20), ("delete", 0.03), ("read_id", 0.30),
       ("read_username", 0.17), ("read_email", 0.18))


@dataclass
class Write:
    """An acknowledged (or unknown-outcome) change of one user: its interval and the result."""

    start: int
    ack: int
    user_id: int | None
    state: dict | None  # the user after the write; None when the write deleted it
    sent: dict = field(default_factory=dict)


@dataclass
class Read:
    start: int
    ack: int
    by: str  # "id", "username" or "email"
    key: int | str
    answer: dict | list | None  # a user, a lookup's list, or None for a 404


@dataclass
class Report:
    operations: int
    reads_checked: int
    violations: list[str]
    errors: list[str]  # 5xx answers, unexpected statuses, transport failures
    statuses: collections.Counter
    seconds: float
    faults: int = 0  # faults that happened to Redis during the run

    @property
    def ok(self) -> bool:
        return not self.violations and not self.errors

    def summary(self) -> str:
        lines = [f"operations: {self.operations} in {self.seconds:.1f} s "
                 f"({self.operations / self.seconds:.0f}/s)",
                 "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
                 f"reads checked: {self.reads_checked}",
                 f"faults: {self.faults}",
                 f"violations: {len(self.violations)}",
                 f"server errors: {len(self.errors)}"]
        lines += [f"  violation: {v}" for v in self.violations[:5]]
        lines += [f"  error: {e}" for e in self.errors[:5]]
        return "\n".join(lines)


class History:
    """What all clients did, shared between their threads."""

    def __init__(self, tag: str) -> None:
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.live: set[int] = set()
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        self.errors: list[str] = []
        self.statuses: collections.Counter = collections.Counter()
        self.names = [f"{tag}_{i}" for i in range(POOL)]
        # Rows only the outside writer changes (OutsideWriter): what clients read of them
        # can have come from nowhere but Postgres's change stream.
        self.outside_ids: list[int] = []
        self.outside_names = [f"{tag}_o{i}" for i in range(OUTSIDE_ROWS * 2)]

    def record(self, kind: str, status: int | str, item: Write | Read | None) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1
            if isinstance(item, Write):
                self.writes.append(item)
                if kind == "create" and item.ack != FOREVER:
                    self.ids.append(item.user_id)
                    self.live.add(item.user_id)
                elif kind == "delete":
                    self.live.discard(item.user_id)
            elif isinstance(item, Read):
                self.reads.append(item)

    def pick_id(self, rng: random.Random, unborn: float = 0.0) -> int:
        """Mostly a live id, sometimes a recently deleted one; with probability `unborn` one
        that does not exist yet."""
        with self.lock:
            recent = self.ids[-RECENT:]
            live = sorted(self.live) if rng.random() < 0.8 else []
        if not recent:  # nothing of ours yet: an id no one has, even in a shared database
            return FIRST_UNBORN + rng.randint(1, 3)
        if rng.random() < unborn:
            return max(recent) + rng.randint(1, 3)
        return rng.choice(live or recent)

    def pick_read_id(self, rng: random.Random) -> int:
        """An id to read: now and then one of the outside writer's rows."""
        with self.lock:
            outside = self.outside_ids[:]
        if outside and rng.random() < OUTSIDE_READS:
            return rng.choice(outside)
        return self.pick_id(rng, unborn=0.1)

    def pick_read_name(self, rng: random.Random) -> str:
        with self.lock:
            outside = bool(self.outside_ids)
        return rng.choice(self.outside_names if outside and rng.random() < OUTSIDE_READS
                          else self.names)


def any_case(rng: random.Random, text: str) -> str:
    """Lookups ignore case: ask in a random one."""
    return rng.choice((text, text.upper(), text.capitalize()))


class Client:
    """One thread's session: performs random operations and records each one's interval."""

    def __init__(self, base: str, history: History, rng: random.Random, number: int,
                 headers: dict[str, str]) -> None:
        self.base, self.history, self.rng = base, history, rng
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.tokens = (f"c{number}-{n}" for n in itertools.count())

    def run(self, operations: int) -> None:
        kinds, weights = zip(*MIX, strict=True)
        for kind in self.rng.choices(kinds, weights, k=operations):
            getattr(self, kind)()

    def _timed_request(self, method: str, path: str,
                       **kwargs: object) -> tuple[int, int, object, int]:
        """(start, ack, JSON body or None, status) of one request; status 0 when it failed."""
        start = time.monotonic_ns()
        try:
            response = self.session.request(method, self.base + path, timeout=10, **kwargs)
            body = response.json() if response.content else None
            status = response.status_code
        except (requests.RequestException, ValueError) as exc:
            body, status = repr(exc), 0
        ack = time.monotonic_ns()
        if status == 0 or status >= 500:
            with self.history.lock:
                self.history.errors.append(f"{method} {path} {kwargs.get('json', '')} -> "
                                           f"{status or 'no answer'} {body}")
        return start, ack, body, status

    def _write(self, kind: str, method: str, path: str, ok: int, refused: tuple[int, ...],
               user_id: int | None, sent: dict | None = None) -> None:
        start, ack, body, status = self._timed_request(method, path, json=sent)
        if status == ok:
            state = body["data"] if isinstance(body, dict) else None
            item = Write(start, ack, state["id"] if state else user_id, state, sent or {})
        elif status in refused:
            item = None  # refused: nothing changed
        else:  # the change may or may not have happened
            item = Write(start, FOREVER, user_id, None if method == "DELETE" else {}, sent or {})
        self.history.record(kind, status, item)

    def create(self) -> None:
        sent = {"username": self.rng.choice(self.history.names),
                "email": f"{self.rng.choice(self.history.names)}@example.com",
                "display_name": next(self.tokens)}
        self._write("create", "POST", "/users", 201, (409,), None, sent)

    def update(self) -> None:
        sent = {"display_name": next(self.tokens)}
        if self.rng.random() < 0.3:
            sent["username"] = self.rng.choice(self.history.names)
        if self.rng.random() < 0.2:
            sent["email"] = f"{self.rng.choice(self.history.names)}@example.com"
        user_id = self.history.pick_id(self.rng)
        self._write("update", "PATCH", f"/users/{user_id}", 200, (404, 409), user_id, sent)

    def delete(self) -> None:
        user_id = self.history.pick_id(self.rng)
        self._write("delete", "DELETE", f"/users/{user_id}", 204, (404,), user_id)

    def _read(self, kind: str, by: str, key: int | str, path: str, params: dict | None) -> None:
        start, ack, body, status = self._timed_request("GET", path, params=params)
        item = None
        if status == 200 and isinstance(body, dict):
            item = Read(start, ack, by, key, body["data"])
        elif status == 404 and by == "id":
            item = Read(start, ack, by, key, None)
        self.history.record(kind, status, item)

    def read_id(self) -> None:
        user_id = self.history.pick_read_id(self.rng)
        self._read("read_id", "id", user_id, f"/users/{user_id}", None)

    def read_username(self) -> None:
        name = self.history.pick_read_name(self.rng)
        self._read("read_username", "username", name, "/users",
                   {"username": any_case(self.rng, name)})

    def read_email(self) -> None:
        email = f"{self.history.pick_read_name(self.rng)}@example.com"
        self._read("read_email", "email", email, "/users", {"email": any_case(self.rng, email)})




@dataclass(frozen=True)
class Outside:
    """A writer the service never hears from: plain SQL UPDATEs on `dsn` (an operator's psql,
    a batch job), one every `every` seconds, each of a display name (a unique token) and now
    and then a username. Only Postgres's change stream tells the cache, so a change counts as
    acknowledged `lag` seconds after its commit."""

    dsn: str
    lag: float = LAG_BOUND
    every: float = OUTSIDE_EVERY


class OutsideWriter:
    """The thread that makes an Outside's changes while the clients run."""

    def __init__(self, outside: Outside, history: History, rng: random.Random) -> None:
        self.outside, self.history, self.rng = outside, history, rng
        self.tokens = (f"o-{n}" for n in itertools.count())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outside", daemon=True)

    def __enter__(self) -> OutsideWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.outside.dsn)
        conn.autocommit = True
        try:
            for name in self.history.outside_names[:OUTSIDE_ROWS]:
                self._change(conn, "INSERT INTO users (username, email, display_name) "
                             "VALUES (%s, %s, %s)", (name, f"{name}@example.com",
                                                     next(self.tokens)))
            while not self._stop.wait(self.outside.every):
                changes = {"display_name": next(self.tokens)}
                if self.rng.random() < 0.3:
                    name = self.rng.choice(self.history.outside_names)
                    changes.update(username=name, email=f"{name}@example.com")
                with self.history.lock:
                    user_id = self.rng.choice(self.history.outside_ids)
                self._change(conn, "UPDATE users SET "
                             + ", ".join(f"{column} = %s" for column in changes)
                             + " WHERE id = %s", (*changes.values(), user_id))
        finally:
            conn.close()

    def _change(self, conn: Any, statement: str, args: tuple) -> None:
        """Run one INSERT or UPDATE and record it as a write acknowledged the lag after its
        commit; a new row is one for the clients to read."""
        import psycopg2

        from service.model import UserRow
        from service.postgres.statements import USER_COLUMNS

        start = time.monotonic_ns()
        try:
            with conn.cursor() as cur:
                cur.execute(f"{statement} RETURNING {USER_COLUMNS}", args)
                row = cur.fetchone()
        except psycopg2.errors.UniqueViolation:  # a name another of its rows has
            self.history.record("outside", 409, None)
            return
        state = json.loads(UserRow(*row).public_json)
        ack = time.monotonic_ns() + int(self.outside.lag * 1e9)
        self.history.record("outside", 200, Write(start, ack, state["id"], state,
                                                  {"display_name": state["display_name"]}))
        if statement.startswith("INSERT"):
            with self.history.lock:
                self.history.outside_ids.append(state["id"])


class Checker:
    """Judges every read against the writes, after the run."""

    def __init__(self, writes: list[Write]) -> None:
        self.by_id: dict[int, list[Write]] = collections.defaultdict(list)
        self.by_token: dict[str, Write] = {}
        self.holders: dict[tuple[str, str], list[Write]] = collections.defaultdict(list)
        for write in writes:
            if write.user_id is not None:
                self.by_id[write.user_id].append(write)
            token = (write.state or {}).get("display_name") or write.sent.get("display_name")
            if token:
                self.by_token[token] = write
            if write.state and write.ack != FOREVER:
                for by in ("username", "email"):
                    self.holders[(by, write.state[by].lower())].append(write)

    def _superseded(self, user_id: int, write_ack: int, read_start: int) -> Write | None:
        """A write on user_id that surely came after the given one and was acknowledged before
        the read started: the read may no longer see the older state."""
        for later in self.by_id.get(user_id, ()):
            if write_ack < later.start and later.ack < read_start:
                return later
        return None

    def check_user(self, read: Read, user: dict) -> str | None:
        """A read answered with this user: it must be the state of a write that is not stale."""
        write = self.by_token.get(user.get("display_name") or "")
        if write is None:
            return f"{read} returned a state that no write produced: {user}"
        if write.start >= read.ack:
            return f"{read} returned {user} of a write that started after it: {write}"
        newer = self._superseded(user["id"], write.ack, read.start)
        if newer is not None:
            return (f"STALE: {read} returned the state of {write}, but {newer} was acknowledged "
                    "before the read started")
        if write.ack != FOREVER and write.state != user:
            return f"{read} returned {user}, which differs from its write's answer {write}"
        if write.ack == FOREVER and any(user.get(k) != v for k, v in write.sent.items()):
            return f"{read} returned {user}, which differs from what its write sent: {write}"
        return None

    def check_absent(self, read: Read) -> str | None:
        """A 404 by id: the user must not surely exist at any moment the read could have taken."""
        writes = self.by_id.get(read.key, [])
        born = self._superseded(read.key, -FOREVER, read.start)
        if born is None:
            return None  # its creation may not have happened yet
        for delete in writes:
            if delete.state is None and delete.start < read.ack and \
                    self._superseded(read.key, delete.ack, read.start) is None:
                return None
        return f"STALE: {read} answered 404, but {born} was acknowledged before and no delete"

    def check_empty(self, read: Read) -> str | None:
        """An empty lookup: no user may surely hold the key over the whole read."""
        key = str(read.key).lower()
        for write in self.holders.get((read.by, key), ()):
            if write.ack >= read.start:
                continue
            possibly_after = [other for other in self.by_id[write.user_id] if other is not write
                              and other.start < read.ack and not other.ack < write.start]
            if all(o.ack != FOREVER and o.state and o.state[read.by].lower() == key
                   for o in possibly_after):
                return (f"STALE: {read} found nobody, but {write} gave {read.by} {key} to user "
                        f"{write.user_id} before the read started and nothing could have taken it")
        return None

    def check(self, read: Read) -> str | None:
        if read.by == "id":
            if read.answer is None:
                return self.check_absent(read)
            if read.key not in self.by_id:
                return None  # not one of ours (a shared database): nothing to judge by
            return self.check_user(read, read.answer)
        if not read.answer:
            return self.check_empty(read)
        if len(read.answer) > 1:
            return f"{read} returned more than one user"
        user = read.answer[0]
        if str(user[read.by]).lower() != str(read.key).lower():
            return f"{read} returned a user whose {read.by} is not {read.key}: {user}"
        return self.check_user(read, user)


FAULTS = ("kill", "pause")
FAULT_EVERY = 2.0  # seconds from one fault to the next (the first comes after a quarter of it)
PAUSE_SECONDS = 1.5  # longer than the service's command timeout, and than its heartbeat


class Faults:
    """What happens to Redis while the clients run: `kill` sends it SIGKILL (`restart` brings
    it back; None when something else does, as a container's restart policy), `pause` stops it
    with SIGSTOP for `pause` seconds, then lets it go on. `pid()` is the process id of the
    Redis to hit now (with Sentinels, the primary's)."""

    def __init__(self, mode: str, pid: Callable[[], int],
                 restart: Callable[[], None] | None = None,
                 pause: float = PAUSE_SECONDS) -> None:
        if mode not in FAULTS:
            raise ValueError(f"no such fault: {mode} (one of {', '.join(FAULTS)})")
        self.mode, self._pid, self._restart, self._pause = mode, pid, restart, pause
        self.done = 0
        self.failed: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def __enter__(self) -> Faults:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.failed is not None:  # not the service's doing: the run proves nothing
            raise RuntimeError(f"the faults stopped: {self.failed!r}") from self.failed

    def _run(self) -> None:
        try:
            self._make_faults()
        except Exception as exc:  # noqa: BLE001 - reported by __exit__
            self.failed = exc

    def _make_faults(self) -> None:
        wait = FAULT_EVERY / 4
        while not self._stop.wait(wait):
            pid = self._pid()
            if self.mode == "kill":
                os.kill(pid, signal.SIGKILL)
                if self._restart:
                    self._restart()
            else:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(self._pause)
                os.kill(pid, signal.SIGCONT)
            self.done += 1
            wait = FAULT_EVERY


def run_checker(base_url: str, operations: int = 20_000, clients: int = 32,
                seed: int = 1, headers: dict[str, str] | None = None,
                faults: Faults | None = None, outside: Outside | None = None) -> Report:
    """Run `operations` random operations from `clients` threads against base_url, each request
    with `headers` (an Authorization header, say), while `faults` happen to Redis and an
    `outside` writer changes rows behind the service's back, then check."""
    history = History(f"k{uuid.uuid4().hex[:8]}")
    rng = random.Random(seed)
    threads = []
    for number in range(clients):
        share = operations // clients + (number < operations % clients)
        client = Client(base_url.rstrip("/"), history, random.Random(rng.random()), number,
                        headers or {})
        threads.append(threading.Thread(target=client.run, args=(share,), daemon=True))
    started = time.monotonic()
    writer = OutsideWriter(outside, history, random.Random(rng.random())) if outside else None
    with faults or contextlib.nullcontext(), writer or contextlib.nullcontext():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.monotonic() - started
    checker = Checker(history.writes)
    violations = [v for v in map(checker.check, history.reads) if v]
    return Report(operations, len(history.reads), violations, history.errors, history.statuses,
                  seconds, faults.done if faults else 0)


def container_pid(name: str) -> Callable[[], int]:
    """The host's process id of a container's main process, asked anew each time (a killed
    container comes back as another process): kill -9 of it is a crash, as `docker kill`
    is not (a manual stop, which the restart policy leaves alone)."""
    import docker

    client = docker.from_env(version="auto")

    def pid() -> int:
        deadline = time.monotonic() + 30
        while (found := client.containers.get(name).attrs["State"]["Pid"]) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {name} did not come back")
            time.sleep(0.1)
        return found

    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service; default: start one with its defaults")
    parser.add_argument("--operations", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--token-file", type=Path,
                        help="with --url: send the first token of this API_TOKENS_FILE")
    parser.add_argument("--fault", choices=FAULTS,
                        help=f"every {FAULT_EVERY:g} s, SIGKILL Redis (it is started again) or "
                        f"stop it for {PAUSE_SECONDS:g} s (SIGSTOP)")
    parser.add_argument("--redis-container",
                        help="with --url and --fault: the stack's Redis container (its restart "
                        "policy starts it again)")
    parser.add_argument("--outside", action="store_true",
                        help=f"also update rows by plain SQL, one every {OUTSIDE_EVERY:g} s")
    parser.add_argument("--outside-dsn", help="with --url and --outside: the database to update "
                        "them in (libpq URL of a role that may)")
    parser.add_argument("--lag", type=float, default=LAG_BOUND,
                        help="seconds an outside change may take to be seen "
                        f"(default {LAG_BOUND:g})")
    args = parser.parse_args(argv)
    if args.url and args.outside and not args.outside_dsn:
        parser.error("--outside with --url needs --outside-dsn")
    if args.url:
        headers = {}
        if args.token_file:
            token = args.token_file.read_text().split()[0]
            headers = {"Authorization": f"Bearer {token}"}
        faults = None
        if args.fault:
            if not args.redis_container:
                parser.error("--fault with --url needs --redis-container")
            faults = Faults(args.fault, container_pid(args.redis_container))
        outside = Outside(args.outside_dsn, args.lag) if args.outside else None
        report = run_checker(args.url, args.operations, args.clients, args.seed, headers,
                             faults, outside)
    else:
        from processes import Processes, drop_database, recreate_database

        with tempfile.TemporaryDirectory(prefix="cachestack-consistency-") as tmp, \
                Processes(tmp) as processes:
            try:
                owner_url = recreate_database("bench_consistency")
                redis_url = f"redis://127.0.0.1:{processes.start_redis()}/0"
                base, _ = processes.start_service("bench_consistency", redis_url)
                processes.start_stream("bench_consistency", redis_url)
                print(f"service {base} (default settings) and its stream, {args.clients} "
                      "clients", flush=True)
                faults = args.fault and Faults(args.fault, lambda: processes.pid("redis"),
                                               lambda: processes.restart("redis"))
                outside = Outside(owner_url, args.lag) if args.outside else None
                report = run_checker(base, args.operations, args.clients, args.seed,
                                     faults=faults or None, outside=outside)
            finally:
                processes.close()
                drop_database("bench_consistency")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
