"""Settings from the environment; every setting may instead be read from a file.

Containers receive credentials as files under /run/secrets, so each variable NAME
also accepts NAME_FILE. Values that are secrets are never part of an error message
or of the settings' repr.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import redis

from ..files import ConfigError, SecretFile, parse_tokens, read_file
from ..settings import THREADS, CacheSettings, PostgresSettings, RedisSettings


def read_setting(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """Return NAME, or the contents of the file NAME_FILE points at (trailing newline dropped)."""
    path = env.get(f"{name}_FILE")
    if path:
        return read_file(f"{name}_FILE", path)
    return env.get(name, default)


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0) -> float:
    raw = read_setting(env, name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def with_password(url: str, password: str | None) -> str:
    """Put a separately supplied password into a connection URL's netloc, leaving the rest as
    it is written (the user name as quoted, host and port unread: the clients judge them).
    ValueError when the URL cannot be split."""
    if not password:
        return url
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))


def _api_tokens(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The tokens a client may send; None when the setting is absent, which leaves the API
    open. A file of no token leaves it closed to everyone (web/auth.py)."""
    raw = read_setting(env, "API_TOKENS")
    return None if raw is None else parse_tokens(raw).tokens


def _urls(env: Mapping[str, str]) -> tuple[str, str]:
    """DATABASE_URL and REDIS_URL with their passwords, checked as their clients will read
    them: a typo is one line at start, not a failure on every request."""
    database_url = read_setting(env, "DATABASE_URL")
    if not database_url:
        raise ConfigError("DATABASE_URL (or DATABASE_URL_FILE) is required")
    password = read_setting(env, "DATABASE_PASSWORD")
    try:
        database_url = with_password(database_url, password)
        for host in urlsplit(database_url).netloc.rpartition("@")[2].split(","):
            urlsplit(f"//{host}").port  # noqa: B018 - raises ValueError for a port that is not one
        psycopg2.extensions.parse_dsn(database_url)
    except (psycopg2.ProgrammingError, ValueError):
        raise ConfigError("DATABASE_URL is not a URL libpq takes (postgresql://user@host:port/"
                          "database?option=value, with libpq's option names)") from None
    redis_url = read_setting(env, "REDIS_URL", "redis://127.0.0.1:6379/0") or ""
    password = read_setting(env, "REDIS_PASSWORD")
    try:  # makes a connection object, which connects only when used
        redis_url = with_password(redis_url, password)
        redis.ConnectionPool.from_url(redis_url).make_connection()
    except (ValueError, TypeError) as exc:  # a scheme, a port, a query option redis-py lacks
        raise ConfigError(f"REDIS_URL is not a URL redis-py takes: {exc}") from None
    return database_url, redis_url


def _sentinels(env: Mapping[str, str]) -> tuple[str, ...]:
    """REDIS_SENTINELS: host:port of each Sentinel, comma-separated (none: REDIS_URL's Redis
    is the primary)."""
    sentinels = tuple(part.strip() for part in (read_setting(env, "REDIS_SENTINELS") or "")
                      .split(",") if part.strip())
    for sentinel in sentinels:
        host, _, port = sentinel.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"REDIS_SENTINELS: {sentinel!r} is not host:port")
    return sentinels


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
    rate = _number(env, "CACHE_AUDIT_PER_SECOND", CacheSettings.audit_per_second)
    if rate != rate or rate > MAX_AUDIT_PER_SECOND:  # NaN, or more than a low rate
        raise ConfigError(f"CACHE_AUDIT_PER_SECOND must be 0 (off) to {MAX_AUDIT_PER_SECOND:g}, "
                          f"got {rate}")
    return rate


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, validated once at start, as the
    records each layer takes (service/settings.py) and what the process itself uses."""

    postgres: PostgresSettings
    redis: RedisSettings
    cache: CacheSettings = CacheSettings()
    # Concurrent creates and reads by id of a process share their statements (batching.py);
    # BATCHING=0 sends each on its own, to compare.
    batching: bool = True
    threads: int = THREADS
    # The roles the service and its change stream run as, which `python -m service migrate`
    # grants to (the stream's only when it exists).
    app_role: str = "cachestack_app"
    stream_role: str = "cachestack_stream"
    # The replication slot the change stream reads (one per database: slots are the cluster's).
    stream_slot: str = "cachestack_invalidation"
    # None: the API is open to anyone who reaches it; empty: it accepts no token.
    api_tokens: tuple[str, ...] | None = field(default=None, repr=False)
    # Where the tokens came from, read again when it changes (auth.py); None: they are fixed.
    api_tokens_file: str | None = None

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
        threads = int(_number(env, "THREADS", cls.threads, minimum=1))
        sentinels = _sentinels(env)
        sentinel_master = (read_setting(env, "REDIS_SENTINEL_MASTER", "cachestack") or "").strip()
        if sentinels and not sentinel_master:
            raise ConfigError("REDIS_SENTINEL_MASTER must name what the Sentinels watch")
        return cls(
            postgres=PostgresSettings(
                url=database_url,
                password=SecretFile.of(env, "DATABASE_PASSWORD"),
                # One connection per request a worker can have in flight, unless told
                # otherwise: no thread waits for a connection while another waits out a
                # handover of the lead.
                pool_size=int(_number(env, "DB_POOL_SIZE", threads, minimum=1)),
                connect_timeout=int(_number(env, "DB_CONNECT_TIMEOUT_SECONDS", 2, minimum=1)),
                statement_timeout_ms=int(_number(env, "DB_STATEMENT_TIMEOUT_MS", 5000,
                                                 minimum=1)),
            ),
            redis=RedisSettings(
                url=redis_url,
                password=SecretFile.of(env, "REDIS_PASSWORD"),
                timeout=_number(env, "CACHE_TIMEOUT_MS", 100.0, minimum=1) / 1000,
                sentinels=sentinels,
                sentinel_master=sentinel_master,
            ),
            cache=CacheSettings(
                ttl=_number(env, "CACHE_TTL_SECONDS", 300.0, minimum=1),
                ttl_jitter=jitter,
                negative_ttl=_number(env, "CACHE_NEGATIVE_TTL_SECONDS", 60.0, minimum=1),
                cooldown=_number(env, "CACHE_COOLDOWN_SECONDS", 1.0),
                near_size=int(_number(env, "NEAR_CACHE_SIZE", 10_000)),
                audit_per_second=_audit_rate(env),
            ),
            batching=_flag(env, "BATCHING", True),
            threads=threads,
            app_role=app_role,
            stream_role=read_setting(env, "DATABASE_STREAM_ROLE", "cachestack_stream") or "",
            stream_slot=read_setting(env, "STREAM_SLOT", "cachestack_invalidation") or "",
            api_tokens=_api_tokens(env),
            api_tokens_file=env.get("API_TOKENS_FILE") or None,
        )
