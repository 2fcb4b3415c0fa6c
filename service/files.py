"""Settings and secrets that live in files: containers receive credentials as files under
/run/secrets, read again when they change so that they can rotate under a running service.
What a file holds is never part of an error message, a log line or a repr."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it, never its value."""


def read_file(name: str, path: str) -> str:
    """The file setting `name` points at, trailing newline dropped; a ConfigError that names
    the file, never what it holds, when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None


class SecretFile:
    """A secret read from its file each time it is used (for each new connection), so that
    it can change under a running service: a rotation rewrites each container's copy in
    place. A file that cannot be read, or is empty (as when caught half rewritten), gives
    the value read before, and one log line until it is good again. Neither the log nor
    the repr ever shows the value."""

    def __init__(self, name: str, path: str, value: str) -> None:
        self.name, self.path = name, path
        self._value = value  # the last value the file held
        self._failing = False

    @classmethod
    def of(cls, env: Mapping[str, str], name: str) -> SecretFile | None:
        """NAME_FILE's secret, read now; None when NAME_FILE is not set."""
        path = env.get(f"{name}_FILE")
        return cls(f"{name}_FILE", path, read_file(f"{name}_FILE", path)) if path else None

    def __repr__(self) -> str:
        return f"SecretFile({self.name}={self.path})"

    def read(self) -> str:
        try:
            value = read_file(self.name, self.path)
            if not value:
                raise ConfigError(f"{self.name}: {self.path} is empty")
        except ConfigError as exc:
            if not self._failing:
                log.warning("%s; using the value it held before", exc)
            self._failing = True
            return self._value
        self._value, self._failing = value, False
        return value


class FileVersion(NamedTuple):
    """What changes whenever a file is replaced or rewritten."""

    inode: int
    modified_ns: int
    size: int


def file_version(name: str, path: str) -> FileVersion:
    """The version of the file setting `name` points at (one stat); a ConfigError naming the
    file when it is gone."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None
    return FileVersion(info.st_ino, info.st_mtime_ns, info.st_size)


# A bearer token as RFC 6750 spells one (b64token): what can follow "Bearer " in a header.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class TokenLines(NamedTuple):
    """What a token file says: its tokens, and the numbers of its lines that are not one."""

    tokens: tuple[str, ...]
    not_tokens: tuple[int, ...]


def parse_tokens(raw: str) -> TokenLines:
    """Tokens one a line (so that a new one can be added before the old one is removed);
    blank lines, lines that start with `#` and spaces around a token are ignored."""
    tokens, not_tokens = [], []
    for number, line in enumerate(raw.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if BEARER_TOKEN.fullmatch(token):
            tokens.append(token)
        else:
            not_tokens.append(number)
    return TokenLines(tuple(tokens), tuple(not_tokens))
