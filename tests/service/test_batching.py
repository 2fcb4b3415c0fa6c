"""Coalesced creates and reads by id (batching.py): each request of a batch gets the answer it
would get alone. A lock on the users table holds one statement in flight while the others
gather behind it, so that they go as one batch when the lock is released."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg2
import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from service.process.config import ConfigError, Settings
from service.usecases.batching import Combiner
from service.web.routes import users_of

from .helpers import Read, app_for, create, keys, query, read
from .servers import RedisServer

Answer = tuple[int, dict]


def batches(kind: str) -> tuple[float, float]:
    """How many batches of `kind` this process ran, and how many items they held."""
    labels = {"kind": kind}
    return (REGISTRY.get_sample_value("batch_size_count", labels) or 0,
            REGISTRY.get_sample_value("batch_size_sum", labels) or 0)


def post(app: Flask, username: str, email: str) -> Answer:
    response = app.test_client().post("/users", json={"username": username, "email": email})
    return response.status_code, response.get_json()


def gathered(combiner: Combiner, owner_url: str, first: Callable[[], object],
             rest: list[Callable[[], object]], hold: float = 0) -> tuple[Future, list[Future]]:
    """Run `first` while the table is locked, then `rest`, each once the one before waits in
    `combiner`; the lock is released `hold` seconds after they all wait."""
    pool = ThreadPoolExecutor(len(rest) + 1)
    with psycopg2.connect(owner_url) as conn, conn.cursor() as cur:
        cur.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        leading = pool.submit(first)
        wait_for(lambda: combiner._busy)
        following = []
        for number, work in enumerate(rest, 1):
            following.append(pool.submit(work))
            wait_for(lambda number=number: len(combiner._waiting) == number)
        time.sleep(hold)
    conn.close()
    pool.shutdown(wait=True)
    return leading, following


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the requests never gathered"
        time.sleep(0.005)


@pytest.fixture
def short_timeout_app(database_url: str, owner_url: str,
                      redis_up: RedisServer) -> Iterator[Flask]:
    """Statements that wait on a lock longer than 300 ms fail (Postgres cancels them)."""
    yield from app_for(database_url, owner_url, redis_up.url,
                       postgres={"statement_timeout_ms": 300})


@pytest.fixture
def unbatched_app(database_url: str, owner_url: str, redis_up: RedisServer) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url, batching=False)


def test_a_lone_create_is_a_batch_of_one(client: FlaskClient) -> None:
    before = batches("create")
    create(client, "alice", "alice@example.org")
    response = client.post("/users", json={"username": "ALICE", "email": "other@example.org"})
    assert response.status_code == 409 and "username" in response.get_json()["error"]["message"]
    after = batches("create")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


def test_a_batch_of_creates_gives_each_its_own_answer(
        app: Flask, client: FlaskClient, redis_up: RedisServer, owner_url: str) -> None:
    taken = create(client, "taken", "taken@example.org")
    before = batches("create")
    leading, following = gathered(users_of(app)._creates, owner_url,
                                  lambda: post(app, "first", "first@example.org"), [
        lambda: post(app, "bob", "bob@example.org"),
        lambda: post(app, "TAKEN", "new@example.org"),  # against the table
        lambda: post(app, "carol", "taken@example.org"),
        lambda: post(app, "dave", "dave@example.org"),  # against an earlier row of the batch
        lambda: post(app, "Dave", "dave2@example.org"),
        lambda: post(app, "erin", "erin@example.org"),
        lambda: post(app, "frank", "erin@example.org"),
        lambda: post(app, "grace", "grace@example.org"),
    ])
    after = batches("create")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 9)  # the first, then 8 together
    answers = [leading.result(), *(future.result() for future in following)]
    conflicts = {2: "username", 3: "email", 5: "username", 7: "email"}
    assert [status for status, _ in answers] == [409 if n in conflicts else 201
                                                for n in range(len(answers))], answers
    for n, field in conflicts.items():
        assert answers[n][1]["error"]["message"] == f"{field} is already taken", answers[n]
    created = [body["data"] for status, body in answers if status == 201]
    assert len({user["id"] for user in created} | {taken["id"]}) == 6
    for user in created:  # each write-through was acknowledged before its 201
        assert redis_up.client().exists(keys(app).user(user["id"]))
        assert read(client, f"/users/{user['id']}") == Read("HIT", user)
    rows = query(owner_url, "SELECT username FROM users ORDER BY id")
    assert [name for (name,) in rows] == ["taken", "first", "bob", "dave", "erin", "grace"]


def test_a_batch_whose_postgres_fails_fails_each_request(
        short_timeout_app: Flask, owner_url: str) -> None:
    app = short_timeout_app
    leading, following = gathered(
        users_of(app)._creates, owner_url, lambda: post(app, "first", "first@example.org"),
        [lambda n=n: post(app, f"user{n}", f"user{n}@example.org") for n in range(4)], hold=1.0)
    answers = [leading.result(), *(future.result() for future in following)]
    assert [status for status, _ in answers] == [503] * 5, answers
    assert query(owner_url, "SELECT count(*) FROM users") == [(0,)]
    assert post(app, "later", "later@example.org")[0] == 201  # and the next one goes through


def test_misses_by_id_that_arrive_together_share_one_query(
        app: Flask, client: FlaskClient, redis_up: RedisServer, owner_url: str) -> None:
    users = [create(client, f"user{n}", f"user{n}@example.org") for n in range(4)]
    redis_up.client().flushall()
    before = batches("load_by_id")

    def get(user_id: int) -> Callable[[], Read]:
        return lambda: read(app.test_client(), f"/users/{user_id}")

    leading, following = gathered(users_of(app)._loads, owner_url, get(users[0]["id"]),
                                  [get(users[1]["id"]), get(999), get(users[2]["id"]),
                                   get(users[3]["id"]), get(users[3]["id"] + 1000)])
    after = batches("load_by_id")
    assert (after[0] - before[0], after[1] - before[1]) == (2, 6)
    answers = [leading.result(), *(future.result() for future in following)]
    assert [answer.data for answer in answers] == [users[0], users[1], None, users[2], users[3],
                                                   None]
    assert [answer.status for answer in answers] == [200, 200, 404, 200, 200, 404]


def test_the_batching_setting() -> None:
    env = {"DATABASE_URL": "postgresql://u@127.0.0.1/d"}
    assert Settings.from_env(env).batching is True
    assert Settings.from_env({**env, "BATCHING": "0"}).batching is False
    assert Settings.from_env({**env, "BATCHING": " On "}).batching is True
    with pytest.raises(ConfigError, match="BATCHING"):
        Settings.from_env({**env, "BATCHING": "sometimes"})


def test_without_batching_concurrent_creates_go_one_by_one(unbatched_app: Flask) -> None:
    app = unbatched_app
    before = batches("create")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: post(app, f"user{n}", f"user{n % 3}@example.org"),
                                range(6)))
    assert sorted(status for status, _ in answers) == [201] * 3 + [409] * 3
    assert batches("create") == before  # no combiner ran
