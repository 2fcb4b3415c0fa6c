"""A stack under steady load through its published port (tests/steady_load.py, about 200 requests a
second): replicas replaced for new code, a replica killed, Postgres killed, and how many
requests each costs. Tests run in file order on one stack."""

from __future__ import annotations

import time
from typing import Any

import docker
import requests

from orchestrate import engine
from orchestrate.secretfiles import api_token
from orchestrate.stack import REPLICA_LABEL, SERVICE_LABEL, describe_stack
from tests.steady_load import SteadyLoad

from .helpers import Project, derived_image, kill_main_process, until


def running(client: docker.DockerClient, project: Project, service: str) -> list[Any]:
    found = client.containers.list(ignore_removed=True, filters={"label": [
        f"org.cachestack.project={project.name}", f"{SERVICE_LABEL}={service}"]})
    return sorted(found, key=lambda c: int(c.labels.get(REPLICA_LABEL, 0)))


def test_new_code_replaces_the_replicas_one_by_one_without_a_failed_request(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    before = running(docker_client, stack, "service")
    refs = {c.labels[SERVICE_LABEL]: c.image.id
            for c in docker_client.containers.list(ignore_removed=True,
                filters={"label": f"org.cachestack.project={stack.name}"})}
    refs["service"] = derived_image(docker_client, before[0].image.id,
                                    f"cachestack/service:{stack.name}")
    with SteadyLoad(stack.url, api_token) as load:
        time.sleep(2)
        engine.realise(docker_client, describe_stack(stack.name, stack.port), refs, {})
        time.sleep(2)
    print(f"update under load: {load.requests_sent} requests, {len(load.failures)} failed")
    assert load.requests_sent > 1000
    assert load.failures == []
    after = running(docker_client, stack, "service")
    assert len(after) == 2 and not {c.id for c in after} & {c.id for c in before}
    assert {c.image.id for c in after} == {refs["service"]}


def test_a_killed_replica_fails_only_the_requests_it_had(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    victim = running(docker_client, stack, "service")[0]
    with SteadyLoad(stack.url, api_token) as load:
        time.sleep(2)
        killed = kill_main_process(victim)
        time.sleep(10)
    late = [f for f in load.failures if f.at - killed > 3.0]  # the proxy checks every second
    window = max((f.at - killed for f in load.failures), default=0.0)
    print(f"killed replica: {len(load.failures)} of {load.requests_sent} requests failed, "
          f"the last {window:.2f}s after the kill")
    assert late == [], late
    assert len(load.failures) <= 8  # what one replica can have in flight at this rate
    victim.reload()
    assert victim.status == "running" and victim.attrs["RestartCount"] >= 1


def test_scaling_up_and_down_keeps_the_replicas_that_stay(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    assert stack.run("up").returncode == 0  # back to the image `up` builds
    kept = {c.id for c in running(docker_client, stack, "service")}
    result = stack.run("up", "--replicas", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    three = running(docker_client, stack, "service")
    assert len(three) == 3 and kept < {c.id for c in three}
    result = stack.run("up", "--replicas", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(running(docker_client, stack, "service")) == 2
    assert "drained and stopped" in result.stdout


def test_acknowledged_creates_survive_a_killed_postgres(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    [postgres] = running(docker_client, stack, "postgres")
    with SteadyLoad(stack.url, api_token) as load:
        until(lambda: len(load.users) >= 100, "100 acknowledged creates before the kill")
        killed = len(load.users)
        kill_main_process(postgres)
        # The restart policy brings it back, the service reconnects, and creates go on.
        until(lambda: len(load.users) >= killed + 20, "creates acknowledged after the restart")
    acknowledged = load.users
    auth = {"Authorization": f"Bearer {api_token()}"}
    session = requests.Session()
    lost = [u["id"] for u in acknowledged
            if session.get(f"{stack.url}/users/{u['id']}", headers=auth, timeout=10).status_code
            != 200]
    print(f"killed postgres: {len(acknowledged)} acknowledged creates, {len(lost)} lost, "
          f"{len(load.failures)} requests failed while it restarted")
    assert lost == []
    postgres.reload()
    assert postgres.attrs["RestartCount"] >= 1
