"""Fixtures of the deployment-format tests (compose, swarm, Kubernetes).

Missing tools or engine: skip locally, fail when CI=true (tests/support.py). Docker tests build
or reuse the images through the orchestrator (the same function and tags as `orchestrate up`),
use their own project names and ports, and remove what they made even when they fail.
ORCHESTRATE_TEST_IMAGES picks the image mode, as for the orchestrator tests (default auto).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrate.images import resolve_images
from orchestrate.secretfiles import ensure_secrets, secret_path
from orchestrate.stack import DEFAULT_MONITORING_PORT, Stack, describe_stack
from tests.support import REPO, docker_engine, run

from .helpers import HA_SECRET_NAMES, SECRET_NAMES, tool


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """A client of the local engine; skip (fail in CI) when none answers."""
    tool("docker")
    return docker_engine()


@pytest.fixture(scope="session")
def stack_images(docker_client: Any) -> dict[str, str]:
    """Image key -> local reference, built or reused by the orchestrator's own function; every
    image compose may run (Prometheus's too), as `orchestrate build` makes them."""
    mode = os.environ.get("ORCHESTRATE_TEST_IMAGES", "auto")
    stack = describe_stack(monitoring_port=DEFAULT_MONITORING_PORT)
    return resolve_images(docker_client, stack, mode)


@pytest.fixture(scope="session")
def secret_files() -> Iterator[Stack]:
    """secrets/* as the orchestrator makes them; the ones this session created go afterwards."""
    stack = describe_stack()
    created = ensure_secrets(stack)
    yield stack
    for name in created:
        secret_path(name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """k8s/ copied to a temporary directory with throwaway secret files beside each
    kustomization that generates Secrets, so a clean clone works, and the repository's own
    secrets/ folders there (real passwords, if any) are neither read nor touched."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(REPO / "k8s", root, ignore=shutil.ignore_patterns("secrets"))
    for folder, names in ((root, SECRET_NAMES), (root / "overlays" / "ha", HA_SECRET_NAMES)):
        (folder / "secrets").mkdir(mode=0o700)
        for name in names:
            (folder / "secrets" / name).write_text(f"test-{name}")
    return root


def kustomized(folder: Path) -> Path:
    """The kustomization in `folder` rendered into one file beside it."""
    rendered = folder / "rendered.yaml"
    rendered.write_text(run(tool("kubectl"), "kustomize", str(folder), timeout=60).stdout)
    return rendered


@pytest.fixture(scope="session")
def k8s_rendered(k8s_copy: Path) -> Path:
    """k8s/ rendered by kustomize into one file."""
    return kustomized(k8s_copy)


@pytest.fixture(scope="session")
def k8s_objects(k8s_rendered: Path) -> list[dict[str, Any]]:
    """Every object of the rendered manifests."""
    return [doc for doc in yaml.safe_load_all(k8s_rendered.read_text()) if doc]


@pytest.fixture(scope="session")
def k8s_ha_rendered(k8s_copy: Path) -> Path:
    """The overlay k8s/overlays/ha/ (`up --ha`) rendered into one file."""
    return kustomized(k8s_copy / "overlays" / "ha")


@pytest.fixture(scope="session")
def k8s_ha_objects(k8s_ha_rendered: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(k8s_ha_rendered.read_text()) if doc]
