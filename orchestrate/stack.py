"""The one declarative description of the cachestack stack.

Everything that runs the stack (this orchestrator; the compose, swarm and k8s files and their
tests) is meant to agree with `describe_stack()`. It is plain, frozen data: `as_dict()` turns
it into dicts/lists/str/int only, so a test can compare another deployment format against it.
The code that realises it with the Docker SDK lives in `orchestrate.engine`; images are built by
`orchestrate.images` from `ImageSpec`, and secret files are made by `orchestrate.secretfiles`.

Who may do what:
- Postgres: the superuser `postgres` logs in only through the local socket inside its
  container; from the network only the owner role (migrations), the runtime role (the
  service) and the stream role (the change stream's readers) may log in, to the stack's
  database only, with SCRAM over TLS (docker/postgres).
- Redis: the `default` user is off; the service, the health check and operators each have a
  user of their own (docker/redis/users.acl); it listens on a TLS port only.
- HTTP: every /users route needs a bearer token from secrets/api_tokens.

Networks: only what publishes a port on the host (the proxy, Prometheus) is on a network with
a route out (`edge`); the replicas and the stream's readers, which hold the database's and
Redis's credentials, and the stores are on internal networks only (`frontend`: the proxy, the
replicas, the readers' metrics and Prometheus; `backend`: the replicas, the readers, the
stores and `migrate`).

Resource names: containers `<project>-<service>`, networks and volumes `<project>_<name>`;
every container, network and volume carries the label `org.cachestack.project=<project>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROJECT_LABEL = "org.cachestack.project"
SERVICE_LABEL = "org.cachestack.service"
CONFIG_HASH_LABEL = "org.cachestack.config-hash"
REPLICA_LABEL = "org.cachestack.replica"

DEFAULT_PROJECT = "cachestack"
DEFAULT_PORT = 8000
DEFAULT_REPLICAS = 2
DEFAULT_MONITORING_PORT = 9090
MAX_REPLICAS = 10  # the proxy's server-template slots (docker/proxy/haproxy.cfg)
SECRETS_DIR = "secrets"  # relative to the repository root
SECRETS_TARGET_DIR = "/run/secrets"

POSTGRES_UID = 999
REDIS_UID = 999
SERVICE_UID = 10001
PROXY_UID = 99
PROMETHEUS_UID = 65534  # nobody, as in the official image

DB_NAME = "cachestack"
DB_OWNER = "cachestack_owner"  # owns the database and its tables; runs the migrations
DB_APP = "cachestack_app"  # the service's login: exactly the DML it needs, owns nothing
# The change stream's login: REPLICATION, to read its slot, and SELECT on what it looks up.
DB_STREAM = "cachestack_stream"
REDIS_SERVICE_USER = "service"  # the users are defined in docker/redis/users.acl
REDIS_HEALTH_USER = "health"
REDIS_PORT = 6379
# `up --ha`: two Redis servers, the first of which starts as the primary and the other as its
# replica, and three Sentinels, which fail the primary over to the replica (a quorum of two
# must find it down: docker/redis/sentinel.conf) and tell the service which is the primary.
REDIS_SERVERS = ("redis-1", "redis-2")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
SENTINEL_PORT = 26379
SENTINEL_MASTER = "cachestack"  # what the Sentinels call the primary they watch

# Secret files under secrets/, one value each, and where containers find them.
CA_CERT = "ca.crt"
API_TOKENS = "api_tokens"

REDIS_MEMORY_LIMIT = 256 * 2**20
# Redis saves nothing here, but a replica's first sync (--ha) is a snapshot written by a forked
# child, which shares memory with Redis copy-on-write: while it runs, every page Redis writes
# is copied. Under a steady stream of writes and evictions a forked Redis peaked at about
# twice maxmemory (bench/RESULTS.md), so maxmemory is 3/8 of the limit and the rest headroom.
REDIS_MAXMEMORY = REDIS_MEMORY_LIMIT * 3 // 8


def secret_target(name: str) -> str:
    return f"{SECRETS_TARGET_DIR}/{name}"


@dataclass(frozen=True)
class ImageSpec:
    """How one image of the stack is built: `context` (repo-relative, with `dockerfile`) on
    the base image passed as build arg BASE_IMAGE.

    With a registry the base is `base`, a pinned official image. Offline, the base is built
    from Debian packages instead: from the recipe `offline_base` (a folder under
    docker/offline/) on the debootstrap base, or the debootstrap base itself when None.
    """

    repository: str
    context: str
    base: str
    offline_base: str | None
    dockerfile: str = "Dockerfile"
    # The folders whose files make the recipe, when the context holds more than them (the
    # repository's root): what the image's tag is a hash of. Empty: the context.
    sources: tuple[str, ...] = ()
    # The package's own image (the root Dockerfile): offline, its builder installs wheels the host
    # downloaded, because pip inside a build cannot be relied on to reach PyPI there.
    host_wheels: bool = False


@dataclass(frozen=True)
class SecretMount:
    """A secret file delivered at `target`, owned by uid:gid with `mode`, read-only."""

    secret: str
    target: str
    uid: int
    gid: int
    mode: int = 0o400


@dataclass(frozen=True)
class Certificate:
    """A server certificate signed by the project CA, valid for `hosts`: the files
    `<name>.crt` and `<name>.key` under secrets/."""

    name: str
    hosts: tuple[str, ...]
    # Also a client certificate: the members of etcd and of the Patroni cluster (`up --ha`)
    # present theirs to each other.
    client: bool = False

    @property
    def cert(self) -> str:
        return f"{self.name}.crt"

    @property
    def key(self) -> str:
        return f"{self.name}.key"


@dataclass(frozen=True)
class HealthCheck:
    """Docker healthcheck; `test` is in Docker's form ("CMD", ...) or ("CMD-SHELL", "...")."""

    test: tuple[str, ...]
    interval_s: float = 2.0
    timeout_s: float = 3.0
    retries: int = 5
    start_period_s: float = 30.0


# How every container asks Docker's DNS for a name: with ndots set, Docker answers at once that
# it does not know a name without a dot (a container of the stack that is down or restarting),
# where on an internal network it otherwise lets the question time out, for 20 s, stalling
# whoever asked: a request of the service, a Sentinel's whole event loop.
DNS_OPTIONS = ("ndots:1",)


@dataclass(frozen=True)
class Hardening:
    """Runtime restrictions every container gets."""

    read_only: bool = True
    tmpfs: tuple[tuple[str, str], ...] = (("/tmp", "rw,noexec,nosuid,size=64m"),)
    cap_drop: tuple[str, ...] = ("ALL",)
    cap_add: tuple[str, ...] = ()
    no_new_privileges: bool = True
    mem_limit: str = "256m"
    pids_limit: int = 128
    # CPUs it may use (a CFS quota; None: any). The service starts a worker per CPU it may use
    # (usable_cpus in service/process/serve.py): without a limit, one per CPU of the host, each
    # with its own memory, whatever mem_limit says.
    cpus: float | None = None
    restart: str = "unless-stopped"
    privileged: bool = False


@dataclass(frozen=True)
class Port:
    """A published port: host_ip:host -> container, speaking TLS when `tls`."""

    container: int
    host: int
    host_ip: str = "127.0.0.1"
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host_ip}:{self.host}"


@dataclass(frozen=True)
class Service:
    """One container of the stack. `image` is a key of `Stack.images`.

    A `once` service is a task: it runs to completion (exit 0) after the services before it
    are healthy and before the ones after it start, and has no health check.
    """

    name: str
    image: str
    user: str
    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    secrets: tuple[SecretMount, ...]
    networks: tuple[str, ...]
    volumes: tuple[tuple[str, str], ...]  # (volume name, mount path)
    healthcheck: HealthCheck | None
    hardening: Hardening
    ports: tuple[Port, ...] = ()
    ready_path: str | None = None  # HTTP readiness path through the published port
    # What a load balancer (the proxy, a Kubernetes Service) checks to keep a container in
    # rotation: nothing every replica shares (Postgres), or its outage would empty the rotation.
    rotation_path: str | None = None
    once: bool = False
    # Containers of this service at once. Each answers to the service's name on its networks,
    # which is how the proxy finds them.
    replicas: int = 1
    # How a changed container is replaced: stop-first (one writer per data volume, one owner of
    # a published port) or start-first (a new replica is in service before an old one leaves).
    update_order: str = "stop-first"


@dataclass(frozen=True)
class Network:
    name: str
    internal: bool


@dataclass(frozen=True)
class Stack:
    project: str
    services: tuple[Service, ...]
    networks: tuple[Network, ...]
    volumes: tuple[str, ...]
    secrets: tuple[str, ...]  # file names under secrets/ that containers get
    certificates: tuple[Certificate, ...] = ()
    images: dict[str, ImageSpec] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        """The label that marks every resource of this project (cleanup finds them by it)."""
        return {PROJECT_LABEL: self.project}

    def container_name(self, service: str, replica: int | None = None) -> str:
        """`<project>-<service>`, or `<project>-<service>-<n>` for replica n of a replicated
        service (n grows with every replacement, so a new replica never takes an old name)."""
        return f"{self.project}-{service}" + (f"-{replica}" if replica is not None else "")

    def resource_name(self, name: str) -> str:
        """Docker name of a network or volume of this project."""
        return f"{self.project}_{name}"

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)


IMAGES: dict[str, ImageSpec] = {
    "postgres": ImageSpec(
        repository="cachestack/postgres",
        context="docker/postgres",
        base="postgres:16.15-bookworm",
        offline_base="docker/offline/postgres",
    ),
    "redis": ImageSpec(
        repository="cachestack/redis",
        # The repository's root: the image carries the cache's functions (service/cache/lua).
        context=".",
        dockerfile="docker/redis/Dockerfile",
        sources=("docker/redis", "service/cache/lua"),
        base="redis:7.4.11-bookworm",
        offline_base="docker/offline/redis",
    ),
    "proxy": ImageSpec(
        repository="cachestack/proxy",
        context="docker/proxy",
        base="haproxy:3.0.26-trixie",
        offline_base="docker/offline/proxy",
    ),
    "prometheus": ImageSpec(
        repository="cachestack/prometheus",
        context="docker/prometheus",
        base="prom/prometheus:v2.53.5",
        offline_base="docker/offline/prometheus",
    ),
    "service": ImageSpec(
        repository="cachestack/service",
        context=".",
        base="python:3.11.16-slim-bookworm",
        offline_base=None,
        host_wheels=True,
    ),
    # `up --ha`: the members of the Patroni cluster, and of etcd, where it keeps its state.
    "patroni": ImageSpec(
        repository="cachestack/patroni",
        # docker/: the members take the single Postgres's roles and access rules from
        # docker/postgres.
        context="docker",
        dockerfile="patroni/Dockerfile",
        sources=("docker/patroni", "docker/postgres"),
        base="postgres:16.15-bookworm",
        offline_base="docker/offline/postgres",
    ),
    "etcd": ImageSpec(
        repository="cachestack/etcd",
        context="docker/etcd",
        base="debian:12.12-slim",
        offline_base=None,
    ),
    # Not the stack's: the load generator of `bench` (orchestrate/bench/wrk.py).
    "wrk": ImageSpec(
        repository="cachestack/wrk",
        context="docker/wrk",
        base="debian:12.12-slim",
        offline_base=None,
    ),
}

POSTGRES_CERT = Certificate("postgres", ("postgres", "localhost", "127.0.0.1"))
REDIS_CERT = Certificate("redis", ("redis", "localhost", "127.0.0.1"))
# Every Redis server and Sentinel of `up --ha`: clients reach each by its own name.
REDIS_HA_CERT = Certificate("redis-ha", (*REDIS_SERVERS, *SENTINELS, "localhost", "127.0.0.1"))
# The proxy's, with `up --tls`: for clients on this host. A file the project CA did not sign is
# the operator's own (secrets/README.md) and is used as it is.
PROXY_CERT = Certificate("proxy", ("localhost", "127.0.0.1"))
# The server certificates the project CA signs; a stack has those its services mount.
CERTIFICATES = (POSTGRES_CERT, REDIS_CERT, REDIS_HA_CERT, PROXY_CERT)
# HAProxy serves TLS on its port when this names its certificate (docker/proxy/haproxy.cfg).
PROXY_TLS_SETTING = "PROXY_TLS_CERT"
# Clients verify the server's certificate and its name (verify-full, redis-py's default).
DATABASE_TLS = f"sslmode=verify-full&sslrootcert={secret_target(CA_CERT)}"
REDIS_TLS = f"ssl_ca_certs={secret_target(CA_CERT)}"
# HAProxy answers on its runtime API while it runs (docker/proxy/haproxy.cfg).
PROXY_HEALTH = (
    'echo "show info" | socat stdio unix-connect:/tmp/haproxy.sock | grep -q "^Name: HAProxy"'
)
REDIS_HEALTH = (
    f'REDISCLI_AUTH="$(cat {secret_target("redis_health_password")})" '
    f"redis-cli --tls --cacert {secret_target(CA_CERT)} --user {REDIS_HEALTH_USER} "
    "-h 127.0.0.1 ping | grep -q PONG"
)
SENTINEL_HEALTH = REDIS_HEALTH.replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {SENTINEL_PORT}")


def _mounts(uid: int, *names: str) -> tuple[SecretMount, ...]:
    return tuple(SecretMount(name, secret_target(name), uid, uid) for name in names)


def _database_url(role: str, ha: bool = False) -> str:
    """How `role` reaches the database: with `ha`, whichever member of the Patroni cluster
    leads (libpq tries each host and keeps the one that takes writes)."""
    url = f"postgresql://{role}@{database_hosts(ha)}/{DB_NAME}?{DATABASE_TLS}"
    return url + "&target_session_attrs=read-write" if ha else url


def _private_tmp(uid: int, size: str) -> tuple[str, str]:
    return ("/tmp", f"rw,noexec,nosuid,size={size},uid={uid},gid={uid}")


# The settings every Postgres of the stack runs with, one server or a Patroni cluster's
# members: logical decoding for the change stream, and a cap on the WAL a replication slot
# nobody reads may keep (past it Postgres drops the slot's claim, and the stream begins a new
# cache epoch rather than fill the disk).
MAX_SLOT_WAL_KEEP_SIZE = "1GB"
POSTGRES_SETTINGS = (
    ("wal_level", "logical"),
    ("max_slot_wal_keep_size", MAX_SLOT_WAL_KEEP_SIZE),
    ("ssl_min_protocol_version", "TLSv1.3"),
)


# What the roles of docker/postgres/roles.sql need, the single Postgres's and every Patroni
# member's: their names, and the passwords it sets.
POSTGRES_ROLE_SECRETS = ("postgres_password", "postgres_owner_password", "postgres_app_password",
                         "postgres_stream_password")


def _roles_environment() -> tuple[tuple[str, str], ...]:
    return (
        ("CACHESTACK_DATABASE", DB_NAME),
        ("CACHESTACK_OWNER_ROLE", DB_OWNER),
        ("CACHESTACK_APP_ROLE", DB_APP),
        ("CACHESTACK_STREAM_ROLE", DB_STREAM),
    )


def _postgres_tmpfs() -> tuple[tuple[str, str], ...]:
    return (
        _private_tmp(POSTGRES_UID, "64m"),
        (
            "/var/run/postgresql",
            f"rw,noexec,nosuid,size=8m,uid={POSTGRES_UID},gid={POSTGRES_UID},mode=0775",
        ),
    )


# Through the local socket (peer authentication): a TCP probe would be refused by pg_hba and
# log a FATAL line every few seconds.
POSTGRES_HEALTH = ("CMD", "pg_isready", "-h", "/var/run/postgresql", "-U", "postgres", "-d",
                   DB_NAME)


def postgres_service() -> Service:
    """PostgreSQL (docker/postgres), with TLS 1.3 for the network logins of the owner and the
    runtime role; its data in the volume pgdata."""
    return Service(
        name="postgres",
        image="postgres",
        user=f"{POSTGRES_UID}:{POSTGRES_UID}",
        command=(
            "postgres",
            "-c", "listen_addresses=*",
            "-c", "ssl=on",
            "-c", f"ssl_cert_file={secret_target(POSTGRES_CERT.cert)}",
            "-c", f"ssl_key_file={secret_target(POSTGRES_CERT.key)}",
            *(arg for name, value in POSTGRES_SETTINGS for arg in ("-c", f"{name}={value}")),
        ),
        environment=(("PGDATA", "/var/lib/postgresql/data"), *_roles_environment()),
        secrets=_mounts(POSTGRES_UID, *POSTGRES_ROLE_SECRETS, POSTGRES_CERT.cert,
                        POSTGRES_CERT.key),
        networks=("backend",),
        volumes=(("pgdata", "/var/lib/postgresql/data"),),
        healthcheck=HealthCheck(POSTGRES_HEALTH),
        hardening=Hardening(tmpfs=_postgres_tmpfs(), mem_limit="512m", pids_limit=256),
    )


def _redis_container(name: str, command: tuple[str, ...], environment: tuple[tuple[str, str], ...],
                     secrets: tuple[str, ...], health: str, memory: int) -> Service:
    """A container of the Redis image (docker/redis): a Redis server or a Sentinel, hardened
    alike, with `memory` MiB."""
    return Service(
        name=name,
        image="redis",
        user=f"{REDIS_UID}:{REDIS_UID}",
        command=command,
        environment=environment,
        secrets=_mounts(REDIS_UID, *secrets),
        networks=("backend",),
        volumes=(),
        healthcheck=HealthCheck(("CMD-SHELL", health)),
        hardening=Hardening(
            tmpfs=(
                _private_tmp(REDIS_UID, "8m"),
                # Its users, its configuration and its functions' snapshot
                # (docker/redis/cachestack-redis).
                ("/data", f"rw,noexec,nosuid,size=8m,uid={REDIS_UID},gid={REDIS_UID},mode=0700"),
            ),
            mem_limit=f"{memory}m",
            pids_limit=64,
        ),
    )


def _tls_port(port: int, cert: Certificate) -> tuple[str, ...]:
    """Listen on a TLS `port` only, with `cert`; clients show no certificate of their own."""
    return ("--port", "0", "--tls-port", str(port), "--tls-cert-file", secret_target(cert.cert),
            "--tls-key-file", secret_target(cert.key), "--tls-auth-clients", "no")


def _redis_server(cert: Certificate) -> tuple[str, ...]:
    """redis-server with `cert`, as a cache: evicting, and keeping nothing across a restart."""
    return (
        "redis-server",
        *_tls_port(REDIS_PORT, cert),
        "--maxmemory", str(REDIS_MAXMEMORY),
        "--maxmemory-policy", "allkeys-lru",
        # Evict as much as a command needs before it runs, however long that takes; the
        # default bounds the time and lets a burst of writes outgrow maxmemory.
        "--maxmemory-eviction-tenacity", "100",
        # Nothing is kept across a restart: a Redis that comes back is a new epoch for
        # the service, whatever it would bring back (service/cache/trust.py). The image's
        # start script gives the server its functions, its users and its working folder.
        "--appendonly", "no",
        "--save", "",
    )


REDIS_SECRETS = ("redis_service_password", "redis_health_password", "redis_admin_password")


def redis_service() -> Service:
    """Redis (docker/redis): the cache, on a TLS port only, keeping nothing across a restart."""
    return _redis_container(
        "redis", _redis_server(REDIS_CERT), (),
        (*REDIS_SECRETS, REDIS_CERT.cert, REDIS_CERT.key, CA_CERT), REDIS_HEALTH,
        REDIS_MEMORY_LIMIT // 2**20)


# What a Redis server or a Sentinel of `up --ha` holds: the users of both (replication.acl's
# and sentinel.conf's, the replica user's password also to log in to its primary), the
# certificate they all share, and the CA, which they check each other's certificates with.
HA_SECRETS = (*REDIS_SECRETS, "redis_replica_password", "redis_sentinel_password",
              REDIS_HA_CERT.cert, REDIS_HA_CERT.key, CA_CERT)


def _sentinels_setting() -> tuple[tuple[str, str], ...]:
    return (("REDIS_SENTINELS", ",".join(f"{name}:{SENTINEL_PORT}" for name in SENTINELS)),)


def _ha_start() -> tuple[tuple[str, str], ...]:
    """What the start script of a Redis server or Sentinel of `up --ha` asks: the Sentinels
    (who is the primary now), and the servers, the first of which is the primary of the
    stack's first start (docker/redis/cachestack-redis)."""
    return (*_sentinels_setting(),
            ("REDIS_SERVERS", ",".join(f"{name}:{REDIS_PORT}" for name in REDIS_SERVERS)))


def redis_ha_server(name: str) -> Service:
    """A Redis server of `up --ha`: the primary or its replica, as the Sentinels say. It
    replicates over TLS, checking its primary's certificate, and announces itself by `name`,
    which is how the Sentinels and the service reach it."""
    return _redis_container(
        name,
        (*_redis_server(REDIS_HA_CERT),
         "--tls-ca-cert-file", secret_target(CA_CERT),
         "--tls-replication", "yes",
         "--replica-announce-ip", name,
         # A replica loads its primary's data from the socket, keeping what it had until the
         # load is done: /data is too small a tmpfs for a snapshot. With one replica, the
         # primary has nobody to wait for before it sends.
         "--repl-diskless-sync", "yes",
         "--repl-diskless-sync-delay", "0",
         "--repl-diskless-load", "swapdb"),
        _ha_start(), HA_SECRETS, REDIS_HEALTH, REDIS_MEMORY_LIMIT // 2**20)


def sentinel_service(name: str) -> Service:
    """A Sentinel of `up --ha` (docker/redis/sentinel.conf), on a TLS port only, speaking TLS to
    the servers and the other Sentinels, and announcing itself by `name`."""
    return _redis_container(
        name,
        ("redis-server", "--sentinel",
         *_tls_port(SENTINEL_PORT, REDIS_HA_CERT),
         "--tls-ca-cert-file", secret_target(CA_CERT),
         "--tls-replication", "yes",
         "--sentinel", "announce-ip", name),
        _ha_start(), HA_SECRETS, SENTINEL_HEALTH, 64)


def migrate_service(ha: bool = False) -> Service:
    """The task that brings the schema up to date, as the owner role, before the replicas
    start."""
    return Service(
        name="migrate",
        image="service",
        user=f"{SERVICE_UID}:{SERVICE_UID}",
        command=("python", "-m", "service", "migrate"),
        environment=(
            ("DATABASE_URL", _database_url(DB_OWNER, ha)),
            ("DATABASE_PASSWORD_FILE", secret_target("postgres_owner_password")),
            ("DATABASE_APP_ROLE", DB_APP),
            ("DATABASE_STREAM_ROLE", DB_STREAM),
        ),
        secrets=_mounts(SERVICE_UID, "postgres_owner_password", CA_CERT),
        networks=("backend",),
        volumes=(),
        healthcheck=None,
        hardening=Hardening(
            tmpfs=(_private_tmp(SERVICE_UID, "16m"),), restart="no", pids_limit=32
        ),
        once=True,
    )


def _redis_location(ha: bool) -> tuple[tuple[str, str], ...]:
    """Where the service finds Redis: the one server, or (--ha) the primary the Sentinels
    name (the URL gives the user and the TLS settings)."""
    host = REDIS_SERVERS[0] if ha else "redis"
    url = (("REDIS_URL", f"rediss://{REDIS_SERVICE_USER}@{host}:{REDIS_PORT}/0?{REDIS_TLS}"),)
    if not ha:
        return url
    return (*url, *_sentinels_setting(), ("REDIS_SENTINEL_MASTER", SENTINEL_MASTER))


def replicas_service(replicas: int, ha: bool = False) -> Service:
    """The user service itself (the root Dockerfile), `replicas` containers of it, as the
    runtime role; it publishes no port: the proxy reaches it on the frontend network."""
    return Service(
        name="service",
        image="service",
        user=f"{SERVICE_UID}:{SERVICE_UID}",
        command=("python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"),
        environment=(
            ("DATABASE_URL", _database_url(DB_APP, ha)),
            ("DATABASE_PASSWORD_FILE", secret_target("postgres_app_password")),
            *_redis_location(ha),
            ("REDIS_PASSWORD_FILE", secret_target("redis_service_password")),
            ("API_TOKENS_FILE", secret_target(API_TOKENS)),
            ("TMPDIR", "/tmp"),
        ),
        secrets=_mounts(
            SERVICE_UID, "postgres_app_password", "redis_service_password", API_TOKENS, CA_CERT
        ),
        networks=("backend", "frontend"),
        volumes=(),
        healthcheck=HealthCheck(("CMD", "python", "-m", "service.probe"), interval_s=5.0),
        hardening=Hardening(
            tmpfs=(_private_tmp(SERVICE_UID, "64m"),),
            mem_limit="512m",
            pids_limit=256,
            cpus=2.0,
        ),
        ready_path="/readyz",
        rotation_path="/healthz",
        replicas=replicas,
        update_order="start-first",
    )


# Where each reader of the change stream serves its metrics, on the frontend network, for
# Prometheus alone: nothing publishes it.
STREAM_METRICS_PORT = 9101
STREAM_READERS = 2  # Postgres lets one read the slot; the other takes over when it stops


def stream_service(ha: bool = False) -> Service:
    """The change stream (`python -m service stream`): two readers that take turns on the
    users table's replication slot, invalidating the cache for every change whoever made it,
    as the stream role (a REPLICATION login, over TLS) and the service's Redis user, which
    they find as the service does (with `ha`, through the Sentinels)."""
    replicas = replicas_service(STREAM_READERS, ha)
    return dataclasses.replace(
        replicas,
        name="stream",
        command=("python", "-m", "service", "stream", "--host", "0.0.0.0"),
        environment=(
            ("DATABASE_URL", _database_url(DB_STREAM, ha)),
            ("DATABASE_PASSWORD_FILE", secret_target("postgres_stream_password")),
            *((name, value) for name, value in replicas.environment
              if name.startswith("REDIS_")),
            ("PORT", str(STREAM_METRICS_PORT)),
        ),
        secrets=_mounts(SERVICE_UID, "postgres_stream_password", "redis_service_password",
                        CA_CERT),
        # Alive while it answers; ready once it has taken its turn on the slot (a new epoch
        # begun, if one was due): `up` starts the next reader, and the proxy, only then.
        healthcheck=HealthCheck(("CMD", "python", "-m", "service.probe", "/metrics"),
                                interval_s=5.0),
        hardening=Hardening(tmpfs=(_private_tmp(SERVICE_UID, "16m"),), pids_limit=64),
        ready_path="/readyz",
        rotation_path=None,
    )


def proxy_service(port: int, tls: bool) -> Service:
    """HAProxy (docker/proxy) in front of every replica, published on 127.0.0.1:`port`; with
    `tls`, speaking TLS only, with PROXY_CERT."""
    return Service(
        name="proxy",
        image="proxy",
        user=f"{PROXY_UID}:{PROXY_UID}",
        command=("haproxy", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"),
        environment=((PROXY_TLS_SETTING, secret_target(PROXY_CERT.cert)),) if tls else (),
        secrets=_mounts(PROXY_UID, PROXY_CERT.cert, PROXY_CERT.key) if tls else (),
        networks=("frontend", "edge"),
        volumes=(),
        healthcheck=HealthCheck(("CMD-SHELL", PROXY_HEALTH)),
        hardening=Hardening(
            tmpfs=(_private_tmp(PROXY_UID, "8m"),),
            mem_limit="128m",
            pids_limit=64,
        ),
        ports=(Port(container=8000, host=port, tls=tls),),
        ready_path="/readyz",
    )


def prometheus_service(port: int) -> Service:
    """Prometheus (docker/prometheus): scrapes every replica and the proxy, which it reaches on
    the frontend network; its UI and API are published on 127.0.0.1:`port` (from the edge
    network)."""
    return Service(
        name="prometheus",
        image="prometheus",
        user=f"{PROMETHEUS_UID}:{PROMETHEUS_UID}",
        command=(
            "prometheus",
            "--config.file=/etc/cachestack/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            "--storage.tsdb.retention.time=15d",
        ),
        environment=(),
        secrets=(),
        networks=("frontend", "edge"),
        volumes=(("prometheusdata", "/prometheus"),),
        # promtool asks the query API, which only a running server answers.
        healthcheck=HealthCheck(
            ("CMD", "promtool", "query", "instant", "http://127.0.0.1:9090", "vector(1)")
        ),
        hardening=Hardening(
            tmpfs=(_private_tmp(PROMETHEUS_UID, "8m"),),
            mem_limit="256m",
            pids_limit=128,
        ),
        ports=(Port(container=9090, host=port),),
    )


# --- `up --ha`: Postgres as a Patroni cluster ---------------------------------------------
# Three Postgres members, one leader and two streaming replicas, one of them synchronous: a
# commit is acknowledged once it is on two members, and Patroni promotes only the synchronous
# one, so a failover loses no acknowledged write. Patroni elects the leader through etcd, whose
# three members keep a quorum while one is away. Clients find the leader themselves: their URL
# names every member, and libpq keeps the one that takes writes (target_session_attrs).
PATRONI_MEMBERS = ("postgres-1", "postgres-2", "postgres-3")
ETCD_MEMBERS = ("etcd-1", "etcd-2", "etcd-3")
PATRONI_CLUSTER = "cachestack"  # Patroni's scope: the cluster's name in etcd
ETCD_UID = 999
DB_REPLICATION = "cachestack_replication"  # streaming, and a new replica's copy
DB_REWIND = "cachestack_rewind"  # pg_rewind of a former leader that comes back as a replica
STREAM_SLOT = "cachestack_invalidation"  # the change stream's, which Patroni leaves alone
# How long the leader's key in etcd lives without being renewed (the longest a dead leader
# keeps the lead), how often each member looks at the cluster, and how long it tries etcd or
# Postgres again before giving up (ttl >= loop_wait + 2 * retry_timeout, Patroni's rule).
PATRONI_TTL = 10
PATRONI_LOOP_WAIT = 2
PATRONI_RETRY_TIMEOUT = 4
# Patroni's synchronous mode: "on" (with no replica left, the leader takes writes alone, and
# nobody may take over from it) or "strict" (no write without a synchronous replica).
SYNCHRONOUS_MODE = "on"


def database_hosts(ha: bool) -> str:
    """host:port of each server a client may find the database on, as libpq's multi-host URLs
    take them: the single Postgres, or every member of the Patroni cluster."""
    return ",".join(f"{name}:5432" for name in (PATRONI_MEMBERS if ha else ("postgres",)))


def member_certificate(name: str) -> Certificate:
    """A member's certificate, which names it: a server's, and a client's for its peers."""
    return Certificate(name, (name, "localhost", "127.0.0.1"), client=True)


def etcd_service(name: str) -> Service:
    """A member of etcd, where Patroni keeps the cluster's state: TLS only, and only clients
    and peers with a certificate of the project CA (the Patroni members' and its own)."""
    cert = member_certificate(name)
    tls = (secret_target(cert.cert), secret_target(cert.key), secret_target(CA_CERT))
    peers = ",".join(f"{member}=https://{member}:2380" for member in ETCD_MEMBERS)
    return Service(
        name=name,
        image="etcd",
        user=f"{ETCD_UID}:{ETCD_UID}",
        command=(
            "etcd",
            "--name", name,
            "--data-dir", "/var/lib/etcd/data",
            "--listen-client-urls", "https://0.0.0.0:2379",
            "--advertise-client-urls", f"https://{name}:2379",
            "--listen-peer-urls", "https://0.0.0.0:2380",
            "--initial-advertise-peer-urls", f"https://{name}:2380",
            "--initial-cluster", peers,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", PATRONI_CLUSTER,
            "--client-cert-auth",
            "--cert-file", tls[0], "--key-file", tls[1], "--trusted-ca-file", tls[2],
            "--peer-client-cert-auth",
            "--peer-cert-file", tls[0], "--peer-key-file", tls[1], "--peer-trusted-ca-file", tls[2],
        ),
        environment=(),
        secrets=_mounts(ETCD_UID, cert.cert, cert.key, CA_CERT),
        networks=("dcs",),
        volumes=((f"{name}-data", "/var/lib/etcd"),),
        # A member is healthy while the cluster has a quorum and answers it.
        healthcheck=HealthCheck((
            "CMD", "etcdctl", "--endpoints", "https://127.0.0.1:2379", "--cacert", tls[2],
            "--cert", tls[0], "--key", tls[1], "endpoint", "health")),
        hardening=Hardening(tmpfs=(_private_tmp(ETCD_UID, "8m"),), mem_limit="256m",
                            pids_limit=128),
    )


def patroni_service(name: str) -> Service:
    """A member of the Patroni cluster (docker/patroni): Postgres, with the single one's roles,
    access rules and settings, which Patroni starts as the leader or a replica; its data in
    the volume `<name>-data`."""
    cert = member_certificate(name)
    return Service(
        name=name,
        image="patroni",
        user=f"{POSTGRES_UID}:{POSTGRES_UID}",
        command=("cachestack-patroni",
                 *(arg for setting, value in POSTGRES_SETTINGS
                   for arg in ("-c", f"{setting}={value}"))),
        environment=(
            ("PGDATA", "/var/lib/postgresql/data"),
            *_roles_environment(),
            ("CACHESTACK_CLUSTER", PATRONI_CLUSTER),
            ("CACHESTACK_MEMBER", name),
            ("CACHESTACK_ETCD", ",".join(f"{member}:2379" for member in ETCD_MEMBERS)),
            ("CACHESTACK_REPLICATION_ROLE", DB_REPLICATION),
            ("CACHESTACK_REWIND_ROLE", DB_REWIND),
            ("CACHESTACK_STREAM_SLOT", STREAM_SLOT),
            ("CACHESTACK_TTL", str(PATRONI_TTL)),
            ("CACHESTACK_LOOP_WAIT", str(PATRONI_LOOP_WAIT)),
            ("CACHESTACK_RETRY_TIMEOUT", str(PATRONI_RETRY_TIMEOUT)),
            ("CACHESTACK_SYNCHRONOUS", SYNCHRONOUS_MODE),
        ),
        secrets=_mounts(POSTGRES_UID, *POSTGRES_ROLE_SECRETS, "postgres_replication_password",
                        "postgres_rewind_password", "patroni_api_password", cert.cert,
                        cert.key, CA_CERT),
        # backend: the service and `migrate` reach Postgres; dcs: etcd, and the members' REST
        # APIs, which answer only a client with a certificate of the project CA.
        networks=("backend", "dcs"),
        volumes=((f"{name}-data", "/var/lib/postgresql/data"),),
        healthcheck=HealthCheck(POSTGRES_HEALTH),
        hardening=Hardening(tmpfs=_postgres_tmpfs(), mem_limit="512m", pids_limit=256),
    )


def postgres_services(ha: bool) -> tuple[Service, ...]:
    """The database: one Postgres, or (`ha`) three etcd members and the three members of a
    Patroni cluster, which keeps its state in them."""
    if ha:
        return (*(etcd_service(name) for name in ETCD_MEMBERS),
                *(patroni_service(name) for name in PATRONI_MEMBERS))
    return (postgres_service(),)


def database_certificates(ha: bool) -> tuple[Certificate, ...]:
    """The certificates the database's servers present: the single Postgres's, or each
    member's of the Patroni cluster and of etcd."""
    if ha:
        return tuple(member_certificate(name) for name in (*PATRONI_MEMBERS, *ETCD_MEMBERS))
    return (POSTGRES_CERT,)


def database_networks(ha: bool) -> tuple[Network, ...]:
    """With `ha`, the network of Patroni's members and etcd, which nothing else joins."""
    return (Network("dcs", internal=True),) if ha else ()


def redis_services(ha: bool) -> tuple[Service, ...]:
    """The cache: one Redis; with `ha`, a primary, its replica and three Sentinels."""
    if not ha:
        return (redis_service(),)
    return (*map(redis_ha_server, REDIS_SERVERS), *map(sentinel_service, SENTINELS))


def describe_stack(
    project: str = DEFAULT_PROJECT, port: int = DEFAULT_PORT, replicas: int = DEFAULT_REPLICAS,
    monitoring_port: int | None = None, tls: bool = False, ha: bool = False,
) -> Stack:
    """Return the stack for `project`: `replicas` service containers behind the proxy, which
    is published on 127.0.0.1:`port` (with `tls`, speaking TLS only, with PROXY_CERT), and
    with a `monitoring_port`, Prometheus published there; with `ha`, Postgres and Redis
    highly available. Its services start in this order."""
    services = (*postgres_services(ha), *redis_services(ha), migrate_service(ha),
                replicas_service(replicas, ha), stream_service(ha), proxy_service(port, tls))
    if monitoring_port is not None:
        services += (prometheus_service(monitoring_port),)
    mounted = dict.fromkeys(m.secret for s in services for m in s.secrets)
    return Stack(
        project=project,
        services=services,
        networks=(Network("backend", internal=True), Network("frontend", internal=True),
                  Network("edge", internal=False), *database_networks(ha)),
        volumes=tuple(v for s in services for v, _ in s.volumes),
        secrets=tuple(mounted),
        certificates=tuple(dict.fromkeys(c for c in (*database_certificates(ha), *CERTIFICATES)
                                         if c.cert in mounted)),
        images={key: IMAGES[key] for key in dict.fromkeys(s.image for s in services)},
    )


@dataclass(frozen=True)
class Settings:
    """What a stack is brought up with: `up`'s options. `up` records them with the stack
    (orchestrate.record), and every later command keeps them. `images` is the mode the images
    were made in (official or offline, once `up` has chosen), so that a container made again
    runs an image made the same way."""

    port: int = DEFAULT_PORT
    images: str = "auto"
    replicas: int = DEFAULT_REPLICAS
    monitoring_port: int | None = None  # None: no Prometheus
    tls: bool = False
    ha: bool = False

    def stack(self, project: str) -> Stack:
        return describe_stack(project, self.port, self.replicas, self.monitoring_port, self.tls,
                              self.ha)


def as_dict(stack: Stack) -> dict[str, Any]:
    """The stack as plain data (dicts, lists, str, int, float, bool, None)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(stack))
