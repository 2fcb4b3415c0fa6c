"""The consistency auditor (service/cache/audit.py) on real Postgres and Redis: each lie a cache
can tell (a row or an email changed by plain SQL, a stale value, a stale pointer and a wrong
"nobody" planted in Redis by the admin) is found within 5 seconds at the default rate,
counted, repaired in Redis and in every process's near cache (two apps, each with its own),
and never served again; the full pass (`python -m service audit`) finds and repairs them too;
and under the consistency checker's load, with Redis flushed every 50 ms, it finds nothing."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from bench.consistency import run_checker
from service.cache import audit
from service.cache.keys import Lookup
from service.process.factory import AUDITOR, create_app
from service.web.routes import users_of

from .helpers import (
    create,
    empty_database,
    keys_of,
    private_redis,
    query,
    read,
    run_service,
    send_fills,
    serve,
    settings_for,
    via_proxy,
)
from .servers import RedisServer, ServiceProcess, TcpProxy

DEADLINE = 5.0  # seconds from the lie to its repair, at the default rate
Counts = dict[tuple[str, str], float]


def inconsistencies() -> Counts:
    """cache_inconsistencies_total of this process, by (layer, kind)."""
    return {(layer, kind): REGISTRY.get_sample_value(
        "cache_inconsistencies_total", {"layer": layer, "kind": kind}) or 0.0
        for layer in audit.LAYERS for kind in audit.KINDS}


def new_since(before: Counts) -> Counts:
    return {key: value - before[key] for key, value in inconsistencies().items()
            if value != before[key]}


@pytest.fixture
def apps(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[tuple[Flask, Flask]]:
    """Two service processes' apps on one database and one Redis, each with its own near
    cache: the first audits at the default rate, the second does not."""
    empty_database(owner_url)
    audited = create_app(settings_for(database_url, redis_up.url, cache={"audit_per_second": 1.0}))
    other = create_app(settings_for(database_url, redis_up.url))
    yield audited, other
    audited.extensions[AUDITOR].stop()
    for app in (audited, other):
        users_of(app).close()


def read_until(client: FlaskClient, path: str, done: Callable[[], bool]) -> float:
    """Keep reading `path` (as a client does) until `done()`; the seconds it took."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < DEADLINE + 5, "never found"
        read(client, path)
        time.sleep(0.05)
    return time.monotonic() - started


def found_within_deadline(client: FlaskClient, path: str, before: Counts,
                          *wanted: tuple[str, str]) -> Counts:
    """Read `path` until the auditor counted each of `wanted`; within DEADLINE."""
    seconds = read_until(client, path, lambda: all(new_since(before).get(w) for w in wanted))
    assert seconds <= DEADLINE, f"found after {seconds:.1f}s"
    time.sleep(1.5)  # nothing else is counted afterwards (one more sample at least)
    return new_since(before)


def warm(client: FlaskClient, path: str) -> None:
    """Read `path` until it is in Redis and in the app's near cache."""
    for _ in range(3):
        read(client, path)
    send_fills(client)


def admin_set(redis_up: RedisServer, key: str, value: str | bytes) -> None:
    redis_up.client().set(key, value)


def test_a_row_changed_by_plain_sql_is_found_counted_and_repaired_in_every_near_cache(
        apps: tuple[Flask, Flask], owner_url: str) -> None:
    audited, other = apps[0].test_client(), apps[1].test_client()
    user = create(audited)
    path = f"/users/{user['id']}"
    warm(audited, path)
    warm(other, path)
    query(owner_url, "UPDATE users SET display_name = 'changed behind' WHERE id = %s",
          (user["id"],))  # the version stays
    assert read(other, path).data["display_name"] is None  # the lie, from a near cache
    before = inconsistencies()
    counted = found_within_deadline(audited, path, before, ("redis", "value"), ("near", "value"))
    assert counted == {("redis", "value"): 1, ("near", "value"): 1}
    for client in (audited, other, audited, other):
        assert read(client, path).data["display_name"] == "changed behind"


def test_an_email_changed_by_plain_sql_is_found_with_its_stale_pointer(
        apps: tuple[Flask, Flask], owner_url: str) -> None:
    audited, other = apps[0].test_client(), apps[1].test_client()
    user = create(audited, email="alice@example.org")
    path = f"/users/{user['id']}"
    warm(audited, path)
    warm(other, path)
    query(owner_url, "UPDATE users SET email = 'alice.new@example.org' WHERE id = %s",
          (user["id"],))
    by_old_email = "/users?email=alice@example.org"
    assert read(other, by_old_email).data == [user]  # the lie: a pointer and an old entry
    before = inconsistencies()
    counted = found_within_deadline(audited, path, before, ("redis", "value"),
                                    ("redis", "pointer"))
    assert counted == {("redis", "value"): 1, ("near", "value"): 1, ("redis", "pointer"): 1}
    for client in (audited, other):
        assert read(client, by_old_email).data == []
        assert read(client, path).data["email"] == "alice.new@example.org"
        assert read(client, "/users?email=alice.new@example.org").data[0]["id"] == user["id"]


def test_a_stale_value_planted_in_redis_is_found_and_dropped_from_other_near_caches(
        apps: tuple[Flask, Flask], redis_up: RedisServer, database_url: str) -> None:
    audited, other = apps[0].test_client(), apps[1].test_client()
    user = create(audited)
    path = f"/users/{user['id']}"
    warm(audited, path)
    key = keys_of(database_url, redis_up).user(user["id"])
    version = redis_up.client().get(key).partition(b" ")[0]
    planted = {**user, "display_name": "planted"}
    admin_set(redis_up, key, version + b" " + json.dumps(planted, separators=(",", ":")).encode())
    warm(other, path)
    assert read(other, path).data == planted  # served, and now in the other's near cache
    before = inconsistencies()
    counted = found_within_deadline(audited, path, before, ("redis", "value"))
    assert counted == {("redis", "value"): 1}
    for client in (other, audited, other):
        assert read(client, path).data == user


def test_a_stale_pointer_planted_in_redis_is_found_and_deleted(
        apps: tuple[Flask, Flask], redis_up: RedisServer, database_url: str) -> None:
    audited, other = apps[0].test_client(), apps[1].test_client()
    alice = create(audited)
    bob = create(audited, username="bob", email="bob@example.org")
    path = f"/users/{alice['id']}"
    warm(audited, path)
    pointer = keys_of(database_url, redis_up).of(Lookup.of("username", "alice"))
    admin_set(redis_up, pointer, str(bob["id"]))  # "alice" is bob's, says Redis
    before = inconsistencies()
    counted = found_within_deadline(audited, path, before, ("redis", "pointer"))
    assert counted == {("redis", "pointer"): 1}
    assert redis_up.client().get(pointer) is None
    for client in (other, audited):
        assert read(client, "/users?username=Alice").data == [alice]


def test_a_wrong_nobody_planted_in_redis_is_found_and_never_served_again(
        apps: tuple[Flask, Flask], redis_up: RedisServer, database_url: str) -> None:
    audited, other = apps[0].test_client(), apps[1].test_client()
    alice = create(audited)
    by_name = "/users?username=alice"
    admin_set(redis_up, keys_of(database_url, redis_up).of(Lookup.of("username", "alice")), "")
    assert read(other, by_name).data == []  # the lie: nobody is called alice
    before = inconsistencies()
    counted = found_within_deadline(audited, by_name, before, ("redis", "nobody"))
    assert counted == {("redis", "nobody"): 1}
    for client in (other, audited, other, audited):
        assert read(client, by_name).data == [alice]


def test_the_auditor_finds_nothing_where_nothing_is_wrong(apps: tuple[Flask, Flask]) -> None:
    audited = apps[0].test_client()
    users = [create(audited, username=f"user{n}", email=f"u{n}@example.org") for n in range(5)]
    before = inconsistencies()
    deadline = time.monotonic() + 3.5
    for n in range(10_000):
        if time.monotonic() > deadline:
            break
        user = users[n % 5]
        read(audited, f"/users/{user['id']}")
        read(audited, f"/users?email={user['email']}")
        assert audited.patch(f"/users/{user['id']}",
                             json={"display_name": f"n{n}"}).status_code == 200
    assert new_since(before) == {}
    assert REGISTRY.get_sample_value("cache_audits_total") > 0


def test_the_auditor_skips_quietly_while_redis_is_down(
        apps: tuple[Flask, Flask], redis_up: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    audited = apps[0].test_client()
    user = create(audited)
    path = f"/users/{user['id']}"
    warm(audited, path)
    before = inconsistencies()
    sampler = apps[0].extensions[AUDITOR]
    redis_up.stop()
    try:
        with caplog.at_level(logging.INFO, logger="service.cache.audit"):
            ends = time.monotonic() + 2.5
            while time.monotonic() < ends:
                assert read(audited, path).status == 200
                time.sleep(0.05)
    finally:
        redis_up.start()
    assert sampler._thread.is_alive()
    assert new_since(before) == {}
    assert not [r for r in caplog.records if r.name == "service.cache.audit"]


def test_the_auditor_skips_quietly_while_postgres_is_away_and_audits_again_after(
        database_url: str, owner_url: str, redis_up: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    empty_database(owner_url)
    proxy = TcpProxy(urlsplit(database_url).port or 5432)
    app = create_app(settings_for(via_proxy(database_url, proxy.port), redis_up.url,
                                  cache={"audit_per_second": 1.0}))
    client = app.test_client()
    try:
        user = create(client)
        path = f"/users/{user['id']}"
        warm(client, path)
        before = inconsistencies()
        proxy.cut()
        with caplog.at_level(logging.INFO, logger="service.cache.audit"):
            ends = time.monotonic() + 2.5
            while time.monotonic() < ends:
                assert read(client, path).cache == "HIT"  # the near cache needs no Postgres
                time.sleep(0.05)
        assert not [r for r in caplog.records if r.name == "service.cache.audit"]
        assert new_since(before) == {}
        proxy.restore()
        query(owner_url, "UPDATE users SET display_name = 'changed behind' WHERE id = %s",
              (user["id"],))
        assert found_within_deadline(client, path, before, ("redis", "value"))
    finally:
        app.extensions[AUDITOR].stop()
        users_of(app).close()
        proxy.close()


def test_an_app_made_from_settings_alone_runs_no_auditor(app: Flask) -> None:
    assert app.extensions[AUDITOR] is None


# -- the full pass --------------------------------------------------------------------


def test_the_full_pass_finds_each_kind_repairs_it_and_then_finds_nothing(
        app: Flask, client: FlaskClient, redis_up: RedisServer, database_url: str,
        owner_url: str) -> None:
    alice, bob = create(client), create(client, username="bob", email="bob@example.org")
    carol = create(client, username="carol", email="carol@example.org")
    for user in (alice, bob, carol):
        read(client, f"/users/{user['id']}")
    send_fills(client)
    keys = keys_of(database_url, redis_up)
    query(owner_url, "UPDATE users SET display_name = 'behind' WHERE id = %s", (carol["id"],))
    admin_set(redis_up, keys.of(Lookup.of("username", "alice")), str(bob["id"]))
    admin_set(redis_up, keys.of(Lookup.of("email", "bob@example.org")), "")
    redis_up.client().acl_log_reset()
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_up.url}
    first = run_service("audit", "--pause", "0", **env)
    assert first.returncode == 1, first.stderr
    assert first.stdout.strip() == "value 1, pointer 1, nobody 1"
    again = run_service("audit", "--json", "--pause", "0", **env)
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    assert lines[0] == {"done": 0, "total": 6} == {**lines[-2], "done": 0}  # 9 less 3 deleted
    assert lines[-1] == {"found": {"value": 0, "pointer": 0, "nobody": 0}}
    assert redis_up.client().acl_log() == []  # SCAN and all: what the service's user may run
    assert read(client, f"/users/{carol['id']}").data["display_name"] == "behind"


def test_the_full_pass_says_so_in_one_line_when_redis_is_away(database_url: str) -> None:
    result = run_service("audit", DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert re.fullmatch(r"error: the audit could not finish: .+\n", result.stderr), result.stderr


# -- under the consistency checker's load ------------------------------------------------

OPERATIONS = 2_000  # the checker's CI size (bench/consistency.py runs 20,000 by hand)
CLIENTS = 32


@pytest.fixture(scope="module")
def flushed_redis() -> Iterator[RedisServer]:
    yield from private_redis()


@pytest.fixture(scope="module")
def audited_service(database_url: str, owner_url: str,
                    flushed_redis: RedisServer) -> Iterator[ServiceProcess]:
    """The real server, auditing 20 samples a second per worker (the default is 1): the more
    it looks, the likelier a false positive would show."""
    yield from serve(database_url, owner_url, flushed_redis, CACHE_AUDIT_PER_SECOND="20")


def metric_sum(base_url: str, name: str) -> float:
    """A counter's value summed over its labels, on a real server's /metrics."""
    text = requests.get(base_url + "/metrics", timeout=5).text
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_no_false_positive_under_the_checkers_load_with_redis_flushed_every_50ms(
        audited_service: ServiceProcess, flushed_redis: RedisServer) -> None:
    stop = threading.Event()

    def flush() -> None:
        admin = flushed_redis.client()
        while not stop.wait(0.05):
            admin.flushall()

    flusher = threading.Thread(target=flush, daemon=True)
    audits_before = metric_sum(audited_service.url, "cache_audits_total")
    flusher.start()
    try:
        report = run_checker(audited_service.url, OPERATIONS, CLIENTS, seed=20261201)
    finally:
        stop.set()
        flusher.join(5)
    time.sleep(audit.GRACE_SECONDS + 1)  # the last suspects re-checked
    assert report.ok, report.summary()
    assert metric_sum(audited_service.url, "cache_audits_total") - audits_before > 20
    assert metric_sum(audited_service.url, "cache_inconsistencies_total") == 0
