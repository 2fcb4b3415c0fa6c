"""The default stack's one Postgres crashes or stops answering under load (tests/outage.py:
versioned updates, creates and reads through the proxy, each read judged as
bench/consistency.py judges it): no read is stale, no acknowledged create is lost, nothing but
503 fails, and the reads the cache can answer are answered. Prints each outage's figures."""

from __future__ import annotations

import time

import docker

from orchestrate import patroni
from orchestrate.secretfiles import api_token
from tests.outage import Outcome, UnderLoad

from .helpers import Project, absent, container, kill_main_process, not_as_written, until

PAUSE_S = 20  # how long Postgres stops answering: the fault itself, not a wait


def judged(docker_client: docker.DockerClient, project: Project, load: UnderLoad,
           what: str) -> Outcome:
    """The load's outcome, printed, with what every fault must leave true asserted."""
    outcome = load.outcome()
    print(f"{what}: {outcome.summary()}")
    assert outcome.violations == [], outcome.violations[:5]
    assert outcome.failures == [], outcome.failures[:5]
    database = patroni.database(docker_client, project.name)
    assert absent(database, outcome.created) == []
    assert not_as_written(database, outcome.final) == []
    return outcome


def test_a_killed_postgres_loses_no_acknowledged_write(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")
    with UnderLoad(stack.url, api_token()) as load:
        load.until_writes(200)
        kill_main_process(postgres)
        until(lambda: postgres.reload() or postgres.attrs["RestartCount"] >= 1,
              "postgres started again")
        load.until_writes(200)
    outcome = judged(docker_client, stack, load, "SIGKILL postgres")
    assert outcome.cached_share >= 0.99


def test_a_postgres_that_stops_answering_costs_no_cached_read(
        docker_client: docker.DockerClient, stack: Project) -> None:
    postgres = container(docker_client, stack, "postgres")
    with UnderLoad(stack.url, api_token()) as load:
        load.until_writes(200)
        postgres.pause()
        try:
            time.sleep(PAUSE_S)
        finally:
            postgres.unpause()
        load.until_writes(200)
    outcome = judged(docker_client, stack, load, f"postgres paused {PAUSE_S} s")
    assert outcome.cached_share >= 0.99
    assert outcome.longest_write_gap >= PAUSE_S - 1  # the pause was real
