"""Start the processes a benchmark needs (Redis, our service, the Express peer) and always stop
them again, on success, failure, Ctrl-C or SIGTERM alike.

Every process gets its own session, so stopping one stops all of its children (granian's workers)
and nothing else on the machine. Our service runs as in the stack: `python -m service migrate`
as the database's owner (BENCH_PG_URL's role, which creates the bench databases), then the
service as the least-privileged role of BENCH_APP_PG_URL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import psycopg2
import redis
import requests

from orchestrate.certs import make_ca, make_server_cert
from orchestrate.paths import ROOT
from service.cache.scripts import LIBRARY

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://cachestack:cachestack@127.0.0.1:5432")
APP_PG_URL = os.environ.get("BENCH_APP_PG_URL",
                            "postgresql://cachestack_app:cachestack_app@127.0.0.1:5432")
# The change stream's role (LOGIN REPLICATION); it also drops the bench databases' slots.
STREAM_PG_URL = os.environ.get("BENCH_STREAM_PG_URL",
                               "postgresql://cachestack_stream:cachestack_stream@127.0.0.1:5432")
# The Express reference's sources (server.js, schema.sql, package.json), outside this repository.
PEER_SOURCE = Path(os.environ.get("BENCH_PEER_SOURCE", "/work/shared/peers/express-seed"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (the tests use it too)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Processes:
    """The processes of one run; a context manager that stops them all on the way out."""

    def __init__(self, workdir: str) -> None:
        self.workdir = Path(workdir)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._starts: dict[str, Callable[[], None]] = {}  # how to start a process again
        signal.signal(signal.SIGTERM, _terminate)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, name: str) -> None:
        """Stop the newest process started under `name` (SIGTERM, as an orchestrator would)."""
        proc = dict(self.procs)[name]
        _signal_group(proc, signal.SIGTERM)
        proc.wait(10)

    def pid(self, name: str) -> int:
        """The process id of the newest process started under `name`."""
        return dict(self.procs)[name].pid

    def restart(self, name: str) -> None:
        """Start `name` again, as it was started, once the one before has gone (the
        consistency checker's faults kill Redis: until the killed one is reaped, its port may
        still answer)."""
        dict(self.procs)[name].wait(10)
        self._starts[name]()

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """SIGTERM every process group we started, newest first; SIGKILL what is left after 5 s."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # also reaps workers whose parent already left
            proc.wait()
        self.procs.clear()

    def wait_http(self, name: str, url: str, ready: int = 200, timeout: float = 30) -> None:
        """Poll URL until it answers with status `ready`; fail early if the process died."""
        proc = dict(self.procs)[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if requests.get(url, timeout=1).status_code == ready:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready at {url} after {timeout} s:\n{self.log_tail(name)}")

    def start_redis(self) -> int:
        """A private redis-server without persistence, with the cache's functions loaded (as
        the stack's Redis has them); returns its port."""
        port = free_port()
        self._redis("redis", ["--port", str(port)], port, f"redis://127.0.0.1:{port}/0")
        return port

    def start_tls_redis(self) -> str:
        """The same, speaking TLS only, with a certificate of a CA made for the run (as the
        stack's Redis does); returns the URL that verifies it."""
        port = free_port()
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={self.workdir / 'ca.crt'}"
        self._redis("redis-tls", self._tls_listen(port), port, url)
        return url

    def _redis(self, name: str, listen: list[str], port: int, url: str) -> None:
        self._starts[name] = lambda: self._redis(name, listen, port, url)
        self.spawn(name, ["redis-server", *listen, "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.workdir)])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{self.log_tail(name)}") from None
                time.sleep(0.05)
        with redis.Redis.from_url(url) as client:
            client.function_load(LIBRARY, replace=True)

    def _tls_listen(self, port: int) -> list[str]:
        ca = make_ca("cachestack bench CA")
        server = make_server_cert(ca, ["localhost", "127.0.0.1"])
        files = {"ca.crt": ca.cert, "redis.crt": server.cert, "redis.key": server.key}
        for name, pem in files.items():
            (self.workdir / name).write_bytes(pem)
        return ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no",
                "--tls-cert-file", str(self.workdir / "redis.crt"),
                "--tls-key-file", str(self.workdir / "redis.key")]

    def migrate(self, database: str) -> None:
        """`python -m service migrate` on DATABASE as its owner, for BENCH_APP_PG_URL's role."""
        done = subprocess.run(
            [sys.executable, "-m", "service", "migrate", "--wait", "10"], cwd=ROOT, text=True,
            capture_output=True, env={**os.environ, "DATABASE_URL": f"{PG_URL}/{database}",
                                      "DATABASE_APP_ROLE": urlsplit(APP_PG_URL).username or ""})
        if done.returncode:
            raise RuntimeError(f"migrate failed: {done.stderr.strip()}")

    def start_service(self, database: str, redis_url: str, name: str = "service",
                      database_options: str = "",
                      env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
        """Migrate DATABASE, then `python -m service` on it with its defaults (workers, threads)
        as the runtime role; `database_options` is the URL's query (`?sslmode=...`). Returns
        (base URL, process)."""
        self.migrate(database)
        port = free_port()
        database_url = f"{APP_PG_URL}/{database}{database_options}"
        proc = self.spawn(name, [sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT,
                          env={"DATABASE_URL": database_url, "REDIS_URL": redis_url, **(env or {})})
        base = f"http://127.0.0.1:{port}"
        self.wait_http(name, f"{base}/readyz")
        return base, proc

    def start_stream(self, database: str, redis_url: str) -> subprocess.Popen:
        """`python -m service stream` on DATABASE (migrated) as BENCH_STREAM_PG_URL's role,
        invalidating the cache at `redis_url`; returns once it reads the database's slot."""
        self._starts["stream"] = lambda: self.start_stream(database, redis_url)
        proc = self.spawn("stream", [sys.executable, "-m", "service", "stream", "--port", "0"],
                          cwd=ROOT, env={"DATABASE_URL": f"{STREAM_PG_URL}/{database}",
                                         "REDIS_URL": redis_url,
                                         "STREAM_SLOT": stream_slot(database)})
        deadline = time.monotonic() + 30
        while not _slot_read(database):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the stream did not start:\n{self.log_tail('stream')}")
            time.sleep(0.05)
        return proc

    def start_peer(self, peer_dir: Path, database_url: str, redis_url: str) -> str:
        """The Express reference server (npm-installed in peer_dir); returns its base URL."""
        if not (peer_dir / "node_modules").is_dir():
            shutil.copytree(PEER_SOURCE, peer_dir, dirs_exist_ok=True)
            subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=peer_dir,
                           check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        self.spawn("peer", ["node", "server.js"], cwd=peer_dir,
                   env={"DATABASE_URL": database_url, "CACHE_URL": redis_url, "PORT": str(port)})
        base = f"http://127.0.0.1:{port}"
        self.wait_http("peer", f"{base}/query", ready=400)  # no query parameter: alive
        return base


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _administer(*statements: str) -> None:
    """Run statements that cannot run in a transaction (CREATE/DROP DATABASE)."""
    conn = psycopg2.connect(f"{PG_URL}/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def recreate_database(name: str) -> str:
    """Drop and create database NAME on the bench Postgres server; returns its owner's URL."""
    _administer(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return f"{PG_URL}/{name}"


def drop_database(name: str) -> None:
    """Drop database NAME, its change stream's slot first (Postgres refuses otherwise), once
    the sessions of the processes just stopped are gone (this role may not end them)."""
    deadline = time.monotonic() + 10
    while _stream_query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE slot_name = %s AND NOT active", stream_slot(name)) or \
            _stream_query("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                          stream_slot(name)) or \
            _stream_query("SELECT 1 FROM pg_stat_activity WHERE datname = %s", name):
        if time.monotonic() > deadline:  # a reader or a session still has it
            raise RuntimeError(f"the slot of {name}, or a session on it, is still there")
        time.sleep(0.1)
    _administer(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stream_slot(database: str) -> str:
    """The replication slot of DATABASE's change stream (slots are the cluster's: one each)."""
    return f"bench_{database}"


def _stream_query(sql: str, *args: object) -> list[tuple]:
    conn = psycopg2.connect(f"{STREAM_PG_URL}/postgres")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _slot_read(database: str) -> bool:
    return bool(_stream_query("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND "
                              "active", stream_slot(database)))


def stream_caught_up(database: str, timeout: float = 60) -> float:
    """Wait until DATABASE's stream has confirmed everything committed so far; returns the
    seconds that took."""
    started = time.monotonic()
    [(target,)] = _stream_query("SELECT pg_current_wal_lsn()")
    while not _stream_query("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND "
                            "confirmed_flush_lsn >= %s", stream_slot(database), target):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"the stream of {database} is behind after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(processes, total RSS bytes, total PSS bytes) of PID and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    rss = pss = 0
    for each in found:
        try:
            rollup = Path(f"/proc/{each}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
        rss += fields.get("Rss", 0) * 1024
        pss += fields.get("Pss", 0) * 1024
    return len(found), rss, pss
