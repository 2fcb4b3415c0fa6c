"""`python -m service` on SIGTERM (what `docker stop` and a replica's replacement send): it
stops taking connections at once, answers the requests it has in flight, then exits 0.
Measured on the real server, with a PATCH held in flight by a row lock and a client that
keeps an idle connection open (as a proxy does); and while its workers still load the app."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest
import requests

from .helpers import query, serve
from .servers import RedisServer, ServiceProcess, wait_until

# Bounds on what was measured (about 0.02 s and 0.5 s), loose enough for a busy machine.
REFUSES_WITHIN = 1.0
EXITS_WITHIN = 3.0


@pytest.fixture
def stopping_service(database_url: str, owner_url: str,
                     redis_server: RedisServer) -> Iterator[ServiceProcess]:
    yield from serve(database_url, owner_url, redis_server)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def a_statement_waits_for_a_lock(owner_url: str) -> bool:
    return query(owner_url, "SELECT count(*) FROM pg_locks WHERE NOT granted") != [(0,)]


def test_sigterm_refuses_new_connections_answers_what_it_has_then_exits_0(
        stopping_service: ServiceProcess, owner_url: str) -> None:
    service = stopping_service
    user = requests.post(service.url + "/users", timeout=5,
                         json={"username": "held", "email": "held@example.org"}).json()["data"]
    idle = requests.Session()  # keeps its connection open after this request
    assert idle.get(service.url + "/healthz", timeout=5).status_code == 200
    lock = psycopg2.connect(owner_url)
    lock.cursor().execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user["id"],))
    answers: list[requests.Response] = []
    in_flight = threading.Thread(target=lambda: answers.append(requests.patch(
        f"{service.url}/users/{user['id']}", json={"display_name": "Drained"}, timeout=30)))
    in_flight.start()
    try:
        wait_until(lambda: a_statement_waits_for_a_lock(owner_url), 5, "the PATCH on the lock")
        sent = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(service.port), REFUSES_WITHIN,
                   "refusing new connections", interval=0.01)
        refused = time.monotonic() - sent
        time.sleep(0.5)
        assert service.process.poll() is None, "it exited with a request in flight"
    finally:
        released = time.monotonic()
        lock.commit()
        lock.close()
    in_flight.join(10)
    answered = time.monotonic() - released
    status = service.process.wait(EXITS_WITHIN)
    exited = time.monotonic() - released
    idle.close()
    assert status == 0, service.output()
    assert [(r.status_code, r.json()["data"]["display_name"]) for r in answers] == [
        (200, "Drained")]
    print(f"SIGTERM: refused new connections after {refused:.3f} s; the request in flight "
          f"answered {answered:.3f} s and the process exited {exited:.3f} s after its lock "
          "was released")


def test_sigterm_while_the_workers_load_the_app_exits_0_at_once(
        database_url: str, redis_server: RedisServer) -> None:
    """As when a replica is stopped right after it started: a worker that is still loading
    the app has nothing to finish, and must not miss the signal (service/__main__.py)."""
    service = ServiceProcess({"DATABASE_URL": database_url, "REDIS_URL": redis_server.url},
                             ready_path=None)
    try:
        wait_until(lambda: "Spawning worker-2" in service.output(), 10, "the workers",
                   interval=0.005)
        sent = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        status = service.process.wait(EXITS_WITHIN)
        print(f"SIGTERM while loading: exited {time.monotonic() - sent:.3f} s after it")
        assert status == 0, service.output()
    finally:
        service.close()
