"""backup and restore against a running stack: a restore gives back exactly the backed-up
state, with no answer from before it served by Redis or a near cache; a bad file, a foreign
one, a full disk or an interrupted run each fail with one line and change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from orchestrate_helpers import REPO, Project, orchestrate

from orchestrate.backup import BACKUPS
from orchestrate.secretfiles import api_token
from orchestrate.stack import SERVICE_LABEL
from tests.containers import psql

LOOKUPS = ("id", "username", "email")


class Api:
    """The stack's API, with its token."""

    def __init__(self, project: Project) -> None:
        self.url = project.url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_token()}"

    def create(self, name: str) -> dict[str, Any]:
        reply = self.session.post(f"{self.url}/users", timeout=10,
                                  json={"username": name, "email": f"{name}@example.org"})
        assert reply.status_code == 201, reply.text
        return reply.json()["data"]

    def read(self, user: dict[str, Any], by: str) -> tuple[str, list[dict[str, Any]]]:
        """(X-Cache, the users found) for a lookup of `user` by id, username or email."""
        if by == "id":
            reply = self.session.get(f"{self.url}/users/{user['id']}", timeout=10)
            found = [reply.json()["data"]] if reply.status_code == 200 else []
        else:
            reply = self.session.get(f"{self.url}/users", params={by: user[by]}, timeout=10)
            found = reply.json()["data"]
        assert reply.status_code in (200, 404), reply.text
        return reply.headers.get("X-Cache", ""), found


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def made_files(before: set[Path]) -> set[Path]:
    return set(BACKUPS.glob("*")) - before if BACKUPS.exists() else set()


def test_a_restore_gives_back_exactly_what_was_backed_up(stack: Project) -> None:
    api = Api(stack)
    a, b = api.create("restore_a"), api.create("restore_b")
    result = stack.run("backup")
    assert result.returncode == 0, result.stderr
    dump = Path(result.stdout.split(" to ", 1)[1].split(" (", 1)[0])
    assert dump.stat().st_mode & 0o777 == 0o600 and BACKUPS.stat().st_mode & 0o777 == 0o700
    assert api.session.patch(f"{stack.url}/users/{a['id']}", json={"display_name": "after"},
                             timeout=10).status_code == 200
    assert api.session.delete(f"{stack.url}/users/{b['id']}", timeout=10).status_code == 204
    c = api.create("restore_c")
    for user in (a, b, c):  # Redis and both replicas' near caches hold the new state
        for by in LOOKUPS:
            for _ in range(4):
                api.read(user, by)

    result = stack.run("restore", str(dump), "--yes")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for user, want in ((a, [a]), (b, [b]), (c, [])):
        for by in LOOKUPS:
            for _ in range(4):  # both replicas, first a miss, then from the cache
                _, found = api.read(user, by)
                assert found == want, (user["username"], by)


def test_restore_without_yes_says_what_it_would_replace(stack: Project) -> None:
    [dump] = sorted(BACKUPS.glob(f"{stack.name}-*.dump"))[-1:]
    result = stack.run("restore", str(dump))
    assert result.returncode == 2
    assert f"replace the database of project {stack.name}" in result.stdout


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "missing"])
def test_a_bad_backup_changes_nothing(stack: Project, damage: str, tmp_path: Path) -> None:
    api = Api(stack)
    keep = api.create(f"untouched_{damage}")
    [dump] = sorted(BACKUPS.glob(f"{stack.name}-*.dump"))[-1:]
    bad = tmp_path / dump.name
    data = dump.read_bytes()
    manifest = dump.with_name(dump.name + ".json").read_text()
    if damage == "corrupt":
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "foreign":
        manifest = manifest.replace(f'"{stack.name}"', '"another"')
    if damage != "missing":
        bad.write_bytes(data)
        bad.with_name(bad.name + ".json").write_text(manifest)
        bad.with_name(bad.name + ".sha256").write_text(
            dump.with_name(dump.name + ".sha256").read_text())
    line = one_line_error(stack.run("restore", str(bad), "--yes"))
    assert {"corrupt": "SHA-256", "truncated": "SHA-256", "foreign": "project another",
            "missing": "no such backup"}[damage] in line
    assert api.read(keep, "id")[1] == [keep]


def test_a_full_disk_or_an_unknown_project_leave_nothing(stack: Project) -> None:
    before = set(BACKUPS.glob("*"))
    full = Path("/tmp") / f"full-{stack.name}"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], check=True)
    try:
        line = one_line_error(stack.run("backup", "--output", str(full / "x.dump")))
        assert "No space left" in line
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
        full.rmdir()
    line = one_line_error(orchestrate("backup", "--project", "nosuchproject"))
    assert "no running postgres" in line
    line = one_line_error(orchestrate("backup", "--project", stack.name,
                                      env={"DOCKER_HOST": "unix:///nonexistent.sock"}))
    assert "no Docker engine" in line
    assert made_files(before) == set()


def test_150000_users_back_up_and_restore_and_an_interrupted_backup_leaves_nothing(
    docker_client: Any, stack: Project
) -> None:
    [postgres] = docker_client.containers.list(ignore_removed=True, filters={"label": [
        f"org.cachestack.project={stack.name}", f"{SERVICE_LABEL}=postgres"]})
    psql(postgres, "INSERT INTO users (username, email) SELECT 'bulk' || g, 'bulk' || g || "
                   "'@example.org' FROM generate_series(1, 150000) g")
    before = set(BACKUPS.glob("*"))
    started = time.monotonic()
    result = stack.run("backup")
    backup_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    dump = Path(result.stdout.split(" to ", 1)[1].split(" (", 1)[0])
    started = time.monotonic()
    result = stack.run("restore", str(dump), "--yes")
    restore_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [(count,)] = psql(postgres, "SELECT count(*) FROM users WHERE username LIKE 'bulk%'")
    assert count == "150000"
    print(f"150,000 users: backup {backup_s:.1f}s ({dump.stat().st_size / 2**20:.1f} MiB), "
          f"restore {restore_s:.1f}s (with the replicas' restart and the smoke checks)")
    interrupted = subprocess.Popen(
        [sys.executable, "-m", "orchestrate", "backup", "--project", stack.name], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(BACKUPS.glob(".*.partial")):  # interrupted while it writes
        assert interrupted.poll() is None and time.monotonic() < deadline, "it finished first"
        time.sleep(0.01)
    os.kill(interrupted.pid, signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130 and "interrupted" in stderr, stderr
    assert made_files(before) == {dump, *(dump.with_name(dump.name + s)
                                          for s in (".json", ".sha256"))}
