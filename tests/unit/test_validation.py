"""What clients send, judged in-process (service/web/validation.py): every rule of every field
refuses with a 400 that names the field, text Postgres cannot store (NUL, a lone surrogate)
is refused in every free-text field, and lookups take exactly one known parameter."""

from __future__ import annotations

from typing import Any

import pytest

from service.web import validation
from service.web.errors import ApiError


def refusal(check: Any, *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check(*args, **kwargs)
    return caught.value


def assert_refused(check: Any, value: Any, field: str, says: str) -> None:
    error = refusal(check, value)
    assert (error.status, error.code, error.field) == (400, "invalid_field", field)
    assert error.message.startswith(f"{field}: ") and says in error.message, error.message


@pytest.mark.parametrize("name", ["abc", "A" * 32, "al.ice_-9", "ALICE"])
def test_a_username_of_3_to_32_allowed_characters_is_taken_as_sent(name: str) -> None:
    assert validation.username(name) == name


@pytest.mark.parametrize(("value", "says"), [
    (7, "must be a string"), (None, "must be a string"), (["alice"], "must be a string"),
    ("ab", "3-32 characters"), ("a" * 33, "3-32 characters"), ("al ice", "3-32 characters"),
    ("alice!", "3-32 characters"), ("alicé", "3-32 characters"), ("alice\n", "3-32 characters"),
    ("ali\x00ce", "3-32 characters"), ("ali\ud800ce", "3-32 characters"),
])
def test_a_username_outside_the_rule_is_refused(value: Any, says: str) -> None:
    assert_refused(validation.username, value, "username", says)


def test_an_email_is_stored_lower_cased() -> None:
    assert validation.email("Alice@Example.ORG") == "alice@example.org"
    assert validation.email("a.b+c@mail.example.co.uk") == "a.b+c@mail.example.co.uk"


def test_an_email_of_the_longest_length_is_taken() -> None:
    longest = "a" * (validation.EMAIL_MAX - len("@example.org")) + "@example.org"
    assert validation.email(longest) == longest


@pytest.mark.parametrize(("value", "says"), [
    (1, "must be a string"), (None, "must be a string"),
    ("a" * 243 + "@example.org", "at most 254 characters"),
    ("alice", "name@example.org"), ("alice@", "name@example.org"), ("@example.org", "name@"),
    ("alice@example", "name@example.org"), ("alice@example.", "name@example.org"),
    ("alice@.org", "name@example.org"), ("a@b@example.org", "name@example.org"),
    ("al ice@example.org", "name@example.org"), ("alice@exa\tmple.org", "name@example.org"),
    ("alice@example..org", "name@example.org"), ("al\x7fice@example.org", "name@example.org"),
    ("al\x00ice@example.org", "cannot be stored"), ("al\udfffice@example.org", "cannot be stored"),
])
def test_an_email_outside_the_rule_is_refused(value: Any, says: str) -> None:
    assert_refused(validation.email, value, "email", says)


@pytest.mark.parametrize("value", [None, "", "Alice Liddell", "x" * 100, "名前 🙂",
                                   "\ufffe\U0010ffff"])
def test_a_display_name_of_storable_text_up_to_100_characters_or_null_is_taken(
        value: str | None) -> None:
    assert validation.display_name(value) == value


@pytest.mark.parametrize(("value", "says"), [
    (5, "must be a string or null"), (["a"], "must be a string or null"),
    ("x" * 101, "at most 100 characters"), ("a\x00b", "cannot be stored"),
    ("\ud800", "cannot be stored"), ("a\udfffb", "cannot be stored"),
])
def test_a_display_name_outside_the_rule_is_refused(value: Any, says: str) -> None:
    assert_refused(validation.display_name, value, "display_name", says)


def test_a_valid_create_body_is_validated_field_by_field() -> None:
    body = {"username": "Alice", "email": "Alice@Example.org", "display_name": None}
    assert validation.user_fields(body, partial=False) == {
        "username": "Alice", "email": "alice@example.org", "display_name": None}
    assert validation.user_fields({"email": "B@Example.org"}, partial=True) == {
        "email": "b@example.org"}


@pytest.mark.parametrize("body", [[], "text", 5, None, ["username", "email"]])
def test_a_body_that_is_not_an_object_is_refused(body: Any) -> None:
    for partial in (False, True):
        error = refusal(validation.user_fields, body, partial=partial)
        assert (error.status, error.code, error.field) == (400, "invalid_body", None)


def test_unknown_fields_are_refused_and_the_first_named() -> None:
    body = {"username": "alice", "email": "a@example.org", "zeta": 1, "admin": True}
    error = refusal(validation.user_fields, body, partial=False)
    assert (error.status, error.code, error.field) == (400, "unknown_field", "admin")
    assert error.message == "unknown field: admin, zeta"


@pytest.mark.parametrize("missing", ["username", "email"])
def test_a_create_without_a_required_field_is_refused_naming_it(missing: str) -> None:
    body = {"username": "alice", "email": "a@example.org", "display_name": "A"}
    del body[missing]
    error = refusal(validation.user_fields, body, partial=False)
    assert (error.status, error.code, error.field) == (400, "missing_field", missing)
    assert error.message == f"{missing}: is required"


def test_an_empty_update_is_refused_and_says_what_it_may_hold() -> None:
    error = refusal(validation.user_fields, {}, partial=True)
    assert (error.status, error.code) == (400, "invalid_body")
    assert error.message == "give at least one of: username, email, display_name"


def test_a_bad_field_in_a_body_is_refused_naming_that_field() -> None:
    body = {"username": "alice", "email": "a@example.org", "display_name": "a\x00"}
    for partial in (False, True):
        assert refusal(validation.user_fields, body, partial=partial).field == "display_name"


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", 1), ("0042", 42), (7, 7), (str(2**63 - 1), 2**63 - 1)])
def test_an_id_is_a_positive_64_bit_integer(raw: str | int, expected: int) -> None:
    assert validation.user_id(raw) == expected


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "+1", " 1", "1 ", "1.5", "1e3", "", "0x1",
                                 str(2**63), "99999999999999999999", "١", "²", 0, -5])
def test_anything_else_cannot_name_a_user(raw: str | int) -> None:
    assert_refused(validation.user_id, raw, "id", "must be a positive integer")


@pytest.mark.parametrize(("args", "expected"), [
    ({"id": ["12"]}, ("id", 12)),
    ({"username": ["Alice"]}, ("username", "Alice")),
    ({"email": ["Alice@Example.org"]}, ("email", "alice@example.org")),
])
def test_a_lookup_takes_one_parameter_and_validates_it(args: dict, expected: tuple) -> None:
    assert validation.lookup(args) == expected


@pytest.mark.parametrize("args", [{}, {"id": ["1"], "username": ["alice"]},
                                  {"username": ["alice", "bob"]}, {"email": []}])
def test_a_lookup_without_exactly_one_parameter_given_once_is_refused(args: dict) -> None:
    error = refusal(validation.lookup, args)
    assert (error.status, error.code, error.field) == (400, "invalid_query", None)
    assert error.message == "give exactly one query parameter: id, username or email"


def test_a_lookup_by_an_unknown_parameter_is_refused_naming_it() -> None:
    error = refusal(validation.lookup, {"id": ["1"], "name": ["x"], "admin": ["1"]})
    assert (error.status, error.code, error.field) == (400, "unknown_parameter", "admin")


@pytest.mark.parametrize(("args", "field"), [
    ({"id": ["0"]}, "id"), ({"id": ["abc"]}, "id"), ({"username": ["a b"]}, "username"),
    ({"username": ["al\x00ice"]}, "username"), ({"email": ["a\x00@example.org"]}, "email"),
    ({"email": ["\ud800@example.org"]}, "email"), ({"email": ["nobody"]}, "email"),
])
def test_a_lookup_value_that_breaks_its_fields_rule_is_refused(args: dict, field: str) -> None:
    assert refusal(validation.lookup, args).field == field
