"""Each worker's own copy of users' cached values by id (the least recently used go first),
kept correct by what its watch hears from Redis (watch.py): every `get` drains the watch
first, and answers only while Redis is heard, so no read that starts after an acknowledged
write sees the old value (docs/design.md, "The near cache").
"""

from __future__ import annotations

import time
from collections import OrderedDict

from .watch import Changes, Watch


class NearCache:
    """Users' cached values by id: at most `size`, each for at most `max_age` seconds, never
    past a change the watch reported."""

    def __init__(self, watch: Watch, size: int, max_age: float) -> None:
        self._watch = watch
        self._size = size
        self._max_age = max_age
        # Least recently used first: a hit moves its user to the end, a put evicts the first.
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        watch.on_change = self._forget

    @property
    def generation(self) -> int:
        """Read before asking Redis, handed to `put` with what Redis answered."""
        return self._watch.generation

    def get(self, key: str) -> bytes | None:
        with self._watch.lock:
            if not self._watch.current():
                return None
            found = self._values.get(key)
            if found is None:
                return None
            if found[1] < time.monotonic():
                del self._values[key]
                return None
            self._values.move_to_end(key)
            return found[0]

    def put(self, key: str, value: bytes, generation: int) -> None:
        """Keep a value that was read from Redis after `generation` was current."""
        with self._watch.lock:
            if generation != self._watch.generation or not self._watch.heard():
                return
            if key not in self._values and len(self._values) >= self._size:
                self._values.popitem(last=False)
            self._values[key] = (value, time.monotonic() + self._max_age)
            self._values.move_to_end(key)

    def _forget(self, changed: Changes) -> None:
        if changed is None:
            self._values.clear()
        else:
            for key in changed:
                self._values.pop(key, None)
