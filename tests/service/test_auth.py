"""API tokens on the real server (service/auth.py): /users needs one of API_TOKENS_FILE's,
the rest stays open, refusals are counted, and no token is ever logged or echoed. How both
doors refuse alike is in test_hotpath.py; bad token files in test_cli.py."""

from __future__ import annotations

import re

import requests
from flask.testing import FlaskClient

from .helpers import ApiTokens, counter
from .servers import ServiceProcess

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


def test_the_spec_documents_the_bearer_scheme(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            if path.startswith("/users"):
                assert operation["security"] == [{"bearer": []}], (path, method)
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            else:
                assert "security" not in operation and "401" not in operation["responses"]
