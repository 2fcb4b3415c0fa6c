"""API tokens (service/web/auth.py) in the app and the real server: every path but the probes'
needs one of API_TOKENS_FILE's, refusals are counted, and no token is ever logged or echoed; a
token added to the file is accepted, and one removed refused, within about a second, without a
restart, in every worker. What the check accepts, what a refusal says and what a token file
that holds no token or cannot be read does are in tests/unit/test_auth.py; how both doors
refuse alike is in test_hotpath.py, every spelling of a path in test_paths.py."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from .helpers import SECRET, ApiTokens, app_for, counter, serve
from .servers import RedisServer, ServiceProcess, wait_until

OPEN_NOTICE = "API_TOKENS_FILE is not set"


def refused_count(base_url: str) -> float:
    text = requests.get(base_url + "/metrics", timeout=5).text
    found = re.search(r'^http_request_duration_seconds_count\{method="GET",status="401"\} (\S+)$',
                      text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_real_server_needs_a_token_on_both_doors_and_counts_refusals(
        guarded_service: ServiceProcess, api_tokens: ApiTokens) -> None:
    base = guarded_service.url
    refused_before = refused_count(base)
    wrong = "Bearer a-guess-that-is-wrong"
    for path in ("/users/1", "/users?id=1"):  # the hot path's route, and one of Flask's
        for headers, error in (({}, None), ({"Authorization": wrong}, "invalid_token")):
            response = requests.get(base + path, headers=headers, timeout=5)
            assert response.status_code == 401, (path, response.text)
            challenge = 'Bearer realm="cachestack"' + (f', error="{error}"' if error else "")
            assert response.headers["WWW-Authenticate"] == challenge
            assert response.json()["error"]["code"] == (error or "missing_token")
    assert refused_count(base) - refused_before == 4
    for which in (0, 1):
        created = requests.post(base + "/users", headers=api_tokens.header(which), timeout=5,
                                json={"username": f"tok{which}", "email": f"t{which}@example.org"})
        assert created.status_code == 201, created.text
        user = created.json()["data"]
        found = requests.get(f"{base}/users/{user['id']}", headers=api_tokens.header(which),
                             timeout=5)
        assert found.status_code == 200 and found.json()["data"] == user
    output = guarded_service.output()
    assert OPEN_NOTICE not in output
    assert not [secret for secret in (*api_tokens.tokens, wrong.split()[1]) if secret in output]


def test_the_real_server_keeps_probes_and_metrics_open(guarded_service: ServiceProcess) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert requests.get(guarded_service.url + path, timeout=5).status_code == 200, path
    assert counter(guarded_service.url, "cache_hits_total") >= 0


def test_a_server_without_tokens_is_open_and_says_so_once(service: ServiceProcess) -> None:
    assert requests.get(service.url + "/users/1", timeout=5).status_code == 404
    assert service.output().count(OPEN_NOTICE) == 1  # from the main process, not per worker


# -- the token file, read again when it changes -------------------------------------------

OLD, NEW, NEWER = "old-token.Aa1", "new-token.Bb2", "newer-token.Cc3"
# Checked about once a second: a change takes effect within that, plus the request's time.
TAKES_EFFECT_WITHIN = 1.6


def accepts(client: FlaskClient, token: str) -> bool:
    status = client.get("/users/999", headers={"Authorization": f"Bearer {token}"}).status_code
    assert status in (401, 404), status
    return status == 404


def takes_effect(check: Callable[[], bool], what: str) -> float:
    """How long until `check()` holds; it must, within TAKES_EFFECT_WITHIN."""
    started = time.monotonic()
    wait_until(check, TAKES_EFFECT_WITHIN, what, interval=0.02)
    return time.monotonic() - started


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "api_tokens"
    path.write_text(f"{OLD}\n")
    return path


@pytest.fixture
def watching_app(database_url: str, owner_url: str, redis_up: RedisServer,
                 token_file: Path) -> Iterator[Flask]:
    yield from app_for(database_url, owner_url, redis_up.url, api_tokens=(OLD,),
                       api_tokens_file=str(token_file))


def test_a_token_added_to_the_file_is_accepted_within_about_a_second(
        watching_app: Flask, token_file: Path) -> None:
    client = watching_app.test_client()
    assert accepts(client, OLD) and not accepts(client, NEW)
    token_file.write_text(f"{OLD}\n{NEW}\n")
    takes_effect(lambda: accepts(client, NEW), "the added token")
    assert accepts(client, OLD)


def test_a_token_removed_from_the_file_is_refused_within_about_a_second(
        watching_app: Flask, token_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = watching_app.test_client()
    token_file.write_text(f"{NEW}\n{OLD}\n")
    takes_effect(lambda: accepts(client, NEW), "the added token")
    with caplog.at_level(logging.INFO, logger="service.web.auth"):
        token_file.write_text(f"{NEW}\n")
        takes_effect(lambda: not accepts(client, OLD), "the refusal of the removed token")
        assert accepts(client, NEW)
    assert [record.getMessage() for record in caplog.records] == [
        "API_TOKENS_FILE read again: 1 tokens accepted"]


def test_a_rewrite_that_leaves_the_same_inode_time_and_size_is_not_missed(
        watching_app: Flask, token_file: Path) -> None:
    """Two rewrites within the file system's timestamp resolution leave the same inode,
    modification time and size; made so here by setting the time back."""
    client = watching_app.test_client()
    token_file.write_text(f"{NEW}\n")
    written = token_file.stat().st_mtime_ns
    takes_effect(lambda: accepts(client, NEW), "the first rewrite")  # read within a second
    same_size = NEW[:-3] + "Zz9"
    with open(token_file, "r+") as handle:
        handle.write(f"{same_size}\n")
    os.utime(token_file, ns=(written, written))
    takes_effect(lambda: accepts(client, same_size), "the second rewrite")


def every_time(service: ServiceProcess, token: str | None, expected: int) -> bool:
    """Whether 20 requests, each on a new connection (which any worker may take), all get
    `expected`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return all(requests.get(f"{service.url}/users/999", headers=headers, timeout=5).status_code
               == expected for _ in range(20))


@pytest.fixture
def watching_service(database_url: str, owner_url: str, redis_server: RedisServer,
                     token_file: Path) -> Iterator[ServiceProcess]:
    yield from serve(database_url, owner_url, redis_server, API_TOKENS_FILE=str(token_file))


def test_every_worker_of_the_real_server_takes_a_rotated_token_within_about_a_second(
        watching_service: ServiceProcess, token_file: Path) -> None:
    """As `rotate` does it: old and new, then only the new."""
    service = watching_service
    assert every_time(service, OLD, 404) and every_time(service, NEW, 401)
    token_file.write_text(f"{OLD}\n{NEW}\n")
    added = takes_effect(lambda: every_time(service, NEW, 404), "the added token in every worker")
    token_file.write_text(f"{NEW}\n")
    removed = takes_effect(lambda: every_time(service, OLD, 401), "the removal in every worker")
    assert every_time(service, NEW, 404)
    print(f"token added: accepted after {added:.2f} s; removed: refused after {removed:.2f} s")
    output = service.output()
    assert output.count("API_TOKENS_FILE read again") >= 2
    assert OLD not in output and NEW not in output


@pytest.mark.parametrize(("rewrite", "refused", "accepted"), [
    (f"{NEW}\n", [OLD], [NEW]),  # one removed
    ("", [OLD, NEW], []),  # emptied
    (f"# {OLD} revoked\n{NEW}\n", [OLD], [NEW]),  # a comment in its place
    (f"{NEW}\n{OLD} is revoked\n", [OLD], [NEW]),  # a line that is not a token
    (None, [OLD, NEW], []),  # the file deleted
], ids=["removed", "emptied", "commented out", "not a token", "deleted"])
def test_every_worker_of_the_real_server_refuses_revoked_tokens_within_about_a_second(
        watching_service: ServiceProcess, token_file: Path, rewrite: str | None,
        refused: list[str], accepted: list[str]) -> None:
    token_file.write_text(f"{OLD}\n{NEW}\n")
    takes_effect(lambda: every_time(watching_service, NEW, 404), "both tokens in every worker")
    if rewrite is None:
        token_file.unlink()
    else:
        token_file.write_text(rewrite)
    takes_effect(lambda: all(every_time(watching_service, token, 401) for token in refused),
                 "the refusal in every worker")
    assert all(every_time(watching_service, token, 404) for token in accepted)
    assert all(every_time(watching_service, token, 401) for token in refused)
    output = watching_service.output()
    assert OLD not in output and NEW not in output


def test_a_server_started_without_a_token_in_its_file_is_closed_until_one_is_added(
        database_url: str, owner_url: str, redis_server: RedisServer, tmp_path: Path) -> None:
    """Not open, as without API_TOKENS_FILE: closed to every token, the probes answering."""
    token_file = tmp_path / "api_tokens"
    token_file.write_text(f"# none yet\n\nbad {SECRET}\n")
    for service in serve(database_url, owner_url, redis_server,
                         API_TOKENS_FILE=str(token_file)):
        for token in (None, NEW, f"bad {SECRET}", "bad", "# none yet"):
            assert every_time(service, token, 401), token
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert requests.get(service.url + path, timeout=5).status_code == 200, path
        token_file.write_text(f"{NEW}\n")
        takes_effect(lambda service=service: every_time(service, NEW, 404),
                     "the added token in every worker")
        output = service.output()
        assert OPEN_NOTICE not in output
        assert "API_TOKENS_FILE: line 3 of" in output and "holds no token" in output
        assert SECRET not in output and NEW not in output
