"""`up --monitoring`: Prometheus scrapes every replica and the proxy, and its recording rules
answer with what the service's own counters say."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker
import requests

from orchestrate.secretfiles import api_token
from orchestrate.stack import SERVICE_LABEL
from tests.support import free_port

from .helpers import Project

METRICS = ("import urllib.request; print(urllib.request.urlopen("
           "'http://127.0.0.1:8000/metrics', timeout=5).read().decode())")


def counter(replica: Any, name: str) -> float:
    """A counter of one replica (summed over its workers), read inside it: replicas publish
    no port."""
    text = replica.exec_run(["python", "-c", METRICS]).output.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"{name} "))


def query(port: int, expr: str) -> list[dict[str, Any]]:
    reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr},
                         timeout=10)
    reply.raise_for_status()
    return reply.json()["data"]["result"]


def test_prometheus_answers_the_hit_ratio_the_replicas_count(
    docker_client: docker.DockerClient, new_project: Callable[[], Project]
) -> None:
    project, port = new_project(), free_port()
    result = project.run("up", "--monitoring", "--monitoring-port", str(port))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_token()}"
    for number in range(20):
        user = session.post(f"{project.url}/users", timeout=10, json={
            "username": f"watched{number}", "email": f"watched{number}@example.org"}).json()
        for _ in range(3):
            session.get(f"{project.url}/users/{user['data']['id']}", timeout=10)
        session.get(f"{project.url}/users", params={"username": f"nobody{number}"}, timeout=10)
    replicas = docker_client.containers.list(ignore_removed=True, filters={"label": [
        f"org.cachestack.project={project.name}", f"{SERVICE_LABEL}=service"]})
    hits = sum(counter(r, "cache_hits_total") for r in replicas)
    misses = sum(counter(r, "cache_misses_total") for r in replicas)
    assert hits > 0 and misses > 0
    # A scrape and a rule evaluation every 5 s; each target's scrapes start at an offset of
    # their own within those 5 s, so the proxy may be scraped first after the replicas.
    deadline = time.monotonic() + 60
    while True:
        found = query(port, "cachestack:cache_hit_ratio:total")
        targets = [(r["metric"]["job"], r["value"][1]) for r in query(port, "up")]
        if (found and abs(float(found[0]["value"][1]) - hits / (hits + misses)) < 1e-9
                and ("proxy", "1") in targets):
            break
        assert time.monotonic() < deadline, (found, hits, misses, targets)
        time.sleep(1)
    assert [job for job, up in targets if up == "1"].count("service") == len(replicas) == 2
    # A rate needs two scrapes of the counters; the p99 needs requests in the last minute.
    while not (query(port, "cachestack:http_requests:rate1m")
               and query(port, "cachestack:http_request_duration_seconds:p99_1m")):
        assert time.monotonic() < deadline + 30, "no request rate or p99 recorded"
        time.sleep(1)
