"""The locks the root Dockerfile installs from (requirements/*.lock, made by
`bash scripts/lock.sh`) against pyproject.toml, and the service image against its lock.

A dependency changed in pyproject.toml without the locks being made again fails here, and so
does a lock line the images could not install with `pip install --require-hashes --no-deps`;
the image build refuses a wheel the lock does not list, and a lock that lacks a dependency for
the image's Python.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from orchestrate import images
from tests.support import REPO, run_once

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_BACKEND = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
ORCHESTRATE = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["orchestrate"]]
# What each lock must hold: what its virtualenv installs, and the backend that builds the package.
LOCKED = {
    "requirements/service.lock": [*RUNTIME, *BUILD_BACKEND],
    "requirements/setup.lock": [*RUNTIME, *ORCHESTRATE, *BUILD_BACKEND],
}
HASH = "--hash=sha256:"


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def read_lock(path: str) -> dict[str, Pin]:
    """Canonical name -> its pin, from a lock in pip's requirements format."""
    text = (REPO / path).read_text().replace("\\\n", " ")
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *hashes = (part.strip() for part in line.split(HASH))
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in hashes), line
        parsed = Requirement(requirement)
        # One platform, no markers: a marker would leave a package out of the wheels the host
        # downloads for the offline image when the host's Python differs from the image's.
        assert parsed.marker is None and parsed.url is None, line
        (pin,) = parsed.specifier
        assert pin.operator == "==" and "*" not in pin.version, line
        name = canonicalize_name(parsed.name)
        assert name not in pins, f"{name} twice in {path}"
        pins[name] = Pin(pin.version, frozenset(hashes))
    return pins


def test_every_lock_the_images_install_is_checked_here() -> None:
    assert set(LOCKED) == set(images.LOCKS)


@pytest.mark.parametrize("lock", sorted(LOCKED))
def test_every_lock_line_is_one_version_with_its_hashes(lock: str) -> None:
    pins = read_lock(lock)
    assert pins
    assert all(pin.hashes for pin in pins.values()), [n for n, p in pins.items() if not p.hashes]


@pytest.mark.parametrize("lock", sorted(LOCKED))
def test_every_dependency_in_pyproject_is_locked_at_a_version_it_allows(lock: str) -> None:
    pins = read_lock(lock)
    for requirement in LOCKED[lock]:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {lock}: bash scripts/lock.sh"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{lock} has {name}=={pins[name].version}, pyproject.toml wants {requirement}: "
            "bash scripts/lock.sh")


def test_the_setup_has_the_services_dependencies_at_the_same_files() -> None:
    service, setup = read_lock("requirements/service.lock"), read_lock("requirements/setup.lock")
    assert {name: setup.get(name) for name in service} == service


INSTALLED = (
    "import importlib.metadata as m\n"
    "for d in m.distributions(): print(d.metadata['Name'], d.version)"
)


def test_the_service_image_has_exactly_the_locked_versions(
    docker_client: Any, stack_images: dict[str, str]
) -> None:
    """What the service's virtualenv holds: the lock without the build backend (removed with
    pip after the build), and the package itself."""
    output = run_once(docker_client, stack_images["service"], ["python", "-c", INSTALLED],
                      network_disabled=True)
    installed = dict(line.split() for line in output.decode().splitlines())
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    backend = {canonicalize_name(r.name) for r in BUILD_BACKEND}
    locked = {name: pin.version for name, pin in read_lock("requirements/service.lock").items()
              if name not in backend}
    assert installed == {**locked, "cachestack": PYPROJECT["project"]["version"]}


# What the root Dockerfile's build context holds (.dockerignore), bar build/wheels.
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "service", "orchestrate",
           "requirements")


def offline_context(tmp_path: Path) -> Path:
    """A copy of the root Dockerfile's context with the wheels the host downloads for the
    offline build, to be spoilt by a test."""
    context = tmp_path / "context"
    context.mkdir()
    for name in CONTEXT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, context / name)
    with images.build_lock():  # build/wheels is remade by every offline build of this checkout
        shutil.copytree(images.download_wheels(), context / "build" / "wheels")
    return context


def replace_a_wheel(context: Path) -> None:
    """A file under a locked wheel's name that is not the locked file (a tampered mirror)."""
    (wheel,) = (context / "build" / "wheels").glob("blinker-*.whl")
    wheel.write_bytes(wheel.read_bytes() + b"\0")


def drop_async_timeout(context: Path) -> None:
    """A lock resolved for a later Python than Debian's 3.11.2, where redis-py needs it."""
    lock = context / "requirements" / "service.lock"
    lock.write_text(re.sub(r"async-timeout==.*?# via redis\n", "", lock.read_text(), flags=re.S))


@pytest.mark.parametrize(("spoil", "refusal"), [
    (replace_a_wheel, "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE"),
    (drop_async_timeout, r"redis \S+ requires async-timeout, which is not installed"),
])
def test_the_build_refuses_what_the_lock_does_not_say(
    docker_client: Any, tmp_path: Path, spoil: Callable[[Path], None], refusal: str
) -> None:
    base = images.ensure_offline_base(docker_client)
    context = offline_context(tmp_path)
    spoil(context)
    with pytest.raises(docker.errors.BuildError) as failed:
        docker_client.images.build(path=str(context), target="builder", rm=True, forcerm=True,
                                   buildargs={"BASE_IMAGE": base, "WHEELS": "host"})
    log = "".join(entry.get("stream", "") for entry in failed.value.build_log)
    assert re.search(refusal, log), log[-3000:]
