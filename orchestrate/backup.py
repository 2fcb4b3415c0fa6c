"""Backups of a stack's database, and restores from them.

`backup`: pg_dump (custom format) inside the Postgres container, as the superuser over the
local socket, so it needs no credentials and no network: one transaction, a consistent
snapshot while the service works. It is streamed out into backups/<project>-<UTC time>.dump
(folder 0700, files 0600), beside it its SHA-256 (`<file>.sha256`, as sha256sum writes it)
and what it is (`<file>.json`: project, time, size). A file is only ever complete: it is
written under a temporary name and renamed when pg_dump succeeded.

`restore`: checks the file against its checksum and its project, restores it into a new
database, and only when that succeeded switches over: the service's replicas are stopped (so
that nothing they keep in memory outlives the data it came from), the database in use is
renamed aside and the new one takes its name, the cache gets a new namespace (so that no key
Redis kept from before is ever read), and the migrations, the replicas and the smoke checks
run again. A corrupt or truncated file, or one of another project, changes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.models.containers import Container

from . import rollout
from .containers import connect, exec_input, exec_output, project_containers
from .errors import OrchestrateError
from .output import say
from .stack import DB_NAME, DB_OWNER, Stack

ROOT = Path(__file__).resolve().parents[1]
BACKUPS = ROOT / "backups"
CHUNK = 1 << 20
PREVIOUS = f"{DB_NAME}_before_restore"  # the database a restore replaced, kept for one more


@dataclass(frozen=True)
class Manifest:
    """What a backup file is, written beside it as JSON."""

    project: str
    taken_at: str
    bytes: int
    sha256: str

    @classmethod
    def read(cls, dump: Path) -> Manifest:
        try:
            return cls(**json.loads(sidecar(dump, ".json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise OrchestrateError(
                f"{dump}: no readable {sidecar(dump, '.json').name} beside it ({exc})"
            ) from None


def sidecar(dump: Path, suffix: str) -> Path:
    return dump.with_name(dump.name + suffix)


def _postgres(client: docker.DockerClient, stack: Stack) -> Container:
    found = [c for c in project_containers(client, stack.project, "postgres")
             if c.status == "running"]
    if not found:
        raise OrchestrateError(f"project {stack.project} has no running postgres container "
                               f"(python -m orchestrate up --project {stack.project})")
    return found[0]


def _private_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _write_private(path: Path, text: str) -> None:
    with os.fdopen(_private_file(path), "w") as handle:
        handle.write(text)


def backup(stack: Stack, output: Path | None = None) -> tuple[Path, Manifest]:
    """Dump the stack's database into `output` (default backups/<project>-<time>.dump)."""
    client = connect()
    postgres = _postgres(client, stack)
    now = datetime.datetime.now(datetime.UTC)
    if output is None:
        BACKUPS.mkdir(mode=0o700, exist_ok=True)
        output = BACKUPS / f"{stack.project}-{now:%Y%m%dT%H%M%SZ}.dump"
    output = output.resolve()
    if output.exists():
        raise OrchestrateError(f"{output} exists: give another --output")
    partial = output.with_name(f".{output.name}.partial")
    digest, size = hashlib.sha256(), 0
    command = ["pg_dump", "--format=custom", "--username=postgres", f"--dbname={DB_NAME}"]
    try:
        with os.fdopen(_private_file(partial), "wb") as handle:
            for out, _ in exec_output(postgres, command, postgres.attrs["Config"]["User"]):
                handle.write(out)
                digest.update(out)
                size += len(out)
            handle.flush()
            os.fsync(handle.fileno())
        manifest = Manifest(stack.project, now.isoformat(timespec="seconds"), size,
                            digest.hexdigest())
        _write_private(sidecar(output, ".sha256"), f"{manifest.sha256}  {output.name}\n")
        _write_private(sidecar(output, ".json"), json.dumps(manifest.__dict__, indent=2) + "\n")
        partial.rename(output)
    except OSError as exc:  # a full disk, a folder that is not writable
        raise OrchestrateError(f"cannot write the backup to {output.parent}: {exc.strerror}"
                               ) from None
    finally:
        for left in (partial, *(() if output.exists() else
                                (sidecar(output, ".sha256"), sidecar(output, ".json")))):
            left.unlink(missing_ok=True)
    return output, manifest


def verify(stack: Stack, dump: Path) -> Manifest:
    """The backup's manifest, once the file is known to be whole and of this project."""
    if not dump.is_file():
        raise OrchestrateError(f"{dump}: no such backup file")
    manifest = Manifest.read(dump)
    if manifest.project != stack.project:
        raise OrchestrateError(
            f"{dump} is a backup of project {manifest.project}, not of {stack.project}")
    digest = hashlib.sha256()
    with dump.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    recorded = sidecar(dump, ".sha256")
    expected = recorded.read_text().split()[0] if recorded.exists() else manifest.sha256
    if digest.hexdigest() != expected or expected != manifest.sha256:
        raise OrchestrateError(f"{dump} does not match its SHA-256: it is corrupt or truncated")
    return manifest


def _chunks(dump: Path) -> Iterator[bytes]:
    with dump.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def psql(postgres: Container, database: str, *statements: str) -> str:
    """Run statements as the superuser over the container's local socket, each in a
    transaction of its own (DROP and ALTER DATABASE may not share one); their output."""
    commands = [arg for sql in statements for arg in ("--command", sql)]
    out = b"".join(o for o, _ in exec_output(
        postgres, ["psql", "--username=postgres", f"--dbname={database}", "--no-psqlrc",
                   "--quiet", "--tuples-only", "--no-align", "--set=ON_ERROR_STOP=1",
                   *commands], postgres.attrs["Config"]["User"]))
    return out.decode().strip()


def restore(stack: Stack, dump: Path) -> Manifest:
    """Replace the stack's database with the backup in `dump` (see the module docstring)."""
    manifest = verify(stack, dump)
    client = connect()
    postgres = _postgres(client, stack)
    staging = f"{DB_NAME}_restoring"
    psql(postgres, "postgres", f'DROP DATABASE IF EXISTS "{staging}"')  # an interrupted one
    psql(postgres, "postgres", f'CREATE DATABASE "{staging}" OWNER "{DB_OWNER}"')
    try:
        exec_input(postgres, ["pg_restore", "--username=postgres", f"--dbname={staging}",
                              "--no-owner", f"--role={DB_OWNER}", "--no-acl", "--exit-on-error"],
                   postgres.attrs["Config"]["User"], _chunks(dump))
        users = psql(postgres, staging, "SELECT count(*) FROM users")
        psql(postgres, staging, f"UPDATE cache_namespace SET value = '{secrets.token_hex(6)}'")
    except BaseException as exc:
        psql(postgres, "postgres", f'DROP DATABASE IF EXISTS "{staging}"')
        if isinstance(exc, OrchestrateError):
            raise OrchestrateError(f"{dump} could not be restored ({exc.message}); "
                                   "the database in use is untouched") from None
        raise
    say(f"restored {manifest.bytes} bytes, {users} users, into a new database")
    stopped = [container for service in stack.services if service.update_order == "start-first"
               for container in rollout.replicas(client, stack, service)]
    try:
        for container in stopped:
            container.stop(timeout=rollout.STOP_GRACE_S)
        # The database in use leaves service (no new sessions, the open ones ended), takes the
        # previous one's name, and the new one takes its name.
        psql(postgres, "postgres",
             f'DROP DATABASE IF EXISTS "{PREVIOUS}"',
             f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS false',
             f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
             f"WHERE datname = '{DB_NAME}'",
             f'ALTER DATABASE "{DB_NAME}" RENAME TO "{PREVIOUS}"',
             f'ALTER DATABASE "{staging}" RENAME TO "{DB_NAME}"')
    except BaseException:
        # Not switched (the renames are the last step): the database in use serves again.
        psql(postgres, "postgres", f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS true',
             f'DROP DATABASE IF EXISTS "{staging}"')
        for container in stopped:
            container.start()
        raise
    say(f"switched over; the database it replaced is kept as {PREVIOUS}")
    return manifest
