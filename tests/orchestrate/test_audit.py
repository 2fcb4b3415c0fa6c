"""`python -m orchestrate audit` against a running stack: entries planted in Redis with the
admin user (a stale value, a wrong "nobody") are found, counted by kind and repaired, so the
pass exits 1 and the next one exits 0; without a stack it fails with one line."""

from __future__ import annotations

import json

import docker
import requests

from orchestrate.secretfiles import api_token
from tests.stores import psql, redis_cli

from .helpers import Project, container, orchestrate


def test_audit_finds_planted_lies_repairs_them_and_then_passes(
        docker_client: docker.DockerClient, stack: Project) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_token()}"
    users = []
    for name in ("audit_ann", "audit_ben"):
        reply = session.post(f"{stack.url}/users", timeout=10,
                             json={"username": name, "email": f"{name}@example.org"})
        assert reply.status_code == 201, reply.text
        users.append(reply.json()["data"])
    redis = container(docker_client, stack, "redis")
    ((namespace,),) = psql(container(docker_client, stack, "postgres"),
                           "SELECT value FROM cache_namespace")
    # The entries of the epoch in use: cs:1:<namespace>:epoch holds '<run_id>:<name>'.
    epoch = redis_cli(redis, "admin", "GET", f"cs:1:{namespace}:epoch")[1].rpartition(":")[2]
    prefix = f"cs:1:{namespace}:{epoch}:"
    ann, ben = users
    lie = json.dumps({**ann, "display_name": "planted"}, separators=(",", ":"))
    assert redis_cli(redis, "admin", "SET", f"{prefix}id:{ann['id']}", f"1 {lie}")[0] == 0
    assert redis_cli(redis, "admin", "SET", f"{prefix}username:audit_ben", "")[0] == 0
    # Not read before the pass: the replicas' own auditors would repair what they serve.

    first = stack.run("audit")
    assert first.returncode == 1, first.stdout + first.stderr
    last = first.stdout.strip().splitlines()[-1]
    assert last == (f"project {stack.name}: stale values 1, stale pointers 0, "
                    "wrong nobodies 1"), first.stdout
    assert "cache inconsistency: redis nobody at" in first.stdout  # logged by key...
    assert "audit_ben" not in first.stdout + first.stderr  # ...never with the user's data
    again = stack.run("audit")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().endswith("stale values 0, stale pointers 0, wrong nobodies 0")
    for _ in range(4):  # whichever replica answers
        assert session.get(f"{stack.url}/users/{ann['id']}", timeout=10).json()["data"] == ann
        found = session.get(f"{stack.url}/users?username=audit_ben", timeout=10).json()["data"]
        assert found == [ben]


def test_audit_without_a_stack_fails_with_one_line() -> None:
    result = orchestrate("audit", "--project", "ctnostack00", timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no running" in lines[0]
    assert "Traceback" not in result.stderr
