"""The one declarative description of the cachestack stack.

Everything that runs the stack (this orchestrator; the compose, swarm and k8s files and their
tests) is meant to agree with `describe_stack()`. It is plain, frozen data: `as_dict()` turns
it into dicts/lists/str/int only, so a test can compare another deployment format against it.
The code that realises it with the Docker SDK lives in `orchestrate.engine`; image references
per mode (official/offline) are resolved by `orchestrate.images` from `ImageSpec`.

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

DEFAULT_PROJECT = "cachestack"
DEFAULT_PORT = 8000
SECRETS_DIR = "secrets"  # relative to the repository root
SECRETS_TARGET_DIR = "/run/secrets"

POSTGRES_UID = 999
REDIS_UID = 999
SERVICE_UID = 10001

DB_USER = "cachestack"
DB_NAME = "cachestack"

# Redis must get requirepass from a config file, never argv: printf is a shell builtin, so the
# value is in no process's command line; /tmp is a tmpfs readable by uid 999 only (umask 077).
REDIS_COMMAND = (
    "umask 077; "
    "printf 'requirepass %s\\n' \"$(cat /run/secrets/redis_password)\" > /tmp/redis.conf; "
    "exec redis-server /tmp/redis.conf --appendonly yes --dir /data"
)
REDIS_HEALTH = 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli ping | grep -q PONG'


@dataclass(frozen=True)
class ImageSpec:
    """Where an image comes from in each mode.

    official: a pinned reference pulled from a registry (None: always built locally).
    context: build context (repo-relative) for the offline build, or for every mode when
    `official` is None. The offline base image (debootstrap, docker/base/mkrootfs.sh) is passed
    as build arg BASE_IMAGE; `official_base` is the BASE_IMAGE in official mode.
    """

    official: str | None
    context: str
    dockerfile: str = "Dockerfile"
    official_base: str | None = None


@dataclass(frozen=True)
class SecretMount:
    """A secret file delivered at `target`, owned by uid:gid with `mode`, read-only."""

    secret: str
    target: str
    uid: int
    gid: int
    mode: int = 0o400


@dataclass(frozen=True)
class HealthCheck:
    """Docker healthcheck; `test` is in Docker's form ("CMD", ...) or ("CMD-SHELL", "...")."""

    test: tuple[str, ...]
    interval_s: float = 2.0
    timeout_s: float = 3.0
    retries: int = 5
    start_period_s: float = 30.0


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
    restart: str = "unless-stopped"
    privileged: bool = False


@dataclass(frozen=True)
class Port:
    """A published port: host_ip:host -> container."""

    container: int
    host: int
    host_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    """One container of the stack. `image` is a key of `Stack.images`."""

    name: str
    image: str
    user: str
    command: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    secrets: tuple[SecretMount, ...]
    networks: tuple[str, ...]
    volumes: tuple[tuple[str, str], ...]  # (volume name, mount path)
    healthcheck: HealthCheck
    hardening: Hardening
    ports: tuple[Port, ...] = ()
    ready_path: str | None = None  # HTTP readiness path through the published port


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
    secrets: tuple[str, ...]  # file names under secrets/
    images: dict[str, ImageSpec] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        """The label that marks every resource of this project (cleanup finds them by it)."""
        return {PROJECT_LABEL: self.project}

    def container_name(self, service: str) -> str:
        return f"{self.project}-{service}"

    def resource_name(self, name: str) -> str:
        """Docker name of a network or volume of this project."""
        return f"{self.project}_{name}"

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)


IMAGES: dict[str, ImageSpec] = {
    "postgres": ImageSpec(official="postgres:16.6-bookworm", context="docker/postgres"),
    "redis": ImageSpec(official="redis:7.4.1-bookworm", context="docker/redis"),
    "service": ImageSpec(official=None, context=".", official_base="python:3.11.10-slim-bookworm"),
}


def describe_stack(project: str = DEFAULT_PROJECT, port: int = DEFAULT_PORT) -> Stack:
    """Return the stack for `project` with the service published on 127.0.0.1:`port`."""
    pg_secret = SecretMount(
        "postgres_password", f"{SECRETS_TARGET_DIR}/postgres_password", POSTGRES_UID, POSTGRES_UID
    )
    redis_secret = SecretMount(
        "redis_password", f"{SECRETS_TARGET_DIR}/redis_password", REDIS_UID, REDIS_UID
    )
    postgres = Service(
        name="postgres",
        image="postgres",
        user=f"{POSTGRES_UID}:{POSTGRES_UID}",
        command=("postgres",),
        environment=(
            ("POSTGRES_USER", DB_USER),
            ("POSTGRES_DB", DB_NAME),
            ("POSTGRES_PASSWORD_FILE", pg_secret.target),
            ("PGDATA", "/var/lib/postgresql/data"),
        ),
        secrets=(pg_secret,),
        networks=("backend",),
        volumes=(("pgdata", "/var/lib/postgresql/data"),),
        healthcheck=HealthCheck(
            ("CMD", "pg_isready", "-h", "127.0.0.1", "-U", DB_USER, "-d", DB_NAME)
        ),
        hardening=Hardening(
            tmpfs=(
                ("/tmp", "rw,noexec,nosuid,size=64m"),
                (
                    "/var/run/postgresql",
                    f"rw,noexec,nosuid,size=8m,uid={POSTGRES_UID},gid={POSTGRES_UID},mode=0775",
                ),
            ),
            mem_limit="512m",
            pids_limit=256,
        ),
    )
    redis = Service(
        name="redis",
        image="redis",
        user=f"{REDIS_UID}:{REDIS_UID}",
        command=("sh", "-c", REDIS_COMMAND),
        environment=(),
        secrets=(redis_secret,),
        networks=("backend",),
        volumes=(("redisdata", "/data"),),
        healthcheck=HealthCheck(("CMD-SHELL", REDIS_HEALTH)),
        hardening=Hardening(
            tmpfs=(("/tmp", f"rw,noexec,nosuid,size=8m,uid={REDIS_UID},gid={REDIS_UID}"),),
            mem_limit="256m",
            pids_limit=64,
        ),
    )
    service = Service(
        name="service",
        image="service",
        user=f"{SERVICE_UID}:{SERVICE_UID}",
        command=("python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"),
        environment=(
            ("DATABASE_URL", f"postgresql://{DB_USER}@postgres:5432/{DB_NAME}"),
            ("DATABASE_PASSWORD_FILE", f"{SECRETS_TARGET_DIR}/postgres_password"),
            ("REDIS_URL", "redis://redis:6379/0"),
            ("REDIS_PASSWORD_FILE", f"{SECRETS_TARGET_DIR}/redis_password"),
            ("TMPDIR", "/tmp"),
        ),
        secrets=(
            SecretMount("postgres_password", pg_secret.target, SERVICE_UID, SERVICE_UID),
            SecretMount("redis_password", redis_secret.target, SERVICE_UID, SERVICE_UID),
        ),
        networks=("backend", "frontend"),
        volumes=(),
        healthcheck=HealthCheck(("CMD", "python", "-m", "service.probe"), interval_s=5.0),
        hardening=Hardening(
            tmpfs=(
                (
                    "/tmp",
                    f"rw,noexec,nosuid,size=64m,uid={SERVICE_UID},gid={SERVICE_UID}",
                ),
            ),
            mem_limit="512m",
            pids_limit=256,
        ),
        ports=(Port(container=8000, host=port),),
        ready_path="/readyz",
    )
    return Stack(
        project=project,
        services=(postgres, redis, service),
        networks=(Network("backend", internal=True), Network("frontend", internal=False)),
        volumes=("pgdata", "redisdata"),
        secrets=("postgres_password", "redis_password"),
        images=dict(IMAGES),
    )


def as_dict(stack: Stack) -> dict[str, Any]:
    """The stack as plain data (dicts, lists, str, int, float, bool, None)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(stack))
