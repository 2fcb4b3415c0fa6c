"""What each layer is told, one small frozen record per layer; `process/config.py` fills them
from the environment once, and the factory hands each layer its own.

Kept free of heavy imports: `python -m service` reads its settings before the metrics may
load (see process/serve.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .files import SecretFile

# Blocking threads per worker process (`python -m service --threads`): as many as the
# connections a worker serves at once under load, so that the batches of creates and misses
# fill while one is in flight (bench/RESULTS.md); a worker's pool has a session for each.
THREADS = 16


@dataclass(frozen=True)
class PostgresSettings:
    """How to reach Postgres. `password`, when set, is read again for every new connection
    (so that it can rotate) and overrides the URL's."""

    url: str = field(repr=False)
    password: SecretFile | None = None
    pool_size: int = THREADS
    connect_timeout: int = 2
    statement_timeout_ms: int = 5000


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis, and the longest a request waits for it. With `sentinels`
    (host:port of each), the primary is the one they name `sentinel_master`, and the URL's
    address is not used."""

    url: str = field(repr=False)
    password: SecretFile | None = None
    timeout: float = 0.1
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "cachestack"


@dataclass(frozen=True)
class CacheSettings:
    """The cache policy's knobs (docs/design.md)."""

    ttl: float = 300.0
    ttl_jitter: float = 0.1
    negative_ttl: float = 60.0
    cooldown: float = 1.0
    near_size: int = 10_000
    # Samples per second the consistency auditor compares with Postgres; 0 turns it off.
    audit_per_second: float = 1.0
