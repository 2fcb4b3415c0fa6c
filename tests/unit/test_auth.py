"""The API-token check (service/web/auth.py) as the WSGI layer it is, around a dummy app: which
requests reach the app, what a refusal says, and what a token file accepts as it changes.
It fails closed, and never logs or echoes a token. How it stands in front of both doors of
the real app is in tests/service/test_hotpath.py and test_paths.py; how soon a changed file
takes effect, in tests/service/test_auth.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from werkzeug.test import Client

from service.web import auth

TOKENS = ("first-token.A1b2C3d4E5f6G7h8", "second~token/Zz9+Yy8=")
OLD, NEW, NEWER = "old-token.Aa1", "new-token.Bb2", "newer-token.Cc3"
MISSING = ('Bearer realm="cachestack"', "missing_token")
INVALID = ('Bearer realm="cachestack", error="invalid_token"', "invalid_token")
BAD_CREDENTIALS = [  # (Authorization header or None, the challenge and error code expected)
    (None, MISSING),
    ("Bearer not-one-of-ours", INVALID),
    ("Bearer first-token.A1b2C3d4E5f6G7h", INVALID),  # all but the last character
    ("Bearer first-token.A1b2C3d4E5f6G7h8 second~token/Zz9+Yy8=", INVALID),
    ("Bearer  first-token.A1b2C3d4E5f6G7h8", INVALID),  # two spaces
    ("Bearer first-token.A1b2C3d4E5f6G7h8 ", INVALID),
    ("Bearer", INVALID),
    ("Bearer ", INVALID),
    ("", INVALID),
    ("first-token.A1b2C3d4E5f6G7h8", INVALID),  # no scheme
    ("Basic Zmlyc3QtdG9rZW46", INVALID),
    ("Token first-token.A1b2C3d4E5f6G7h8", INVALID),
]


class Inner:
    """The app behind the check: answers 200 and notes the paths that reached it."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        self.reached.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"inner"]


def status_with(app, token: str | None, path: str = "/users/1") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return Client(app).get(path, headers=headers).status_code


def accepts(app, token: str) -> bool:
    status = status_with(app, token)
    assert status in (200, 401), status
    return status == 200


def test_without_any_token_setting_the_app_is_not_wrapped() -> None:
    inner = Inner()
    assert auth.require_token(inner, None, None) is inner


@pytest.mark.parametrize("token", TOKENS)
def test_each_accepted_token_reaches_the_app(token: str) -> None:
    inner = Inner()
    app = auth.require_token(inner, TOKENS)
    for path in ("/users/1", "/users", "/anything/else"):
        assert status_with(app, token, path) == 200
    assert inner.reached == ["/users/1", "/users", "/anything/else"]


def test_the_bearer_scheme_is_case_insensitive() -> None:
    app = auth.require_token(Inner(), TOKENS)
    for scheme in ("bearer", "BEARER", "bEARER"):
        headers = {"Authorization": f"{scheme} {TOKENS[0]}"}
        assert Client(app).get("/users/1", headers=headers).status_code == 200, scheme


@pytest.mark.parametrize(("authorization", "expected"), BAD_CREDENTIALS)
def test_a_missing_or_bad_token_is_refused_with_the_challenge_and_never_echoed(
        authorization: str | None, expected: tuple[str, str]) -> None:
    inner = Inner()
    app = auth.require_token(inner, TOKENS)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = Client(app).post("/users", headers=headers, json={"username": "mallory"})
    challenge, code = expected
    assert response.status == "401 UNAUTHORIZED"
    assert response.headers["WWW-Authenticate"] == challenge
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(response.data)
    error = json.loads(response.data)["error"]
    assert error["code"] == code and error["message"]
    echoed = response.data + repr(list(response.headers.items())).encode()
    assert not [word for word in (authorization or "").split()
                if word not in ("Bearer", "Basic", "Token") and word.encode() in echoed]
    assert inner.reached == []


def test_only_the_probe_and_scraper_paths_are_open() -> None:
    inner = Inner()
    app = auth.require_token(inner, TOKENS)
    for path in sorted(auth.OPEN_PATHS):
        assert status_with(app, None, path) == 200, path
    assert inner.reached == sorted(auth.OPEN_PATHS)
    assert {"/healthz", "/readyz", "/metrics", "/openapi.json"} == auth.OPEN_PATHS
    assert status_with(app, None, "/healthz/") == status_with(app, None, "/nowhere") == 401


def test_tokens_that_are_not_from_a_file_are_checked_all_the_same() -> None:
    """API_TOKENS without a file: none given accepts none (the API is open only when no
    token setting is given at all)."""
    for tokens, token, status in (((), None, 401), ((), "", 401), ((), OLD, 401),
                                  ((OLD,), OLD, 200), ((OLD,), NEW, 401)):
        assert status_with(auth.require_token(Inner(), tokens), token) == status, (tokens, token)


# -- the token file ------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A token file holding OLD, checked again at every request (not once a second)."""
    monkeypatch.setattr(auth, "CHECK_EVERY_SECONDS", 0)
    path = tmp_path / "api_tokens"
    path.write_text(f"{OLD}\n")
    return path


def test_a_token_file_is_what_is_accepted_whatever_tokens_were_read_at_start(
        token_file: Path) -> None:
    app = auth.require_token(Inner(), (NEWER,), str(token_file))
    assert accepts(app, OLD) and not accepts(app, NEWER)
    token_file.write_text(f"{OLD}\n{NEW}\n")
    assert accepts(app, NEW) and accepts(app, OLD)
    token_file.write_text(f"{NEW}\n")
    assert not accepts(app, OLD) and accepts(app, NEW)


def spoil(path: Path, how: str) -> None:
    if how in ("removed", "a directory"):
        path.unlink()
    if how == "a directory":
        path.mkdir()
    if how == "empty":
        path.write_text("")
    if how == "comments only":
        path.write_text(f"# {OLD} was revoked\n\n  # none yet\n")
    if how == "not UTF-8":
        path.write_bytes(b"\xff" + NEW.encode())


@pytest.mark.parametrize("how", ["removed", "a directory", "empty", "comments only",
                                 "not UTF-8"])
def test_a_file_that_holds_no_readable_token_accepts_none_and_says_so_once(
        token_file: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    app = auth.require_token(Inner(), None, str(token_file))
    assert accepts(app, OLD)
    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        spoil(token_file, how)
        for _ in range(3):  # checked each time: still one line, still closed
            assert not accepts(app, OLD) and not accepts(app, NEW)
            assert status_with(app, None, "/healthz") == 200
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("API_TOKENS_FILE"), lines
    assert "no token" in lines[0]
    assert not [token for token in (OLD, NEW, NEWER) if token in caplog.text]
    if token_file.is_dir():
        token_file.rmdir()
    token_file.write_text(f"{NEWER}\n")  # good again: it takes effect as any change does
    assert accepts(app, NEWER) and not accepts(app, OLD)


def test_a_line_that_is_not_a_token_is_left_out_and_the_others_accepted(
        token_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It cannot be presented as a token (not even what it says, spaces and all), and it
    locks nobody else out; the warning names the line, never what it holds."""
    app = auth.require_token(Inner(), None, str(token_file))
    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        token_file.write_text(f"# rotated\n{NEW}\nnot {NEWER}\n{NEWER}#x\n")
        assert accepts(app, NEW) and not accepts(app, OLD)
        for presented in (f"not {NEWER}", NEWER, f"{NEWER}#x", "# rotated", "rotated"):
            assert not accepts(app, presented), presented
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" of ")[0] for line in lines] == [
        "API_TOKENS_FILE: line 3", "API_TOKENS_FILE: line 4"], lines
    assert NEWER not in caplog.text and NEW not in caplog.text
