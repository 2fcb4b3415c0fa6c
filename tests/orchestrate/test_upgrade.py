"""Upgrade in place: volumes made by the stack of an earlier commit, in which the service logged
in as the bootstrap superuser that owned the tables, come up under the new roles with every
user intact. The earlier stack is the one of commit PREVIOUS, run by its own orchestrator."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import docker
import requests

from orchestrate.secretfiles import api_token, ensure_secrets, secret_path
from orchestrate.stack import DB_APP, DB_OWNER, SERVICE_LABEL, describe_stack
from tests.stores import psql
from tests.support import REPO

from .helpers import UP_TIMEOUT_S, Project

# The last commit before the Postgres roles, Redis users and API tokens.
PREVIOUS = "2751bd6"


def checkout(commit: str, into: Path) -> Path:
    """The tree of `commit`, unpacked into `into` (no .git: its orchestrator does not need it)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_previous(tree: Path, project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrate` of the earlier tree (its cwd comes first on sys.path)."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrate", *args, "--project", project.name,
         "--port", str(project.port)],
        cwd=tree, capture_output=True, text=True, timeout=UP_TIMEOUT_S, check=False,
    )
    project.outputs += [result.stdout, result.stderr]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_volumes_of_the_previous_stack_come_up_under_the_new_roles(
    docker_client: docker.DockerClient, new_project: Callable[[], Project], tmp_path: Path
) -> None:
    previous = checkout(PREVIOUS, tmp_path / "previous")
    ensure_secrets(describe_stack())
    # The superuser's password is the one thing both stacks share: initdb set it.
    (previous / "secrets").mkdir(exist_ok=True)
    shutil.copy(secret_path("postgres_password"), previous / "secrets" / "postgres_password")
    project = new_project()
    up = run_previous(previous, project, "up", "--images", project.images)
    assert "schema up to date" not in up.stdout  # it is the earlier orchestrator that ran
    users = []
    for name in ("ada", "grace", "edsger"):
        created = requests.post(f"{project.url}/users", timeout=10,
                                json={"username": name, "email": f"{name}@example.org"})
        assert created.status_code == 201, created.text
        users.append(created.json()["data"])
    run_previous(previous, project, "down")  # keeps the volumes

    result = project.run("up")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    auth = {"Authorization": f"Bearer {api_token()}"}
    for user in users:
        by_id = requests.get(f"{project.url}/users/{user['id']}", headers=auth, timeout=10)
        assert by_id.status_code == 200 and by_id.json()["data"] == user
        by_name = requests.get(f"{project.url}/users", params={"username": user["username"]},
                               headers=auth, timeout=10)
        assert by_name.json()["data"] == [user]
    [postgres] = docker_client.containers.list(ignore_removed=True, filters={"label": [
        f"org.cachestack.project={project.name}", f"{SERVICE_LABEL}=postgres"]})
    assert {row[0] for row in psql(postgres, "SELECT tableowner FROM pg_tables "
                                   "WHERE schemaname = 'public'")} == {DB_OWNER}
    # The earlier stack's login, the bootstrap superuser, is retired.
    assert psql(postgres, "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'cachestack'") == [
        ["f"]]
    assert {row[0] for row in psql(postgres, "SELECT usename FROM pg_stat_activity WHERE "
                                   "application_name = 'cachestack'")} == {DB_APP}

