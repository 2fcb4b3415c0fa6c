"""The HTTP contract, line by line, against real Postgres and Redis."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient

from .helpers import create, query

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def assert_error(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] and error["message"]
    if field:
        assert error["field"] == field
        assert field in error["message"]
    return error


def test_create_answers_201_with_location_and_the_user(client: FlaskClient) -> None:
    response = client.post("/users", json={"username": "Alice", "email": "Alice@Example.ORG",
                                           "display_name": "Alice A."})
    assert response.status_code == 201
    body = response.get_json()
    user = body["data"]
    assert body["message"] == "created" and body["source"] == "db"
    assert response.headers["Location"] == f"/users/{user['id']}"
    assert set(user) == {"id", "username", "email", "display_name", "created_at", "updated_at"}
    assert user["username"] == "Alice"
    assert user["email"] == "alice@example.org"
    assert user["display_name"] == "Alice A."
    assert RFC3339.match(user["created_at"]) and RFC3339.match(user["updated_at"])


def test_read_by_id(client: FlaskClient) -> None:
    user = create(client)
    response = client.get(f"/users/{user['id']}")
    assert response.status_code == 200
    assert response.get_json() == {"source": "cache", "data": user}
    assert response.headers["X-Cache"] == "HIT"


def test_unknown_id_is_404_not_found(client: FlaskClient) -> None:
    error = assert_error(client.get("/users/999"), 404)
    assert error["code"] == "not_found"


@pytest.mark.parametrize("query", ["id={id}", "username=ALICE", "email=alice@EXAMPLE.org"])
def test_lookup_by_each_key_ignores_case(client: FlaskClient, query: str) -> None:
    user = create(client)
    response = client.get("/users?" + query.format(id=user["id"]))
    assert response.status_code == 200
    assert response.get_json()["data"] == [user]


@pytest.mark.parametrize("query", ["id=77", "username=nobody", "email=no@body.org"])
def test_lookup_without_match_is_an_empty_list(client: FlaskClient, query: str) -> None:
    response = client.get("/users?" + query)
    assert response.status_code == 200
    assert response.get_json() == {"source": "db", "data": []}
    assert response.headers["X-Cache"] == "MISS"


def test_patch_changes_any_field(client: FlaskClient) -> None:
    user = create(client)
    response = client.patch(f"/users/{user['id']}",
                            json={"username": "alicia", "email": "New@Example.org",
                                  "display_name": None})
    assert response.status_code == 200
    body = response.get_json()
    assert body["message"] == "updated" and body["source"] == "db"
    assert body["data"]["username"] == "alicia"
    assert body["data"]["email"] == "new@example.org"
    assert body["data"]["created_at"] == user["created_at"]
    assert body["data"]["updated_at"] >= user["updated_at"]


def test_patch_and_delete_of_unknown_id_are_404(client: FlaskClient) -> None:
    assert_error(client.patch("/users/41", json={"display_name": "x"}), 404)
    assert_error(client.delete("/users/41"), 404)


def test_delete_answers_204_then_404(client: FlaskClient) -> None:
    user = create(client)
    response = client.delete(f"/users/{user['id']}")
    assert response.status_code == 204 and response.data == b""
    assert_error(client.get(f"/users/{user['id']}"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "a@b.org"}, "username"),
        ({"username": "alice"}, "email"),
        ({"username": 12, "email": "a@b.org"}, "username"),
        ({"username": "al", "email": "a@b.org"}, "username"),
        ({"username": "a" * 33, "email": "a@b.org"}, "username"),
        ({"username": "al ice", "email": "a@b.org"}, "username"),
        ({"username": "älice", "email": "a@b.org"}, "username"),
        ({"username": "alice", "email": "no-at-sign.org"}, "email"),
        ({"username": "alice", "email": "a@@b.org"}, "email"),
        ({"username": "alice", "email": "a@nodot"}, "email"),
        ({"username": "alice", "email": "a@b.org" + "x" * 250}, "email"),
        ({"username": "alice", "email": ["a@b.org"]}, "email"),
        ({"username": "alice", "email": "a@b.org", "display_name": "x" * 101}, "display_name"),
        ({"username": "alice", "email": "a@b.org", "display_name": 5}, "display_name"),
        ({"username": "alice", "email": "a@b.org", "password": "pw"}, "password"),
    ],
)
def test_bad_create_is_400_naming_the_field_and_writes_nothing(
        client: FlaskClient, body: dict, field: str) -> None:
    assert_error(client.post("/users", json=body), 400, field)
    assert client.get("/users?username=alice").get_json()["data"] == []


# What Postgres's text cannot store, as JSON sends it: a lone surrogate (either half) or NUL.
UNSTORABLE = ["\ud800", "\udfff", "\udc80x", "\x00", "x\x00y"]


@pytest.mark.parametrize("text", UNSTORABLE)
@pytest.mark.parametrize("field", ["username", "email", "display_name"])
def test_text_that_cannot_be_stored_is_400_naming_the_field_on_create_and_update(
        client: FlaskClient, owner_url: str, field: str, text: str) -> None:
    user = create(client, "bob", "bob@example.org")
    value = {"username": f"al{text}ice", "email": f"al{text}ice@example.org",
             "display_name": f"Al{text}"}[field]
    body = json.dumps({"username": "alice", "email": "alice@example.org", field: value})
    assert "\\u" in body  # sent escaped, as any JSON client sends them
    assert_error(client.post("/users", data=body, content_type="application/json"), 400, field)
    change = json.dumps({field: value})
    assert_error(client.patch(f"/users/{user['id']}", data=change,
                              content_type="application/json"), 400, field)
    assert query(owner_url, "SELECT username, email, display_name FROM users") == [
        ("bob", "bob@example.org", None)]


def test_text_that_can_be_stored_is_stored_as_sent(client: FlaskClient) -> None:
    """Noncharacters, unassigned code points, the last one, and a pair that makes one
    character are all text Postgres keeps."""
    odd = "\ufffe\uffff\ufdd0\u0378\U0010ffff\U0001f600"
    body = json.dumps({"username": "odd", "email": f"{odd}@example.org", "display_name": odd})
    response = client.post("/users", data=body, content_type="application/json")
    assert response.status_code == 201, response.get_json()
    user = response.get_json()["data"]
    assert (user["email"], user["display_name"]) == (f"{odd}@example.org", odd)
    found = client.get(f"/users?email={quote(odd)}@example.org").get_json()["data"]
    assert found == [user]


@pytest.mark.parametrize(("query_string", "status"), [
    ("email=%ED%A0%80@example.org", 200),  # a surrogate as UTF-8 would spell it: invalid
    ("email=%FF@example.org", 200),  # not UTF-8 at all: read as U+FFFD, which matches nobody
    ("email=%C0%80@example.org", 200),  # an overlong NUL: invalid UTF-8 too
    ("email=%00@example.org", 400),
    ("email=a%00b@example.org", 400),
    ("username=%ED%A0%80abc", 400),
    ("username=%FF%FE%FD", 400),
    ("username=ab%00c", 400),
])
def test_lookups_with_text_that_cannot_be_stored_are_never_a_500(
        client: FlaskClient, query_string: str, status: int) -> None:
    response = client.get(f"/users?{query_string}")
    assert response.status_code == status, response.get_json()
    if status == 200:
        assert response.get_json()["data"] == []
    else:
        assert_error(response, 400, query_string.partition("=")[0])


@pytest.mark.parametrize("body", ["[]", '"text"', "5", "null"])
def test_body_must_be_an_object(client: FlaskClient, body: str) -> None:
    assert_error(client.post("/users", data=body, content_type="application/json"), 400)


def test_empty_patch_and_bad_patch_are_400(client: FlaskClient) -> None:
    user = create(client)
    assert_error(client.patch(f"/users/{user['id']}", json={}), 400)
    assert_error(client.patch(f"/users/{user['id']}", json={"email": "bad"}), 400, "email")
    assert_error(client.patch(f"/users/{user['id']}", json={"id": 5}), 400, "id")
    assert client.get(f"/users/{user['id']}").get_json()["data"] == user


def test_not_json_is_415_and_broken_json_is_400(client: FlaskClient) -> None:
    assert_error(client.post("/users", data="username=alice", content_type="text/plain"), 415)
    assert_error(client.post("/users", data="{", content_type="application/json"), 400)
    assert_error(client.post("/users", data="[" * 30_000, content_type="application/json"), 400)


def test_body_over_64_kib_is_413(client: FlaskClient) -> None:
    big = {"username": "alice", "email": "a@b.org", "display_name": "x" * 70_000}
    assert_error(client.post("/users", json=big), 413)


@pytest.mark.parametrize("clash", [{"username": "ALICE", "email": "other@example.org"},
                                   {"username": "other", "email": "ALICE@example.org"}])
def test_duplicate_username_or_email_in_any_case_is_409(client: FlaskClient, clash: dict) -> None:
    create(client)
    field = "username" if clash["username"] == "ALICE" else "email"
    assert_error(client.post("/users", json=clash), 409, field)
    assert client.get("/users?username=other").get_json()["data"] == []


def test_patch_onto_a_taken_name_is_409_and_changes_nothing(client: FlaskClient) -> None:
    create(client)
    bob = create(client, "bob", "bob@example.org")
    assert_error(client.patch(f"/users/{bob['id']}", json={"username": "Alice"}), 409, "username")
    assert client.get(f"/users/{bob['id']}").get_json()["data"] == bob


@pytest.mark.parametrize("query", ["", "?id=1&username=a", "?username=a&username=b",
                                   "?name=alice", "?id=abc", "?id=0", "?id=-3",
                                   "?id=99999999999999999999", "?username=x", "?email=nope"])
def test_bad_lookup_query_is_400(client: FlaskClient, query: str) -> None:
    assert_error(client.get("/users" + query), 400)


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5", "99999999999999999999", "١"])
def test_id_that_is_not_a_positive_integer_is_400(client: FlaskClient, raw: str) -> None:
    for method in ("get", "patch", "delete"):
        assert_error(getattr(client, method)(f"/users/{raw}", json={"display_name": "x"}), 400)


def test_unknown_route_and_method_are_json_errors(client: FlaskClient) -> None:
    assert_error(client.get("/nowhere"), 404)
    assert_error(client.put("/users/1"), 405)


def test_healthz_and_readyz(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"database": "ok", "cache": "ok", "stream": "absent"}


def test_metrics_expose_counters_and_latency_histogram(client: FlaskClient) -> None:
    user = create(client)
    client.get(f"/users/{user['id']}")
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("cache_hits_total", "cache_misses_total", "cache_errors_total",
                 "db_queries_total", "http_request_duration_seconds_bucket"):
        assert re.search(rf"^{name}(\{{.*\}})? \d", text, re.M), name


def test_made_up_methods_share_one_latency_series(client: FlaskClient) -> None:
    for method in ("BREW", "WHEN", "BREW"):
        assert client.open("/healthz", method=method).status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert 'method="other",status="405"' in text
    assert "BREW" not in text and "WHEN" not in text
