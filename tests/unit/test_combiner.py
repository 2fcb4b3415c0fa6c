"""The Combiner (service/usecases/batching.py) with threads and no servers: each thread leaves
with its own item's result, in order; what arrives while a batch runs goes as the next batch;
an item that fails fails only itself; a shared error fails every item of its batch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from service.usecases import batching
from service.usecases.batching import Combiner


class Poison(ValueError):
    """What one item's bad value raises, as psycopg2 raises UnicodeEncodeError."""


class Down(RuntimeError):
    """What a failure of everyone's raises, as a Postgres that is down does."""


def upper_unless(raising: dict[str, type[BaseException]], ran: list[list[str]]) -> Callable:
    """A batch's work: each item upper-cased, unless an item raises (what `raising` says)."""
    def run(items: list[str]) -> list[str]:
        ran.append(list(items))
        for item in items:
            if item in raising:
                raise raising[item](item)
        return [item.upper() for item in items]

    return run


def waiting(combiner: Combiner, count: int) -> None:
    """Until `count` threads wait in `combiner` for the batch in flight to return."""
    deadline = time.monotonic() + 5
    while len(combiner._waiting) != count:
        assert time.monotonic() < deadline, f"{count} threads never waited"
        time.sleep(0.002)


def gather_in(combiner: Combiner, first: str, rest: list[str]) -> list[Future]:
    """`first` leads a batch held until `rest` all wait behind it, in order; they go as the
    next batch. Each item's future, in order."""
    held, release = threading.Event(), threading.Event()
    work = combiner._run

    def held_first(items: list[str]) -> list[str]:
        if items == [first]:
            held.set()
            assert release.wait(5)
        return work(items)

    combiner._run = held_first
    with ThreadPoolExecutor(len(rest) + 1) as pool:
        futures = [pool.submit(combiner, first)]
        assert held.wait(5)
        for number, item in enumerate(rest, 1):
            futures.append(pool.submit(combiner, item))
            waiting(combiner, number)
        release.set()
    return futures


def outcomes(futures: list[Future]) -> list[object]:
    """Each future's result, or the exception it raised."""
    return [future.exception() or future.result() for future in futures]


def test_a_lone_item_runs_at_once_as_a_batch_of_one() -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({}, ran))
    assert [combiner("a"), combiner("b")] == ["A", "B"]
    assert ran == [["a"], ["b"]]


def test_what_arrives_during_a_batch_goes_together_as_the_next_one_in_order() -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({}, ran))
    futures = gather_in(combiner, "first", ["a", "b", "c", "d"])
    assert outcomes(futures) == ["FIRST", "A", "B", "C", "D"]
    assert ran == [["first"], ["a", "b", "c", "d"]]
    assert not combiner._busy and combiner._waiting == []


def test_each_thread_gets_its_own_items_result_when_results_depend_on_the_batch() -> None:
    """Results are matched to items by position, whatever the batch's order of work."""
    combiner = Combiner("test", lambda items: [f"{item}/{len(items)}" for item in items])
    futures = gather_in(combiner, "x", ["p", "q", "r"])
    assert outcomes(futures) == ["x/1", "p/3", "q/3", "r/3"]


def test_a_batch_whose_results_do_not_match_its_items_runs_each_alone() -> None:
    """Results are never handed out by a guess: a run that returns fewer results than items
    failed, and each item then runs as a batch of one."""
    ran: list[list[str]] = []
    work = upper_unless({}, ran)
    combiner = Combiner("test", lambda items: work(items)[:1])
    assert outcomes(gather_in(combiner, "first", ["a", "b"])) == ["FIRST", "A", "B"]
    assert ran == [["first"], ["a", "b"], ["a"], ["b"]]


def test_a_batch_that_one_item_fails_runs_each_alone_and_fails_only_that_one(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({"bad": Poison}, ran), shared=(Down,))
    with caplog.at_level(logging.ERROR, logger=batching.__name__):
        answers = outcomes(gather_in(combiner, "first", ["a", "bad", "b"]))
    assert answers[0] == "FIRST" and answers[1] == "A" and answers[3] == "B"
    assert isinstance(answers[2], Poison) and str(answers[2]) == "bad"
    assert ran == [["first"], ["a", "bad", "b"], ["a"], ["bad"], ["b"]]
    assert [record.getMessage() for record in caplog.records] == [
        "a batch of 3 (test) failed; each of them runs alone"]
    assert combiner("after") == "AFTER"  # and the combiner goes on


def test_a_shared_error_fails_every_item_of_the_batch_without_running_them_again() -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({"down": Down}, ran), shared=(Down,))
    answers = outcomes(gather_in(combiner, "first", ["a", "down", "b"]))
    assert answers[0] == "FIRST"
    assert all(isinstance(answer, Down) and str(answer) == "down" for answer in answers[1:])
    assert ran == [["first"], ["a", "down", "b"]]
    assert combiner("after") == "AFTER"


class Stop(BaseException):
    """Not an Exception (as KeyboardInterrupt is not): never one item's doing."""


def test_what_is_not_an_exception_fails_every_item_without_running_them_again() -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({"stop": Stop}, ran))
    answers = outcomes(gather_in(combiner, "first", ["a", "stop"]))
    assert answers[0] == "FIRST" and all(isinstance(answer, Stop) for answer in answers[1:])
    assert ran == [["first"], ["a", "stop"]]


def test_a_lone_item_that_fails_raises_its_own_error_once() -> None:
    ran: list[list[str]] = []
    combiner = Combiner("test", upper_unless({"bad": Poison}, ran))
    with pytest.raises(Poison):
        combiner("bad")
    assert ran == [["bad"]]


def test_without_batching_each_item_runs_alone_even_when_others_are_in_flight() -> None:
    ran: list[list[str]] = []
    inside = threading.Barrier(3)
    work = upper_unless({}, ran)

    def together(items: list[str]) -> list[str]:
        inside.wait(5)  # all three are in `run` at once: none waited for another
        return work(items)

    combiner = Combiner("test", together, batching=False)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(combiner, item) for item in ("a", "b", "c")]
    assert outcomes(futures) == ["A", "B", "C"]
    assert sorted(ran) == [["a"], ["b"], ["c"]]
