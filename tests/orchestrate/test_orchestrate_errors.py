"""Failure paths: a killed `up`, a taken port, no engine, a failing build, and every command's
bad inputs. Each ends with one clear message line and a non-zero exit, never a traceback, and
leaves nothing behind; `down` cleans up by label."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from orchestrate import images
from orchestrate.backup import BACKUPS, Manifest
from orchestrate.errors import OrchestrateError
from orchestrate.stack import as_dict, describe_stack
from tests.support import REPO, free_port

from .helpers import Project, labelled, one_line_error, orchestrate, sweep


def test_stack_description_is_plain_data() -> None:
    described = as_dict(describe_stack("demo", 8123))
    assert json.loads(json.dumps(described)) == described
    names = [s["name"] for s in described["services"]]
    assert names == ["postgres", "redis", "migrate", "service", "stream", "proxy"]
    assert described["services"][-1]["ports"] == [
        {"container": 8000, "host": 8123, "host_ip": "127.0.0.1", "tls": False}
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
        line = one_line_error(project.run("up"))
        assert f"port 127.0.0.1:{project.port} is already in use" in line
        line = one_line_error(orchestrate("up", "--project", project.name, "--port",
                                          str(free_port()), "--monitoring",
                                          "--monitoring-port", str(project.port)))
        assert f"port 127.0.0.1:{project.port} is already in use" in line
        assert "--monitoring-port" in line
    assert labelled(docker_client, project.name) == []
    assert not (REPO / "build" / "secrets" / project.name).exists()


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


# Every command's bad inputs: (arguments, what its one error line names). `{project}` is a
# project nobody made, `{port}` a free port, `{tmp}` a folder of prepared files.
BAD_INPUTS = {
    "port out of range": (["up", "--port", "70000"], "--port: must be 1 to 65535, got 70000"),
    "port zero": (["up", "--port", "0"], "--port: must be 1 to 65535, got 0"),
    "port not a number": (["status", "--port", "http"], "--port: not a number"),
    "monitoring port out of range": (["up", "--monitoring", "--monitoring-port", "65536"],
                                     "--monitoring-port: must be 1 to 65535"),
    "monitoring port is the port": (["up", "--monitoring", "--port", "{port}",
                                     "--monitoring-port", "{port}"], "cannot both be {port}"),
    "project not a name": (["up", "--project", "Not A Name"], "--project: 'Not A Name'"),
    "project a path": (["down", "--project", "../up"], "--project: '../up'"),
    "replicas": (["up", "--replicas", "11"], "--replicas: must be 1 to 10"),
    "images": (["up", "--images", "bogus"], "--images: invalid choice"),
    "no command": ([], "required: command"),
    "status of no project": (["status"], "project {project} has no containers"),
    "logs of no project": (["logs"], "no container of project {project}"),
    "smoke of no project": (["smoke"], "project {project} has no containers"),
    "audit of no project": (["audit"], "project {project} has no running service"),
    "rotate of no project": (["rotate"], "project {project} has no running postgres"),
    "rotate an unknown name": (["rotate", "nosuchsecret"], "cannot rotate nosuchsecret"),
    "bench of no project": (["bench", "--seconds", "1"], "project {project} has no containers"),
    "bench seconds": (["bench", "--seconds", "0"], "--seconds: must be 1 to"),
    "backup of no project": (["backup"], "project {project} has no running postgres"),
    "backup into a missing folder": (["backup", "--output", "{tmp}/missing/x.dump"],
                                     "--output: no folder {tmp}/missing"),
    "backup onto a folder": (["backup", "--output", "{tmp}/folder"], "{tmp}/folder is a folder"),
    "restore without a file": (["restore"], "required: file"),
    "restore a missing file": (["restore", "{tmp}/missing.dump", "--yes"],
                               "{tmp}/missing.dump: no such backup file"),
    "restore a folder": (["restore", "{tmp}/folder", "--yes"], "{tmp}/folder: not a file"),
    "restore a pipe": (["restore", "{tmp}/pipe.dump", "--yes"], "{tmp}/pipe.dump: not a file"),
    "restore without a manifest": (["restore", "{tmp}/alone.dump", "--yes"],
                                   "no readable alone.dump.json"),
    "restore with a folder as manifest": (["restore", "{tmp}/odd.dump", "--yes"],
                                          "no readable odd.dump.json"),
    "build env file in a missing folder": (["build", "--env-file", "{tmp}/missing/x.env"],
                                           "--env-file: no folder {tmp}/missing"),
    "build env file onto a folder": (["build", "--env-file", "{tmp}/folder"],
                                     "{tmp}/folder is a folder"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder, a pipe, a dump without its manifest and one whose manifest is a folder."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "folder").mkdir()
    os.mkfifo(tmp / "pipe.dump")
    (tmp / "alone.dump").write_bytes(b"PGDMP")
    (tmp / "odd.dump").write_bytes(b"PGDMP")
    (tmp / "odd.dump.json").mkdir()
    return tmp


def left_behind(client: docker.DockerClient, project: str, tmp: Path) -> list[str]:
    """What a command of `project` left: resources, staged secrets, backups, files in tmp."""
    staged = REPO / "build" / "secrets" / project
    return (labelled(client, project)
            + ([str(staged)] if staged.exists() else [])
            + sorted(str(p) for p in BACKUPS.glob(f"{project}-*"))
            + sorted(p.name for p in tmp.iterdir()
                     if p.name not in ("folder", "pipe.dump", "alone.dump", "odd.dump",
                                       "odd.dump.json")))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_command_refuses_its_bad_inputs_with_one_line(
        docker_client: docker.DockerClient, prepared: Path, case: str) -> None:
    project, port = f"ctbad{uuid.uuid4().hex[:8]}", str(free_port())
    args, names = BAD_INPUTS[case]
    if args and "--project" not in args:
        args = [*args, "--project", project]
    project = args[args.index("--project") + 1] if args else project
    fill = {"project": project, "port": port, "tmp": str(prepared)}
    try:
        line = one_line_error(orchestrate(*(a.format(**fill) for a in args), timeout=60))
        assert names.format(**fill) in line
        assert left_behind(docker_client, project, prepared) == []
    finally:  # what a command that did not refuse made
        sweep(docker_client, project)
        shutil.rmtree(REPO / "build" / "secrets" / project, ignore_errors=True)


def test_an_unreadable_backup_gives_one_line(tmp_path: Path) -> None:
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"PGDMP")
    dump.chmod(0)
    # Root reads any file; without the capabilities that let it, it reads as its owner would.
    no_override = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    line = one_line_error(orchestrate("restore", str(dump), "--yes", "--project", "ctnone",
                                      timeout=60, under=no_override))
    assert f"{dump}: cannot read it: Permission denied" in line


def test_a_signed_backup_of_a_project_with_no_containers_changes_nothing(
        docker_client: docker.DockerClient, tmp_path: Path) -> None:
    project = f"ctbad{uuid.uuid4().hex[:8]}"
    dump = tmp_path / "x.dump"
    dump.write_bytes(b"PGDMP")
    manifest = Manifest(project, "2026-01-01T00:00:00+00:00", 5,
                        hashlib.sha256(b"PGDMP").hexdigest()).signed()
    dump.with_name("x.dump.json").write_text(json.dumps(manifest.__dict__))
    line = one_line_error(orchestrate("restore", str(dump), "--yes", "--project", project,
                                      timeout=60))
    assert f"project {project} has no running postgres" in line
    assert labelled(docker_client, project) == []


def test_a_volume_that_takes_the_name_of_the_record_is_refused(
        docker_client: docker.DockerClient) -> None:
    """`<project>_settings` that `up` did not make (no project label) is not read as the
    project's settings, nor replaced: `up` refuses before it makes anything."""
    project = f"ctbad{uuid.uuid4().hex[:8]}"
    foreign = docker_client.volumes.create(f"{project}_settings")
    try:
        line = one_line_error(orchestrate("up", "--project", project, "--port",
                                          str(free_port()), timeout=60))
        assert f"volume {project}_settings exists but is not project {project}'s" in line
        assert labelled(docker_client, project) == []
        assert not (REPO / "build" / "secrets" / project).exists()
    finally:
        sweep(docker_client, project)
        foreign.remove()
