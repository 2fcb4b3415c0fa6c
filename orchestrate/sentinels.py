"""The Redis of `up --ha` as it is now, for `status` and for the tests and benchmarks that fail
it over: which server is the primary and which its replica (as each says of itself), what each
Sentinel says (the primary it names, and whether the Sentinels it knows could agree on a
failover), and the cache's epoch on the primary.

Everything is asked inside the containers with redis-cli, as the admin user, whose password
the command reads there from the container's own file: it never reaches this process, a
command line or the output.
"""

from __future__ import annotations

import docker
from docker.models.containers import Container

from .containers import connect, exec_output, project_containers
from .errors import OrchestrateError
from .output import say
from .stack import (
    CA_CERT,
    DB_NAME,
    REDIS_PORT,
    REDIS_SERVERS,
    SENTINEL_MASTER,
    SENTINEL_PORT,
    SENTINELS,
    SERVICE_LABEL,
    Service,
    Stack,
    secret_target,
)
from .waits import unless, until

# How long a planned failover, or a server or Sentinel replaced, may take to settle: the
# Sentinels' failover-timeout (docker/redis/sentinel.conf) and a replica's first full sync.
SETTLE_S = 60
POLL_S = 0.5  # each poll is a docker exec of redis-cli in every Sentinel
QUORUM = "OK 3 usable"  # what SENTINEL CKQUORUM says when every Sentinel is there

ADMIN = (f'REDISCLI_AUTH="$(cat {secret_target("redis_admin_password")})" timeout 5 '
         f"redis-cli --tls --cacert {secret_target(CA_CERT)} --user admin -h 127.0.0.1 "
         '--no-auth-warning -p "$0" -e "$@"')


def admin(container: Container, port: int, *command: str) -> list[str]:
    """The reply of the Redis server or Sentinel in `container` (listening on `port`) to
    `command`, one line a value; OrchestrateError when it does not answer, or refuses."""
    chunks = exec_output(container, ["sh", "-c", ADMIN, str(port), *command],
                         container.attrs["Config"]["User"])
    return b"".join(out for out, _ in chunks).decode(errors="replace").splitlines()


def _running(client: docker.DockerClient, stack: Stack, name: str) -> Container | None:
    found = [c for c in project_containers(client, stack.project, name) if c.status == "running"]
    return found[0] if found else None


def _running_sentinels(client: docker.DockerClient, stack: Stack) -> list[Container]:
    return [c for c in (_running(client, stack, name) for name in SENTINELS) if c is not None]


def sentinel_view(sentinel: Container) -> tuple[str, str, str]:
    """(the primary the Sentinel names, its flags for it, its quorum check): e.g. ('redis-1',
    'master', 'OK 3 usable Sentinels. Quorum and failover authorization can be reached')."""
    reply = admin(sentinel, SENTINEL_PORT, "SENTINEL", "MASTER", SENTINEL_MASTER)
    fields = dict(zip(reply[::2], reply[1::2], strict=False))
    try:
        quorum = " ".join(admin(sentinel, SENTINEL_PORT, "SENTINEL", "CKQUORUM", SENTINEL_MASTER))
    except OrchestrateError as exc:
        quorum = exc.message.partition(": ")[2]  # NOQUORUM, and why
    return fields.get("ip", "?"), fields.get("flags", "?"), quorum


def primary(client: docker.DockerClient, stack: Stack) -> str:
    """The server the first Sentinel that answers names the primary."""
    for sentinel in _running_sentinels(client, stack):
        try:
            return sentinel_view(sentinel)[0]
        except OrchestrateError:
            continue
    raise OrchestrateError(f"no Sentinel of project {stack.project} answers")


def server_role(server: Container) -> str:
    """What the Redis server says it is: 'primary, 1 replica(s) connected' or 'replica of
    redis-1, link up'."""
    info = dict(line.split(":", 1) for line in admin(server, REDIS_PORT, "INFO", "replication")
                if ":" in line)
    if info.get("role") == "master":
        return f"primary, {info.get('connected_slaves', '0')} replica(s) connected"
    return f"replica of {info.get('master_host', '?')}, link {info.get('master_link_status', '?')}"


def epoch(client: docker.DockerClient, stack: Stack, server: Container) -> str:
    """The cache's epoch on `server` (docs/design.md, "Epochs"): under the database's
    namespace, which Postgres keeps."""
    postgres = _running(client, stack, "postgres")
    if postgres is None:
        return "unknown (no running postgres)"
    query = ["psql", "-U", "postgres", "-d", DB_NAME, "-tAc", "SELECT value FROM cache_namespace"]
    out = b"".join(o for o, _ in exec_output(postgres, query, postgres.attrs["Config"]["User"]))
    namespace = out.decode().strip()
    found = admin(server, REDIS_PORT, "GET", f"cs:1:{namespace}:epoch")
    return found[0] if found and found[0] else "none yet"


def before_replacing(client: docker.DockerClient, stack: Stack, service: Service,
                     container: Container) -> None:
    """Ready a Redis server of `up --ha` to be removed: the primary hands its role to its
    replica first (SENTINEL FAILOVER, which the service follows as any failover: a new
    epoch), so that the cache is never without a primary for longer than a failover."""
    if service.name not in REDIS_SERVERS or container.status != "running" \
            or primary(client, stack) != service.name:
        return
    sentinels = _running_sentinels(client, stack)
    try:
        admin(sentinels[0], SENTINEL_PORT, "SENTINEL", "FAILOVER", SENTINEL_MASTER)
    except OrchestrateError as exc:  # no replica fit to take over: nothing to hand over to
        say(f"{service.name}: replaced while the primary ({exc.message})")
        return
    until(unless(lambda: all(sentinel_view(s)[0] != service.name for s in sentinels)), SETTLE_S,
          f"the Sentinels did not fail {service.name} over", poll_s=POLL_S)
    say(f"{service.name}: handed the primary's role to {primary(client, stack)}")


def wait_rejoined(client: docker.DockerClient, stack: Stack, name: str) -> None:
    """Until the Redis server `name`, made anew, replicates from the primary, or the Sentinel
    `name` names the primary with every Sentinel there: the next may be replaced then."""
    container = _running(client, stack, name)
    if container is None:
        raise OrchestrateError(f"{name} is not running")
    if name in REDIS_SERVERS:
        joined = unless(
            lambda: server_role(container) == f"replica of {primary(client, stack)}, link up")
        what = f"{name} did not replicate from the primary"
    else:
        joined = unless(lambda: sentinel_view(container)[2].startswith(QUORUM))
        what = f"{name} did not join the other Sentinels"
    until(joined, SETTLE_S, what, poll_s=POLL_S)


def status_lines(stack: Stack) -> list[str]:
    """What `status` says of the Redis of `up --ha`: each server's role, each Sentinel's view,
    and the cache's epoch on the primary; one line each, a server or Sentinel that does not
    answer said so."""
    client = connect()
    lines, primary_server = [], None
    for name in REDIS_SERVERS:
        container = _running(client, stack, name)
        try:
            role = server_role(container) if container else "not running"
        except OrchestrateError:
            role = "no answer"
        if role.startswith("primary"):
            primary_server = container
        lines.append(f"{name:<11} {role}")
    for name in SENTINELS:
        container = _running(client, stack, name)
        try:
            view = "not running" if container is None else (
                "names {} the primary ({}); quorum: {}".format(*sentinel_view(container)))
        except OrchestrateError:
            view = "no answer"
        lines.append(f"{name:<11} {view}")
    state = "unknown (no primary answers)" if primary_server is None else (
        f"{epoch(client, stack, primary_server)} (on {primary_server.labels[SERVICE_LABEL]})")
    return [*lines, f"cache epoch {state}"]
