"""`up --ha`: Redis as a primary, its replica and three Sentinels, which the service follows
through a failover. One stack for the module: it comes up healthy, `status` shows the
Sentinels' view; while the primary is killed or hangs under the consistency checker's load no
read is stale and no request fails; and when it is killed for good the Sentinels promote the
replica, reads are HITs again, and the old primary comes back as its replica."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import docker
import pytest
from docker.models.containers import Container

from bench.stack_faults import FAILOVER_WITHIN, Target, judge
from orchestrate import engine
from orchestrate.errors import OrchestrateError
from orchestrate.secretfiles import api_token
from orchestrate.sentinels import server_role
from orchestrate.stack import PROJECT_LABEL, SERVICE_LABEL, describe_stack
from tests.steady_load import SteadyLoad
from tests.support import free_port

from .helpers import Api, Project, derived_image, sweep, until

pytestmark = pytest.mark.usefixtures("docker_client")

OPERATIONS = 3_000  # the checker's run: a few kills of the primary, FAULT_EVERY apart
CLIENTS = 16


@pytest.fixture(scope="module")
def ha_stack(docker_client: docker.DockerClient, images_mode: str) -> Iterator[Project]:
    project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
    try:
        result = project.run("up", "--ha")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield project
    finally:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)


def test_up_ha_comes_up_and_follows_the_sentinels_when_the_primary_is_killed(
        ha_stack: Project, docker_client: docker.DockerClient) -> None:
    status = ha_stack.run("status")
    assert status.returncode == 0, status.stderr
    assert "redis-1     primary, 1 replica(s) connected" in status.stdout, status.stdout
    assert "redis-2     replica of redis-1, link up" in status.stdout, status.stdout
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        assert f"{name:<11} names redis-1 the primary (master); quorum: OK 3 usable" \
            in status.stdout, status.stdout

    target = Target.of(ha_stack.name)
    # SIGKILL (the restart policy brings the primary back, empty: a new epoch, before the
    # Sentinels find it down), and SIGSTOP until the Sentinels have promoted the replica.
    for mode in ("primary-kill", "primary-pause"):
        report = judge(target, mode, OPERATIONS, CLIENTS, seed=20261206)
        print(mode, report.summary())
        assert report.faults >= 1, report.summary()
        assert report.ok, report.summary()  # no stale read, no failed request

    # The primary killed for good (`docker kill`: no restart): the Sentinels promote the
    # replica, reads are HITs again, and the old primary, started again, is its replica.
    api = Api(ha_stack)
    user = api.create(f"ha{uuid.uuid4().hex[:6]}")
    before = target.primary()
    old = docker_client.containers.get(target.container(before))
    old.kill()
    until(lambda: target.named_primary() not in (before, None), "a failover", FAILOVER_WITHIN)
    until(lambda: api.read(user, "id")[0] == "HIT", "a HIT after the failover", FAILOVER_WITHIN)
    old.start()
    until(lambda: role(old) == f"replica of {target.primary()}, link up",
          "the old primary a replica", FAILOVER_WITHIN)


def test_a_new_redis_image_rolls_over_the_servers_and_sentinels_without_a_failed_request(
        ha_stack: Project, docker_client: docker.DockerClient) -> None:
    """What `up` does when the Redis image changes (a patch release): every server and
    Sentinel replaced, under load, no request failing; then a primary with its replica, and
    every Sentinel naming it with a quorum."""
    stack = describe_stack(ha_stack.name, ha_stack.port, ha=True)
    running = docker_client.containers.list(ignore_removed=True, filters={
        "label": f"{PROJECT_LABEL}={ha_stack.name}"})
    refs = {stack.service(c.labels[SERVICE_LABEL]).image: c.image.id for c in running}
    refs["redis"] = derived_image(docker_client, refs["redis"], f"cachestack/redis:{ha_stack.name}")
    with SteadyLoad(ha_stack.url, api_token) as load:
        engine.realise(docker_client, stack, refs, {})
        until(lambda: "quorum: OK 3 usable" in ha_stack.run("status").stdout,
              "the Sentinels' quorum", FAILOVER_WITHIN)
    print(f"rolling update of Redis under load: {load.requests_sent} requests, "
          f"{len(load.failures)} failed; reads answered {dict(load.cache_answers)}")
    assert load.failures == []
    renewed = [c for c in docker_client.containers.list(filters={
        "label": f"{PROJECT_LABEL}={ha_stack.name}"}) if stack.service(
            c.labels[SERVICE_LABEL]).image == "redis"]
    assert len(renewed) == 5 and {c.image.id for c in renewed} == {refs["redis"]}
    status = ha_stack.run("status").stdout
    assert "primary, 1 replica(s) connected" in status and ", link up" in status, status
    assert status.count("quorum: OK 3 usable") == 3, status


def role(server: Container) -> str:
    """What the Redis server says it is; '' while it does not answer yet."""
    try:
        return server_role(server)
    except OrchestrateError:
        return ""
