"""The OpenAPI document (service/web/openapi.py), read from an app that has only the routes'
blueprint: it is served as is, describes every route with its answers, asks for the bearer
token exactly where the token check does, and publishes the field rules validation.py
enforces."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from service.web import auth, routes, validation
from service.web.openapi import DOCUMENT, OPENAPI_JSON


@pytest.fixture(scope="module")
def app() -> Flask:
    """The routes alone: nothing behind them is reached by these tests."""
    app = routes.CanonicalFlask("openapi")
    app.register_blueprint(routes.bp)
    return app


def test_the_document_is_served_at_openapi_json(app: Flask) -> None:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.data == OPENAPI_JSON and response.get_json() == DOCUMENT


def test_openapi_describes_every_route_with_responses(app: Flask) -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    served: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            path = rule.rule.replace("<raw_id>", "{id}")
            served.setdefault(path, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    assert set(served) == set(DOCUMENT["paths"])
    for path, methods in served.items():
        documented = set(DOCUMENT["paths"][path]) - {"parameters"}
        assert documented == {method.lower() for method in methods}, path
        for method in methods:
            assert DOCUMENT["paths"][path][method.lower()]["responses"], (path, method)


def test_the_spec_documents_the_bearer_scheme() -> None:
    scheme = DOCUMENT["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            if path not in auth.OPEN_PATHS:
                assert operation["security"] == [{"bearer": []}], (path, method)
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            else:
                assert "security" not in operation and "401" not in operation["responses"]


def test_every_reference_names_a_schema_the_document_has() -> None:
    references = set(re.findall(r'"\$ref":"#/components/schemas/([^"]+)"',
                                OPENAPI_JSON.decode()))
    assert references == set(DOCUMENT["components"]["schemas"])


@pytest.mark.parametrize(("field", "value"), [
    ("username", "alice"), ("username", "al"), ("username", "al ice"), ("username", "a" * 33),
    ("email", "alice@example.org"), ("email", "alice@example"), ("email", "a@b@example.org"),
    ("email", "a b@example.org"), ("display_name", "Alice"), ("display_name", "a\x00b"),
])
def test_the_published_field_rules_are_the_ones_enforced(field: str, value: str) -> None:
    """Where the text is Unicode (what JSON Schema applies patterns to): surrogates aside."""
    schema = DOCUMENT["components"]["schemas"]["NewUser"]["properties"][field]
    published = re.search(schema["pattern"], value) is not None and \
        len(value) <= schema.get("maxLength", len(value))
    try:
        validation.CHECKS[field](value)
        enforced = True
    except validation.ApiError:
        enforced = False
    assert published == enforced
