"""`python -m orchestrate bench` against a running stack: the report's files (a PNG, an HTML
page that carries it, the figures as JSON), figures for every workload that show each cache
layer doing its part (the near cache off still hits Redis; the cache off hits nothing and
every read goes to Postgres), and no temporary container left behind, after a run or a Ctrl-C;
with no wrk on the host (it runs in a container)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrate.bench import REPORT_DIR
from orchestrate.secretfiles import STAGE_ROOT
from orchestrate.stack import PROJECT_LABEL, SERVICE_LABEL
from service.process.config import Settings
from tests.support import REPO, free_port

from .helpers import Project, orchestrate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKLOADS = ("id", "id-cache-on", "id-near-off", "id-cache-off", "email", "create")
# Every query is a miss's or a bypass's, but for a few others while the counters are read: each
# /readyz asks Postgres (the orchestrator's waits send some).
OTHER_QUERIES = 50
# Concurrent reads by id, or creates, of one worker share a statement
# (service/usecases/batching.py): at most one per blocking thread in each.
MOST_PER_QUERY = Settings.threads
BENCH_TIMEOUT_S = 600
# This host's PATH without the folders that hold a wrk: bench must not need one.
NO_WRK_PATH = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep)
                              if shutil.which("wrk", path=folder) is None)


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    """The project's temporary bench containers and their staged secrets, if any remain."""
    containers = client.containers.list(ignore_removed=True, all=True,
                                        filters={"label": f"{PROJECT_LABEL}={project}"})
    found = [c.name for c in containers if c.labels.get(SERVICE_LABEL, "").startswith("bench-")]
    staged = STAGE_ROOT / project
    return found + ([str(p) for p in staged.glob("bench-*")] if staged.is_dir() else [])


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def report(stack: Project) -> Iterator[tuple[subprocess.CompletedProcess[str], dict[str, Path]]]:
    """One `bench --seconds 2` run on the module's stack, with no wrk on its PATH; its files
    are removed afterwards."""
    result = stack.run("bench", "--seconds", "2", timeout=BENCH_TIMEOUT_S,
                       env={"PATH": NO_WRK_PATH})
    stem = REPORT_DIR / f"bench-{stack.name}"
    files = {suffix: stem.with_suffix(f".{suffix}") for suffix in ("html", "png", "json")}
    yield result, files
    for path in files.values():
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def figures(report: tuple[subprocess.CompletedProcess[str], dict[str, Path]]
            ) -> dict[str, dict[str, Any]]:
    result, files = report
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {row["workload"]: row for row in json.loads(files["json"].read_text())["results"]}


def test_bench_writes_a_png_and_a_page_that_carries_it(
    report: tuple[subprocess.CompletedProcess[str], dict[str, Path]],
    figures: dict[str, dict[str, Any]],
) -> None:
    result, files = report
    png = files["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    page = files["html"].read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    assert f"wrote {files['html']} and {files['png']}" in result.stdout
    for row in figures.values():  # the terminal's table and the page's have every workload
        assert row["title"] in result.stdout and row["title"] in page


def test_every_workload_has_figures(figures: dict[str, dict[str, Any]]) -> None:
    assert tuple(figures) == WORKLOADS
    for name, row in figures.items():
        assert row["requests"] > 0 and row["rps"] > 0, name
        assert 0 < row["p50_ms"] <= row["p99_ms"], name
        assert row["errors"] == 0, name
        assert row["cpu_seconds"] > 0 and row["memory_mib"] > 0, name


def test_each_cache_layer_shows_in_the_hit_ratios(figures: dict[str, dict[str, Any]]) -> None:
    """Hits and misses as each layer makes them. Bypasses are allowed where the cache is on:
    on a busy machine a Redis call may outlast CACHE_TIMEOUT_MS, and the breaker then sends
    reads to Postgres for a second, which is the service doing its job, not a miss."""
    cached = [figures[name] for name in ("id", "id-cache-on", "id-near-off", "email")]
    for row in cached:  # every user was read once before the runs: Redis has them all
        assert row["hits"] >= 0.95 * (row["hits"] + row["misses"]), row
        assert row["hits"] >= 0.5 * row["requests"], row
        assert row["queries"] <= row["misses"] + row["bypasses"] + OTHER_QUERIES, row
    cache_off = figures["id-cache-off"]
    assert cache_off["hits"] == 0 and cache_off["misses"] == 0, cache_off
    assert cache_off["bypasses"] >= cache_off["requests"], cache_off
    assert 1 / MOST_PER_QUERY <= cache_off["queries_per_request"] <= 1.2, cache_off
    assert figures["create"]["hit_ratio"] is None
    assert figures["create"]["queries_per_request"] >= 1 / MOST_PER_QUERY


def test_no_temporary_container_is_left(
    figures: dict[str, dict[str, Any]], stack: Project, docker_client: docker.DockerClient
) -> None:
    assert leftovers(docker_client, stack.name) == []


def test_ctrl_c_removes_the_temporary_container(
    stack: Project, docker_client: docker.DockerClient
) -> None:
    command = [sys.executable, "-m", "orchestrate", "bench", "--project", stack.name,
               "--port", str(stack.port), "--seconds", "5"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + BENCH_TIMEOUT_S
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # one line per step: no terminal
            seen.append(line)
            if "near cache off (" in line or time.monotonic() > deadline:
                break
        if not (seen and "near cache off (" in seen[-1]):  # it ended: say why
            proc.wait(timeout=60)
            assert proc.stderr is not None
            raise AssertionError("".join(seen) + proc.stderr.read())
        assert leftovers(docker_client, stack.name), "the near-cache-off container runs"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted"]
    assert leftovers(docker_client, stack.name) == []


def test_bench_needs_no_wrk_on_the_host(
    report: tuple[subprocess.CompletedProcess[str], dict[str, Path]],
) -> None:
    result, _ = report
    assert shutil.which("wrk", path=NO_WRK_PATH) is None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_no_running_stack_is_one_line(docker_client: docker.DockerClient) -> None:
    project = f"ct{uuid.uuid4().hex[:8]}"
    result = orchestrate("bench", "--project", project, "--port", str(free_port()))
    assert f"project {project} has no containers" in one_line_error(result)
    assert leftovers(docker_client, project) == []
