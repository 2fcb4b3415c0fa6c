"""Secret files: generated into secrets/ on the host, staged per container for bind mounts.

secrets/ holds one value per file, mode 0600: passwords (256 random bits each), the API
tokens (one per line), the project CA (ca.key never leaves this folder) and the server
certificates it signed, and the key that signs backups (backup_key, read by the orchestrator
only: no container gets it).

Containers get each secret as a read-only bind mount of a per-container copy at
/run/secrets/NAME, owned by the container's uid:gid with mode 0400, staged in
build/secrets/<project>/<service>/ (directories mode 0700, root-owned). So only the container's
user can read it; values never go into env, argv, labels or image layers. Bind mounts need the
engine on this machine (a local DOCKER_HOST socket).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets as stdlib_secrets
import shutil
import ssl
from pathlib import Path

from . import certs
from .errors import OrchestrateError
from .paths import BUILD, ROOT
from .stack import (
    API_TOKENS,
    CA_CERT,
    PROXY_CERT,
    SECRETS_DIR,
    Certificate,
    Port,
    Service,
    Stack,
)

STAGE_ROOT = BUILD / "secrets"
CA_KEY = "ca.key"
BACKUP_KEY = "backup_key"
CA_NAME = "cachestack CA"
EXPIRY_WARNING = datetime.timedelta(days=30)


def secret_path(name: str) -> Path:
    return ROOT / SECRETS_DIR / name


def _present(name: str) -> bool:
    path = secret_path(name)
    return path.exists() and bool(path.read_bytes().strip())


def write_secret(name: str, value: bytes) -> None:
    """Replace a secret file with `value`, mode 0600 from the start (never readable by others,
    not even between its creation and a chmod)."""
    path = secret_path(name)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    partial = path.with_name(f".{name}.new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    partial.replace(path)


def new_password() -> bytes:
    return stdlib_secrets.token_urlsafe(32).encode()


def new_token() -> bytes:
    """An API token: `cs_` and 256 random bits, so it is easy to recognise in a leak scan."""
    return f"cs_{stdlib_secrets.token_urlsafe(32)}".encode()


def _ensure_certificates(stack: Stack) -> list[str]:
    """The CA (when missing, every certificate is made anew) and each server certificate."""
    created = []
    fresh_ca = not (_present(CA_KEY) and _present(CA_CERT))
    if fresh_ca:
        ca = certs.make_ca(CA_NAME)
        write_secret(CA_KEY, ca.key)
        write_secret(CA_CERT, ca.cert)
        created += [CA_KEY, CA_CERT]
    else:
        ca = certs.KeyPair(secret_path(CA_KEY).read_bytes(), secret_path(CA_CERT).read_bytes())
    for server in stack.certificates:
        if operators_own(server):
            continue
        if fresh_ca or not (_present(server.key) and _present(server.cert)) or not certs.signed_by(
                secret_path(server.cert).read_bytes(), ca.cert):
            created += issue_certificate(ca, server)  # missing, or left from an earlier CA
    return created


def operators_own(server: Certificate) -> bool:
    """Whether the server certificate in secrets/ was issued by another CA than the project's:
    the operator's own (the proxy's, for a public name), used as it is and never replaced."""
    return _present(server.cert) and certs.issuer(secret_path(server.cert).read_bytes()) != CA_NAME


def issue_certificate(ca: certs.KeyPair, server: Certificate) -> list[str]:
    pair = certs.make_server_cert(ca, list(server.hosts), client=server.client)
    write_secret(server.key, pair.key)
    write_secret(server.cert, pair.cert)
    return [server.key, server.cert]


def ensure_secrets(stack: Stack) -> list[str]:
    """Create missing secret files; return the names of the new ones."""
    created = _ensure_certificates(stack)
    made_by_certificates = {CA_CERT} | {n for c in stack.certificates for n in (c.cert, c.key)}
    for name in stack.secrets:
        path = secret_path(name)
        if name in made_by_certificates:
            continue
        if _present(name):
            os.chmod(path, 0o600)
            continue
        write_secret(name, new_token() + b"\n" if name == API_TOKENS else new_password())
        created.append(name)
    if not _present(BACKUP_KEY):
        backup_key()
        created.append(BACKUP_KEY)
    return created


def backup_key() -> bytes:
    """The key backups are signed with (HMAC-SHA-256, orchestrate/backup.py), made when
    missing. It stays in secrets/: a restore trusts only what this orchestrator signed."""
    try:
        if not _present(BACKUP_KEY):
            write_secret(BACKUP_KEY, new_password())
        return secret_path(BACKUP_KEY).read_bytes().strip()
    except OSError as exc:
        raise OrchestrateError(f"cannot read or make secrets/{BACKUP_KEY}: {exc.strerror}"
                               ) from None


def read_secret(name: str) -> str:
    """The secret value (trailing newline dropped), for checks that must never print it."""
    try:
        return secret_path(name).read_text().strip()
    except OSError as exc:
        raise OrchestrateError(f"cannot read secret {name}: {exc.strerror}") from None


def api_token() -> str:
    """The first API token of secrets/api_tokens (what the smoke checks send)."""
    return read_secret(API_TOKENS).splitlines()[0].strip()


def port_context(port: Port) -> ssl.SSLContext | None:
    """How the orchestrator's own requests trust a published port: with TLS, exactly the
    proxy's certificate in secrets/ (certs.pinned_context); None for plain HTTP."""
    if not port.tls:
        return None
    return certs.pinned_context(secret_path(PROXY_CERT.cert).read_bytes())


def expiring_certificates(stack: Stack, now: datetime.datetime | None = None) -> list[str]:
    """One line for each certificate that expires within EXPIRY_WARNING (or already has)."""
    now = now or datetime.datetime.now(datetime.UTC)
    warnings = []
    own = {c.cert for c in stack.certificates if operators_own(c)}
    for name in [CA_CERT, *(c.cert for c in stack.certificates)]:
        if not _present(name):
            continue
        left = certs.expires(secret_path(name).read_bytes()) - now
        if left < EXPIRY_WARNING:
            state = f"expires in {left.days} days" if left.total_seconds() > 0 else "has expired"
            renew = ("replace it (it is your own)" if name in own
                     else f"renew it with `python -m orchestrate rotate {CA_CERT}`")
            warnings.append(f"certificate secrets/{name} {state}: {renew}")
    return warnings


def secret_digest(name: str) -> str:
    """sha256 of a secret's file content: lets a check compare without showing the value."""
    return hashlib.sha256(secret_path(name).read_bytes()).hexdigest()


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def stage_secrets(stack: Stack, service: Service) -> dict[str, Path]:
    """Write the service's per-container copies; return target path -> staged host file.

    A copy that exists is rewritten in place, never replaced: a running container's bind
    mount keeps pointing at the same inode, so it sees a rotated value at once.
    """
    directory = STAGE_ROOT / stack.project / service.name
    _private_dir(STAGE_ROOT)
    _private_dir(STAGE_ROOT / stack.project)
    _private_dir(directory)
    staged = {}
    for mount in service.secrets:
        source = secret_path(mount.secret).read_bytes()
        target = directory / mount.secret
        if not target.exists():
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        if target.read_bytes() != source:
            with open(target, "r+b") as handle:
                handle.write(source)
                handle.truncate()
        info = target.stat()
        try:
            if (info.st_uid, info.st_gid) != (mount.uid, mount.gid):
                os.chown(target, mount.uid, mount.gid)
        except PermissionError:
            raise OrchestrateError(
                f"staging secrets needs root: cannot chown {target.name} to uid {mount.uid}"
            ) from None
        if info.st_mode & 0o777 != mount.mode:
            os.chmod(target, mount.mode)
        staged[mount.target] = target
    return staged


def changed_since_staged(stack: Stack) -> list[str]:
    """The secrets whose file in secrets/ no longer matches what containers were given: changed
    by hand, which only `rotate` can apply to a running stack."""
    changed = set()
    for service in stack.services:
        for mount in service.secrets:
            copy = STAGE_ROOT / stack.project / service.name / mount.secret
            if copy.exists() and copy.read_bytes() != secret_path(mount.secret).read_bytes():
                changed.add(mount.secret)
    return sorted(changed)


def remove_staged(project: str) -> bool:
    """Remove the staged copies of a project; True when there was something to remove."""
    directory = STAGE_ROOT / project
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    return True
