"""How many workers `python -m service` starts by default: one per CPU it may keep busy, as a
CPU quota (cgroup v2's cpu.max, v1's CFS quota) bounds them. tests/deploy/test_service_image.py
checks it under Docker's own --cpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.process.serve import parse_args, usable_cpus

CPUS = len(os.sched_getaffinity(0))


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({}, CPUS),
    ({"cpu.max": "max 100000\n"}, CPUS),
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still runs one worker
    ({"cpu.max": "150000 100000\n"}, min(CPUS, 2)),  # rounded up
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, CPUS),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu.max": "garbage\n"}, CPUS),  # a file it cannot read says nothing
])
def test_the_workers_follow_the_cpu_quota(tmp_path: Path, files: dict[str, str],
                                          expected: int) -> None:
    assert usable_cpus(cgroup(tmp_path, files)) == expected


def test_workers_given_are_workers_run() -> None:
    assert parse_args(["--workers", "3"]).workers == 3
    assert parse_args([]).workers == usable_cpus()
