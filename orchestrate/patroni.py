"""The Patroni cluster of a stack brought up with `--ha` (orchestrate/stack.py): which member
leads, each member's role and lag, a switchover, and a member replaced without a failed
request.

The orchestrator asks Patroni's REST API from inside a member, with `cachestack-patroni
cluster|switchover` (docker/patroni) run as the member's own user: the member's client
certificate and the API's password never leave it, and nothing is on a command line.

A member is replaced (new image or settings) as a planned change, one at a time: a leader first
hands the lead to its synchronous standby (a switchover: writes pause for a second or two,
which the service waits out), then the member stops (Patroni stops Postgres and leaves the
cluster), and the next one is touched only once the new one streams from the leader again,
so that the leader always has a synchronous standby to hand over to.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import docker
import docker.errors
from docker.models.containers import Container

from .containers import exec_output, project_containers
from .errors import OrchestrateError
from .output import say
from .stack import ETCD_MEMBERS, PATRONI_MEMBERS, Service
from .waits import until

DEADLINE_S = 120.0
POLL_S = 0.5
# How long a stopping member gets to stop Postgres and leave the cluster before Docker kills it.
STOP_GRACE_S = 60
LEADER, SYNC_STANDBY = "leader", "sync_standby"
UP = ("running", "streaming")


@dataclass(frozen=True)
class Member:
    """A member as Patroni sees it: its role (leader, sync_standby, replica), its state
    (running, streaming, stopped, ...), its timeline and how far it is behind the leader
    (bytes; None for the leader, or when Patroni cannot tell)."""

    name: str
    role: str
    state: str
    timeline: int | None
    lag: int | None

    @property
    def up(self) -> bool:
        return self.state in UP and (self.role == LEADER or self.lag is not None)


def running_members(client: docker.DockerClient, project: str) -> list[Container]:
    """The project's running Patroni members (none: not an `up --ha` stack)."""
    return [container for name in PATRONI_MEMBERS
            for container in project_containers(client, project, name)
            if container.status == "running"]


def ask(container: Container, *args: str) -> str:
    """`cachestack-patroni ARGS` in a member, as its user; its output."""
    return b"".join(out for out, _ in exec_output(
        container, ["cachestack-patroni", *args], container.attrs["Config"]["User"])).decode()


def cluster(client: docker.DockerClient, project: str) -> list[Member]:
    """Every member, as the first running member that answers tells it."""
    problems = []
    for container in running_members(client, project):
        try:
            members = json.loads(ask(container, "cluster"))["members"]
        except (OrchestrateError, docker.errors.APIError, ValueError, KeyError) as exc:
            problems.append(f"{container.name}: {exc}")
            continue
        return [Member(m["name"], m["role"], m.get("state", ""), m.get("timeline"),
                       m["lag"] if isinstance(m.get("lag"), int) else None) for m in members]
    raise OrchestrateError(f"no member of project {project}'s Patroni cluster answers"
                           + (f" ({'; '.join(problems)})" if problems else ""))


def container_of(client: docker.DockerClient, project: str, name: str) -> Container:
    found = [c for c in project_containers(client, project, name) if c.status == "running"]
    if not found:
        raise OrchestrateError(f"project {project} has no running {name}")
    return found[0]


def leader(client: docker.DockerClient, project: str) -> Container:
    """The container of the member that leads."""
    leaders = [m.name for m in cluster(client, project) if m.role == LEADER and m.up]
    if not leaders:
        raise OrchestrateError(f"project {project}'s Patroni cluster has no leader now "
                               "(a failover is under way, or etcd has lost its quorum)")
    return container_of(client, project, leaders[0])


def database(client: docker.DockerClient, project: str) -> Container:
    """The Postgres that takes writes: the single one, or the cluster's leader."""
    single = [c for c in project_containers(client, project, "postgres")
              if c.status == "running"]
    if single:
        return single[0]
    if running_members(client, project):
        return leader(client, project)
    raise OrchestrateError(f"project {project} has no running postgres container "
                           f"(python -m orchestrate up --project {project})")


def status_lines(client: docker.DockerClient, project: str) -> list[str]:
    """One line per member of the cluster (none without one): its role, state, timeline and
    lag."""
    if not running_members(client, project):
        return []
    return [f"{m.name:<12} {m.role:<13} {m.state:<10} timeline {m.timeline or '-':<4} "
            f"lag {'-' if m.role == LEADER else 'unknown' if m.lag is None else f'{m.lag} B'}"
            for m in cluster(client, project)]


def wait_for(client: docker.DockerClient, project: str, done: str,
             check: Callable[[list[Member]], bool], deadline_s: float = DEADLINE_S) -> None:
    """Until `check(members)` holds; fail with `done` (what did not happen) at the deadline."""

    def pending() -> str | None:
        try:
            members = cluster(client, project)
        except OrchestrateError:
            return "no answer"
        if check(members):
            return None
        return ", ".join(f"{m.name} {m.role} {m.state}" for m in members) or "no members"

    until(pending, deadline_s, done, poll_s=POLL_S)


def switchover(client: docker.DockerClient, project: str, to: str | None = None) -> tuple[str, str]:
    """Hand the lead to `to` (by default, the synchronous standby) and wait until it leads and
    the former leader streams from it; (former leader, new leader)."""
    members = cluster(client, project)
    leaders = [m for m in members if m.role == LEADER and m.up]
    if not leaders:
        raise OrchestrateError(f"project {project}'s Patroni cluster has no leader to hand over "
                               "from (a failover is under way, or etcd has lost its quorum)")
    current = leaders[0].name
    standbys = [m.name for m in members if m.role == SYNC_STANDBY and m.up]
    if to == current:
        raise OrchestrateError(f"{to} leads already")
    if to is None:
        if not standbys:
            raise OrchestrateError("no synchronous standby is streaming: no member has every "
                                   "commit, so none may take over now")
        to = standbys[0]
    elif to not in standbys:
        raise OrchestrateError(
            f"{to} is not the synchronous standby ({', '.join(standbys) or 'none is'}): only "
            "the member that has every commit may take over")
    ask(container_of(client, project, current), "switchover", current, to)
    wait_for(client, project, f"{current} did not come back as a replica of {to}",
             lambda ms: leads(ms, to) and follows(ms, current))
    return current, to


def leads(members: list[Member], name: str) -> bool:
    """Whether `name` leads, and has a synchronous standby streaming from it."""
    return (any(m.name == name and m.role == LEADER and m.up for m in members)
            and any(m.role == SYNC_STANDBY and m.up for m in members))


def follows(members: list[Member], name: str) -> bool:
    """Whether `name` streams from the leader."""
    return any(m.name == name and m.role != LEADER and m.up for m in members)


def before_replacing(client: docker.DockerClient, project: str, service: Service,
                     container: Container) -> None:
    """Ready a member of the cluster or of etcd to be removed: a leader hands over first, and
    the member stops (Patroni stops Postgres and leaves the cluster; etcd leaves cleanly)
    rather than being killed."""
    if service.name not in (*PATRONI_MEMBERS, *ETCD_MEMBERS) or container.status != "running":
        return
    if service.name in PATRONI_MEMBERS and any(
            m.name == service.name and m.role == LEADER for m in cluster(client, project)):
        former, new = switchover(client, project)
        say(f"{former}: handed the lead to {new}")
    container.stop(timeout=STOP_GRACE_S)


def wait_led(client: docker.DockerClient, project: str) -> None:
    """Until the cluster (if the project has one) has a leader with a synchronous standby:
    before that, a commit is on one member only."""
    if running_members(client, project):
        wait_for(client, project, "the Patroni cluster has no leader with a synchronous standby",
                 lambda ms: any(leads(ms, m.name) for m in ms))


def wait_rejoined(client: docker.DockerClient, project: str, name: str) -> None:
    """Until the member `name` streams from the leader again, and the leader has a
    synchronous standby (the member a next switchover hands over to)."""
    wait_for(client, project, f"{name} did not rejoin the cluster",
             lambda ms: follows(ms, name) and any(leads(ms, m.name) for m in ms))
