"""Failure paths: a killed `up`, a taken port, no engine, a failing build. Each ends with one
clear message line and a non-zero exit, never a traceback; `down` cleans up by label."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

import docker
import pytest
from orchestrate_helpers import REPO, Project, labelled, orchestrate

from orchestrate import images
from orchestrate.errors import OrchestrateError
from orchestrate.stack import as_dict, describe_stack


def test_stack_description_is_plain_data() -> None:
    described = as_dict(describe_stack("demo", 8123))
    assert json.loads(json.dumps(described)) == described
    names = [s["name"] for s in described["services"]]
    assert names == ["postgres", "redis", "migrate", "service", "proxy"]
    assert described["services"][4]["ports"] == [
        {"container": 8000, "host": 8123, "host_ip": "127.0.0.1"}
    ]


def test_no_engine_gives_one_clear_line() -> None:
    result = orchestrate(
        "up",
        "--project",
        "ctnoengine",
        env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: no Docker engine answers at unix:///nonexistent")


def test_port_taken_gives_one_clear_line(
    docker_client: docker.DockerClient, new_project: Callable[[], Project]
) -> None:
    project = new_project()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", project.port))
        holder.listen()
        result = project.run("up")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert f"error: port 127.0.0.1:{project.port} is already in use" in result.stderr
    assert labelled(docker_client, project.name) == []


def test_build_failure_raises_with_log_lines(docker_client: docker.DockerClient) -> None:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        recipe = b"FROM scratch\nRUN echo cannot-run-without-a-shell\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(recipe)
        tar.addfile(info, io.BytesIO(recipe))
    context.seek(0)
    with pytest.raises(OrchestrateError) as failed:
        images.stream_build(
            docker_client,
            "cachestack-test/broken:latest",
            "broken image",
            fileobj=context,
            custom_context=True,
        )
    assert failed.value.message.startswith("build of broken image failed")
    assert failed.value.log_lines


def test_down_cleans_up_after_a_killed_up(
    docker_client: docker.DockerClient, new_project: Callable[[], Project]
) -> None:
    project = new_project()
    # images first: killing an image build would leave an orphaned debootstrap behind
    assert project.run("build").returncode == 0
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrate",
            "up",
            "--project",
            project.name,
            "--port",
            str(project.port),
            "--images",
            project.images,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(r.startswith("container") for r in labelled(docker_client, project.name)):
            assert up.poll() is None, "up ended before creating a container"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    assert labelled(docker_client, project.name)
    result = project.run("down", "--volumes")
    assert result.returncode == 0, result.stderr
    assert labelled(docker_client, project.name) == []
    assert not (REPO / "build" / "secrets" / project.name).exists()
