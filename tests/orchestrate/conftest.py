"""Fixtures for the orchestrator tests: a real Docker engine, one project per test run.

No engine: the tests skip locally but fail when CI=true. Every project gets its own name and
127.0.0.1 port; finalizers run `down --volumes` and then sweep anything still labelled, so a
failing test leaves nothing behind. Images are shared and reused (keyed by recipe hash).
ORCHESTRATE_TEST_IMAGES picks the image mode (default auto: offline here, official elsewhere).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import docker
import docker.errors
import pytest

from tests.support import docker_engine, free_port

from .helpers import Project, sweep


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return docker_engine()


@pytest.fixture(scope="session")
def images_mode() -> str:
    return os.environ.get("ORCHESTRATE_TEST_IMAGES", "auto")


@pytest.fixture
def new_project(
    docker_client: docker.DockerClient, images_mode: str
) -> Iterator[Callable[[], Project]]:
    """Factory of throwaway projects, each removed at teardown whatever happened."""
    made: list[Project] = []

    def make() -> Project:
        project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
        made.append(project)
        return project

    yield make
    for project in made:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient, images_mode: str) -> Iterator[Project]:
    """One running stack per test module; `up` output is kept in project.outputs[0:2]."""
    project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
    try:
        result = project.run("up")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield project
    finally:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)
