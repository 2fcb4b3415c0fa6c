"""Backups of a stack's database, and restores from them.

`backup`: pg_dump (custom format) inside the Postgres container, as the superuser over the
local socket, so it needs no credentials and no network: one transaction, a consistent
snapshot while the service works. It is streamed out into backups/<project>-<UTC time>.dump
(folder 0700, files 0600), beside it its SHA-256 (`<file>.sha256`, as sha256sum writes it)
and what it is (`<file>.json`: project, time, size, SHA-256, and an HMAC-SHA-256 of those with
secrets/backup_key, which only this orchestrator holds). A file is only ever complete: it is
written under a temporary name and linked into place when pg_dump succeeded. A backup never
takes a name that is taken (nor follows a link there), and a failed one removes only what it
made.

`restore`: checks the file against its HMAC, its checksum and its project, restores it into a
new database, and only when that succeeded switches over: the service's replicas are stopped
(so that nothing they keep in memory outlives the data it came from), the database in use is
renamed aside and the new one takes its name, the cache gets a new namespace (so that no key
Redis kept from before is ever read), and the migrations, the replicas and the smoke checks
run again. A corrupt, truncated, unsigned or foreign file changes nothing.

Nothing from a dump runs with more privilege than the owner role, which controls what is in
the database anyway: pg_restore and every statement in the restored database log in as the
owner (a `--role` would be a SET ROLE, which SQL in the dump can RESET). The Postgres image
lets the container's own user log in as the owner to the staging database only
(docker/postgres/cachestack-postgres). The superuser only creates, drops and renames
databases, from the `postgres` database, with nothing but pg_catalog on its search path.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from docker.models.containers import Container

from . import patroni, rollout
from .containers import connect, exec_input, exec_output
from .errors import OrchestrateError
from .output import say
from .paths import ROOT
from .secretfiles import BACKUP_KEY, backup_key, secret_path
from .stack import DB_NAME, DB_OWNER, SECRETS_DIR, Stack

BACKUPS = ROOT / "backups"
CHUNK = 1 << 20
PREVIOUS = f"{DB_NAME}_before_restore"  # the database a restore replaced, kept for one more
# The new database a restore fills; the only one the owner may log in to through the local
# socket (docker/postgres/cachestack-postgres allows `<database>_restoring`).
STAGING = f"{DB_NAME}_restoring"
SIGNATURE_VERSION = "cachestack backup 1"


@dataclass(frozen=True)
class Manifest:
    """What a backup file is, written beside it as JSON; `hmac` authenticates the rest."""

    project: str
    taken_at: str
    bytes: int
    sha256: str
    hmac: str = ""

    @classmethod
    def read(cls, dump: Path) -> Manifest:
        path = sidecar(dump, ".json")
        try:
            manifest = cls(**json.loads(path.read_text()))
        except OSError as exc:
            raise OrchestrateError(f"{dump}: no readable {path.name} beside it "
                                   f"({exc.strerror})") from None
        except (ValueError, TypeError) as exc:
            raise OrchestrateError(f"{dump}: no readable {path.name} beside it ({exc})"
                                   ) from None
        wrong = [f.name for f in fields(cls) if type(getattr(manifest, f.name)).__name__ != f.type]
        if wrong:
            raise OrchestrateError(f"{dump}: no readable {path.name} beside it ({wrong[0]} is "
                                   "of the wrong type)")
        return manifest

    def _mac(self) -> str:
        signed = json.dumps([self.project, self.taken_at, self.bytes, self.sha256])
        message = f"{SIGNATURE_VERSION}\n{signed}".encode()
        return hmac.new(backup_key(), message, hashlib.sha256).hexdigest()

    def signed(self) -> Manifest:
        """This manifest with its HMAC made with secrets/backup_key."""
        return replace(self, hmac=self._mac())

    def unsigned_because(self) -> str | None:
        """Why the HMAC does not show that this orchestrator made the backup; None if it does."""
        if not self.hmac:
            return "is not signed (its manifest has no HMAC)"
        if not secret_path(BACKUP_KEY).exists():
            return f"cannot be checked: there is no {SECRETS_DIR}/{BACKUP_KEY}"
        if not hmac.compare_digest(self.hmac.encode(), self._mac().encode()):
            return (f"has an HMAC that does not match {SECRETS_DIR}/{BACKUP_KEY}: it was "
                    "changed, or signed with another key")
        return None


def sidecar(dump: Path, suffix: str) -> Path:
    return dump.with_name(dump.name + suffix)


@contextmanager
def _new_files() -> Iterator[list[Path]]:
    """Collects the files a run creates, and removes them (those only) if it fails."""
    made: list[Path] = []
    try:
        yield made
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise


def _create(path: Path, made: list[Path]) -> int:
    """A new file, mode 0600: never one that was there, nor a link's target."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    made.append(path)
    return fd


def _write_new(path: Path, text: str, made: list[Path]) -> None:
    with os.fdopen(_create(path, made), "w") as handle:
        handle.write(text)


def _free_name(output: Path) -> Path:
    """`output` with its folder resolved (not its own name: a link there is refused), once
    nothing is at it, at its sidecars or at its temporary name."""
    output = output.parent.resolve() / output.name
    for path in (output, sidecar(output, ".sha256"), sidecar(output, ".json"),
                 output.with_name(f".{output.name}.partial")):
        if os.path.lexists(path):
            raise OrchestrateError(f"{path} exists: give another --output")
    return output


def backup(project: str, output: Path | None = None) -> tuple[Path, Manifest]:
    """Dump the project's database into `output` (default backups/<project>-<time>.dump)."""
    now = datetime.datetime.now(datetime.UTC)
    default = output is None
    output = _free_name(output or BACKUPS / f"{project}-{now:%Y%m%dT%H%M%SZ}.dump")
    postgres = patroni.database(connect(), project)
    if default:
        BACKUPS.mkdir(mode=0o700, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    digest, size = hashlib.sha256(), 0
    command = ["pg_dump", "--format=custom", "--username=postgres", f"--dbname={DB_NAME}"]
    try:
        with _new_files() as made:
            with os.fdopen(_create(partial, made), "wb") as handle:
                for out, _ in exec_output(postgres, command, postgres.attrs["Config"]["User"]):
                    handle.write(out)
                    digest.update(out)
                    size += len(out)
                handle.flush()
                os.fsync(handle.fileno())
            manifest = Manifest(project, now.isoformat(timespec="seconds"), size,
                                digest.hexdigest()).signed()
            _write_new(sidecar(output, ".sha256"), f"{manifest.sha256}  {output.name}\n", made)
            _write_new(sidecar(output, ".json"), json.dumps(asdict(manifest), indent=2) + "\n",
                       made)
            os.link(partial, output)  # unlike a rename, never replaces what appeared there
            made.append(output)
            partial.unlink()
    except OSError as exc:  # a full disk, a folder that is not writable, a name now taken
        raise OrchestrateError(f"cannot write the backup to {output.parent}: {exc.strerror}"
                               ) from None
    return output, manifest


def _chunks(dump: Path, digest: Any) -> Iterator[bytes]:
    """The file's content (a regular file's only: not a pipe's, not a folder's), added to
    `digest` as it is read."""
    try:
        fd = os.open(dump, os.O_RDONLY | os.O_NONBLOCK)  # a pipe must not block the open
    except FileNotFoundError:
        raise OrchestrateError(f"{dump}: no such backup file") from None
    except OSError as exc:
        raise OrchestrateError(f"{dump}: cannot read it: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OrchestrateError(f"{dump}: not a file")
    with os.fdopen(fd, "rb") as handle:
        try:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                yield chunk
        except OSError as exc:
            raise OrchestrateError(f"{dump}: cannot read it: {exc.strerror}") from None


def verify(project: str, dump: Path, trust_unsigned: bool = False) -> Manifest:
    """The backup's manifest, once the file is known to be signed by this orchestrator (unless
    `trust_unsigned`), of `project`, and whole."""
    digest = hashlib.sha256()
    for _ in _chunks(dump, digest):  # first, so that a path that is no backup says so
        pass
    manifest = Manifest.read(dump)
    unsigned = manifest.unsigned_because()
    if unsigned and not trust_unsigned:
        raise OrchestrateError(f"{dump} {unsigned}; if you know where it comes from, restore "
                               "it anyway (as the owner role only) with --trust-unsigned")
    if unsigned:
        say(f"warning: {dump} {unsigned}; restoring it as the owner role only, "
            "as --trust-unsigned asks")
    if manifest.project != project:
        raise OrchestrateError(
            f"{dump} is a backup of project {manifest.project}, not of {project}")
    if digest.hexdigest() != manifest.sha256:
        raise OrchestrateError(f"{dump} does not match its SHA-256: it is corrupt or truncated")
    return manifest


def _psql(postgres: Container, role: str, database: str, *statements: str) -> str:
    """Run statements as `role` over the container's local socket (peer authentication: the
    container's own user, no password), each in a transaction of its own (DROP and ALTER
    DATABASE may not share one), with only pg_catalog on the search path; their output."""
    commands = [arg for sql in statements for arg in ("--command", sql)]
    login = f"dbname={database} user={role} options='-c search_path=pg_catalog'"
    out = b"".join(o for o, _ in exec_output(
        postgres, ["psql", f"--dbname={login}", "--no-psqlrc", "--no-password", "--quiet",
                   "--tuples-only", "--no-align", "--set=ON_ERROR_STOP=1", *commands],
        postgres.attrs["Config"]["User"]))
    return out.decode().strip()


def as_superuser(postgres: Container, *statements: str) -> str:
    """Statements on databases themselves (CREATE, DROP, RENAME need the superuser), from the
    `postgres` database, where the owner has nothing: the owner can make none of it run code."""
    return _psql(postgres, "postgres", "postgres", *statements)


def in_staging(postgres: Container, *statements: str) -> str:
    """Statements in the database being restored, as its owner: what the owner put there
    (triggers, views, functions) runs with the owner's rights only."""
    return _psql(postgres, DB_OWNER, STAGING, *statements)


def restore(stack: Stack, dump: Path, manifest: Manifest) -> None:
    """Replace the stack's database with the backup in `dump`, whose `manifest` `verify` gave
    (see the module docstring)."""
    client = connect()
    postgres = patroni.database(client, stack.project)
    as_superuser(postgres, f'DROP DATABASE IF EXISTS "{STAGING}"')  # an interrupted one
    as_superuser(postgres, f'CREATE DATABASE "{STAGING}" OWNER "{DB_OWNER}" TEMPLATE template0')
    try:
        restored = hashlib.sha256()
        exec_input(postgres, ["pg_restore", f"--username={DB_OWNER}", f"--dbname={STAGING}",
                              "--no-password", "--no-owner", "--no-acl", "--exit-on-error"],
                   postgres.attrs["Config"]["User"], _chunks(dump, restored))
        if restored.hexdigest() != manifest.sha256:
            raise OrchestrateError("the file changed after it was checked")
        users = in_staging(postgres, "SELECT pg_catalog.count(*) FROM public.users")
        in_staging(postgres, f"UPDATE public.cache_namespace SET value = "
                             f"'{secrets.token_hex(6)}'")
    except BaseException as exc:
        as_superuser(postgres, f'DROP DATABASE IF EXISTS "{STAGING}"')
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
        as_superuser(postgres,
                     f'DROP DATABASE IF EXISTS "{PREVIOUS}"',
                     f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS false',
                     "SELECT pg_catalog.count(pg_catalog.pg_terminate_backend(pid)) "
                     f"FROM pg_catalog.pg_stat_activity WHERE datname = '{DB_NAME}'",
                     f'ALTER DATABASE "{DB_NAME}" RENAME TO "{PREVIOUS}"',
                     f'ALTER DATABASE "{STAGING}" RENAME TO "{DB_NAME}"')
    except BaseException:
        # Not switched (the renames are the last step): the database in use serves again.
        as_superuser(postgres, f'ALTER DATABASE "{DB_NAME}" ALLOW_CONNECTIONS true',
                     f'DROP DATABASE IF EXISTS "{STAGING}"')
        for container in stopped:
            container.start()
        raise
    say(f"switched over; the database it replaced is kept as {PREVIOUS}")
