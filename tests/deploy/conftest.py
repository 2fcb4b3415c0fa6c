"""Shared fixtures for the deployment formats: rendered Kubernetes objects and tool checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SECRET_NAMES = ("postgres_password", "redis_password")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose tool is missing here, but fail in CI, where everything must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Return the path of an executable, or skip/fail when it is not installed."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def k8s_objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Render k8s/ with kustomize, using throwaway secret files so a clean clone works.

    The kustomization is copied to a temporary directory, so the repository's own k8s/secrets/
    (real passwords, if any) is neither read nor touched.
    """
    kubectl = require_tool("kubectl")
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(REPO / "k8s", root, ignore=shutil.ignore_patterns("secrets"))
    (root / "secrets").mkdir(mode=0o700)
    for name in SECRET_NAMES:
        (root / "secrets" / name).write_text(f"test-{name}")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(root)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]
