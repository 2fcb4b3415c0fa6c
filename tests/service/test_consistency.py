"""The consistency checker (bench/consistency.py) in its CI size, against the default,
fastest configuration of the multi-worker server (with an API token, as deployed): no read
that starts after a write is acknowledged may return older data. Also while Redis crashes or
hangs, while Redis, out of memory, evicts keys (any of the service's: rows, pointers,
tombstones, "nobody" entries, leases) throughout the run, and while rows change by plain SQL
behind the service's back (seen through the change stream within its lag bound)."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator

import pytest

from bench.background import Background
from bench.consistency import OUTSIDE_ROWS, Faults, Outside, run_checker

from .helpers import ApiTokens, counter, private_redis, serve, streaming
from .servers import RedisServer, ServiceProcess

OPERATIONS = 2_000
CLIENTS = 32
HEADROOM = 2**20  # bytes of maxmemory above what Redis used when the run began
# Seconds within which the change stream must bring an outside change to every reader: far
# more than its lag on a loaded machine (bench/RESULTS.md), far less than the run.
STREAM_LAG = 0.5
# Few and large, so that most keys Redis samples to evict are the service's.
FILLER = b"x" * 65536


def test_no_read_sees_data_older_than_an_acknowledged_write(
        guarded_service: ServiceProcess, api_tokens: ApiTokens) -> None:
    report = run_checker(guarded_service.url, OPERATIONS, CLIENTS, seed=20261127,
                         headers=api_tokens.header())
    assert report.operations >= OPERATIONS
    assert report.reads_checked > OPERATIONS // 3
    assert report.ok, report.summary()


@pytest.fixture(scope="module")
def faulty_redis() -> Iterator[RedisServer]:
    """A Redis of its own, to crash and to hang: it comes back with its append-only file,
    which the service must never read from."""
    yield from private_redis()


@pytest.fixture(scope="module")
def service_on_faulty_redis(database_url: str, owner_url: str,
                            faulty_redis: RedisServer) -> Iterator[ServiceProcess]:
    yield from serve(database_url, owner_url, faulty_redis)


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_no_stale_read_and_no_failed_request_while_redis_crashes_or_hangs_throughout(
        service_on_faulty_redis: ServiceProcess, faulty_redis: RedisServer, fault: str) -> None:
    """SIGKILL (Redis then starts again, from its append-only file) or SIGSTOP for longer than
    the command timeout and the heartbeat, every 2 s: no read returns what an acknowledged
    write replaced, and every request is answered (BYPASS is an answer)."""
    faulty_redis.client().bgrewriteaof()  # an append-only file to come back with
    faults = Faults(fault, lambda: faulty_redis.process.pid, faulty_redis.start)
    report = run_checker(service_on_faulty_redis.url, OPERATIONS, CLIENTS, seed=20261206,
                         faults=faults)
    assert report.faults >= 1, report.summary()
    assert report.reads_checked > OPERATIONS // 3
    assert report.ok, report.summary()


@pytest.fixture(scope="module")
def evicting_redis() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture(scope="module")
def service_on_evicting_redis(database_url: str, owner_url: str,
                              evicting_redis: RedisServer) -> Iterator[ServiceProcess]:
    yield from serve(database_url, owner_url, evicting_redis)


class Pressure(Background):
    """Keeps a Redis at its maxmemory with filler keys (written as the admin), and counts
    which of the service's keys it evicts, by kind (id, username, lease...)."""

    def __init__(self, server: RedisServer) -> None:
        self.admin = server.client()
        self.evicted: collections.Counter[str] = collections.Counter()
        self._events = self.admin.pubsub()
        self._events.subscribe("__keyevent@0__:evicted")
        super().__init__([self._fill, self._count], join_s=5)

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self._events.close()

    def _fill(self) -> None:
        for batch in itertools.count():
            if self.stop.wait(0.005):
                return
            self.admin.set(f"filler:{batch}", FILLER)

    def _count(self) -> None:
        while not self.stop.is_set():
            message = self._events.get_message(timeout=0.1)
            if message and message["type"] == "message" and message["data"].startswith(b"cs:"):
                # cs:1:<namespace>:<epoch name>:<kind>:..., or cs:1:<namespace>:epoch (whose
                # eviction begins a new epoch: the cache is cold, never wrong)
                parts = message["data"].split(b":")
                self.evicted[parts[4 if len(parts) > 4 else 3].decode()] += 1


def test_no_stale_read_while_redis_evicts_throughout(
        service_on_evicting_redis: ServiceProcess, evicting_redis: RedisServer) -> None:
    admin = evicting_redis.client()
    admin.config_set("appendonly", "no")  # the filler need not reach the disk
    admin.config_set("notify-keyspace-events", "Ee")  # publish the name of every evicted key
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] + HEADROOM)
    evicted_before = admin.info("stats")["evicted_keys"]
    errors_before = counter(service_on_evicting_redis.url, "cache_errors_total")
    with Pressure(evicting_redis) as pressure:
        report = run_checker(service_on_evicting_redis.url, OPERATIONS, CLIENTS, seed=20261128)
    assert report.ok, report.summary()
    assert report.reads_checked > OPERATIONS // 3
    assert admin.info("stats")["evicted_keys"] - evicted_before > 0
    # Keys of each kind that lives long enough to be picked (leases seldom do), in numbers.
    assert {"id", "username", "email"} <= set(pressure.evicted), pressure.evicted
    assert sum(pressure.evicted.values()) > 100, pressure.evicted
    # Redis evicted rather than refused writes (OOM): the cache was never bypassed.
    assert counter(service_on_evicting_redis.url, "cache_errors_total") == errors_before


@pytest.fixture(scope="module")
def streamed_redis() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture(scope="module")
def streamed_service(database_url: str, owner_url: str, stream_url: str,
                     streamed_redis: RedisServer) -> Iterator[ServiceProcess]:
    """The server, and its change stream (`python -m service stream`) on the same Redis."""
    for service in serve(database_url, owner_url, streamed_redis):
        for _ in streaming(stream_url, streamed_redis.url):
            yield service


def test_no_read_misses_a_change_made_by_plain_sql_once_the_stream_had_time(
        streamed_service: ServiceProcess, owner_url: str) -> None:
    """The checker's outside writer inserts rows and changes them by plain SQL (as the
    database's owner), while the clients read them by id, username and email: every read that
    starts STREAM_LAG after a commit sees it. (Twice the operations: the run must outlast the
    lag many times over for a stale read to be caught.)"""
    report = run_checker(streamed_service.url, 2 * OPERATIONS, CLIENTS, seed=20261208,
                         outside=Outside(owner_url, lag=STREAM_LAG))
    assert report.statuses["outside 200"] > OUTSIDE_ROWS, report.summary()
    assert report.reads_checked > OPERATIONS // 3
    assert report.ok, report.summary()
