"""backup and restore against a running stack: a restore gives back exactly the backed-up
state, with no answer from before it served by Redis or a near cache; a bad file, a foreign
one, one the stack did not sign, a full disk or an interrupted run each fail with one line and
change nothing; `backup --output` never writes through a link nor removes what it did not make."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from orchestrate.backup import BACKUPS, Manifest
from orchestrate.stack import DB_NAME
from tests.stores import psql
from tests.support import REPO

from .helpers import (
    Api,
    Project,
    backed_up,
    container,
    database_oid,
    one_line_error,
    orchestrate,
    until,
)

LOOKUPS = ("id", "username", "email")
HOLDER = "test-holds-users"  # the application_name of the session that locks the users table
# Sessions of an application holding (true) or waiting for (false) a lock on the users table.
LOCKS_HELD = ("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
              "WHERE a.application_name = '{}' AND l.relation = 'users'::regclass "
              "AND l.granted = {}")


def made_files(before: set[Path]) -> set[Path]:
    return set(BACKUPS.glob("*")) - before if BACKUPS.exists() else set()


def copy_backup(dump: Path, to: Path, data: bytes | None = None,
                manifest: dict[str, object] | None = None) -> Path:
    """A copy of a backup and its sidecars in `to`, with other content or another manifest."""
    copy = to / dump.name
    copy.write_bytes(dump.read_bytes() if data is None else data)
    sidecar = dump.with_name(dump.name + ".json")
    copy.with_name(copy.name + ".json").write_text(
        sidecar.read_text() if manifest is None else json.dumps(manifest))
    sha256 = json.loads(copy.with_name(copy.name + ".json").read_text())["sha256"]
    copy.with_name(copy.name + ".sha256").write_text(f"{sha256}  {copy.name}\n")
    return copy


def test_a_restore_gives_back_exactly_what_was_backed_up(stack: Project) -> None:
    api = Api(stack)
    a, b = api.create("restore_a"), api.create("restore_b")
    dump = backed_up(stack)
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


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "missing", "unsigned",
                                    "forged"])
def test_a_bad_backup_changes_nothing(docker_client: docker.DockerClient, stack: Project,
                                      damage: str, tmp_path: Path) -> None:
    api = Api(stack)
    keep = api.create(f"untouched_{damage}")
    postgres = container(docker_client, stack, "postgres")
    in_use = database_oid(postgres)
    [dump] = sorted(BACKUPS.glob(f"{stack.name}-*.dump"))[-1:]
    data = dump.read_bytes()
    fields = json.loads(dump.with_name(dump.name + ".json").read_text())
    if damage == "corrupt":
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "foreign":  # a backup of another project, signed with the same key
        fields.pop("hmac", None)
        fields = Manifest(**{**fields, "project": "another"}).signed().__dict__
    elif damage == "unsigned":  # as a manifest without an HMAC says
        fields.pop("hmac", None)
    elif damage == "forged":  # other content, with checksums anyone can compute
        data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        fields.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    bad = tmp_path / dump.name if damage == "missing" else copy_backup(dump, tmp_path, data,
                                                                         fields)
    line = one_line_error(stack.run("restore", str(bad), "--yes"))
    assert {"corrupt": "SHA-256", "truncated": "SHA-256", "foreign": "project another",
            "missing": "no such backup", "unsigned": "is not signed",
            "forged": "HMAC that does not match"}[damage] in line
    if damage in ("unsigned", "forged"):
        assert "--trust-unsigned" in line
    assert api.read(keep, "id")[1] == [keep]
    assert database_oid(postgres) == in_use


def test_an_unsigned_backup_restores_only_when_the_operator_trusts_it(
        docker_client: docker.DockerClient, stack: Project, tmp_path: Path) -> None:
    api = Api(stack)
    kept = api.create("unsigned_kept")
    dump = backed_up(stack)
    gone = api.create("unsigned_gone")
    fields = json.loads(dump.with_name(dump.name + ".json").read_text())
    fields.pop("hmac", None)
    unsigned = copy_backup(dump, tmp_path, manifest=fields)
    postgres = container(docker_client, stack, "postgres")
    in_use = database_oid(postgres)
    one_line_error(stack.run("restore", str(unsigned), "--yes"))
    assert database_oid(postgres) == in_use

    result = stack.run("restore", str(unsigned), "--yes", "--trust-unsigned")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not signed" in result.stdout and "as the owner role" in result.stdout
    assert database_oid(postgres) != in_use
    assert api.read(kept, "id")[1] == [kept]
    assert api.read(gone, "id")[1] == []


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


@pytest.mark.parametrize("there", ["manifest", "checksum", "link", "manifest link"])
def test_backup_output_takes_no_place_that_is_taken_and_removes_only_what_it_made(
        stack: Project, tmp_path: Path, there: str) -> None:
    output = tmp_path / "x.dump"
    theirs = {"manifest": tmp_path / "x.dump.json", "checksum": tmp_path / "x.dump.sha256",
              "link": output, "manifest link": tmp_path / "x.dump.json"}[there]
    if there.endswith("link"):  # dangling: following it would create its target
        theirs.symlink_to(tmp_path / "target")
    else:
        theirs.write_text("not the backup's\n")
    result = stack.run("backup", "--output", str(output))
    assert list(tmp_path.iterdir()) == [theirs]
    assert theirs.is_symlink() if there.endswith("link") else (
        theirs.read_text() == "not the backup's\n")
    assert f"{theirs} exists" in one_line_error(result)


def test_150000_users_back_up_and_restore_and_an_interrupted_backup_leaves_nothing(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    postgres = container(docker_client, stack, "postgres")
    psql(postgres, "INSERT INTO users (username, email) SELECT 'bulk' || g, 'bulk' || g || "
                   "'@example.org' FROM generate_series(1, 150000) g")
    before = set(BACKUPS.glob("*"))
    started = time.monotonic()
    dump = backed_up(stack)
    backup_s = time.monotonic() - started
    started = time.monotonic()
    result = stack.run("restore", str(dump), "--yes")
    restore_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [(count,)] = psql(postgres, "SELECT count(*) FROM users WHERE username LIKE 'bulk%'")
    assert count == "150000"
    print(f"150,000 users: backup {backup_s:.1f}s ({dump.stat().st_size / 2**20:.1f} MiB), "
          f"restore {restore_s:.1f}s (with the replicas' restart and the smoke checks)")
    # The backup is interrupted while pg_dump waits for a lock this test holds on the users
    # table: while it writes, whatever the machine's speed, and never after it finished.
    postgres.exec_run(["psql", "-U", "postgres", "-d", DB_NAME, "-c", "BEGIN; LOCK TABLE users "
                       "IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600)"],
                      user=postgres.attrs["Config"]["User"], environment={"PGAPPNAME": HOLDER},
                      detach=True)
    until(lambda: psql(postgres, LOCKS_HELD.format(HOLDER, "true")) == [["1"]],
          "the test holds the lock")
    interrupted = subprocess.Popen(
        [sys.executable, "-m", "orchestrate", "backup", "--project", stack.name], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: psql(postgres, LOCKS_HELD.format("pg_dump", "false")) == [["1"]]
              and bool(list(BACKUPS.glob(".*.partial"))), "pg_dump waiting, its file begun")
        os.kill(interrupted.pid, signal.SIGINT)
        _, stderr = interrupted.communicate(timeout=60)
    finally:
        interrupted.kill()
        psql(postgres, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       f"WHERE application_name = '{HOLDER}'")
    assert interrupted.returncode == 130 and "interrupted" in stderr, stderr
    assert made_files(before) == {dump, *(dump.with_name(dump.name + s)
                                          for s in (".json", ".sha256"))}
