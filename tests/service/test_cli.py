"""`python -m service` and its commands fail with one clear line and status 2, not a traceback,
and never echo a secret. Which settings are refused, and what each refusal says, is judged
in-process in tests/unit/test_config.py; here, a few of them through the real command line."""

from __future__ import annotations

import socket

import pytest

from .helpers import SECRET, assert_one_line_error, run_service

WITH_SECRET = f"postgresql://u:{SECRET}@127.0.0.1/db"


@pytest.mark.parametrize("command", [[], ["migrate"], ["audit"]])
def test_every_command_without_database_url_says_so_in_one_line(command: list[str]) -> None:
    assert_one_line_error(run_service(*command), "DATABASE_URL")


@pytest.mark.parametrize(("env", "named"), [
    ({"DATABASE_URL": WITH_SECRET, "REDIS_PASSWORD_FILE": "/nonexistent/redis_password"},
     "REDIS_PASSWORD_FILE"),
    ({"DATABASE_URL": WITH_SECRET, "REDIS_URL": f"http://u:{SECRET}@127.0.0.1/0"}, "REDIS_URL"),
])
def test_a_bad_setting_is_named_in_one_line_without_the_secret(env: dict, named: str) -> None:
    assert_one_line_error(run_service(**env), named)


def test_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_service("--port", str(port), DATABASE_URL=WITH_SECRET)
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")
