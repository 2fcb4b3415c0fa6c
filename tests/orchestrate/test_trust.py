"""The stack's trust boundaries, against a real stack: who may log in to Postgres and Redis and
how (TLS only, least privilege), and a Redis whose memory stays bounded when it is overfilled.

Each refusal is shown by attempting it: from the service's own container (the only one that
talks to both), or with the stores' own command-line clients inside their containers."""

from __future__ import annotations

import datetime
import json
import textwrap
import time
from typing import Any

import docker
import pytest
from docker.types import Mount

from orchestrate.secretfiles import api_token, expiring_certificates
from orchestrate.smoke import run_smoke
from orchestrate.stack import (
    DB_APP,
    DB_NAME,
    DB_OWNER,
    REDIS_MAXMEMORY,
    describe_stack,
)
from tests.stores import psql, redis_cli
from tests.support import run_once

from .helpers import Project, container

pytestmark = pytest.mark.usefixtures("docker_client")


def run_python(service: Any, code: str) -> Any:
    """Run `code` with the service image's Python inside the service container; its stdout
    parsed as JSON."""
    result = service.exec_run(["python", "-c", textwrap.dedent(code)])
    assert result.exit_code == 0, result.output.decode(errors="replace")
    return json.loads(result.output)


def test_every_database_session_from_the_network_is_tls_and_least_privilege(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    postgres = container(docker_client, stack, "postgres")
    sessions = psql(
        postgres,
        "SELECT a.usename, a.application_name, s.ssl, s.version FROM pg_stat_activity a "
        "JOIN pg_stat_ssl s USING (pid) WHERE a.client_addr IS NOT NULL",
    )
    assert sessions, "the service holds connections"
    assert all(ssl == "t" and version == "TLSv1.3" for _, _, ssl, version in sessions), sessions
    assert {user for user, app, *_ in sessions if app == "cachestack"} == {DB_APP}
    [(superuser, createdb, createrole, replication, bypassrls, owns)] = psql(
        postgres,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
        f"(SELECT count(*) FROM pg_class WHERE relowner = r.oid) FROM pg_roles r "
        f"WHERE rolname = '{DB_APP}'",
    )
    assert [superuser, createdb, createrole, replication, bypassrls, owns] == ["f"] * 5 + ["0"]
    [(table_owner,)] = psql(postgres, "SELECT tableowner FROM pg_tables WHERE tablename = 'users'")
    assert table_owner == DB_OWNER


def test_postgres_admits_only_the_two_roles_over_tls(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    """From the service container: what pg_hba refuses, it refuses before any password."""
    attempts = run_python(
        container(docker_client, stack, "service"),
        f"""
        import json, psycopg2
        password = open("/run/secrets/postgres_app_password").read().strip()
        tls = "sslmode=verify-full sslrootcert=/run/secrets/ca.crt"
        def attempt(dsn):
            try:
                psycopg2.connect(dsn, connect_timeout=5).close()
                return "connected"
            except psycopg2.OperationalError as exc:
                return str(exc).strip().splitlines()[-1]
        print(json.dumps({{
            "app over tls": attempt(f"host=postgres dbname={DB_NAME} user={DB_APP} "
                                    f"password={{password}} {{tls}}"),
            "app in plain text": attempt(f"host=postgres dbname={DB_NAME} user={DB_APP} "
                                         f"password={{password}} sslmode=disable"),
            "superuser": attempt(f"host=postgres dbname={DB_NAME} user=postgres {{tls}}"),
            "another database": attempt(f"host=postgres dbname=postgres user={DB_APP} "
                                        f"password={{password}} {{tls}}"),
            "wrong password": attempt(f"host=postgres dbname={DB_NAME} user={DB_APP} "
                                      f"password=wrong {{tls}}"),
            "wrong host name": attempt(f"host={stack.name}-postgres dbname={DB_NAME} "
                                       f"user={DB_APP} password={{password}} {{tls}}"),
        }}))
        """,
    )
    assert attempts.pop("app over tls") == "connected"
    assert "does not match host name" in attempts.pop("wrong host name")
    assert "password authentication failed" in attempts.pop("wrong password")
    for what, error in attempts.items():
        assert "no pg_hba.conf entry" in error, what


def test_redis_speaks_only_tls_to_known_users_with_their_rights(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    redis = container(docker_client, stack, "redis")
    plain = run_python(
        container(docker_client, stack, "service"),
        """
        import json, socket
        sock = socket.create_connection(("redis", 6379), timeout=3)
        sock.sendall(b"PING\\r\\n")
        try:
            answer = sock.recv(100).decode(errors="replace")
        except OSError as exc:
            answer = type(exc).__name__
        print(json.dumps(answer))
        """,
    )
    assert "PONG" not in plain
    anonymous = redis.exec_run(
        ["redis-cli", "--tls", "--cacert", "/run/secrets/ca.crt", "-h", "127.0.0.1", "PING"]
    )
    assert "NOAUTH" in anonymous.output.decode()
    assert redis_cli(redis, "health", "PING") == (0, "PONG")
    assert "NOPERM" in redis_cli(redis, "health", "GET", "cs:x")[1]
    for command in (("FLUSHALL",), ("CONFIG", "GET", "maxmemory"), ("KEYS", "*"),
                    ("ACL", "LIST"), ("SET", "elsewhere", "1")):
        assert "NOPERM" in redis_cli(redis, "service", *command)[1], command
    assert redis_cli(redis, "admin", "CONFIG", "GET", "maxmemory-policy")[1].split() == [
        "maxmemory-policy", "allkeys-lru"]


# Writes of 300-byte values under cs: (all the service's user may write), each to a new key,
# as raw protocol for `redis-cli --pipe`; $0 is how many.
FILL_COMMANDS = (
    "awk -v n=\"$0\" 'BEGIN { v = sprintf(\"%300s\", \"\"); gsub(/ /, \"x\", v); "
    "for (i = 0; i < n; i++) { k = \"cs:fill:\" i; "
    "printf \"*3\\r\\n$3\\r\\nSET\\r\\n$%d\\r\\n%s\\r\\n$300\\r\\n%s\\r\\n\", "
    "length(k), k, v } }'"
)


def set_stats(redis: Any) -> dict[str, float]:
    """Redis's counts of SET commands: calls, rejected_calls, failed_calls..."""
    stats = redis_cli(redis, "admin", "INFO", "commandstats")[1]
    (line,) = [line for line in stats.splitlines() if line.startswith("cmdstat_set:")]
    return {name: float(value) for name, value in
            (pair.split("=") for pair in line.partition(":")[2].split(","))}


def test_redis_filled_to_three_times_maxmemory_evicts_and_keeps_running(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    redis = container(docker_client, stack, "redis")
    writes = 3 * REDIS_MAXMEMORY // 300
    before = set_stats(redis)
    # A client container on the backend network, with the Redis container's secret files: exec
    # into a container at its memory limit can fail for lack of memory.
    output = run_once(
        docker_client,
        redis.image.id,
        entrypoint=["sh", "-c"],
        command=[
            f'{FILL_COMMANDS} | REDISCLI_AUTH="$(cat /run/secrets/redis_service_password)" '
            "redis-cli --tls --cacert /run/secrets/ca.crt --user service -h redis "
            "--no-auth-warning --pipe --pipe-timeout 1 2>&1; true",
            str(writes),
        ],
        user=redis.attrs["Config"]["User"],
        network=f"{stack.name}_backend",
        mounts=[
            Mount(m["Destination"], m["Source"], type="bind", read_only=True)
            for m in redis.attrs["Mounts"] if m["Destination"].startswith("/run/secrets/")
        ],
    )
    # --pipe ends with an ECHO of its own, which the service's user may not send: every
    # other reply is a SET's, and Redis counts none of them refused or failed.
    assert f"replies: {writes + 1}" in output.decode()
    after = set_stats(redis)
    assert after["calls"] - before["calls"] >= writes
    assert (after["rejected_calls"], after["failed_calls"]) == (
        before["rejected_calls"], before["failed_calls"]), (before, after)
    redis.reload()
    assert redis.attrs["State"]["OOMKilled"] is False
    assert redis.attrs["RestartCount"] == 0 and redis.attrs["State"]["Running"]
    info = dict(
        line.split(":", 1) for line in redis_cli(redis, "admin", "INFO")[1].splitlines()
        if ":" in line
    )
    assert int(info["evicted_keys"]) > 0
    assert int(info["used_memory"]) <= REDIS_MAXMEMORY * 1.05
    # Redis's LRU clock ticks once a second: entries the smoke checks write in the second the
    # fill ended would be as old to it as the fill's, and as likely to be evicted at once.
    time.sleep(2.5)
    lines: list[str] = []
    assert run_smoke(stack.url, api_token(), out=lines.append), "\n".join(lines)


def test_status_warns_of_certificates_that_expire_within_30_days(stack: Project) -> None:
    """(The stack fixture made the certificates, valid for a year.)"""
    described = describe_stack(stack.name, stack.port)
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    warnings = expiring_certificates(described, soon)
    assert len(warnings) == 1 + len(described.certificates), warnings
    assert all("expires in" in w and "orchestrate rotate ca.crt" in w for w in warnings)
    assert expiring_certificates(described) == []
