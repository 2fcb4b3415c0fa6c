"""Which primary the service connects to, from what the Sentinels say (service/wire/client.py,
newest_primary): the one of the newest configuration, and none while they fail it over."""

from __future__ import annotations

import pytest
from redis.sentinel import MasterNotFoundError

from service.wire.client import Primary, newest_primary


def state(host: str, configuration: int, flags: str = "master",
          odown: bool = False) -> dict:
    """What redis-py makes of one Sentinel's SENTINEL MASTERS entry (the fields used)."""
    return {"ip": host, "port": 6379, "config-epoch": configuration, "flags": flags,
            "is_odown": odown}


def test_the_newest_configuration_wins_over_the_first_answer() -> None:
    states = [state("redis-1", 0), state("redis-2", 1), state("redis-2", 1)]
    assert newest_primary(states, "cachestack") == Primary("redis-2", 6379, 1)


def test_no_primary_while_one_of_the_newest_fails_it_over() -> None:
    states = [state("redis-1", 1), state("redis-1", 1, "master,failover_in_progress")]
    with pytest.raises(MasterNotFoundError, match="failing"):
        newest_primary(states, "cachestack")


def test_no_primary_while_it_is_found_down() -> None:
    with pytest.raises(MasterNotFoundError, match="failing"):
        newest_primary([state("redis-1", 2, "master,o_down", odown=True)], "cachestack")


def test_no_primary_when_two_name_different_ones_in_one_configuration() -> None:
    with pytest.raises(MasterNotFoundError, match="2 primaries"):
        newest_primary([state("redis-1", 3), state("redis-2", 3)], "cachestack")


def test_no_primary_when_no_sentinel_answers() -> None:
    with pytest.raises(MasterNotFoundError, match="no Sentinel"):
        newest_primary([], "cachestack")
