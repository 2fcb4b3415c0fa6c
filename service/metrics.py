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

CACHE_HITS = Counter("cache_hits", "Reads answered from Redis")
CACHE_MISSES = Counter("cache_misses", "Reads that went to Postgres and filled Redis")
CACHE_ERRORS = Counter("cache_errors", "Redis calls that failed or timed out")
CACHE_BYPASSES = Counter("cache_bypasses", "Reads served from Postgres while Redis was unavailable")
DB_QUERIES = Counter("db_queries", "SQL statements sent to Postgres")
REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time spent answering HTTP requests",
    ["method", "route", "status"],
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
