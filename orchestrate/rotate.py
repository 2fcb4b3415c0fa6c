"""New values for the stack's secrets, applied while it serves, without failing a request.

One rule for every credential: whoever checks it accepts the new value before anyone presents
it, and stops accepting the old one only when nobody presents that any more. Each container's
copy of a secret is bind-mounted, so it changes in place; the service reads its password
files at every new connection and its token file when it changes, so nothing restarts:

- a Postgres role: ALTER ROLE ... PASSWORD as the superuser over the container's local socket,
  with the value read inside the container from its copy of the new file. The service's open
  connections stay logged in. Postgres keeps one password per role, so a login in the instant
  between the new file and the ALTER fails once; the service then reads the file again and
  logs in anew.
- a Redis user: ACL SETUSER adds the new password's hash beside the old, the files change,
  then the user keeps only the new one (open connections stay logged in).
- the API tokens: the service's copy holds old and new until every replica accepts the new;
  then secrets/api_tokens, which clients read, leads with it; after a grace period for them
  the old one goes.
- the certificates: a new CA joins the old in ca.crt, the servers get certificates of the new
  CA and reload them (pg_reload_conf, CONFIG SET tls-cert-file, and with `up --tls` the
  proxy's runtime API), then the old CA goes. An operator's own proxy certificate stays.
  With `up --ha`, etcd reads its files only when it starts: its members restart one at a
  time (a quorum stays) once they must trust the new CA, before any member of the Patroni
  cluster presents a certificate of it, once for their own new certificates, and once when
  the old CA goes; Patroni reloads on SIGHUP (its REST API's certificate and CA, and
  Postgres's settings).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Iterable

from docker.models.containers import Container

from . import certs, patroni
from .containers import connect, exec_input, project_containers, wait_healthy
from .errors import OrchestrateError
from .output import say
from .proxy import SOCKET, Proxy
from .secretfiles import (
    CA_KEY,
    CA_NAME,
    issue_certificate,
    new_password,
    new_token,
    operators_own,
    secret_path,
    stage_secrets,
    write_secret,
)
from .stack import (
    API_TOKENS,
    CA_CERT,
    DB_APP,
    DB_OWNER,
    DB_STREAM,
    ETCD_MEMBERS,
    PATRONI_MEMBERS,
    PROXY_CERT,
    REDIS_HEALTH_USER,
    REDIS_PORT,
    REDIS_SERVERS,
    REDIS_SERVICE_USER,
    SENTINEL_PORT,
    SENTINELS,
    SERVICE_LABEL,
    Certificate,
    Stack,
    database_hosts,
    secret_target,
)
from .waits import unless, until

ROLES = {"postgres_password": "postgres", "postgres_owner_password": DB_OWNER,
         "postgres_app_password": DB_APP, "postgres_stream_password": DB_STREAM}
REDIS_USERS = {"redis_service_password": REDIS_SERVICE_USER,
               "redis_health_password": REDIS_HEALTH_USER, "redis_admin_password": "admin"}
ROTATABLE = (*ROLES, *REDIS_USERS, API_TOKENS, CA_CERT)
# Run in a replica, the CA on standard input and each Postgres (host:port) as an argument:
# TLS handshakes with each Postgres (after its SSLRequest) and each Redis server and Sentinel
# that trust only that CA (arguments postgres=host:port, redis=host:port); prints whether all
# succeed.
PRESENTS_CERTIFICATES = """\
import socket, ssl, sys
context = ssl.create_default_context(cadata=sys.stdin.read())
def verified(host, port, ssl_request):
    with socket.create_connection((host, port), timeout=5) as raw:
        if ssl_request and (raw.sendall(bytes.fromhex("0000000804d2162f")) or raw.recv(1) != b"S"):
            return False
        try:
            context.wrap_socket(raw, server_hostname=host).close()
        except ssl.SSLCertVerificationError:
            return False
    return True
servers = [(kind, *server.rpartition(":")) for kind, server in
           (argument.split("=", 1) for argument in sys.argv[1:])]
print(all(verified(host, int(port), kind == "postgres") for kind, host, _, port in servers))
"""
# How long clients of the API get to pick up a new token before the old one is refused.
TOKEN_GRACE_S = 3.0
# Each worker of a replica looks at the token file at most a second after its last look
# (service/web/auth.py, CHECK_EVERY_SECONDS): once one worker of every replica answers with the
# new file, the others have it this much later.
WORKERS_FOLLOW_S = 1.5
DEADLINE_S = 30.0


class Running:
    """The stack's running containers, by service, and how to reach inside them."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        client = connect()
        self.containers: dict[str, list[Container]] = {}
        for service in stack.services:
            found = [c for c in project_containers(client, stack.project, service.name)
                     if c.status == "running"]
            if found:
                self.containers[service.name] = found
        # The Postgres that takes writes (the cluster's leader), where a role changes.
        self.database = patroni.database(client, stack.project)
        for needed, names in (("redis", ("redis", *REDIS_SERVERS)), ("service", ("service",))):
            if not self.all_of(names):
                raise OrchestrateError(f"project {stack.project} has no running {needed}: "
                                       "rotate applies secrets to a running stack")

    def one(self, service: str) -> Container:
        return self.containers[service][0]

    def all_of(self, names: tuple[str, ...]) -> list[Container]:
        return [c for name in names for c in self.containers.get(name, [])]

    def stage(self, secret: str) -> None:
        """Every copy of `secret` from secrets/, in place: running containers see it at once,
        and a task (migrate) has it at its next run."""
        for service in self.stack.services:
            if any(m.secret == secret for m in service.secrets):
                stage_secrets(self.stack, service)

    def psql(self, script: str, postgres: Container | None = None) -> None:
        """`script` as the superuser, on `postgres` (default: the one that takes writes)."""
        postgres = postgres or self.database
        exec_input(postgres, ["psql", "--username=postgres", "--dbname=postgres", "--no-psqlrc",
                              "--quiet", "--set=ON_ERROR_STOP=1"],
                   postgres.attrs["Config"]["User"], [script.encode()])

    def redis(self) -> list[tuple[Container, int]]:
        """Every Redis server and Sentinel, with the port it serves on: each keeps its own
        users (neither replication nor the Sentinels share them)."""
        return [*((c, REDIS_PORT) for c in self.all_of(("redis", *REDIS_SERVERS))),
                *((c, SENTINEL_PORT) for c in self.all_of(SENTINELS))]

    def redis_admin(self, *commands: str) -> None:
        """`commands` as the admin user on every Redis server and Sentinel."""
        for redis, port in self.redis():
            redis_cli(redis, port, commands)


def redis_cli(redis: Container, port: int, commands: Iterable[str]) -> None:
    """Commands for redis-cli as the admin user, on its standard input (so that no value is on
    a command line); the admin's password is read from its file in the container."""
    login = ('REDISCLI_AUTH="$(cat /run/secrets/redis_admin_password)" redis-cli --tls '
             f"--cacert /run/secrets/ca.crt --user admin -h 127.0.0.1 -p {port} "
             "--no-auth-warning")
    output = exec_input(redis, ["sh", "-c", login], redis.attrs["Config"]["User"],
                        ["".join(f"{c}\n" for c in commands).encode()]).decode()
    if "ERR" in output or "NOPERM" in output or "WRONGPASS" in output:
        raise OrchestrateError(f"{redis.name} refused the rotation: {output.strip()}")


def rotate_role(running: Running, secret: str) -> None:
    write_secret(secret, new_password())
    running.stage(secret)
    running.psql(
        "SET log_min_error_statement = panic;\n"  # a failing ALTER must not log the password
        f"\\set password `cat /run/secrets/{secret}`\n"
        f'ALTER ROLE "{ROLES[secret]}" PASSWORD :\'password\';\n'
    )


def rotate_redis_user(running: Running, secret: str) -> None:
    user, value = REDIS_USERS[secret], new_password()
    digest = hashlib.sha256(value).hexdigest()
    running.redis_admin(f"ACL SETUSER {user} #{digest}")  # the old and the new are good
    write_secret(secret, value)
    running.stage(secret)
    running.redis_admin(f"ACL SETUSER {user} resetpass #{digest}")  # now only the new


def accepted(container: Container, token: str) -> bool:
    """Whether a replica takes `token` (asked inside it; the token goes on standard input)."""
    ask = ("import sys, urllib.request, urllib.error\n"
           "token = sys.stdin.read().strip()\n"
           "request = urllib.request.Request('http://127.0.0.1:8000/users/1',"
           " headers={'Authorization': 'Bearer ' + token})\n"
           "try:\n    urllib.request.urlopen(request, timeout=5)\n    print(200)\n"
           "except urllib.error.HTTPError as exc:\n    print(exc.code)\n")
    reply = exec_input(container, ["python", "-c", ask], container.attrs["Config"]["User"],
                       [token.encode()]).decode().strip()
    return reply != "401"


def rotate_tokens(running: Running) -> None:
    old = secret_path(API_TOKENS).read_text().split()
    new = new_token().decode()
    replicas = running.containers["service"]
    write_secret(API_TOKENS, "\n".join([*old, new]).encode() + b"\n")
    running.stage(API_TOKENS)
    until(unless(lambda: all(accepted(c, new) for c in replicas)), DEADLINE_S,
          "the replicas did not take the new token")
    time.sleep(WORKERS_FOLLOW_S)
    write_secret(API_TOKENS, "\n".join([new, *old]).encode() + b"\n")  # clients take the first
    time.sleep(TOKEN_GRACE_S)
    write_secret(API_TOKENS, new.encode() + b"\n")
    running.stage(API_TOKENS)
    until(unless(lambda: not any(accepted(c, token) for c in replicas for token in old)),
          DEADLINE_S, "the replicas kept accepting the old token")
    time.sleep(WORKERS_FOLLOW_S)


def reload_servers(running: Running) -> None:
    """Postgres, etcd, Redis and the Sentinels read their certificate files again (for new
    connections)."""
    members = running.all_of(PATRONI_MEMBERS)
    if not members:
        running.psql("SELECT pg_reload_conf();\n")
    for member in members:  # Patroni reloads its REST API's certificate, and Postgres
        member.kill(signal="SIGHUP")
    restart_etcd(running)
    for redis, port in running.redis():
        if port == REDIS_PORT:  # a server takes the files it names again
            cert = certificate_of(running.stack, redis.labels[SERVICE_LABEL])
            redis_cli(redis, port, [f"CONFIG SET tls-cert-file {secret_target(cert.cert)} "
                                    f"tls-key-file {secret_target(cert.key)}"])
    restart_sentinels(running)


def certificate_of(stack: Stack, name: str) -> Certificate:
    """The server certificate the service `name` mounts."""
    mounted = {mount.secret for mount in stack.service(name).secrets}
    return next(cert for cert in stack.certificates if cert.cert in mounted)


def restart_etcd(running: Running) -> None:
    """etcd's members read their certificates and CA again, one at a time, each healthy (in
    a quorum) before the next stops."""
    for member in running.all_of(ETCD_MEMBERS):
        member.restart(timeout=30)
        wait_healthy(member)


def restart_sentinels(running: Running) -> None:
    """A Sentinel reads its certificate only at start: one at a time, each healthy before the
    next stops, so that two of three always agree on the primary."""
    for sentinel in running.all_of(SENTINELS):
        sentinel.restart(timeout=30)
        wait_healthy(sentinel)


def renewed_at_proxy(running: Running) -> bool:
    """Whether the proxy serves a certificate that rotation renews (`up --tls`, with the
    project CA's)."""
    return PROXY_CERT in running.stack.certificates and not operators_own(PROXY_CERT)


def reload_proxy(running: Running) -> None:
    """The proxy takes its new certificate and key through its runtime API, on standard input
    (never a command line); the connections it accepts from then on get them."""
    proxy = running.one("proxy")
    target = secret_target(PROXY_CERT.cert)
    pem = secret_path(PROXY_CERT.cert).read_bytes() + secret_path(PROXY_CERT.key).read_bytes()
    answer = exec_input(proxy, ["socat", "stdio", f"unix-connect:{SOCKET}"],
                        proxy.attrs["Config"]["User"],
                        [f"set ssl cert {target} <<\n".encode(), pem, b"\n"]).decode()
    committed = Proxy(proxy).ask(f"commit ssl cert {target}")
    if "Success" not in committed:
        raise OrchestrateError(f"the proxy refused its new certificate: {answer.strip()} "
                               f"{committed.strip()}")


def proxy_presents_certificate_of(running: Running, ca_cert: bytes) -> bool:
    """Whether the proxy's published port presents a certificate of `ca_cert`'s CA for its
    host name, as a client on this host verifies it."""
    port = running.stack.service("proxy").ports[0]
    context = ssl.create_default_context(cadata=ca_cert.decode())
    with socket.create_connection((port.host_ip, port.host), timeout=5) as raw:
        try:
            context.wrap_socket(raw, server_hostname=port.host_ip).close()
        except ssl.SSLCertVerificationError:
            return False
    return True


def present_certificates_of(running: Running, ca_cert: bytes) -> bool:
    """Whether Postgres and Redis both present a certificate of `ca_cert`'s CA, as a replica
    sees them. pg_reload_conf only signals the postmaster, so until this holds a new login
    may still meet the old certificate, and the old CA must stay trusted."""
    replica = running.one("service")
    databases = database_hosts(any(s.name in PATRONI_MEMBERS for s in running.stack.services))
    servers = [*(f"postgres={host}" for host in databases.split(",")),
               *(f"redis={redis.labels[SERVICE_LABEL]}:{port}" for redis, port in running.redis())]
    reply = exec_input(replica, ["python", "-c", PRESENTS_CERTIFICATES, *servers],
                       replica.attrs["Config"]["User"], [ca_cert]).decode().strip()
    return reply == "True"


def rotate_certificates(running: Running) -> None:
    old_ca = secret_path(CA_CERT).read_bytes()
    ca = certs.make_ca(CA_NAME)
    write_secret(CA_CERT, old_ca + ca.cert)  # clients trust both while the servers switch
    running.stage(CA_CERT)
    restart_etcd(running)  # before a Patroni member shows it a certificate of the new CA
    write_secret(CA_KEY, ca.key)
    for server in running.stack.certificates:
        if not operators_own(server):
            issue_certificate(ca, server)
            running.stage(server.cert)
    reload_servers(running)
    proxy = renewed_at_proxy(running)
    if proxy:
        reload_proxy(running)
    until(unless(lambda: present_certificates_of(running, ca.cert) and (
        not proxy or proxy_presents_certificate_of(running, ca.cert))), DEADLINE_S,
          "the servers did not present the new certificates")
    write_secret(CA_CERT, ca.cert)
    running.stage(CA_CERT)
    restart_etcd(running)


def rotate(stack: Stack, names: list[str]) -> list[str]:
    """Rotate `names` (default: every rotatable secret); return what was rotated, in order."""
    unknown = sorted(set(names) - set(ROTATABLE))
    if unknown:
        raise OrchestrateError(f"cannot rotate {', '.join(unknown)}: the secrets that rotate "
                               f"are {', '.join(ROTATABLE)}")
    running = Running(stack)
    done = []
    for name in [n for n in ROTATABLE if n in (names or ROTATABLE)]:
        started = time.monotonic()
        if name in ROLES:
            rotate_role(running, name)
        elif name in REDIS_USERS:
            rotate_redis_user(running, name)
        elif name == API_TOKENS:
            rotate_tokens(running)
        else:
            rotate_certificates(running)
        say(f"rotated {name} in {time.monotonic() - started:.1f}s")
        done.append(name)
    return done
