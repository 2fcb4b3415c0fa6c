"""Secret files: generated into secrets/ on the host, staged per container for bind mounts.

Containers get each secret as a read-only bind mount of a per-container copy at
/run/secrets/NAME, owned by the container's uid:gid with mode 0400, staged in
build/secrets/<project>/<service>/ (directories mode 0700, root-owned). So only the container's
user can read it; values never go into env, argv, labels or image layers. Bind mounts need the
engine on this machine (a local DOCKER_HOST socket).
"""

from __future__ import annotations

import hashlib
import os
import secrets as stdlib_secrets
import shutil
from pathlib import Path

from .errors import OrchestrateError
from .stack import SECRETS_DIR, Service, Stack

ROOT = Path(__file__).resolve().parents[1]
STAGE_ROOT = ROOT / "build" / "secrets"


def secret_path(name: str) -> Path:
    return ROOT / SECRETS_DIR / name


def ensure_secrets(stack: Stack) -> list[str]:
    """Create missing secret files (mode 0600, 256 bits of randomness); return the new names."""
    created = []
    for name in stack.secrets:
        path = secret_path(name)
        path.parent.mkdir(exist_ok=True)
        if path.exists() and path.read_text().strip():
            os.chmod(path, 0o600)
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(stdlib_secrets.token_urlsafe(32))
        created.append(name)
    return created


def read_secret(name: str) -> str:
    """The secret value (trailing newline dropped), for checks that must never print it."""
    try:
        return secret_path(name).read_text().strip()
    except OSError as exc:
        raise OrchestrateError(f"cannot read secret {name}: {exc.strerror}") from None


def secret_digest(name: str) -> str:
    """sha256 of a secret's file content: lets a check compare without showing the value."""
    return hashlib.sha256(secret_path(name).read_bytes()).hexdigest()


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def stage_secrets(stack: Stack, service: Service) -> dict[str, Path]:
    """Write the service's per-container copies; return target path -> staged host file.

    A file whose content, owner and mode already match is left alone, so a running container's
    bind mount keeps pointing at the same inode.
    """
    directory = STAGE_ROOT / stack.project / service.name
    _private_dir(STAGE_ROOT)
    _private_dir(STAGE_ROOT / stack.project)
    _private_dir(directory)
    staged = {}
    for mount in service.secrets:
        source = secret_path(mount.secret).read_bytes()
        target = directory / mount.secret
        try:
            info = target.stat()
            current = (target.read_bytes(), info.st_uid, info.st_gid, info.st_mode & 0o777)
        except OSError:
            current = None
        if current != (source, mount.uid, mount.gid, mount.mode):
            target.unlink(missing_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(source)
            try:
                os.chown(target, mount.uid, mount.gid)
            except PermissionError:
                raise OrchestrateError(
                    f"staging secrets needs root: cannot chown {target.name} to uid {mount.uid}"
                ) from None
            os.chmod(target, mount.mode)
        staged[mount.target] = target
    return staged


def remove_staged(project: str) -> bool:
    """Remove the staged copies of a project; True when there was something to remove."""
    directory = STAGE_ROOT / project
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
