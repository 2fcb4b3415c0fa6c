"""Prometheus metrics, shared by every worker process when PROMETHEUS_MULTIPROC_DIR is set.

`python -m service` sets that directory before the workers start, so /metrics adds
up the counters of all workers, whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

CACHE_HITS = Counter("cache_hits", "Reads answered from Redis")
CACHE_MISSES = Counter("cache_misses", "Reads that went to Postgres and filled Redis")
CACHE_ERRORS = Counter("cache_errors", "Redis calls that failed or timed out")
CACHE_BYPASSES = Counter("cache_bypasses", "Reads served from Postgres while Redis was unavailable")
DB_QUERIES = Counter("db_queries", "SQL statements sent to Postgres")
# The consistency auditor's (audit.py); its own SQL is not in db_queries, which counts what
# requests cost.
CACHE_AUDITS = Counter("cache_audits", "Cached entries the auditor compared with Postgres")
CACHE_INCONSISTENCIES = Counter(
    "cache_inconsistencies",
    "Cached entries that disagreed with Postgres past the grace period (then deleted)",
    ["layer", "kind"],
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


# Label values come from the client, so they are kept to a known few: any other method
# would add a time series per made-up method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def timed(wsgi_app: WSGIApplication) -> WSGIApplication:
    """WSGI middleware that observes each request's latency.

    It wraps Flask's `wsgi_app` rather than using request hooks, which cost several times
    more Python calls per request than this on the hottest paths.
    """

    def observed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        status = "500"

        def remember_status(code: str, headers: list, *exc_info: object) -> object:
            nonlocal status
            status = code[:3]
            return start_response(code, headers, *exc_info)

        body = wsgi_app(environ, remember_status)
        method = environ["REQUEST_METHOD"]
        REQUEST_LATENCY.labels(method if method in METHODS else "other", status).observe(
            time.perf_counter() - started)
        return body

    return observed


def render() -> tuple[bytes, str]:
    """The exposition text for every worker (or just this process outside multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
