"""Coalesced creates and reads by id (batching.py): each request of a batch gets the answer it
would get alone. A lock on the users table holds one statement in flight while the others
gather behind it, so that they go as one batch when the lock is released."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg2
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from service.usecases.batching import Combiner
from service.web.routes import users_of

from .helpers import Read, app_for, create, empty_database, keys, query, read
from .servers import RedisServer, ServiceProcess

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


def test_without_batching_concurrent_creates_go_one_by_one(unbatched_app: Flask) -> None:
    app = unbatched_app
    before = batches("create")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: post(app, f"user{n}", f"user{n % 3}@example.org"),
                                range(6)))
    assert sorted(status for status, _ in answers) == [201] * 3 + [409] * 3
    assert batches("create") == before  # no combiner ran


# -- one item's error is its own --------------------------------------------------------


def outcome(work: Callable[[], object]) -> object:
    """What `work` returned, or the exception it raised."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - the test compares it
        return exc


def test_a_create_postgres_cannot_be_sent_fails_alone_in_its_batch(
        app: Flask, owner_url: str) -> None:
    """Past validation (which refuses it: test_api.py), as a value it missed would be."""
    users = users_of(app)

    def create_raw(name: str, email: str) -> Callable[[], object]:
        return lambda: outcome(lambda: users.create({"username": name, "email": email}))

    before = batches("create")
    leading, following = gathered(users._creates, owner_url, create_raw("first", "f@example.org"),
                                  [create_raw("bob", "bob@example.org"),
                                   create_raw("poison", "p\ud800@example.org"),
                                   create_raw("carol", "carol@example.org")])
    answers = [leading.result(), *(future.result() for future in following)]
    assert [getattr(answer, "username", None) for answer in answers] == [
        "first", "bob", None, "carol"]
    assert isinstance(answers[2], UnicodeEncodeError)
    after = batches("create")
    # the first; the three together, which failed; each of them alone
    assert (after[0] - before[0], after[1] - before[1]) == (5, 7)
    rows = query(owner_url, "SELECT username FROM users ORDER BY id")
    assert [name for (name,) in rows] == ["first", "bob", "carol"]


@pytest.fixture
def threaded_service(database_url: str, owner_url: str,
                     redis_server: RedisServer) -> Iterator[ServiceProcess]:
    """The real server with a few threads per worker (as deployed), so that concurrent
    creates share batches."""
    if redis_server.process is None:
        redis_server.start()
    empty_database(owner_url)
    process = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url},
                             threads=4)
    yield process
    process.close()


def create_batches(base_url: str) -> tuple[float, float]:
    """How many batches of creates a real server's workers ran, and how many creates."""
    text = requests.get(base_url + "/metrics", timeout=5).text
    return tuple(float(re.search(rf'^batch_size_{kind}{{kind="create"}} (\S+)$', text, re.M)
                       .group(1)) for kind in ("count", "sum"))


POISONS = [{"email": "p\ud800{n}@example.org"}, {"display_name": "\udfff"},
           {"display_name": "a\x00b"}, {"email": "p\x00{n}@example.org"}]
VALID_CREATES = 600
POISON_CREATES = 200


def test_poisoned_creates_beside_valid_ones_fail_alone_on_the_real_server(
        threaded_service: ServiceProcess, owner_url: str) -> None:
    """Each valid create is 201 and each poisoned one 400, whichever batch they share."""
    base = threaded_service.url

    def post(n: int) -> tuple[bool, int, str]:
        poisoned = n % 4 == 0
        body = {"username": f"user{n}", "email": f"user{n}@example.org"}
        if poisoned:
            body.update({field: value.format(n=n)
                         for field, value in POISONS[n // 4 % len(POISONS)].items()})
        response = session().post(base + "/users", data=json.dumps(body),
                                  headers={"Content-Type": "application/json"}, timeout=10)
        return poisoned, response.status_code, response.text

    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session

    before = create_batches(base)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(VALID_CREATES + POISON_CREATES)))
    wrong = [(poisoned, status, text) for poisoned, status, text in answers
             if status != (400 if poisoned else 201)]
    assert not wrong, (len(wrong), wrong[:3])
    assert query(owner_url, "SELECT count(*) FROM users") == [(VALID_CREATES,)]
    after = create_batches(base)
    count, total = after[0] - before[0], after[1] - before[1]
    assert total > count, "no two creates ever shared a batch: the test proves nothing"
    output = threaded_service.output()
    assert "Traceback" not in output and "unhandled error" not in output, output[-3000:]
