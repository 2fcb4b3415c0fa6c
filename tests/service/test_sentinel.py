"""The service on a Redis that fails over: a primary, a replica and three Sentinels of the
tests' own (docker/redis's templates, as `up --ha` runs them). The service finds the primary
through the Sentinels and follows a failover by itself; a promoted replica is a new epoch, so
no read returns what an acknowledged write replaced, and no request fails (BYPASS is an
answer) while the primary is killed, hangs, or a Sentinel or two are gone."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import requests

from bench.consistency import Faults, run_checker
from tests.support import require

from .helpers import empty_database
from .servers import RedisServer, SentinelGroup, ServiceProcess, wait_until

OPERATIONS = 2_000
CLIENTS = 32
FAILED_OVER_WITHIN = 15  # seconds: 2 s down before a Sentinel says so, then the election


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    require(shutil.which("redis-server") is not None, "redis-server (Debian package redis-server)")
    sentinels = SentinelGroup()
    sentinels.start()
    yield sentinels
    sentinels.close()


@pytest.fixture(scope="module")
def service(database_url: str, owner_url: str, group: SentinelGroup) -> Iterator[ServiceProcess]:
    empty_database(owner_url)
    process = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": group.url,
                              "REDIS_SENTINELS": group.sentinels,
                              "CACHE_COOLDOWN_SECONDS": "0.5"})
    yield process
    process.close()


def create(url: str, name: str) -> dict:
    response = requests.post(f"{url}/users", json={"username": name,
                                                   "email": f"{name}@example.org"}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["data"]


def cache_status(url: str, user: dict) -> str:
    response = requests.get(f"{url}/users/{user['id']}", timeout=10)
    assert response.status_code == 200 and response.json()["data"]["id"] == user["id"]
    return response.headers["X-Cache"]


def failed_over(group: SentinelGroup, old: RedisServer) -> Callable[[], None]:
    """Start the killed primary again once the Sentinels have named another (then they make it
    a replica of the new one)."""

    def restart() -> None:
        wait_until(lambda: group.primary() is not old, FAILED_OVER_WITHIN, "a failover")
        group.restart(old)

    return restart


def test_the_primary_is_found_through_the_sentinels(service: ServiceProcess) -> None:
    user = create(service.url, "found")
    assert cache_status(service.url, user) == "HIT"


def test_hits_resume_soon_after_the_primary_is_killed_and_its_replica_promoted(
        service: ServiceProcess, group: SentinelGroup) -> None:
    user = create(service.url, "promoted")
    old = group.primary()
    old.process.kill()
    killed = time.monotonic()
    wait_until(lambda: group.primary() is not old, FAILED_OVER_WITHIN, "a failover")
    wait_until(lambda: cache_status(service.url, user) == "HIT", 10, "a HIT after the failover")
    print(f"HITs again {time.monotonic() - killed:.1f} s after the primary was killed")
    failed_over(group, old)()


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_no_stale_read_and_no_failed_request_while_the_primary_fails_over(
        service: ServiceProcess, group: SentinelGroup, fault: str) -> None:
    """The primary is killed (and started again once another was promoted), or stopped for
    longer than the Sentinels wait (it comes back as a replica), during the checker's run."""
    victims: list[RedisServer] = []

    def pid() -> int:
        victims.append(group.primary())
        return victims[-1].process.pid

    faults = Faults(fault, pid, lambda: failed_over(group, victims[-1])(),
                    pause=FAILED_OVER_WITHIN / 2)
    report = run_checker(service.url, OPERATIONS, CLIENTS, seed=20261207, faults=faults)
    assert report.faults >= 1, report.summary()
    assert report.ok, report.summary()
    wait_until(lambda: all(node.process.poll() is None for node in group.nodes), 10,
               "both servers running")


@pytest.mark.parametrize("sentinels_killed", [1, 2])
def test_the_service_answers_with_sentinels_gone(
        service: ServiceProcess, group: SentinelGroup, sentinels_killed: int) -> None:
    """One Sentinel gone: the others still fail over. Two gone: no quorum, so no failover,
    and the service keeps answering while the primary is away (from Postgres)."""
    for number in range(sentinels_killed):
        group.kill_sentinel(number)
    try:
        user = create(service.url, f"quorum{sentinels_killed}")
        old = group.primary()
        old.process.kill()
        if sentinels_killed == 1:
            wait_until(lambda: group.primary() is not old, FAILED_OVER_WITHIN, "a failover")
            wait_until(lambda: cache_status(service.url, user) == "HIT", 10, "a HIT")
            group.restart(old)
        else:
            for _ in range(20):
                assert cache_status(service.url, user) in ("BYPASS", "MISS", "HIT")
                time.sleep(0.25)
            assert group.primary() is old  # five seconds on, no Sentinel promoted the replica
            group.restart(old)
            wait_until(lambda: cache_status(service.url, user) == "HIT", 10, "a HIT")
    finally:
        for number in range(sentinels_killed):
            group.start_sentinel(number)


def reads_until(url: str, user: dict, done: Callable[[], bool] = lambda: True,
                seconds: float = 15) -> list[dict]:
    """Read `user` by id until `done()` holds and a read after that was a HIT; every answer's
    data."""
    answers, deadline = [], time.monotonic() + seconds
    while True:
        finished = done()
        response = requests.get(f"{url}/users/{user['id']}", timeout=10)
        assert response.status_code == 200, response.text
        answers.append(response.json()["data"])
        if finished and response.headers["X-Cache"] == "HIT":
            return answers
        assert time.monotonic() < deadline, f"no HIT within {seconds} s: {answers}"
        time.sleep(0.05)


def served_by(server: RedisServer) -> bool:
    """Whether the service holds connections to `server` (its user's clients there). False
    when the admin's own connection was just closed: the Sentinels close every client's
    connection to a server they reconfigure."""
    try:
        return any(client["user"] == "service" for client in server.client().client_list())
    except redis.ConnectionError:
        return False


def test_a_primary_promoted_again_after_missing_writes_begins_a_new_epoch(
        service: ServiceProcess, group: SentinelGroup) -> None:
    """The primary hangs, its replica is promoted and takes writes; the old primary comes back
    a primary still in its own eyes (the Sentinels make it a replica seconds later), and is
    promoted again before that. It is the same run of Redis as before, with the entries of
    the epoch it had, and it missed the writes made meanwhile: that epoch is not current."""
    user = create(service.url, "again")
    reads_until(service.url, user)
    old = group.primary()
    os.kill(old.process.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: group.primary() is not old, FAILED_OVER_WITHIN, "a failover")
        new = group.primary()
        reads_until(service.url, user, lambda: served_by(new))
        changed = requests.patch(f"{service.url}/users/{user['id']}", timeout=10,
                                 json={"display_name": "written meanwhile"})
        assert changed.status_code == 200, changed.text
    finally:
        os.kill(old.process.pid, signal.SIGCONT)
    wait_until(lambda: old.client().role()[0] == b"master" and any(
        replica["port"] == old.port and not replica["is_sdown"]
        for replica in group.sentinel().sentinel_slaves("cachestack")), 10,
               "the Sentinels to hear from the old primary again")
    assert group.fail_over() is old
    answers = reads_until(service.url, user, lambda: served_by(old) and not served_by(new))
    assert all(answer == changed.json()["data"] for answer in answers), answers


def test_a_sentinel_that_missed_a_failover_is_not_followed(
        database_url: str, owner_url: str, group: SentinelGroup) -> None:
    """A Sentinel cut off from the others names the primary of an older configuration (here,
    a server that has been a replica since); the service, which asks it first, finds the
    primary of the newest configuration all the same."""
    old = group.primary()
    group.fail_over()
    wait_until(lambda: old.client().role()[0] == b"slave", 15, "the old primary a replica")
    stale, process = group.stale_sentinel(old)
    empty_database(owner_url)
    service = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": group.url,
                              "REDIS_SENTINELS": f"{stale},{group.sentinels}",
                              "CACHE_COOLDOWN_SECONDS": "0.5"})
    try:
        user = create(service.url, "newest")
        assert reads_until(service.url, user, seconds=10)[-1] == user
    finally:
        service.close()
        process.kill()
        process.wait()
