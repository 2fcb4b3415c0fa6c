"""Settings and secrets in files (service/files.py): a file is read with its trailing newline
dropped, a secret is read again each time it is used and keeps its last good value while its
file is bad, token files hold one token a line; what a file holds is never in an error, a log
line or a repr."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service import files
from service.files import ConfigError, SecretFile, TokenLines, parse_tokens, read_file

SECRET = "do-not-print-this-3f9a"


def test_a_file_is_read_without_its_trailing_newlines_only(tmp_path: Path) -> None:
    for written, read in ((f"{SECRET}\n", SECRET), (f"{SECRET}\r\n\n", SECRET),
                          (f" {SECRET} \n", f" {SECRET} "), ("a\nb\n", "a\nb"), ("", "")):
        (tmp_path / "setting").write_text(written, newline="")
        assert read_file("X_FILE", str(tmp_path / "setting")) == read


@pytest.mark.parametrize(("make", "says"), [
    (lambda path: None, "cannot read {path} (No such file or directory)"),
    (lambda path: path.mkdir(), "cannot read {path} (Is a directory)"),
    (lambda path: path.write_bytes(b"\xff" + SECRET.encode()), "{path} is not UTF-8 text"),
])
def test_a_file_that_cannot_be_read_is_named_and_what_it_holds_is_not(
        tmp_path: Path, make, says: str) -> None:
    path = tmp_path / "secret"
    make(path)
    with pytest.raises(ConfigError) as caught:
        read_file("REDIS_PASSWORD_FILE", str(path))
    assert str(caught.value) == f"REDIS_PASSWORD_FILE: {says.format(path=path)}"


def test_a_secret_file_is_read_when_the_setting_names_one(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text(f"{SECRET}\n")
    secret = SecretFile.of({"REDIS_PASSWORD_FILE": str(path)}, "REDIS_PASSWORD")
    assert secret is not None and secret.read() == SECRET
    assert (secret.name, secret.path) == ("REDIS_PASSWORD_FILE", str(path))
    assert repr(secret) == f"SecretFile(REDIS_PASSWORD_FILE={path})"
    for env in ({}, {"REDIS_PASSWORD_FILE": ""}, {"REDIS_PASSWORD": SECRET}):
        assert SecretFile.of(env, "REDIS_PASSWORD") is None


def test_a_secret_file_that_cannot_be_read_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^DATABASE_PASSWORD_FILE: cannot read "):
        SecretFile.of({"DATABASE_PASSWORD_FILE": str(tmp_path / "gone")}, "DATABASE_PASSWORD")


def test_a_secret_is_read_again_each_time_so_it_can_rotate(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("first\n")
    secret = SecretFile.of({"X_FILE": str(path)}, "X")
    path.write_text("second\n")
    assert secret.read() == "second"


@pytest.mark.parametrize("spoil", ["remove", "empty", "not UTF-8"])
def test_a_bad_secret_file_gives_the_value_before_and_says_so_once_without_it(
        tmp_path: Path, spoil: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "password"
    path.write_text(f"{SECRET}\n")
    secret = SecretFile.of({"X_FILE": str(path)}, "X")
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        if spoil == "remove":
            path.unlink()
        else:
            path.write_bytes(b"" if spoil == "empty" else b"\xff\xfe")
        assert [secret.read() for _ in range(3)] == [SECRET] * 3
        path.write_text("rotated\n")
        assert secret.read() == "rotated"
        path.write_text("")
        assert secret.read() == "rotated"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all(line.startswith("X_FILE: ") for line in lines), lines
    assert lines[0].endswith("; using the value it held before")
    assert SECRET not in caplog.text and "rotated" not in caplog.text


def test_a_file_version_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("a\n")
    before = files.file_version("API_TOKENS_FILE", str(path))
    path.write_text("bb\n")
    assert files.file_version("API_TOKENS_FILE", str(path)) != before
    with pytest.raises(ConfigError, match=r"^API_TOKENS_FILE: cannot read .*gone \(No such"):
        files.file_version("API_TOKENS_FILE", str(tmp_path / "gone"))


def test_tokens_are_one_a_line_with_blanks_comments_and_spaces_ignored() -> None:
    raw = ("# rotated on Monday\n\n  first-token.A1b2  \nsecond~token/Zz9+Yy8=\n"
           "\t# indented comment\nthird_token==\r\n")
    assert parse_tokens(raw) == TokenLines(
        ("first-token.A1b2", "second~token/Zz9+Yy8=", "third_token=="), ())


@pytest.mark.parametrize("line", ["two words", "token#comment", "=leading", "tok=en",
                                  "tök", "to\x00ken", "Bearer\ttoken"])
def test_a_line_that_is_not_a_bearer_token_is_left_out_by_number(line: str) -> None:
    assert parse_tokens(f"good-token\n\n{line}\nother-token\n") == TokenLines(
        ("good-token", "other-token"), (3,))


def test_a_file_of_no_token_gives_none() -> None:
    for raw in ("", "\n\n", "# none yet\n  # still none\n"):
        assert parse_tokens(raw) == TokenLines((), ())
