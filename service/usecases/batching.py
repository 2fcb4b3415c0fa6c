"""Coalescing of concurrent work: the items that arrive while one batch is in flight go
together in the next one (the DataLoader pattern, or group commit).

A worker process runs a few blocking threads. While one create waits on Postgres, the others
that arrive can be sent with it in one statement, and Postgres parses, plans, commits and
flushes its WAL once for all of them instead of once each; Redis and the worker make one
round trip instead of several. No item ever waits for a batch to fill: a batch goes as soon
as the one before it has returned, or at once when none is in flight, so a lone request runs
as it would without a combiner, only in a batch of one. What it saves, and what it costs
(each wait is a hand-over between threads), is measured in bench/RESULTS.md ("batching").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .. import metrics

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Waiter(Generic[Item, Result]):
    """One thread's item, and what became of it. `woken` is held from the start and released
    when the item is done or when it is this thread's turn to lead: a bare lock as a signal,
    which wakes a thread for a fraction of what a threading.Event costs (whose wait and set
    run a Condition in Python), on a path that every create and miss takes."""

    __slots__ = ("item", "result", "error", "leads", "woken")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.leads = False
        self.woken = threading.Lock()
        self.woken.acquire()

    def wait(self) -> None:
        self.woken.acquire()

    def wake(self) -> None:
        """Let the thread go on; at most once between two waits (each wait holds it again)."""
        self.woken.release()


class Combiner(Generic[Item, Result]):
    """A thread enters with its item and leaves with its own result, or its own exception.

    `run(items)` returns one result per item, in order. Items run one batch at a time: the
    thread that finds nothing in flight leads, running every item waiting then (its own
    included); when that batch returns, the first thread that arrived meanwhile leads the
    next, and the others of the batch just done go on. So the leader never runs work that
    arrived after its own batch.

    An exception `run` raises is every item's when it is one of `shared` (a database that is
    down fails each of them alike) or not an Exception at all: every thread of the batch
    raises it. Any other may be one item's doing (a value the database driver cannot send),
    so each item of the batch then runs again alone, as a batch of one, and each thread gets
    what its own item gives: one request's input never fails another's. So `run` must leave
    nothing done when it raises anything but a shared error.

    With `batching` off, every item is a batch of its own, run at once in its own thread,
    as many at a time as threads bring (BATCHING=0, to compare).
    """

    def __init__(self, name: str, run: Callable[[Sequence[Item]], Sequence[Result]],
                 batching: bool = True, shared: tuple[type[Exception], ...] = ()) -> None:
        self._name = name
        self._run = run
        self._batching = batching
        self._shared = shared
        self._sizes = metrics.BATCH_SIZE.labels(name)
        self._lock = threading.Lock()
        self._waiting: list[_Waiter[Item, Result]] = []
        self._busy = False  # a batch is in flight, or a leader was named for the next

    def __call__(self, item: Item) -> Result:
        if not self._batching:
            return self._run([item])[0]
        waiter: _Waiter[Item, Result] = _Waiter(item)
        with self._lock:
            self._waiting.append(waiter)
            leads, self._busy = not self._busy, True
        if not leads:
            waiter.wait()
            if not waiter.leads:
                return self._outcome(waiter)
        self._lead()
        return self._outcome(waiter)

    @staticmethod
    def _outcome(waiter: _Waiter[Item, Result]) -> Result:
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Run every item waiting now, hand the lead on, then let the batch's threads go."""
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            self._settle(batch)
        finally:
            self._hand_on()
            for waiter in batch:
                waiter.leads = False
                waiter.wake()

    def _settle(self, batch: list[_Waiter[Item, Result]]) -> None:
        """Give each waiter of the batch its result or its error."""
        try:
            self._complete(batch)
        except BaseException as exc:
            if len(batch) == 1 or not isinstance(exc, Exception) or isinstance(exc, self._shared):
                for waiter in batch:
                    waiter.error = exc
                return
            log.exception("a batch of %d (%s) failed; each of them runs alone", len(batch),
                          self._name)
            for waiter in batch:
                try:
                    self._complete([waiter])
                except BaseException as own:  # this thread's alone
                    waiter.error = own

    def _complete(self, batch: list[_Waiter[Item, Result]]) -> None:
        self._sizes.observe(len(batch))
        results = self._run([waiter.item for waiter in batch])
        for waiter, result in zip(batch, results, strict=True):
            waiter.result = result

    def _hand_on(self) -> None:
        """Name the first thread that arrived during the batch leader of the next one, or
        leave no batch in flight."""
        with self._lock:
            if not self._waiting:
                self._busy = False
                return
            following = self._waiting[0]
        following.leads = True
        following.wake()
