"""Real servers for the service tests: a private redis-server (with the stack's Redis users,
and TLS when asked) that tests may stop and restart, a TCP proxy that can cut Postgres off
and records what clients send, and the service itself under granian."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from orchestrate.certs import KeyPair, make_ca, make_server_cert
from service.cache.scripts import LIBRARY
from tests.support import REPO as ROOT
from tests.support import free_port

ACL_TEMPLATE = ROOT / "docker" / "redis" / "users.acl"
REPLICATION_ACL = ROOT / "docker" / "redis" / "replication.acl"
SENTINEL_TEMPLATE = ROOT / "docker" / "redis" / "sentinel.conf"
REDIS_USERS = ("service", "health", "admin", "replica", "sentinel")


def wait_until(check, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - the thing is not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout} s")


def render(template: Path, passwords: dict[str, str]) -> str:
    """One of docker/redis's templates as the Redis container renders it: comments dropped,
    each @NAME@ replaced by the SHA-256 of that user's password, each @NAME:clear@ by the
    password."""
    lines = [line for line in template.read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines) + "\n"
    for user, password in passwords.items():
        text = text.replace(f"@{user}:clear@", password)
        text = text.replace(f"@{user}@", hashlib.sha256(password.encode()).hexdigest())
    return text


def render_acl(passwords: dict[str, str]) -> str:
    """The Redis users, those of replication too (a lone Redis simply never sees them)."""
    return render(ACL_TEMPLATE, passwords) + render(REPLICATION_ACL, passwords)


@dataclass(frozen=True)
class TlsFiles:
    """A CA's certificate and key, and a server's key and certificate the CA signed, as files."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path, hosts: list[str], ca: KeyPair | None = None) -> TlsFiles:
        """A new server certificate for `hosts`, signed by `ca` (by default a new CA)."""
        ca = ca or make_ca("cachestack test CA")
        server = make_server_cert(ca, hosts)
        directory.mkdir(parents=True, exist_ok=True)
        names = ("ca.crt", "ca.key", "server.crt", "server.key")
        files = cls(*(directory / name for name in names))
        for path, pem in ((files.ca, ca.cert), (files.ca_key, ca.key), (files.cert, server.cert),
                          (files.key, server.key)):
            path.write_bytes(pem)
        files.key.chmod(0o600)
        files.ca_key.chmod(0o600)
        return files

    def authority(self) -> KeyPair:
        return KeyPair(self.ca_key.read_bytes(), self.ca.read_bytes())


class RedisServer:
    """A redis-server of the test's own, with the stack's users (docker/redis/users.acl) and
    the cache's functions, which the admin loads at every start as the stack's Redis does:
    `url` logs in as the service, `client()` as the admin. With `tls`, it listens on a TLS
    port only. Unlike the stack's, it keeps an append-only file in a temp dir, so that a
    restart brings back what it held (the epochs must make that unreachable)."""

    def __init__(self, tls: TlsFiles | None = None, passwords: dict[str, str] | None = None,
                 replica_of: int | None = None) -> None:
        """`passwords` of the users, shared with the other servers of a SentinelGroup;
        `replica_of` the port of the primary a replica starts from."""
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cachestack-redis-")
        self.tls = tls
        self.passwords = passwords or {user: secrets.token_urlsafe(18) for user in REDIS_USERS}
        self.replica_of = replica_of
        self.acl_file = Path(self.dir, "users.acl")
        self.acl_file.write_text(render_acl(self.passwords))
        self.url = self.url_for("service")
        self.process: subprocess.Popen | None = None
        self._admin: redis.Redis | None = None

    def url_for(self, user: str, port: int | None = None) -> str:
        """The URL that logs in as `user`, to this server or to a proxy of it on `port`."""
        netloc = f"{user}:{self.passwords[user]}@127.0.0.1:{port or self.port}"
        if self.tls:
            return f"rediss://{netloc}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{netloc}/0"

    @property
    def unix_url(self) -> str:
        """The service's URL by the server's unix socket (never TLS, whatever the port speaks)."""
        return f"unix://service:{self.passwords['service']}@{self.dir}/redis.sock?db=0"

    def _listen(self) -> list[str]:
        unix = ["--unixsocket", f"{self.dir}/redis.sock", "--unixsocketperm", "700"]
        if not self.tls:
            return ["--port", str(self.port), *unix]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key), "--tls-auth-clients", "no", *unix]

    def start(self) -> None:
        """Start the server (again: after stop(), or after something killed it)."""
        if self.process is not None:
            self.process.wait(timeout=5)  # killed: reap it
        replication = ["--masteruser", "replica", "--masterauth", self.passwords["replica"]]
        if self.replica_of:
            replication += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.process = subprocess.Popen(
            ["redis-server", *self._listen(), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", self.dir, "--enable-debug-command", "local",
             "--aclfile", str(self.acl_file), *replication],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.client().ping, 10, "redis-server")
        if self.client().role()[0] == b"master":  # a replica has its primary's
            self.client().function_load(LIBRARY, replace=True)

    def stop(self) -> None:
        """Stop like a crash would, after the append-only file has what was written so far."""
        if self.process:
            self.client().bgrewriteaof()
            time.sleep(0.2)
            self.process.kill()
            self.process.wait()
            self.process = None
            self._admin = None

    def client(self) -> redis.Redis:
        """A client logged in as the admin user, who may run every command. One for the
        server's life, so that counting its commands does not count its logins. It checks
        the CA but not the host name, so that a server whose certificate names another host
        (to test the service's check) can still be run."""
        if self._admin is None:
            check_hostname = {"ssl_check_hostname": False} if self.tls else {}
            self._admin = redis.Redis.from_url(self.url_for("admin"), **check_hostname)
        return self._admin

    def close(self) -> None:
        if self.process:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """A primary, a replica and three Sentinels of the tests' own, rendered from docker/redis's
    templates as the --ha stack's are: `url` is the service's (any server's address: the
    Sentinels name the primary), REDIS_SENTINELS `sentinels`."""

    def __init__(self) -> None:
        first = RedisServer()
        self.nodes = [first, RedisServer(passwords=first.passwords, replica_of=first.port)]
        self.passwords = first.passwords
        self.url = first.url
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.sentinel_processes: list[subprocess.Popen | None] = [None] * 3

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        wait_until(lambda: self.nodes[1].client().info("replication")["master_link_status"]
                   == "up", 10, "the replica to sync")
        for number in range(3):
            self.start_sentinel(number)
        wait_until(lambda: len(self.sentinel().execute_command(
            "SENTINEL", "SENTINELS", "cachestack")) == 2, 15, "the Sentinels to find each other")

    def start_sentinel(self, number: int) -> None:
        conf = Path(self.nodes[0].dir, f"sentinel-{number}.conf")
        text = render(SENTINEL_TEMPLATE, self.passwords)
        conf.write_text(text.replace("@PRIMARY@ 6379", f"127.0.0.1 {self.nodes[0].port}")
                        + f"port {self.sentinel_ports[number]}\nbind 127.0.0.1\n")
        self.sentinel_processes[number] = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def sentinel(self, number: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[number], username="admin",
                           password=self.passwords["admin"])

    def primary(self) -> RedisServer:
        """The server a Sentinel that runs names the primary now."""
        for number, process in enumerate(self.sentinel_processes):
            if process and process.poll() is None:
                _, port = self.sentinel(number).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "cachestack")
                return next(node for node in self.nodes if node.port == int(port))
        raise RuntimeError("no Sentinel runs")

    def restart(self, node: RedisServer) -> None:
        """Start a killed server again as the stack's do (docker/redis/cachestack-redis): the
        replica of the primary the Sentinels name, or the primary if they name it."""
        primary = self.primary()
        node.replica_of = None if primary is node else primary.port
        node.start()

    def stale_sentinel(self, primary: RedisServer) -> tuple[str, subprocess.Popen]:
        """A fourth Sentinel (its host:port, and its process) that names `primary` in the
        first configuration of all and hears of nothing after it: it cannot log in to the
        servers (a wrong password), so no other Sentinel reaches it, and it never finds the
        primary down. As a Sentinel looks that is cut off from the others."""
        port = free_port()
        conf = Path(self.nodes[0].dir, "sentinel-stale.conf")
        text = render(SENTINEL_TEMPLATE, self.passwords)
        text = text.replace("@PRIMARY@ 6379", f"127.0.0.1 {primary.port}")
        text = text.replace(f"auth-pass cachestack {self.passwords['sentinel']}",
                            "auth-pass cachestack not-the-password")
        conf.write_text(text + "sentinel down-after-milliseconds cachestack 3600000\n"
                        f"port {port}\nbind 127.0.0.1\n")
        process = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"127.0.0.1:{port}"
        wait_until(lambda: redis.Redis(port=port, username="admin",
                                       password=self.passwords["admin"]).ping(), 10,
                   "the stale Sentinel")
        return address, process

    def fail_over(self) -> RedisServer:
        """Have the Sentinels promote the replica now (SENTINEL FAILOVER); the new primary. A
        replica that came back lately is refused (NOGOODSLAVE) until the Sentinel's next look at
        it finds it in sync: asked again until accepted."""
        old = self.primary()
        wait_until(lambda: self.sentinel().execute_command("SENTINEL", "FAILOVER", "cachestack"),
                   30, "a replica the Sentinels may promote", interval=0.5)
        wait_until(lambda: self.primary() is not old, 15, "the Sentinels to fail over")
        return self.primary()

    def kill_sentinel(self, number: int) -> None:
        process = self.sentinel_processes[number]
        if process:
            process.kill()
            process.wait()
            self.sentinel_processes[number] = None

    def close(self) -> None:
        for number in range(3):
            self.kill_sentinel(number)
        for node in self.nodes:
            node.close()


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `cut()` drops every connection and refuses new
    ones, as a Postgres restart does, without touching the shared Postgres server. `sent`
    holds what each client sent, one entry a connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.sent: list[bytearray] = []
        self._open = threading.Event()
        self._open.set()
        self._flowing = threading.Event()  # cleared by hold(): nothing goes through, nothing is cut
        self._flowing.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            sent = bytearray()
            with self._lock:
                self._conns += [client, upstream]
                self.sent.append(sent)
            for src, dst, log in ((client, upstream, sent), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(src, dst, log), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, log: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if log is not None:
                    log += data
                self._flowing.wait()
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self._open.set()

    def hold(self) -> None:
        """Let nothing through, cutting nothing: as a server that stopped answering (a hung
        process, a stalled disk) looks to its clients, until `flow()`."""
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()


class ServiceProcess:
    """`python -m service` with its workers, as users run it; started once `ready_path`
    answers 200 (at once with None). In a session of its own, so that closing it ends
    every worker too, even one that outlived the main process."""

    def __init__(self, env: dict[str, str], workers: int = 2, threads: int = 1,
                 ready_path: str | None = "/readyz") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cachestack-service-", suffix=".log")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(self.port),
             "--workers", str(workers), "--threads", str(threads)],
            env={**os.environ, **env}, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        if ready_path is None:
            return
        try:
            wait_until(lambda: requests.get(self.url + ready_path, timeout=1).ok, 30, "service")
        except TimeoutError as exc:
            self.close()
            raise TimeoutError(f"{exc}; its output:\n{self.output()}") from None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # the workers, should any be left
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
