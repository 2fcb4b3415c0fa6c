"""`up --ha`: Redis as a primary, its replica and three Sentinels, which the service follows
through a failover. One stack for the module: it comes up healthy, `status` shows the
Sentinels' view, and when the primary is killed under the consistency checker's load the
Sentinels promote the replica, no read is stale, no request fails, and reads are HITs again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import docker
import pytest

from bench.stack_faults import FAILOVER_WITHIN, Target, judge
from tests.support import free_port

from .helpers import Api, Project, sweep, until

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
        ha_stack: Project) -> None:
    status = ha_stack.run("status")
    assert status.returncode == 0, status.stderr
    assert "redis-1     primary, 1 replica(s) connected" in status.stdout, status.stdout
    assert "redis-2     replica of redis-1, link up" in status.stdout, status.stdout
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        assert f"{name:<11} names redis-1 the primary (master); quorum: OK 3 usable" \
            in status.stdout, status.stdout

    target = Target.of(ha_stack.name)
    report = judge(target, "primary-kill", OPERATIONS, CLIENTS, seed=20261206)
    print(report.summary())
    assert report.faults >= 1, report.summary()
    assert report.ok, report.summary()  # no stale read, no failed request

    api = Api(ha_stack)
    user = api.create(f"ha{uuid.uuid4().hex[:6]}")
    until(lambda: api.read(user, "id")[0] == "HIT", "a HIT after the failovers",
          FAILOVER_WITHIN)
