"""`python -m service` fails with one clear line, not a traceback, and never echoes a secret."""

from __future__ import annotations

import socket

import pytest

from .helpers import SECRET, assert_one_line_error, run_service


def test_missing_database_url() -> None:
    assert_one_line_error(run_service(), "DATABASE_URL")


def test_unreadable_secret_file_is_named_but_not_shown(tmp_path) -> None:
    result = run_service(DATABASE_URL=f"postgresql://u:{SECRET}@127.0.0.1/db",
                         REDIS_PASSWORD_FILE=str(tmp_path / "missing"))
    assert_one_line_error(result, "REDIS_PASSWORD_FILE")


def test_bad_number_setting() -> None:
    result = run_service(DATABASE_URL=f"postgresql://u:{SECRET}@127.0.0.1/db",
                         CACHE_TIMEOUT_MS="soon")
    assert_one_line_error(result, "CACHE_TIMEOUT_MS")


def test_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_service("--port", str(port),
                             DATABASE_URL=f"postgresql://u:{SECRET}@127.0.0.1/db")
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")


def test_unreadable_token_file() -> None:
    result = run_service(DATABASE_URL=f"postgresql://u:{SECRET}@127.0.0.1/db",
                         API_TOKENS_FILE="/nonexistent/api_tokens")
    assert_one_line_error(result, "API_TOKENS_FILE", "/nonexistent/api_tokens")


def test_database_url_that_libpq_cannot_read() -> None:
    result = run_service(DATABASE_URL=f"postgresql://u:{SECRET}@127.0.0.1/db?ssl_mode=require")
    assert_one_line_error(result, "DATABASE_URL")


@pytest.mark.parametrize("url", [f"http://u:{SECRET}@127.0.0.1/0",
                                 f"rediss://u:{SECRET}@127.0.0.1/0?ssl_ca_cert=/ca.crt"])
def test_redis_url_that_redis_py_cannot_take(url: str) -> None:
    result = run_service(DATABASE_URL="postgresql://u@127.0.0.1/db", REDIS_URL=url)
    assert_one_line_error(result, "REDIS_URL")
