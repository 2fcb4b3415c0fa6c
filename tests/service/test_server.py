"""The real multi-worker server under concurrency and faults: stampedes, Redis dying
under load, Postgres cut off and back. Each test starts what it breaks itself."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests

from .helpers import counter, empty_database, keys_of, via_proxy
from .servers import RedisServer, ServiceProcess, TcpProxy, wait_until

STAMPEDE = 200


def post_user(base_url: str, name: str) -> dict:
    response = requests.post(base_url + "/users", timeout=5,
                             json={"username": name, "email": f"{name}@example.org"})
    assert response.status_code == 201, response.text
    return response.json()["data"]


def warm_up(base_url: str) -> None:
    """Reach every worker once, so that start-up work is not counted below."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: requests.get(base_url + "/users/1", timeout=5), range(64)))


def stampede(base_url: str, path: str) -> list[requests.Response]:
    """STAMPEDE requests on their own connections, released at the same instant."""
    start = threading.Barrier(STAMPEDE)

    def one(_: int) -> requests.Response:
        with requests.Session() as session:
            session.head(base_url + "/healthz", timeout=10)  # connect before the barrier
            start.wait()
            return session.get(base_url + path, timeout=10)

    with ThreadPoolExecutor(STAMPEDE) as pool:
        return list(pool.map(one, range(STAMPEDE)))


@pytest.fixture(scope="module")
def threaded_service(database_url: str, redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """Many requests in flight per worker, so that a stampede really runs concurrently.

    Sixteen threads share one GIL, so on a busy machine a Redis reply can take longer than
    the 100 ms default to be read; a longer timeout keeps the breaker out of this test."""
    process = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
                              "CACHE_TIMEOUT_MS": "2000"}, threads=16)
    yield process
    process.close()


# How long Postgres holds every read of the stampede back: a moment, or longer than a reader
# used to wait for another's fill before querying Postgres itself (1 s), as on a loaded machine.
SLOW = {"cold": 0.3, "just expired": 0.3, "cold and slow": 1.5}


@pytest.mark.parametrize("state", list(SLOW))
def test_stampede_on_one_key_costs_at_most_two_queries(
        threaded_service: ServiceProcess, redis_server: RedisServer, database_url: str,
        owner_url: str, state: str) -> None:
    service = threaded_service
    user = post_user(service.url, f"hot{uuid.uuid4().hex[:12]}")
    warm_up(service.url)
    key = keys_of(database_url, redis_server).user(user["id"])
    if state.startswith("cold"):
        redis_server.client().delete(key)
    else:
        redis_server.client().pexpire(key, 1)
        time.sleep(0.01)
    before = counter(service.url, "db_queries_total")
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        # A slow database: every read waits until the stampede is fully under way.
        cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(stampede, service.url, f"/users/{user['id']}")
            time.sleep(SLOW[state])
            conn.commit()
            responses = running.result()
    conn.close()
    queries = counter(service.url, "db_queries_total") - before
    bad = [(r.status_code, r.headers.get("X-Cache"), r.text) for r in responses
           if r.status_code != 200 or r.json()["data"] != user
           or r.headers["X-Cache"] == "BYPASS"]
    assert not bad, bad[:3]
    assert queries <= 2, f"{queries} database queries for {STAMPEDE} concurrent reads"


def load(base_url: str, paths: list[str], seconds: float) -> list[tuple[float, int, str]]:
    """Read `paths` round-robin from 8 threads; (latency, status, X-Cache) of each request."""
    deadline = time.monotonic() + seconds

    def worker(offset: int) -> list[tuple[float, int, str]]:
        seen = []
        with requests.Session() as session:
            n = offset
            while time.monotonic() < deadline:
                started = time.monotonic()
                response = session.get(base_url + paths[n % len(paths)], timeout=5)
                seen.append((time.monotonic() - started, response.status_code,
                             response.headers.get("X-Cache", "")))
                n += 1
        return seen

    with ThreadPoolExecutor(8) as pool:
        return [row for rows in pool.map(worker, range(8)) for row in rows]


def test_redis_killed_under_load_then_back(
        service: ServiceProcess, redis_server: RedisServer) -> None:
    users = [post_user(service.url, f"loaded{n}") for n in range(20)]
    paths = [f"/users/{u['id']}" for u in users]
    with ThreadPoolExecutor(1) as pool:
        during = pool.submit(load, service.url, paths, 3.0)
        time.sleep(0.5)
        redis_server.stop()
        results = during.result()
    try:
        after_stop = load(service.url, paths, 0.5)
        assert {status for _, status, _ in results + after_stop} == {200}
        assert {cache for _, _, cache in after_stop} == {"BYPASS"}
        # Redis timeout (100 ms) plus ordinary work; the breaker stops paying it every time
        assert max(latency for latency, _, _ in after_stop) < 0.5
        ready = requests.get(service.url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["cache"] == "degraded"
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while "HIT" not in {cache for _, _, cache in load(service.url, paths, 0.2)}:
        assert time.monotonic() < deadline, "no cache hits within 5 s of Redis coming back"
    while requests.get(service.url + "/readyz", timeout=5).json()["cache"] != "ok":
        assert time.monotonic() < deadline, "/readyz still degraded 5 s after Redis came back"
        time.sleep(0.1)


@pytest.fixture
def behind_proxy(database_url: str, owner_url: str,
                 redis_server: RedisServer) -> Iterator[tuple]:
    """A service whose Postgres connections all pass through a proxy the test can cut."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    empty_database(owner_url)
    proxy = TcpProxy(5432)
    process = ServiceProcess({"DATABASE_URL": via_proxy(database_url, proxy.port),
                              "REDIS_URL": redis_server.url})
    yield process, proxy
    process.close()
    proxy.close()


def test_postgres_outage_then_recovery_without_restart(behind_proxy: tuple) -> None:
    service, proxy = behind_proxy
    cached = post_user(service.url, "cached")
    warm_up(service.url)  # each worker reads the repair log once before it trusts Redis
    proxy.cut()
    started = time.monotonic()
    hit = requests.get(f"{service.url}/users/{cached['id']}", timeout=10)
    assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT"
    assert hit.json()["data"] == cached
    for response in (
        requests.get(f"{service.url}/users?username=uncached", timeout=10),
        requests.get(f"{service.url}/users/{cached['id'] + 1}", timeout=10),
        requests.post(f"{service.url}/users", timeout=10,
                      json={"username": "during", "email": "during@example.org"}),
        requests.patch(f"{service.url}/users/{cached['id']}", json={"display_name": "x"},
                       timeout=10),
        requests.get(f"{service.url}/readyz", timeout=10),
    ):
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"]
        assert response.headers["Content-Type"].startswith("application/json")
    assert time.monotonic() - started < 5, "requests hung while Postgres was down"
    proxy.restore()
    assert requests.get(f"{service.url}/readyz", timeout=10).status_code == 200
    recovered = post_user(service.url, "after")
    assert requests.get(f"{service.url}/users?username=after",
                        timeout=10).json()["data"] == [recovered]
    unchanged = requests.get(f"{service.url}/users/{cached['id']}", timeout=10).json()["data"]
    assert unchanged == cached


def test_a_postgres_that_stops_answering_costs_no_cached_read(
        database_url: str, owner_url: str, redis_server: RedisServer) -> None:
    """Postgres stops answering, without closing anything (a hung process, a stalled disk: a
    proxy holds every byte): reads the cache holds are answered, every one, while misses and
    writes get a 503 within the statement timeout and a margin, not a hang, and do not tie up
    the threads the reads need. Postgres answers again: so does the service, by itself."""
    if redis_server.process is None:
        redis_server.start()
    empty_database(owner_url)
    proxy = TcpProxy(5432)
    service = ServiceProcess({"DATABASE_URL": via_proxy(database_url, proxy.port),
                              "REDIS_URL": redis_server.url, "DB_STATEMENT_TIMEOUT_MS": "1000",
                              "DB_CONNECT_TIMEOUT_SECONDS": "1"}, threads=4)
    try:
        cached = [post_user(service.url, f"held{n}") for n in range(8)]
        warm_up(service.url)
        proxy.hold()
        stop = time.monotonic() + 6
        reads: list[tuple[float, int, str]] = []
        others: list[tuple[float, int]] = []

        def read_cached(offset: int) -> None:
            with requests.Session() as session:
                while time.monotonic() < stop:
                    user = cached[offset % len(cached)]
                    started = time.monotonic()
                    answer = session.get(f"{service.url}/users/{user['id']}", timeout=10)
                    reads.append((time.monotonic() - started, answer.status_code,
                                  answer.headers.get("X-Cache", "")))
                    offset += 1

        def miss_and_write(number: int) -> None:
            with requests.Session() as session:
                while time.monotonic() < stop:
                    started = time.monotonic()
                    answer = (session.get(f"{service.url}/users/{10_000 + number}", timeout=10)
                              if number % 2 else
                              session.post(f"{service.url}/users", timeout=10, json={
                                  "username": f"writer{number}",
                                  "email": f"writer{number}@example.org"}))
                    others.append((time.monotonic() - started, answer.status_code))

        with ThreadPoolExecutor(10) as pool:
            running = [pool.submit(read_cached, n) for n in range(8)]
            running += [pool.submit(miss_and_write, n) for n in range(2)]
            for future in running:
                future.result()
    finally:
        proxy.flow()
    try:
        assert reads and all(status == 200 and cache == "HIT" for _, status, cache in reads), \
            sorted({(status, cache) for _, status, cache in reads})
        assert others and all(status == 503 for _, status in others), others
        assert max(seconds for seconds, _ in others) < 1 + 0.5 + 1, others  # timeout and margin
        wait_until(lambda: requests.post(f"{service.url}/users", timeout=10, json={
            "username": "after", "email": "after@example.org"}).status_code == 201, 10,
            "a write once Postgres answers again")
    finally:
        service.close()
        proxy.close()
