"""Progress output: one line per event, flushed, with step timings."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

TAIL_LINES = 20


def say(line: str) -> None:
    print(line, flush=True)


def tail(lines: list[str], count: int = TAIL_LINES) -> list[str]:
    return lines[-count:]


@contextmanager
def step(title: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Print what a step does and how long it took; record it in `timings`."""
    say(f"==> {title}")
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    if timings is not None:
        timings[title] = elapsed
    say(f"    {title}: done in {elapsed:.1f}s")


def error(message: str, log_lines: list[str]) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    for line in log_lines:
        print(f"  | {line}", file=sys.stderr, flush=True)
