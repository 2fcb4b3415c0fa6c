"""A Redis that hangs, or crashes and comes back, never makes the cache lie: the races of
service/cache/trust.py, forced to happen in the worst order on a Redis of these tests' own
(stopped with SIGSTOP, killed with SIGKILL). Two apps stand for two workers: `a` reads and
writes, `b` reads what it finds in Redis."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from service.cache.watch import HEARTBEAT
from service.process.config import Settings
from service.web.routes import users_of

from .helpers import (
    Read,
    create,
    empty_database,
    finish,
    keys,
    parked_reader,
    private_redis,
    read,
    running_and_empty,
    send_fills,
    settings_for,
)
from .servers import RedisServer, wait_until


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture
def workers(database_url: str, owner_url: str, own_redis: RedisServer,
            new_app: Callable[[Settings], Flask]) -> tuple[Flask, Flask]:
    empty_database(owner_url)
    running_and_empty(own_redis)
    return tuple(new_app(settings_for(database_url, own_redis.url)) for _ in range(2))


def stopped(redis: RedisServer, seconds: float) -> Callable[[], None]:
    """SIGSTOP Redis now; the returned function lets it go on, once `seconds` have passed."""
    os.kill(redis.process.pid, signal.SIGSTOP)
    until = time.monotonic() + seconds

    def resume() -> None:
        time.sleep(max(0.0, until - time.monotonic()))
        os.kill(redis.process.pid, signal.SIGCONT)

    return resume


def test_a_fill_sent_before_a_hang_and_run_after_it_is_never_read(
        workers: tuple[Flask, Flask], own_redis: RedisServer) -> None:
    """A reader took the lease and read v1; Redis hangs; its fill goes out into the hang; a
    writer commits v2, fails its write-through (Redis hangs) and is acknowledged; Redis
    resumes and runs the fill while its lease still holds. No worker may then read v1: not
    the writer's, and not one that never used Redis during the hang."""
    a, b = workers
    user = create(a.test_client())
    path = f"/users/{user['id']}"
    read(b.test_client(), f"/users/{user['id'] + 1}")  # b uses Redis, and listens to it
    own_redis.client().delete(keys(a).user(user["id"]))
    reader, release, _ = parked_reader(a, path)  # the lease taken, v1 read from Postgres
    resume = stopped(own_redis, HEARTBEAT + 0.5)  # shorter than a lease
    finish(reader, release)  # its fill is queued, then sent into the hang
    new = a.test_client().patch(path, json={"display_name": "v2"}).get_json()["data"]
    resume()
    wait_until(lambda: own_redis.client().ping(), 2, "redis to answer again")
    send_fills(a.test_client())
    for worker in (b, a, b):
        assert read(worker.test_client(), path).data == new


def test_a_write_through_a_crash_took_back_is_never_missed(
        workers: tuple[Flask, Flask], own_redis: RedisServer) -> None:
    """Redis acknowledged a write-through, then crashed and came back without it (its files as
    they were before the write): no worker reads what the write replaced."""
    a, b = workers
    user = create(a.test_client())
    path = f"/users/{user['id']}"
    read(b.test_client(), path)
    read(b.test_client(), path)  # in b's near cache too
    before = Path(own_redis.dir) / "before-the-write"
    own_redis.client().bgrewriteaof()
    wait_until(lambda: own_redis.client().info("persistence")["aof_rewrite_in_progress"] == 0,
               5, "the append-only file to be rewritten")
    shutil.copytree(Path(own_redis.dir) / "appendonlydir", before)
    new = a.test_client().patch(path, json={"display_name": "v2"}).get_json()["data"]
    os.kill(own_redis.process.pid, signal.SIGKILL)
    shutil.rmtree(Path(own_redis.dir) / "appendonlydir")
    shutil.move(before, Path(own_redis.dir) / "appendonlydir")
    own_redis.start()
    assert b'"display_name":null' in own_redis.client().get(keys(a).user(user["id"]))  # v1
    for worker in (a, b):  # each finds its connections dead, and trusts Redis no more
        read(worker.test_client(), f"/users/{user['id'] + 1}")
    time.sleep(0.3)  # past the breakers' cool-down: Redis is trusted again
    for worker in (b, a, b):
        assert read(worker.test_client(), path).data == new


def test_a_value_read_in_the_old_epoch_is_not_kept_by_a_near_cache_that_learns_late(
        workers: tuple[Flask, Flask], own_redis: RedisServer) -> None:
    """Thread 1 of worker b reads v1 from Redis in the old epoch; a new epoch begins (a
    worker got past a failed write-through) and brings v2; thread 2 of b drains the news of
    the new epoch; only then does thread 1 try to keep v1 in b's near cache."""
    a, b = workers
    user = create(a.test_client())
    path = f"/users/{user['id']}"
    near = users_of(b).cache.near
    assert read(b.test_client(), f"/users/{user['id'] + 1}").status == 404  # b listens
    generation = near.generation  # thread 1's read of Redis starts here
    old = own_redis.client().get(keys(b).user(user["id"]))
    epoch = own_redis.client().get(keys(a).epoch)
    users_of(a).cache.trust.lost(users_of(a).cache.trust.epoch, "the test's gap")
    time.sleep(0.3)  # past a's cool-down: its next use of Redis settles a new epoch
    new = a.test_client().patch(path, json={"display_name": "v2"}).get_json()["data"]
    assert own_redis.client().get(keys(a).epoch) != epoch
    near.get(str(user["id"] + 1))  # thread 2 drains the news
    near.put(str(user["id"]), old, generation)  # thread 1, late
    assert read(b.test_client(), path).data == new


def test_a_worker_that_learns_of_a_new_epoch_mid_call_looks_up_in_the_new_one(
        workers: tuple[Flask, Flask], own_redis: RedisServer) -> None:
    """b still uses the old epoch when it looks a user up by name; the function tells it of
    the new one, and b asks again there, with every key name of the new epoch (the users'
    entries the pointer leads to included)."""
    a, b = workers
    user = create(a.test_client())
    assert read(b.test_client(), f"/users/{user['id']}").status == 200  # b settles the epoch
    users_of(a).cache.trust.lost(users_of(a).cache.trust.epoch, "the test's gap")
    time.sleep(0.3)  # past a's cool-down: its next use of Redis settles a new epoch
    new = a.test_client().patch(f"/users/{user['id']}",
                                json={"display_name": "v2"}).get_json()["data"]
    assert read(b.test_client(), "/users?username=alice") == Read("HIT", [new])


def test_a_worker_that_could_not_listen_for_a_heartbeat_trusts_nothing_it_held(
        workers: tuple[Flask, Flask]) -> None:
    """b's watch sends no PING for a heartbeat (here its lock is held; a worker that is not
    running at all is the same to it): it cannot tell whether Redis went silent meanwhile, so
    its next read is not answered from what it held, and it moves on to a new epoch."""
    a, b = workers
    user = create(a.test_client())
    path = f"/users/{user['id']}"
    for _ in range(3):
        read(b.test_client(), path)  # in b's near cache
    cache = users_of(b).cache
    epoch = cache.trust.epoch.name
    with cache.watch.lock:
        time.sleep(HEARTBEAT + 0.2)
    assert read(b.test_client(), path) == Read("BYPASS", user)
    time.sleep(0.3)  # past b's cool-down
    assert read(b.test_client(), path).status == 200
    assert cache.trust.epoch.name != epoch
