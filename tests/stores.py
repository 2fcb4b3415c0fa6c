"""Looking inside a running stack's containers, for the Docker-based tests: through `docker exec`
(never by container IP), as the data stores' own admin users.

- Postgres: `psql` as the superuser `postgres` over the container's local socket (peer
  authentication: no password involved, and no network login exists for it).
- Redis: `redis-cli` over TLS as one of the users of docker/redis/users.acl, its password read
  from the container's own /run/secrets inside the container, so it never reaches this process.
"""

from __future__ import annotations

from typing import Any

from orchestrate.stack import CA_CERT, DB_NAME, secret_target


def psql(container: Any, sql: str) -> list[list[str]]:
    """Rows of `sql` run as `postgres` in the stack's database (fields split on '|')."""
    user = container.attrs["Config"]["User"]
    result = container.exec_run(["psql", "-U", "postgres", "-d", DB_NAME, "-tAc", sql], user=user)
    output = result.output.decode(errors="replace")
    assert result.exit_code == 0, output
    return [line.split("|") for line in output.splitlines() if line]


def redis_cli(container: Any, user: str, *command: str) -> tuple[int, str]:
    """Exit code and output of `redis-cli COMMAND...` as the Redis user `user`."""
    password = secret_target(f"redis_{user}_password")
    script = (
        f'REDISCLI_AUTH="$(cat {password})" redis-cli --tls --cacert {secret_target(CA_CERT)} '
        f'--user {user} -h 127.0.0.1 --no-auth-warning "$@"'
    )
    result = container.exec_run(["sh", "-c", script, "redis-cli", *command])
    return result.exit_code, result.output.decode(errors="replace").strip()
