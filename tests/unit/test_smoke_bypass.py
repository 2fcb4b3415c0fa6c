"""The smoke checks run a check again when it met X-Cache BYPASS (Redis out of use for a
moment), and only then: a cache that stays out of use, or any other failure, still fails."""

from __future__ import annotations

import pytest

from orchestrate import smoke
from orchestrate.smoke import CheckFailed, run_check


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smoke, "BYPASS_WAIT_S", 0)


def failing(*failures: CheckFailed):
    """A check that raises each of `failures` in turn, then passes; the calls it got."""
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]

    return check, calls


def test_a_check_that_met_bypass_is_run_again_until_it_passes() -> None:
    check, calls = failing(*[CheckFailed("bypass", bypassed=True)] * smoke.BYPASS_RETRIES)
    assert run_check(check) == smoke.BYPASS_RETRIES
    assert len(calls) == smoke.BYPASS_RETRIES + 1


def test_a_cache_that_stays_out_of_use_fails_the_check() -> None:
    check, calls = failing(*[CheckFailed("bypass", bypassed=True)] * (smoke.BYPASS_RETRIES + 1))
    with pytest.raises(CheckFailed):
        run_check(check)
    assert len(calls) == smoke.BYPASS_RETRIES + 1


def test_any_other_failure_fails_at_once() -> None:
    check, calls = failing(CheckFailed("want X-Cache HIT"))
    with pytest.raises(CheckFailed):
        run_check(check)
    assert calls == [1]
