"""The cache's circuit breaker: after Redis failed, skip it for a cool-down instead of
paying its timeout on every request (answers come from Postgres meanwhile)."""

from __future__ import annotations

import time


class Breaker:
    """Open for `cooldown` seconds after each failure; `tripped` from a failure until Redis
    is trusted again, which takes settling an epoch (trust.py) once Redis answers.

    It starts tripped: a worker settles its epoch before its first use of Redis.
    """

    def __init__(self, cooldown: float) -> None:
        self.cooldown = cooldown
        self.tripped = True
        self.failing = False  # since the last failure, Redis has not answered
        self._open_until = 0.0

    def allows(self) -> bool:
        return time.monotonic() >= self._open_until

    def trip(self) -> bool:
        """Open for a cool-down; True when this failure is news (Redis had answered since the
        last one, or never failed before)."""
        news = not self.failing
        self.tripped = self.failing = True
        self._open_until = time.monotonic() + self.cooldown
        return news

    def reset(self) -> bool:
        """Trust Redis again; True when that is news (it had failed)."""
        news = self.failing
        self.tripped = self.failing = False
        self._open_until = 0.0  # trusted again before its cool-down ran out (trust.py)
        return news
