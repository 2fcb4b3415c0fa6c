"""The stack from a fresh clone, as a new user runs it: compose alone (no Python on the way),
with a registry and without one, with compose v2 and docker-compose 1.29; and the
orchestrator on the official images.

"With a registry" is simulated: Debian's docker-registry on 127.0.0.1 serves the images this
project builds offline under the official names (library/postgres:<tag>, ...), and the engine
takes it as its mirror of Docker Hub for these tests only (its configuration is put back
after them). What this shows: every pull by official name, every build on those bases, and
the service image's builder installing from PyPI. What it cannot: the contents of the real
official images. This machine reaches PyPI only through a TLS proxy whose CA the host trusts;
the stand-in Python image carries that CA (a public certificate, no pip configuration), as
the real image carries the public ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from orchestrate import images
from orchestrate.smoke import run_smoke
from orchestrate.stack import IMAGES
from tests.support import REPO, free_port, require, run

from .helpers import compose_down, tool, unique_name, wait_ready

DAEMON_JSON = Path("/etc/docker/daemon.json")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# The stand-in of the official Python image: the Debian base, trusting this machine's CAs.
PYTHON_STAND_IN = """FROM {base}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
"""
COMPOSES = {"v2": ("docker", "compose"), "v1": ("docker-compose",)}


def stand_ins(client: docker.DockerClient) -> dict[str, str]:
    """Official name -> the local image that stands in for it (built offline, reused)."""
    debian = images.ensure_offline_base(client)
    found = {}
    for key, spec in IMAGES.items():
        if spec.offline_base:
            found[spec.base] = images.build_recipe(
                client, f"cachestack-offline/{key}", spec.offline_base, debian)
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Dockerfile").write_text(PYTHON_STAND_IN.format(base=debian))
        shutil.copy(HOST_CA, Path(context) / "ca-certificates.crt")
        python, _ = client.images.build(path=context, tag="cachestack-offline/python-stand-in",
                                        rm=True)
    found[IMAGES["service"].base] = python.id
    found[IMAGES["wrk"].base] = debian  # `bench`'s load generator: the Debian base itself
    return found


def reload_engine() -> None:
    """dockerd reads daemon.json again on SIGHUP (registry-mirrors is one it may change)."""
    os.kill(int(subprocess.check_output(["pgrep", "-x", "dockerd"]).split()[0]), signal.SIGHUP)
    time.sleep(1)


@contextlib.contextmanager
def engine_mirror(url: str) -> Iterator[None]:
    """The engine with `url` as its Docker Hub mirror, then as it was."""
    before = DAEMON_JSON.read_text() if DAEMON_JSON.exists() else None
    config = json.loads(before) if before else {}
    DAEMON_JSON.parent.mkdir(exist_ok=True)
    DAEMON_JSON.write_text(json.dumps({**config, "registry-mirrors": [url]}))
    reload_engine()
    try:
        yield
    finally:
        # dockerd ignores a SIGHUP without the file: say "no mirrors" first, then remove it.
        DAEMON_JSON.write_text(before or json.dumps({"registry-mirrors": []}))
        reload_engine()
        if before is None:
            DAEMON_JSON.unlink()


@pytest.fixture(scope="module")
def registry(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[None]:
    """A registry serving the stand-ins under the official names, as the engine's mirror; the
    official names absent locally, so that every use pulls; everything put back afterwards."""
    require(shutil.which("docker-registry") is not None, "docker-registry (Debian package)")
    require(os.geteuid() == 0, "root (to point the engine at a mirror)")
    work = tmp_path_factory.mktemp("registry")
    port = free_port()
    (work / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    server = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    official = stand_ins(docker_client)
    present_before = {ref for ref in official if images.image_exists(docker_client, ref)}
    try:
        for ref, local in official.items():
            repository, tag = ref.split(":")
            # Docker Hub's official images live under library/; others (prom/) as named.
            path = repository if "/" in repository else f"library/{repository}"
            pushed = f"127.0.0.1:{port}/{path}"
            docker_client.images.get(local).tag(pushed, tag)
            for event in docker_client.api.push(pushed, tag=tag, stream=True, decode=True):
                assert "error" not in event, event
            docker_client.images.remove(f"{pushed}:{tag}")
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(ref)
        with engine_mirror(f"http://127.0.0.1:{port}"):
            yield
    finally:
        server.terminate()
        server.wait()
        for ref in set(official) - present_before:
            with contextlib.suppress(docker.errors.APIError):
                docker_client.images.remove(ref)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A fresh clone of the repository: no secrets/, no build/."""
    target = tmp_path / "clone"
    run("git", "clone", "--quiet", str(REPO), str(target))
    assert not (target / "build").exists()
    return target


def compose(binary: str, clone: Path, env: dict[str, str], *args: str,
            timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [*COMPOSES[binary], *args]
    result = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **env}, check=False)
    assert result.returncode == 0 or not check, \
        f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def down(binary: str, clone: Path, env: dict[str, str], files: list[str]) -> None:
    result = compose_down(lambda: compose(binary, clone, env, *files, "down", "--volumes",
                                          "--timeout", "10", check=False))
    assert result.returncode == 0, f"down failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def token_of(clone: Path) -> str:
    return (clone / "secrets" / "api_tokens").read_text().split()[0]


def smoke_and_down(binary: str, clone: Path, env: dict[str, str], files: list[str]) -> None:
    url = f"http://127.0.0.1:{env['CACHESTACK_PORT']}"
    try:
        wait_ready(url)
        lines: list[str] = []
        assert run_smoke(url, token_of(clone), out=lines.append), "\n".join(lines)
    finally:
        down(binary, clone, env, files)


def up(binary: str, clone: Path, env: dict[str, str], files: list[str], *options: str) -> float:
    """`up`, as each compose does it; the seconds until every service is healthy."""
    started = time.monotonic()
    if binary == "v2":
        compose(binary, clone, env, *files, "up", "-d", "--wait", *options)
    else:
        compose(binary, clone, env, *files, "up", "-d", *options)
        wait_ready(f"http://127.0.0.1:{env['CACHESTACK_PORT']}")
    return time.monotonic() - started


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("binary", ["v2", "v1"])
def test_compose_alone_with_a_registry(
    docker_client: docker.DockerClient, binary: str, clone: Path
) -> None:
    """Two commands, docker and compose only: the set-up, then `up`."""
    tool(COMPOSES[binary][0])
    # BuildKit, compose v2's builder, asks Docker Hub itself rather than the engine's mirror:
    # the bases come through the engine first (a user's BuildKit reaches Docker Hub).
    for spec in IMAGES.values():
        repository, tag = spec.base.split(":")
        docker_client.images.pull(repository, tag=tag)
    env = {"COMPOSE_PROJECT_NAME": unique_name("csfr"), "CACHESTACK_PORT": str(free_port())}
    started = time.monotonic()
    # The images' tags name the release, not the code: built again, so that an image an older
    # checkout left under the same tag is not run (docker-compose 1.29's `run` cannot build).
    if binary == "v2":
        compose(binary, clone, env, "run", "--rm", "--build", "setup")
    else:
        compose(binary, clone, env, "build", "setup")
        compose(binary, clone, env, "run", "--rm", "setup")
    setup_s = time.monotonic() - started
    up_s = up(binary, clone, env, [], "--build")
    print(f"compose {binary} from a fresh clone, with a registry: setup {setup_s:.1f}s, "
          f"up to healthy {up_s:.1f}s")
    smoke_and_down(binary, clone, env, [])


@pytest.mark.usefixtures("registry")
def test_the_orchestrator_on_the_official_images(
    docker_client: docker.DockerClient, clone: Path
) -> None:
    project, port = unique_name("csof"), free_port()
    started = time.monotonic()
    result = subprocess.run(
        ["python", "-m", "orchestrate", "up", "--project", project, "--port", str(port),
         "--images", "official"], cwd=clone, capture_output=True, text=True, timeout=1200)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        print(f"orchestrator from a fresh clone on the official images: "
              f"{time.monotonic() - started:.1f}s to smoke checks passed")
        assert result.stdout.count("smoke ok") == 10
        service = docker_client.containers.list(ignore_removed=True, filters={"label": [
            f"org.cachestack.project={project}", "org.cachestack.service=service"]})[0]
        # The image's own layers: the builder's virtualenv copied in, no wheel, no pip run.
        layers = [entry.get("CreatedBy", "") for entry in service.image.history()]
        assert any("COPY dir:" in layer or "COPY --from" in layer for layer in layers)
        assert not any("wheels" in layer or "pip install" in layer for layer in layers), layers
    finally:
        subprocess.run(["python", "-m", "orchestrate", "down", "--project", project,
                        "--volumes"], cwd=clone, capture_output=True, timeout=300)


@pytest.mark.parametrize("binary", ["v2", "v1"])
def test_compose_alone_without_a_registry(binary: str, clone: Path) -> None:
    """One command of the orchestrator's (the images from Debian packages, and the set-up),
    then compose with compose.offline.yml."""
    tool(COMPOSES[binary][0])
    env = {"COMPOSE_PROJECT_NAME": unique_name("csfo"), "CACHESTACK_PORT": str(free_port())}
    started = time.monotonic()
    subprocess.run(["python", "-m", "orchestrate", "build", "--images", "offline",
                    "--env-file", "build/images.env", "--project", env["COMPOSE_PROJECT_NAME"]],
                   cwd=clone, check=True, capture_output=True, timeout=1200)
    files = ["--env-file", "build/images.env", "-f", "docker-compose.yml",
             "-f", "compose.offline.yml"]
    up_s = up(binary, clone, env, files)
    print(f"compose {binary} from a fresh clone, offline: build and set-up "
          f"{time.monotonic() - started - up_s:.1f}s, up to healthy {up_s:.1f}s")
    smoke_and_down(binary, clone, env, files)

