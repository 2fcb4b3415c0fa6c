"""The cache is right whoever writes: changes made by plain SQL (as the database's owner, never
through the service) reach the cache through Postgres's change stream (service/usecases/
stream.py), on the test database (wal_level=logical) and a Redis of these tests' own. A
reader runs in this process (a thread), or as `python -m service stream` when it is killed."""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

import psycopg2
import pytest
import requests
from flask import Flask

from service.cache.policy import UserCache
from service.postgres import statements
from service.postgres.changes import PUBLICATIONS, ChangeStream
from service.postgres.pgoutput import Decoder, RowChange
from service.postgres.pool import Database
from service.process.config import Settings
from service.settings import PostgresSettings, RedisSettings
from service.usecases.stream import StreamReader
from service.web.routes import users_of
from service.wire.client import RedisClient
from tests.support import free_port

from .helpers import (
    Read,
    create,
    drop_slot,
    empty_database,
    finish,
    keys,
    late_update,
    new_slot_name,
    parked_reader,
    private_redis,
    query,
    read,
    reading,
    running_and_empty,
    settings_for,
    stream_process,
)
from .servers import RedisServer, wait_until

SEEN_WITHIN = 3.0  # seconds: far more than the stream's lag, which bench/ measures


@pytest.fixture(scope="module")
def stream_redis() -> Iterator[RedisServer]:
    yield from private_redis()


class Reader:
    """A StreamReader in a thread of this process, with a cache of its own."""

    def __init__(self, url: str, redis_url: str, slot: str) -> None:
        postgres = PostgresSettings(url=url)
        self.database = Database(postgres, statements.PREPARED, size=1)
        self.cache = UserCache(Settings(postgres=postgres,
                                        redis=RedisSettings(url=redis_url)).cache,
                               RedisClient(RedisSettings(url=redis_url)), self.database)
        self.reader = StreamReader(ChangeStream(postgres, slot), self.cache)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.reader.run, args=(self.stop,), daemon=True)

    def start(self) -> Reader:
        self.thread.start()
        wait_until(lambda: self.reader.reading, 10, "the reader to take the slot")
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.cache.close()
        self.database.close()


@pytest.fixture
def app(database_url: str, owner_url: str, stream_redis: RedisServer,
        new_app: Callable[[Settings], Flask]) -> Flask:
    empty_database(owner_url)
    running_and_empty(stream_redis)
    return new_app(settings_for(database_url, stream_redis.url))


@pytest.fixture
def reader(app: Flask, stream_url: str, stream_redis: RedisServer,
           slot: str) -> Iterator[Reader]:
    started = Reader(stream_url, stream_redis.url, slot).start()
    yield started
    started.close()


def sql(owner_url: str, statement: str, *args: object) -> None:
    query(owner_url, statement, args)


def seen(check: Callable[[], bool], what: str) -> float:
    """Seconds until `check()` held (within SEEN_WITHIN)."""
    started = time.monotonic()
    wait_until(check, SEEN_WITHIN, what, interval=0.005)
    return time.monotonic() - started


def warm(app: Flask, *paths: str) -> None:
    """Read each path until Redis and the app's near cache hold it."""
    client = app.test_client()
    for path in paths:
        for _ in range(3):
            read(client, path)
    users_of(app).cache.redis.flush()


def test_readyz_says_whether_the_stream_is_read_and_how_far_behind(
        database_url: str, stream_redis: RedisServer, reader: Reader, slot: str,
        new_app: Callable[[Settings], Flask]) -> None:
    app = new_app(settings_for(database_url, stream_redis.url, stream_slot=slot))
    state = app.test_client().get("/readyz").get_json()["stream"]
    assert state["reading"] is True and state["behind_bytes"] >= 0
    reader.close()
    wait_until(lambda: app.test_client().get("/readyz").get_json()["stream"]["reading"] is False,
               10, "the slot to be free")


def test_a_change_made_by_plain_sql_is_seen(app: Flask, reader: Reader, owner_url: str) -> None:
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    warm(app, path, "/users?username=alice")
    sql(owner_url, "UPDATE users SET display_name = 'changed behind' WHERE id = %s", user["id"])
    seen(lambda: read(app.test_client(), path).data["display_name"] == "changed behind",
         "the changed row")
    assert read(app.test_client(), "/users?username=alice").data[0]["display_name"] == \
        "changed behind"


def test_a_rename_and_an_email_change_leave_no_stale_pointer(
        app: Flask, reader: Reader, owner_url: str) -> None:
    user = create(app.test_client())
    warm(app, f"/users/{user['id']}", "/users?username=alice", "/users?email=alice@example.org",
         "/users?username=alicia")  # "alicia": nobody, cached as such
    sql(owner_url, "UPDATE users SET username = 'alicia', email = 'new@example.org' "
        "WHERE id = %s", user["id"])
    client = app.test_client()
    seen(lambda: read(client, "/users?username=alice").data == [], "the old username forgotten")
    assert read(client, "/users?email=alice@example.org").data == []
    assert read(client, "/users?username=alicia").data[0]["id"] == user["id"]
    assert read(client, "/users?email=new@example.org").data[0]["id"] == user["id"]
    assert read(client, f"/users/{user['id']}").data["username"] == "alicia"


def test_a_delete_and_an_insert_under_a_name_cached_as_nobody_are_seen(
        app: Flask, reader: Reader, owner_url: str) -> None:
    user = create(app.test_client())
    warm(app, f"/users/{user['id']}", "/users?username=bob")
    sql(owner_url, "DELETE FROM users WHERE id = %s", user["id"])
    sql(owner_url, "INSERT INTO users (username, email) VALUES ('bob', 'bob@example.org')")
    client = app.test_client()
    seen(lambda: read(client, f"/users/{user['id']}").status == 404, "the delete")
    seen(lambda: len(read(client, "/users?username=bob").data) == 1, "the insert")


def test_the_services_own_writes_stay_cached_once_the_stream_applied_them(
        app: Flask, stream_url: str, stream_redis: RedisServer, slot: str) -> None:
    """The stream reads the service's own writes too, after their write-through stored them:
    a change whose version the cache holds already (two rows with the same version are the
    same row) leaves that entry, a tombstone and the pointers to the user alone, so a read
    after a write is still a hit."""
    Reader(stream_url, stream_redis.url, slot).start().close()  # the slot keeps what follows
    client = app.test_client()
    user = create(client)
    assert client.patch(f"/users/{user['id']}", json={"display_name": "own"}).status_code == 200
    gone = create(client, "carol", "carol@example.org")
    assert client.delete(f"/users/{gone['id']}").status_code == 204
    reader = Reader(stream_url, stream_redis.url, slot).start()  # it reads them only now
    try:
        caught_up(stream_url, slot)
        paths = [f"/users/{user['id']}", "/users?username=alice", "/users?email=alice@example.org"]
        assert [read(client, path).cache for path in paths] == ["HIT"] * 3
        assert read(client, paths[0]).data["display_name"] == "own"
        assert read(client, f"/users/{gone['id']}")[::2] == ("HIT", 404)
    finally:
        reader.close()


def test_the_services_own_creates_are_not_sent_to_the_stream(
        app: Flask, stream_url: str, owner_url: str) -> None:
    """Their write-through did what the stream would (migration 005): of a create through the
    service and an INSERT by plain SQL, the stream is sent the INSERT only; updates and
    deletes are sent whoever makes them."""
    conn = psycopg2.connect(stream_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            slot = new_slot_name()
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', true)",
                        (slot,))
            client = app.test_client()
            ours = create(client, "ours", "ours@example.org")
            sql(owner_url, "INSERT INTO users (username, email) VALUES ('theirs', 'th@x.org')")
            patched = client.patch(f"/users/{ours['id']}", json={"display_name": "o"})
            assert patched.status_code == 200
            cur.execute("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                        "'proto_version', '1', 'publication_names', %s)", (slot, PUBLICATIONS))
            decoder = Decoder()
            changes = [message for (data,) in cur.fetchall()
                       if isinstance(message := decoder.decode(bytes(data)), RowChange)]
    finally:
        conn.close()
    assert [(c.kind, (c.new or c.old)["username"]) for c in changes] == [
        ("insert", "theirs"), ("update", "ours")]


def test_a_burst_of_updates_to_one_row_ends_at_its_last(
        app: Flask, reader: Reader, owner_url: str) -> None:
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    warm(app, path)
    for number in range(10):
        sql(owner_url, "UPDATE users SET display_name = %s WHERE id = %s", f"v{number}",
            user["id"])
    seen(lambda: read(app.test_client(), path).data["display_name"] == "v9", "the last update")
    assert query(owner_url, "SELECT version FROM users WHERE id = %s", (user["id"],)) == [(11,)]


def caught_up(stream_url: str, slot: str) -> None:
    """Wait until the reader confirmed everything committed so far."""
    ((now,),) = query(stream_url, "SELECT pg_current_wal_lsn()::text")
    wait_until(lambda: query(stream_url, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM "
                             "pg_replication_slots WHERE slot_name = %s", (now, slot))[0][0],
               SEEN_WITHIN * 3, "the reader to confirm what was committed")


def test_a_write_through_that_comes_after_the_stream_applied_its_change_still_stores(
        app: Flask, reader: Reader, stream_url: str, slot: str) -> None:
    """The stream is quick: it often applies a write's change before the write-through comes,
    or an earlier change of the same user while a write is under way. Either way it leaves
    its mark of that version on the user's lease, and the write-through, finding no newer
    mark, stores, so the next reads are hits."""
    client = app.test_client()
    user = create(client)
    renamed = client.patch(f"/users/{user['id']}", json={"username": "alicia"})
    assert renamed.status_code == 200
    gone = create(client, "bob", "bob@example.org")
    assert client.delete(f"/users/{gone['id']}").status_code == 204
    caught_up(stream_url, slot)
    for path in (f"/users/{user['id']}", "/users?username=alicia", "/users?email=alice@example.org",
                 f"/users/{gone['id']}"):
        assert read(client, path).cache == "HIT", path


def test_a_fill_of_the_row_read_before_an_outside_change_is_not_stored(
        app: Flask, reader: Reader, owner_url: str, stream_url: str, slot: str,
        stream_redis: RedisServer) -> None:
    """A reader reads the row from Postgres, then an outside UPDATE commits and the stream
    applies it, then the reader fills: its lease now bears the stream's mark, so the old row
    is not stored, and the next read sees the change."""
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    caught_up(stream_url, slot)
    stream_redis.client().delete(keys(app).user(user["id"]))  # so the reader below fills
    thread, release, _ = parked_reader(app, path)
    sql(owner_url, "UPDATE users SET display_name = 'outside' WHERE id = %s", user["id"])
    caught_up(stream_url, slot)
    finish(thread, release)
    assert read(app.test_client(), path).data["display_name"] == "outside"


def test_a_write_through_older_than_the_change_the_stream_applied_is_not_stored(
        app: Flask, reader: Reader, owner_url: str, stream_url: str, slot: str) -> None:
    """The service commits an update, then an outside UPDATE of the same row commits and the
    stream applies both before the service's write-through comes: the stream's mark is of a
    later version than the write-through's, which deletes instead of storing its row."""
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    caught_up(stream_url, slot)
    write_through = late_update(app, user["id"], {"display_name": "ours"})
    sql(owner_url, "UPDATE users SET display_name = 'outside' WHERE id = %s", user["id"])
    caught_up(stream_url, slot)
    write_through()
    assert read(app.test_client(), path).data["display_name"] == "outside"


def test_one_statement_changing_10000_rows_is_applied_in_bounded_batches(
        app: Flask, reader: Reader, owner_url: str, stream_redis: RedisServer,
        stream_url: str, slot: str) -> None:
    sql(owner_url, "INSERT INTO users (username, email) SELECT 'bulk' || n, "
        "'bulk' || n || '@example.org' FROM generate_series(1, 10000) n")
    some = query(owner_url, "SELECT id FROM users ORDER BY id LIMIT 1 OFFSET 5000")[0][0]
    warm(app, f"/users/{some}")
    calls = stream_redis.client().info("commandstats")["cmdstat_fcall"]["calls"]
    sql(owner_url, "UPDATE users SET display_name = 'bulk'")
    caught_up(stream_url, slot)
    writes = stream_redis.client().info("commandstats")["cmdstat_fcall"]["calls"] - calls
    assert read(app.test_client(), f"/users/{some}").data["display_name"] == "bulk"
    assert 10000 / 256 <= writes < 10000 / 10  # batches of at most 256 rows, not one each


def test_a_transaction_rolled_back_invalidates_nothing(
        app: Flask, reader: Reader, owner_url: str, stream_redis: RedisServer) -> None:
    user = create(app.test_client())
    warm(app, f"/users/{user['id']}")
    key = keys(app).user(user["id"])
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET display_name = 'never' WHERE id = %s", (user["id"],))
        conn.rollback()
    sql(owner_url, "UPDATE users SET display_name = display_name WHERE id = -1")  # a marker
    time.sleep(0.5)
    assert stream_redis.client().exists(key)
    assert read(app.test_client(), f"/users/{user['id']}") == Read("HIT", user)


def test_a_truncate_begins_a_new_epoch(app: Flask, reader: Reader, owner_url: str) -> None:
    user = create(app.test_client())
    warm(app, f"/users/{user['id']}")
    epoch = users_of(app).cache.trust.epoch.name
    sql(owner_url, "TRUNCATE users")
    seen(lambda: read(app.test_client(), f"/users/{user['id']}").status == 404, "the truncate")
    assert users_of(app).cache.trust.epoch.name != epoch


def test_a_slot_made_anew_begins_a_new_epoch_before_anything_is_read(
        app: Flask, stream_url: str, stream_redis: RedisServer, owner_url: str,
        slot: str) -> None:
    """The slot is dropped behind the reader's back, and a change commits while no slot keeps
    it: the reader makes the slot anew, which cannot give it that change, so nothing cached
    before it may be read."""
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    warm(app, path)
    first = Reader(stream_url, stream_redis.url, slot).start()
    first.close()
    drop_slot(stream_url, slot)
    sql(owner_url, "UPDATE users SET display_name = 'while no slot' WHERE id = %s", user["id"])
    second = Reader(stream_url, stream_redis.url, slot).start()
    try:
        assert read(app.test_client(), path).data["display_name"] == "while no slot"
    finally:
        second.close()


def test_a_reader_begins_its_new_epochs_before_postgres_shows_the_slot_read(
        app: Flask, stream_url: str, stream_redis: RedisServer, slot: str) -> None:
    """What waits for the slot to be read (the service's /readyz asks Postgres, and compose's
    users wait for that) must find the new epochs begun: here two, for a cache filled from no
    server yet and a slot made anew."""
    reader = Reader(stream_url, stream_redis.url, slot)
    begin, readers_seen = reader.cache.trust.begin_new_epoch, []

    def look_then_begin(why: str) -> None:
        readers_seen.append(reading(stream_url, slot))
        begin(why)

    reader.cache.trust.begin_new_epoch = look_then_begin  # type: ignore[method-assign]
    reader.start().close()
    assert readers_seen == [None, None]


def test_a_change_committed_while_redis_is_down_is_applied_when_it_is_back(
        app: Flask, reader: Reader, owner_url: str, stream_redis: RedisServer,
        stream_url: str, slot: str) -> None:
    user = create(app.test_client())
    path = f"/users/{user['id']}"
    warm(app, path)
    stream_redis.stop()
    sql(owner_url, "UPDATE users SET display_name = 'while away' WHERE id = %s", user["id"])
    stream_redis.start()
    seen(lambda: read(app.test_client(), path).data["display_name"] == "while away",
         "the change, once Redis is back")
    caught_up(stream_url, slot)


def test_a_reader_killed_mid_stream_is_taken_over_and_nothing_is_missed(
        app: Flask, stream_url: str, stream_redis: RedisServer, owner_url: str,
        slot: str) -> None:
    """Two readers as processes; the one that has the slot is killed (SIGKILL) while a bulk
    update streams; the other takes the slot over and every change reaches the cache."""
    sql(owner_url, "INSERT INTO users (username, email) SELECT 'many' || n, "
        "'many' || n || '@example.org' FROM generate_series(1, 2000) n")
    ids = [row[0] for row in query(owner_url, "SELECT id FROM users ORDER BY id")]
    warm(app, *(f"/users/{user_id}" for user_id in ids[::200]))
    readers = [stream_process(stream_url, stream_redis.url, slot) for _ in range(2)]
    try:
        wait_until(lambda: reading(stream_url, slot) is not None, 10, "a reader")
        sql(owner_url, "UPDATE users SET display_name = 'taken over'")
        holder = reading(stream_url, slot)
        os.kill(holder, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: reading(stream_url, slot) not in (None, holder), 10,
                   "the other reader to take the slot")
        print(f"taken over {time.monotonic() - killed:.2f} s after the kill")
        for user_id in ids[::200]:
            seen(lambda user_id=user_id: read(app.test_client(), f"/users/{user_id}")
                 .data["display_name"] == "taken over", f"user {user_id}")
    finally:
        for process in readers:
            process.kill()
            process.wait()


def scraped(port: int) -> dict[str, float]:
    """The reader's metrics, by name (without labels)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def readiness(port: int) -> requests.Response:
    """/readyz of the reader listening on `port`, once it listens."""
    wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).ok, 10,
               "the reader's metrics")
    return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)


def test_a_reader_is_ready_once_it_has_taken_its_turn_and_its_gauges_say_which(
        app: Flask, stream_url: str, stream_redis: RedisServer, slot: str) -> None:
    """Ready: it reads (its start checks done), or another reader has the slot; not ready
    while it cannot reach Postgres. Its gauges say whether it reads and how far behind the slot
    is."""
    ports = [free_port(), free_port()]
    first = stream_process(stream_url, stream_redis.url, slot, ports[0])
    try:
        wait_until(lambda: readiness(ports[0]).status_code == 200, 10, "the first reader")
        second = stream_process(stream_url, stream_redis.url, slot, ports[1])
        try:
            wait_until(lambda: readiness(ports[1]).status_code == 200, 10, "the second reader")
            assert [readiness(port).json() for port in ports] == [
                {"reading": True}, {"reading": False}]
            gauges = [scraped(port) for port in ports]
            assert [g["stream_reading"] for g in gauges] == [1.0, 0.0]
            assert all(g["stream_behind_bytes"] >= 0 for g in gauges), gauges
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
    port = free_port()
    nowhere = stream_process(re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", stream_url),
                             stream_redis.url, slot, port)
    try:
        refused = readiness(port)
        assert refused.status_code == 503 and refused.json() == {"reading": False}
        assert math.isnan(scraped(port)["stream_behind_bytes"])
    finally:
        nowhere.kill()
        nowhere.wait()


def test_a_postgres_other_than_the_one_the_cache_was_filled_from_begins_a_new_epoch(
        app: Flask, stream_url: str, stream_redis: RedisServer, slot: str) -> None:
    """As after a failover, which promotes a replica onto a new timeline and may have lost
    commits the cache saw: the reader finds that the cache was filled from another server or
    timeline, and nothing cached before may be read."""
    user = create(app.test_client())
    warm(app, f"/users/{user['id']}")
    source = keys(app).namespace + "source"
    first = Reader(stream_url, stream_redis.url, slot).start()
    first.close()
    now = stream_redis.client().get(source)
    stream_redis.client().set(source, b"6999999999999999999:7")  # another server's
    epoch = users_of(app).cache.trust.epoch.name
    second = Reader(stream_url, stream_redis.url, slot).start()
    second.close()
    assert stream_redis.client().get(source) == now
    read(app.test_client(), f"/users/{user['id']}")  # it learns of the new epoch
    assert users_of(app).cache.trust.epoch.name != epoch
