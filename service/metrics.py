"""Prometheus metrics, shared by every worker process when PROMETHEUS_MULTIPROC_DIR is set.

`python -m service` sets that directory before the workers start, so /metrics adds
up the counters of all workers, whichever worker answers the scrape.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

CACHE_HITS = Counter("cache_hits", "Reads answered from the cache: Redis or a near cache")
CACHE_MISSES = Counter("cache_misses", "Reads that went to Postgres and filled Redis")
CACHE_ERRORS = Counter("cache_errors", "Redis calls that failed or timed out")
CACHE_GAPS = Counter(
    "cache_gaps",
    "Times a worker stopped trusting Redis until a new epoch: a write-through that failed, "
    "a Redis not heard for a heartbeat",
)
CACHE_BYPASSES = Counter("cache_bypasses", "Reads served from Postgres while Redis was unavailable")
DB_QUERIES = Counter("db_queries", "SQL statements sent to Postgres")
# The consistency auditor's (cache/audit.py); its own SQL is not in db_queries, which counts what
# requests cost.
CACHE_AUDITS = Counter("cache_audits", "Cached entries the auditor compared with Postgres")
CACHE_INCONSISTENCIES = Counter(
    "cache_inconsistencies",
    "Cached entries that disagreed with Postgres past the grace period (then deleted)",
    ["layer", "kind"],
)
# The change stream's (usecases/stream.py): what it applied, how late, how often it began anew.
STREAM_CHANGES = Counter("stream_changes", "Row changes of users applied to the cache")
STREAM_LAG = Histogram(
    "stream_lag_seconds",
    "From a transaction's commit to the cache's invalidation of its changes (of each batch "
    "applied, its oldest transaction's)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STREAM_NEW_EPOCHS = Counter(
    "stream_new_epochs",
    "Times the change stream could not tell what changed (a slot made anew, a TRUNCATE) "
    "and began a new cache epoch",
)
# A batch of one is a request that found nothing to go with (batching.py).
BATCH_SIZE = Histogram(
    "batch_size",
    "Items per batch of coalesced work: creates, loads by id",
    ["kind"],
    buckets=(1, 2, 3, 4, 6, 8, 16),
)
REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time spent answering HTTP requests",
    ["method", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


def render() -> tuple[bytes, str]:
    """The exposition text for every worker (or just this process outside multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
