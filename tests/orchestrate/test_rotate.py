"""rotate under load: every secret gets a new value while a client sends a steady mix of
reads and writes (re-reading its token from secrets/api_tokens), no request fails, and then
the old Postgres, Redis and API credentials are refused and the new ones work."""

from __future__ import annotations

import stat

import docker
import requests

from orchestrate.containers import exec_input
from orchestrate.rotate import ROTATABLE
from orchestrate.secretfiles import api_token, read_secret, secret_path
from orchestrate.stack import DB_APP, DB_NAME
from tests.steady_load import SteadyLoad

from .helpers import Project, container

# Inside the service container: log in to Postgres with the password on standard input.
PG_LOGIN = f"""
import sys, psycopg2
try:
    psycopg2.connect(host="postgres", dbname="{DB_NAME}", user="{DB_APP}",
                     password=sys.stdin.read(), sslmode="verify-full",
                     sslrootcert="/run/secrets/ca.crt", connect_timeout=5).close()
    print("connected")
except psycopg2.OperationalError as exc:
    print(str(exc).strip().splitlines()[-1])
"""
# Inside the Redis container: AUTH as the service's user with the password on standard input.
REDIS_LOGIN = ('read -r password; printf "AUTH service %s\\nPING\\n" "$password" | '
               "redis-cli --tls --cacert /run/secrets/ca.crt -h 127.0.0.1")


def logs_in(client: docker.DockerClient, project: Project, secret: str, value: str) -> str:
    if secret == "postgres_app_password":
        service = container(client, project, "service")
        return exec_input(service, ["python", "-c", PG_LOGIN], service.attrs["Config"]["User"],
                          [value.encode()]).decode().strip()
    redis = container(client, project, "redis")
    return exec_input(redis, ["sh", "-c", REDIS_LOGIN], redis.attrs["Config"]["User"],
                      [value.encode() + b"\n"]).decode().strip()


def test_every_secret_rotates_under_load_without_a_failed_request(
    docker_client: docker.DockerClient, stack: Project
) -> None:
    old = {name: read_secret(name) for name in ROTATABLE}
    with SteadyLoad(stack.url, api_token) as load:
        result = stack.run("rotate", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"rotation under load: {load.requests_sent} requests, {len(load.failures)} failed")
    assert load.requests_sent > 500 and load.failures == [], load.failures[:5]
    for name in ROTATABLE:
        assert read_secret(name) != old[name], name
        assert stat.S_IMODE(secret_path(name).stat().st_mode) == 0o600, name

    assert "password authentication failed" in logs_in(
        docker_client, stack, "postgres_app_password", old["postgres_app_password"])
    assert logs_in(docker_client, stack, "postgres_app_password",
                   read_secret("postgres_app_password")) == "connected"
    assert "WRONGPASS" in logs_in(docker_client, stack, "redis_service_password",
                                  old["redis_service_password"])
    assert logs_in(docker_client, stack, "redis_service_password",
                   read_secret("redis_service_password")).splitlines() == ["OK", "PONG"]
    for token, want in ((old["api_tokens"], 401), (api_token(), 404)):
        reply = requests.get(f"{stack.url}/users/999999", timeout=10,
                             headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == want, token == api_token()


def test_an_unknown_name_or_a_secret_changed_by_hand_is_one_clear_line(
    stack: Project,
) -> None:
    result = stack.run("rotate", "nonsense")
    assert result.returncode == 1 and "cannot rotate nonsense" in result.stderr
    path = secret_path("redis_health_password")
    kept = path.read_bytes()
    try:
        path.write_bytes(b"changed-by-hand")
        result = stack.run("up")
        assert result.returncode == 1
        assert "orchestrate rotate redis_health_password" in result.stderr
    finally:
        path.write_bytes(kept)
