"""Settings from the environment; every setting may instead be read from a file.

Containers receive credentials as files under /run/secrets, so each variable NAME
also accepts NAME_FILE. Values that are secrets are never part of an error message
or of the settings' repr.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import redis

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it, never its value."""


def read_file(name: str, path: str) -> str:
    """The file setting `name` points at, trailing newline dropped; a ConfigError that names
    the file, never what it holds, when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None


def read_setting(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """Return NAME, or the contents of the file NAME_FILE points at (trailing newline dropped)."""
    path = env.get(f"{name}_FILE")
    if path:
        return read_file(f"{name}_FILE", path)
    return env.get(name, default)


class SecretFile:
    """A secret read from its file each time it is used (for each new connection), so that
    it can change under a running service: a rotation rewrites each container's copy in
    place. A file that cannot be read, or is empty (as when caught half rewritten), gives
    the value read before, and one log line until it is good again. Neither the log nor
    the repr ever shows the value."""

    def __init__(self, name: str, path: str, value: str) -> None:
        self.name, self.path = name, path
        self._value = value  # the last value the file held
        self._failing = False

    @classmethod
    def of(cls, env: Mapping[str, str], name: str) -> SecretFile | None:
        """NAME_FILE's secret, read now; None when NAME_FILE is not set."""
        path = env.get(f"{name}_FILE")
        return cls(f"{name}_FILE", path, read_file(f"{name}_FILE", path)) if path else None

    def __repr__(self) -> str:
        return f"SecretFile({self.name}={self.path})"

    def read(self) -> str:
        try:
            value = read_file(self.name, self.path)
            if not value:
                raise ConfigError(f"{self.name}: {self.path} is empty")
        except ConfigError as exc:
            if not self._failing:
                log.warning("%s; using the value it held before", exc)
            self._failing = True
            return self._value
        self._value, self._failing = value, False
        return value


class FileVersion(NamedTuple):
    """What changes whenever a file is replaced or rewritten."""

    inode: int
    modified_ns: int
    size: int


def file_version(name: str, path: str) -> FileVersion:
    """The version of the file setting `name` points at (one stat); a ConfigError naming the
    file when it is gone."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None
    return FileVersion(info.st_ino, info.st_mtime_ns, info.st_size)


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0) -> float:
    raw = read_setting(env, name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def with_password(url: str, password: str | None) -> str:
    """Put a separately supplied password into a connection URL's netloc."""
    if not password:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# A bearer token as RFC 6750 spells one (b64token): what can follow "Bearer " in a header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _api_tokens(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The tokens a client may send; None when the setting is absent, which leaves the API
    open. A file of no token leaves it closed to everyone (auth.py)."""
    raw = read_setting(env, "API_TOKENS")
    return None if raw is None else parse_tokens(raw).tokens


class TokenLines(NamedTuple):
    """What a token file says: its tokens, and the numbers of its lines that are not one."""

    tokens: tuple[str, ...]
    not_tokens: tuple[int, ...]


def parse_tokens(raw: str) -> TokenLines:
    """Tokens one a line (so that a new one can be added before the old one is removed);
    blank lines, lines that start with `#` and spaces around a token are ignored."""
    tokens, not_tokens = [], []
    for number, line in enumerate(raw.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if BEARER_TOKEN.fullmatch(token):
            tokens.append(token)
        else:
            not_tokens.append(number)
    return TokenLines(tuple(tokens), tuple(not_tokens))


def _urls(env: Mapping[str, str]) -> tuple[str, str]:
    """DATABASE_URL and REDIS_URL with their passwords, checked as their clients will read
    them: a typo is one line at start, not a failure on every request."""
    database_url = read_setting(env, "DATABASE_URL")
    if not database_url:
        raise ConfigError("DATABASE_URL (or DATABASE_URL_FILE) is required")
    database_url = with_password(database_url, read_setting(env, "DATABASE_PASSWORD"))
    try:
        psycopg2.extensions.parse_dsn(database_url)
    except psycopg2.ProgrammingError:
        raise ConfigError("DATABASE_URL is not a URL libpq takes (postgresql://user@host:port/"
                          "database?option=value, with libpq's option names)") from None
    redis_url = read_setting(env, "REDIS_URL", "redis://127.0.0.1:6379/0") or ""
    redis_url = with_password(redis_url, read_setting(env, "REDIS_PASSWORD"))
    try:  # makes a connection object, which connects only when used
        redis.ConnectionPool.from_url(redis_url).make_connection()
    except (ValueError, TypeError) as exc:  # a scheme, a port, a query option redis-py lacks
        raise ConfigError(f"REDIS_URL is not a URL redis-py takes: {exc}") from None
    return database_url, redis_url


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """NAME as 1/0 (also true/false, on/off, yes/no); `default` when unset or empty."""
    raw = (read_setting(env, name) or "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "on", "yes"}:
        return True
    if raw in {"0", "false", "off", "no"}:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


# The auditor samples at a low rate by design: each sample costs a few Redis and Postgres
# round trips of its own, off the request path.
MAX_AUDIT_PER_SECOND = 100.0


def _audit_rate(env: Mapping[str, str]) -> float:
    """CACHE_AUDIT_PER_SECOND: 0 (off) up to MAX_AUDIT_PER_SECOND samples a second."""
    rate = _number(env, "CACHE_AUDIT_PER_SECOND", 1.0)
    if rate != rate or rate > MAX_AUDIT_PER_SECOND:  # NaN, or more than a low rate
        raise ConfigError(f"CACHE_AUDIT_PER_SECOND must be 0 (off) to {MAX_AUDIT_PER_SECOND:g}, "
                          f"got {rate}")
    return rate


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, validated once at start."""

    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    cache_ttl: float = 300.0
    cache_ttl_jitter: float = 0.1
    cache_negative_ttl: float = 60.0
    cache_timeout: float = 0.1
    cache_cooldown: float = 1.0
    near_cache_size: int = 10_000
    db_pool_size: int = 4
    db_connect_timeout: int = 2
    db_statement_timeout_ms: int = 5000
    # Concurrent creates and reads by id of a process share their statements (batching.py);
    # BATCHING=0 sends each on its own, to compare.
    batching: bool = True
    # Samples per second the consistency auditor (audit.py) compares with Postgres. The
    # environment's default is 1; an app made from Settings(...) directly starts no auditor
    # thread unless asked for one (the tests make hundreds of apps).
    cache_audit_per_second: float = 0.0
    # The role the service runs as, which `python -m service migrate` grants to.
    database_app_role: str = "cachestack_app"
    # None: the API is open to anyone who reaches it; empty: it accepts no token.
    api_tokens: tuple[str, ...] | None = field(default=None, repr=False)
    # Where the tokens came from, read again when it changes (auth.py); None: they are fixed.
    api_tokens_file: str | None = None
    # Read again at each new connection, so that the passwords can rotate; None: the URLs'
    # passwords, fixed.
    database_password_file: SecretFile | None = None
    redis_password_file: SecretFile | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url, redis_url = _urls(env)
        jitter = _number(env, "CACHE_TTL_JITTER", 0.1)
        if jitter >= 1:
            raise ConfigError(f"CACHE_TTL_JITTER must be below 1, got {jitter}")
        app_role = read_setting(env, "DATABASE_APP_ROLE", "cachestack_app") or ""
        if not app_role.strip():
            raise ConfigError("DATABASE_APP_ROLE must name a role")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            cache_ttl=_number(env, "CACHE_TTL_SECONDS", 300.0, minimum=1),
            cache_ttl_jitter=jitter,
            cache_negative_ttl=_number(env, "CACHE_NEGATIVE_TTL_SECONDS", 60.0, minimum=1),
            cache_timeout=_number(env, "CACHE_TIMEOUT_MS", 100.0, minimum=1) / 1000,
            cache_cooldown=_number(env, "CACHE_COOLDOWN_SECONDS", 1.0),
            near_cache_size=int(_number(env, "NEAR_CACHE_SIZE", 10_000)),
            db_pool_size=int(_number(env, "DB_POOL_SIZE", 4, minimum=1)),
            db_connect_timeout=int(_number(env, "DB_CONNECT_TIMEOUT_SECONDS", 2, minimum=1)),
            db_statement_timeout_ms=int(_number(env, "DB_STATEMENT_TIMEOUT_MS", 5000, minimum=1)),
            batching=_flag(env, "BATCHING", True),
            cache_audit_per_second=_audit_rate(env),
            database_app_role=app_role,
            api_tokens=_api_tokens(env),
            api_tokens_file=env.get("API_TOKENS_FILE") or None,
            database_password_file=SecretFile.of(env, "DATABASE_PASSWORD"),
            redis_password_file=SecretFile.of(env, "REDIS_PASSWORD"),
        )
