"""The service's image under Docker's resource limits: its default number of workers follows
the CPUs a container may use (Docker's --cpus, as a pod's CPU limit), read from the cgroup
files the engine really writes."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.support import run_once

WORKERS = "from service.process.serve import parse_args; print(parse_args([]).workers)"


@pytest.mark.parametrize(("nano_cpus", "expected"), [
    (None, len(os.sched_getaffinity(0))),
    (1_000_000_000, 1),
    (500_000_000, 1),
])
def test_a_replica_runs_one_worker_per_cpu_it_may_use(
    docker_client: Any, stack_images: dict[str, str], nano_cpus: int | None, expected: int
) -> None:
    limits = {"nano_cpus": nano_cpus} if nano_cpus else {}
    output = run_once(docker_client, stack_images["service"], ["python", "-c", WORKERS],
                      network_disabled=True, **limits)
    assert int(output.decode()) == expected
