"""The stack's one door, against a real stack: what reaches a replica through the proxy's
published port (a normalised path, a whole request, never /metrics), what one client address
can take of the proxy's connections, that the replicas have no route out of the host, and TLS
at the proxy (`up --tls`).

Attacks run as an attacker would: from this host through the published port, or (where the
proxy must tell the attacker's address from the host's) from a container of their own on the
edge network, where a remote client would arrive from."""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import docker
import pytest
import requests

from bench.background import Background
from orchestrate.proxy import Proxy
from orchestrate.secretfiles import api_token, secret_path
from orchestrate.stack import CA_CERT, PROJECT_LABEL, PROXY_CERT, SERVICE_LABEL
from tests.support import require

from .helpers import Project

pytestmark = pytest.mark.usefixtures("docker_client")

# Paths a router could take for /users (Werkzeug merges slashes; %2F decodes to a slash), and
# /metrics written so that only a router would see it.
DISGUISED_USERS = ["//users", "///users/1", "/./users", "/users/../users", "/%2Fusers", "/USERS",
                   "/users/", "/%75sers", "/users/%2e%2e/users/1", "/x/../../users"]
DISGUISED_METRICS = ["/metrics", "/metrics/", "//metrics", "/./metrics", "/users/../metrics",
                     "/%6Detrics", "/%2e/metrics"]
# Two replicas serve with 32 blocking threads in all (2 workers of 8 threads each).
SLOW_BODIES = 48
# More than the proxy's maxconn (and the 4,096 it had): one client address alone would hold
# every connection the proxy takes.
HALF_SENT = 4200
PER_ADDRESS = 256  # docker/proxy/haproxy.cfg: sc0_conn_cur
HOLD_S = 12.0  # longer than the proxy's timeout http-request (5 s), so it cuts and they return
OUTSIDE = ("1.1.1.1", 443)  # an address beyond this host


def container(client: docker.DockerClient, project: Project, service: str) -> Any:
    found = client.containers.list(ignore_removed=True, filters={"label": [
        f"{PROJECT_LABEL}={project.name}", f"{SERVICE_LABEL}={service}"]})
    assert found, f"a running {service} container"
    return found[0]


def raw_status(port: int, method: str, path: str, body: bytes = b"") -> int:
    """Send `path` exactly as written (no client-side normalisation), without a token."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body or None,
                           headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
def test_paths_a_router_would_read_as_users_are_judged_as_users(
    stack: Project, method: str
) -> None:
    body = b'{"username": "sneaky", "email": "sneaky@example.org"}' if method in (
        "POST", "PATCH") else b""
    answers = {path: raw_status(stack.port, method, path, body) for path in DISGUISED_USERS}
    assert all(status in (401, 404) for status in answers.values()), answers


def test_metrics_is_not_served_through_the_published_port(stack: Project) -> None:
    answers = {path: raw_status(stack.port, "GET", path) for path in DISGUISED_METRICS}
    assert set(answers.values()) == {404}, answers
    assert raw_status(stack.port, "GET", "/readyz") == 200  # the port itself serves


class SlowBodies(Background):
    """`count` connections through the published port that each send a POST's headers (with
    a valid token) and then its body one byte at a time, reconnecting when the proxy cuts
    them, until stopped."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.lock = threading.Lock()
        self.open_now = 0
        self.answers: list[bytes] = []
        super().__init__([self._trickle] * count, join_s=10)

    def wait_all_open(self, deadline_s: float = 30) -> None:
        deadline = time.monotonic() + deadline_s
        while self.open_now < self.count:
            assert time.monotonic() < deadline, f"{self.open_now} of {self.count} slow bodies open"
            time.sleep(0.05)

    def _trickle(self) -> None:
        head = (f"POST /users HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_token()}"
                "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(head + b" ")
                    with self.lock:
                        self.open_now += 1
                    try:
                        self._until_answered(sock)
                    finally:
                        with self.lock:
                            self.open_now -= 1
            except OSError:
                self.stop.wait(0.1)

    def _until_answered(self, sock: socket.socket) -> None:
        while not self.stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                answer = sock.recv(200)
                with self.lock:
                    self.answers.append(answer.split(b"\r\n", 1)[0])
                return
            sock.sendall(b" ")


def read_continuously(url: str, user_id: int, seconds: float,
                      new_clients: bool = False) -> tuple[int, list[str]]:
    """Read a user again and again for `seconds`, each read given 3 s: on one connection, or
    (`new_clients`) each on a connection of its own, 50 a second, as clients that come and go;
    the number of reads and what went wrong."""
    auth = {"Authorization": f"Bearer {api_token()}"}
    session = requests.Session()
    reads, failures = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        reads += 1
        try:
            get = requests.get if new_clients else session.get
            reply = get(f"{url}/users/{user_id}", headers=auth, timeout=3)
            if reply.status_code != 200:
                failures.append(f"HTTP {reply.status_code}")
        except requests.RequestException as exc:
            failures.append(type(exc).__name__)
        if new_clients:
            time.sleep(0.02)
    return reads, failures


def a_user(url: str) -> int:
    reply = requests.post(f"{url}/users", headers={"Authorization": f"Bearer {api_token()}"},
                          json={"username": f"reader{time.time_ns()}",
                                "email": f"reader{time.time_ns()}@example.org"}, timeout=10)
    assert reply.status_code == 201, reply.text
    return reply.json()["data"]["id"]


def test_slow_request_bodies_are_held_at_the_proxy_while_reads_go_on(stack: Project) -> None:
    user_id = a_user(stack.url)
    with SlowBodies(stack.port, SLOW_BODIES) as slow:
        slow.wait_all_open()
        reads, failures = read_continuously(stack.url, user_id, HOLD_S)
        held = slow.open_now
    cut = [answer for answer in slow.answers if b" 408 " in answer]
    print(f"{SLOW_BODIES} slow bodies held ({held} open at the end, {len(cut)} cut by the "
          f"proxy with 408): {reads} reads, {len(failures)} failed")
    assert failures == [], failures[:10]
    assert reads > 100
    # The proxy held them and cut them when their time was up: no replica ever saw one.
    assert len(cut) >= SLOW_BODIES and set(slow.answers) == set(cut), set(slow.answers)


# Holds `target` connections to the proxy, opened `pace` a second (0: all at once), each with a
# request it never finishes. One the proxy cuts when its time is up is opened again at once;
# one the proxy refused (closed within a second) or that failed is tried again after `retry` s.
HOLDER = """\
import asyncio, socket, sys, time
target, pace, retry = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
address = socket.gethostbyname("proxy")
attempts = open_now = 0

async def hold(number):
    global attempts, open_now
    await asyncio.sleep(number / pace if pace else 0)
    while True:
        attempts += 1
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(address, 8000), 10)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(retry)
            continue
        writer.write(b"GET /users/1 HTTP/1.1\\r\\nHost: proxy\\r\\n")  # never finished
        open_now += 1
        try:
            await reader.read()  # until the proxy closes it
        except OSError:
            pass
        open_now -= 1
        writer.close()
        if time.monotonic() - started < 1:
            await asyncio.sleep(retry)

async def main():
    tasks = [asyncio.create_task(hold(number)) for number in range(target)]
    while True:
        await asyncio.sleep(0.5)
        print(f"attempts {attempts} open {open_now}", flush=True)

asyncio.run(main())
"""


def attacker_counts(attacker: Any) -> tuple[int, int]:
    """The attacker's last report: connections tried so far, and open now."""
    words = attacker.logs(tail=1).decode(errors="replace").split()
    return (int(words[1]), int(words[3])) if len(words) == 4 else (0, 0)


def table_rows(proxy: Proxy) -> dict[str, dict[str, int]]:
    """The proxy's per-address table (client address -> its counters)."""
    rows = {}
    for row in proxy.ask("show table web").splitlines():
        if "key=" in row:
            fields = dict(item.split("=", 1) for item in row.split()[1:])
            rows[fields.pop("key").removeprefix("::ffff:")] = {
                name.split("(")[0]: int(value) for name, value in fields.items()
                if name.startswith("conn_")}
    return rows


@pytest.mark.parametrize(("connections", "pace", "retry"), [
    (HALF_SENT, 0, 1),  # all at once, and again a second after each refusal
    (1100, 100, 30),  # over the proxy's maxconn, slowly enough to stay under the rate limit
], ids=["burst", "paced"])
def test_one_client_address_cannot_take_every_connection(
    docker_client: docker.DockerClient, stack: Project, connections: int, pace: float,
    retry: float,
) -> None:
    """An attacker on the edge network (where a remote client's address arrives from; every
    client on this host shares the edge gateway's) holds half-sent requests: a burst of 4,200
    is refused by the rate limit, 1,100 paced ones are held to the address's share."""
    user_id = a_user(stack.url)
    replica = container(docker_client, stack, "service")
    proxy = Proxy(container(docker_client, stack, "proxy"))
    proxy.ask("clear table web")  # no counts of an earlier attacker, whose address may recur
    edge = f"{stack.name}_edge"
    attacker = docker_client.containers.run(
        replica.image.id, ["python", "-c", HOLDER, str(connections), str(pace), str(retry)],
        detach=True, network=edge,
        user=replica.attrs["Config"]["User"], read_only=True, cap_drop=["ALL"],
        labels={PROJECT_LABEL: stack.name}, name=f"{stack.name}-attacker")
    try:
        attacker.reload()
        address = attacker.attrs["NetworkSettings"]["Networks"][edge]["IPAddress"]
        deadline = time.monotonic() + 60
        while attacker_counts(attacker)[0] < connections:  # each has tried once
            assert time.monotonic() < deadline, attacker.logs(tail=5)
            time.sleep(0.2)
        reads, failures, samples = 0, [], []
        for _ in range(4):  # HOLD_S in all, the proxy's table read after each quarter
            more, failed = read_continuously(stack.url, user_id, HOLD_S / 4, new_clients=True)
            reads, failures = reads + more, failures + failed
            samples.append(table_rows(proxy))
        counts = attacker_counts(attacker)
    finally:
        attacker.remove(force=True)
    gateway = docker_client.networks.get(edge).attrs["IPAM"]["Config"][0]["Gateway"]
    held = [rows.get(address, {}).get("conn_cur", 0) for rows in samples]
    print(f"{connections} half-sent requests from {address} (tried, open: {counts}), held by "
          f"the proxy {held}: {reads} reads from the host, {len(failures)} failed; the "
          f"proxy's table at the end: {samples[-1]}")
    assert failures == [], failures[:10]
    assert reads > 100
    # What the proxy sees: the attacker's own address, held to its share (which it reaches when
    # it stays under the rate limit), and every client of the host as one, the edge gateway.
    assert max(held) <= PER_ADDRESS, held
    if pace:
        assert max(held) >= PER_ADDRESS * 0.9, held
    assert gateway in samples[-1], samples[-1]


def test_replicas_have_no_route_out_while_the_proxy_answers(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    proxy = container(docker_client, stack, "proxy")
    host, port = OUTSIDE
    control = proxy.exec_run(["socat", "-u", "OPEN:/dev/null",
                              f"TCP:{host}:{port},connect-timeout=5"])
    require(control.exit_code == 0, f"a route from this machine to {host}:{port}")
    probe = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("{host}", {port}), timeout=5).close()
            print("connected")
        except OSError as exc:
            print(type(exc).__name__)
        """)
    replica = container(docker_client, stack, "service")
    answer = replica.exec_run(["python", "-c", probe]).output.decode().strip()
    assert answer != "connected", answer
    for network in replica.attrs["NetworkSettings"]["Networks"]:
        assert docker_client.networks.get(network).attrs["Internal"] is True, network
    assert requests.get(f"{stack.url}/readyz", timeout=10).status_code == 200


def test_tls_at_the_proxy(docker_client: docker.DockerClient,
                          new_project: Callable[[], Project]) -> None:
    """`up --tls`: the published port speaks TLS 1.3 only, with a certificate of the project CA
    for 127.0.0.1 and localhost; the orchestrator's later commands find it so; `rotate ca.crt`
    renews the proxy's certificate while it serves."""
    project = new_project()
    result = project.run("up", "--tls")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"is up at https://127.0.0.1:{project.port}" in result.stdout
    ca = str(secret_path(CA_CERT))
    for host in ("127.0.0.1", "localhost"):
        assert requests.get(f"https://{host}:{project.port}/readyz", verify=ca,
                            timeout=10).status_code == 200
    for path in DISGUISED_METRICS:
        assert requests.get(f"https://127.0.0.1:{project.port}{path}", verify=ca,
                            timeout=10).status_code == 404, path
    with pytest.raises(requests.ConnectionError):  # plain HTTP gets no answer
        requests.get(f"http://127.0.0.1:{project.port}/readyz", timeout=10)
    old_tls = ssl.create_default_context(cafile=ca)
    old_tls.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), socket.create_connection(
            ("127.0.0.1", project.port), timeout=10) as raw:
        old_tls.wrap_socket(raw, server_hostname="127.0.0.1")
    smoke = project.run("smoke")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    proxy = container(docker_client, project, "proxy")
    key = secret_path(PROXY_CERT.key).read_text().strip()
    assert key not in json.dumps(proxy.attrs) + proxy.logs().decode(errors="replace")

    old_ca = secret_path(CA_CERT).read_bytes()
    rotated = project.run("rotate", CA_CERT)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert requests.get(f"https://127.0.0.1:{project.port}/readyz", verify=ca,
                        timeout=10).status_code == 200
    with tempfile.NamedTemporaryFile() as old:  # the old CA is trusted no more
        old.write(old_ca)
        old.flush()
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{project.port}/readyz", verify=old.name, timeout=10)
