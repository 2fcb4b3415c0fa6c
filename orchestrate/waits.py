"""The orchestrator's one way to wait: ask again until something holds, and fail with one
clear line once a deadline has passed (testcontainers' wait strategies, as one function)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import OrchestrateError

POLL_S = 0.25


def until(pending: Callable[[], str | None], deadline_s: float, what: str, *,
          poll_s: float = POLL_S, logs: Callable[[], list[str]] | None = None) -> None:
    """Ask `pending()` every `poll_s` until it returns None; until then it returns the state
    for now (or ""). Once `deadline_s` has passed: fail with `what` (what did not happen),
    the last state, and `logs()`. An error `pending()` raises ends the wait at once (a
    container that broke will not get better)."""
    deadline = time.monotonic() + deadline_s
    while (state := pending()) is not None:
        if time.monotonic() > deadline:
            detail = f" ({state})" if state else ""
            raise OrchestrateError(f"{what} within {deadline_s:.0f}s{detail}",
                                   logs() if logs else None)
        time.sleep(poll_s)


def unless(holds: Callable[[], bool]) -> Callable[[], str | None]:
    """`holds` as `until` asks it: pending while it is false, or while what it asks does not
    answer (an OrchestrateError, whose message becomes the state)."""

    def pending() -> str | None:
        try:
            return None if holds() else ""
        except OrchestrateError as exc:
            return exc.message

    return pending
