"""Threads that run beside a measurement until it ends: the readers, writers and filler of
bench/ and tests/."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Self


class Background:
    """Threads, one for each of `targets`, that run until `stop` is set: started when the
    `with` block begins, stopped and joined (each for at most `join_s`, None: until it ends)
    when it ends."""

    def __init__(self, targets: Iterable[Callable[[], None]],
                 join_s: float | None = None) -> None:
        self.stop = threading.Event()
        self._join_s = join_s
        self._threads = [threading.Thread(target=target, daemon=True) for target in targets]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(self._join_s)
