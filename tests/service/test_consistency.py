"""The consistency checker (bench/consistency.py) in its CI size, against the default,
fastest configuration of the multi-worker server: no read that starts after a write is
acknowledged may return older data."""

from __future__ import annotations

from bench.consistency import run_checker

from .servers import ServiceProcess

OPERATIONS = 2_000
CLIENTS = 32


def test_no_read_sees_data_older_than_an_acknowledged_write(service: ServiceProcess) -> None:
    report = run_checker(service.url, OPERATIONS, CLIENTS, seed=20261127)
    assert report.operations >= OPERATIONS
    assert report.reads_checked > OPERATIONS // 3
    assert report.ok, report.summary()
