"""The stack's images: each is built from a recipe in this repository on a base image.

With a registry the bases are the pinned official images (postgres, redis, python). Without
one (offline) every base is made from Debian packages instead: debootstrap makes a Debian
base image, and docker/offline/<name> stands in for the official postgres and redis images
on it. Every image is tagged with a hash of its recipe and its base's id (12 hex digits), so
it is built once and reused by every later `up`, test and CI step on the same engine:
  cachestack-offline/base:<hash>      debootstrap (docker/offline/base/mkrootfs.sh) + import
  cachestack-offline/postgres:<hash>  docker/offline/postgres on that base
  cachestack-offline/redis:<hash>     docker/offline/redis on that base
  cachestack/postgres:<hash>          docker/postgres on postgres:<tag> or its stand-in
  cachestack/redis:<hash>             docker/redis on redis:<tag> or its stand-in
  cachestack/service:<hash>           the root Dockerfile on python:<tag> or the Debian base
The service image's builder installs the locked files (requirements/*.lock, hashes checked): with
a registry from PyPI, as any other build of the root Dockerfile does; offline from wheels the
host downloads into build/wheels first, because pip inside a build cannot be relied on to reach
PyPI there.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import docker.errors

from .errors import OrchestrateError, reason
from .output import say, tail
from .paths import BUILD, ROOT
from .stack import ImageSpec, Stack

IMAGE_LABEL = "org.cachestack.image"
PULL_TIMEOUT_S = 60
PULL_PROBE_TIMEOUT_S = 3
OFFLINE_BASE_RECIPE = "docker/offline/base/mkrootfs.sh"
# What the root Dockerfile's virtualenvs install (`bash scripts/lock.sh` makes them).
LOCKS = ("requirements/service.lock", "requirements/setup.lock")


def tree_hash(paths: list[Path], *extra: str) -> str:
    """sha256 over file names and contents (sorted) plus extra strings."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:12]


def files_under(rel: str) -> list[Path]:
    """Source files under a repo-relative directory, without caches."""
    base = ROOT / rel
    return [
        p
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]


@contextmanager
def build_lock() -> Iterator[None]:
    """Serialise image builds of concurrent orchestrator runs on this machine."""
    BUILD.mkdir(exist_ok=True)
    with open(BUILD / ".image-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def stream_build(client: docker.DockerClient, tag: str, what: str, **kwargs: object) -> None:
    """Run a docker build, streaming its progress; raise with the last lines on failure."""
    say(f"building {what} -> {tag}")
    lines: list[str] = []
    started = time.monotonic()
    for chunk in client.api.build(
        tag=tag, decode=True, rm=True, forcerm=True, labels={IMAGE_LABEL: tag}, **kwargs
    ):
        text = chunk.get("stream") or chunk.get("status") or ""
        for line in text.splitlines():
            if line.strip():
                lines.append(line)
                say(f"  | {line}")
        if "error" in chunk:
            lines.append(chunk["error"].strip())
            raise OrchestrateError(f"build of {what} failed: {chunk['error'].strip()}", tail(lines))
    if not image_exists(client, tag):
        raise OrchestrateError(f"build of {what} produced no image {tag}", tail(lines))
    say(f"built {tag} in {time.monotonic() - started:.1f}s")


def run_streamed(cmd: list[str], what: str) -> None:
    """Run a host command, streaming its output; raise with the last lines on failure."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        say(f"  | {line.rstrip()}")
    if proc.wait() != 0:
        raise OrchestrateError(f"{what} failed (exit {proc.returncode})", tail(lines))


def ensure_offline_base(client: docker.DockerClient) -> str:
    """Debian bookworm + python3 via debootstrap, imported as an image (built once)."""
    recipe = ROOT / OFFLINE_BASE_RECIPE
    tag = f"cachestack-offline/base:{tree_hash([recipe])}"
    if image_exists(client, tag):
        say(f"reusing {tag}")
        return tag
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise OrchestrateError(
            "the offline base image needs root and debootstrap (apt-get install -y debootstrap)"
        )
    work = BUILD / "offline-base"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rootfs, archive = work / "rootfs", work / "rootfs.tar"
    started = time.monotonic()
    say(f"building offline base -> {tag} (debootstrap bookworm)")
    try:
        run_streamed(["sh", str(recipe), str(rootfs)], "debootstrap")
        run_streamed(["tar", "-C", str(rootfs), "-cf", str(archive), "."], "tar of rootfs")
        repo, _, version = tag.partition(":")
        client.api.import_image(
            src=str(archive),
            repository=repo,
            tag=version,
            changes=["ENV LANG=C.UTF-8", 'CMD ["bash"]', f"LABEL {IMAGE_LABEL}={tag}"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not image_exists(client, tag):
        raise OrchestrateError(f"docker import produced no image {tag}")
    say(f"built {tag} in {time.monotonic() - started:.1f}s")
    return tag


def build_recipe(client: docker.DockerClient, repository: str, context: str, base: str,
                 dockerfile: str = "Dockerfile", sources: tuple[str, ...] = ()) -> str:
    """Build `dockerfile` in `context` on `base`, unless an image of the same recipe (the
    files under `sources`, by default the context's) and base exists; return its tag."""
    base_id = client.images.get(base).id
    recipe = [path for folder in sources or (context,) for path in files_under(folder)]
    if sources:
        recipe.append(ROOT / context / dockerfile)
    tag = f"{repository}:{tree_hash(recipe, base_id)}"
    if image_exists(client, tag):
        say(f"reusing {tag}")
        return tag
    stream_build(client, tag, f"{repository} image", path=str(ROOT / context),
                 dockerfile=dockerfile, buildargs={"BASE_IMAGE": base})
    prune_older(client, tag)
    return tag


def download_wheels() -> Path:
    """`pip download` the locked wheels, their hashes checked, into build/wheels on the host, for
    the image build's WHEELS=host (a build here cannot be relied on to reach PyPI). pip picks
    the wheels for the Python it runs on, so this one must be CPython 3.11 on Linux x86_64, as
    the image's is."""
    wheels = BUILD / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    say("downloading the locked wheels on the host -> build/wheels")
    run_streamed(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--require-hashes", "--no-deps", "--only-binary", ":all:", "--dest", str(wheels),
         *(arg for lock in LOCKS for arg in ("--requirement", str(ROOT / lock)))],
        "pip download",
    )
    return wheels


def ensure_service_image(
    client: docker.DockerClient, spec: ImageSpec, base: str, offline: bool
) -> str:
    """Build the root Dockerfile's service stage on `base`, unless present: from PyPI, or
    (offline) from wheels downloaded on the host first."""
    wheels = "host" if offline else "pypi"
    sources = [*files_under("service"), *files_under("orchestrate"), *files_under("requirements"),
               *(ROOT / name for name in (spec.dockerfile, "pyproject.toml", "README.md",
                                          ".dockerignore"))]
    tag = f"{spec.repository}:{tree_hash(sources, client.images.get(base).id, wheels)}"
    if image_exists(client, tag):
        say(f"reusing {tag}")
        return tag
    if offline:
        download_wheels()
    stream_build(
        client,
        tag,
        "service image",
        path=str(ROOT),
        dockerfile=spec.dockerfile,
        target="service",
        buildargs={"BASE_IMAGE": base, "WHEELS": wheels},
        pull=False,
    )
    prune_older(client, tag)
    return tag


def prune_older(client: docker.DockerClient, keep: str) -> None:
    """Remove earlier builds of the same repository that no container uses any more."""
    repo = keep.partition(":")[0]
    for image in client.images.list(name=repo):
        if keep in image.tags:
            continue
        try:
            client.images.remove(image.id)
        except docker.errors.APIError:  # still used by a container: keep it
            continue
        say(f"removed unused older image {', '.join(image.tags) or image.short_id}")


def official_refs(stack: Stack) -> list[str]:
    """Every registry reference the official mode needs: the bases of the stack's images."""
    return list(dict.fromkeys(spec.base for spec in stack.images.values()))


def pull(ref: str, read_timeout_s: float = PULL_TIMEOUT_S) -> None:
    """Pull one image, streaming; fail when the engine stays silent for `read_timeout_s`.

    A registry that answers sends progress at once, so a short read timeout only cuts off an
    engine that is still resolving or dialling an unreachable registry.
    """
    client = docker.from_env(version="auto", timeout=read_timeout_s)
    repo, _, tag = ref.rpartition(":")
    for event in client.api.pull(repo, tag=tag, stream=True, decode=True):
        if "error" in event:
            raise OrchestrateError(event["error"].strip())
    client.images.get(ref)


def choose_mode(client: docker.DockerClient, stack: Stack, mode: str) -> str:
    """Resolve `auto` to official (all present or a pull works) or offline, and say why."""
    if mode != "auto":
        return mode
    missing = [ref for ref in official_refs(stack) if not image_exists(client, ref)]
    if not missing:
        say("images: official (all pinned official images are present)")
        return "official"
    try:
        pull(missing[0], read_timeout_s=PULL_PROBE_TIMEOUT_S)
    except Exception as exc:  # any pull failure means: go offline
        say(f"images: offline (pull of {missing[0]} failed: {reason(exc)})")
        return "offline"
    say(f"images: official (pull of {missing[0]} works)")
    return "official"


def pull_missing(client: docker.DockerClient, refs: list[str]) -> None:
    for ref in refs:
        if not image_exists(client, ref):
            say(f"pulling {ref}")
            try:
                pull(ref)
            except Exception as exc:
                raise OrchestrateError(
                    f"cannot pull {ref}: {reason(exc)} (use --images offline)"
                ) from None


def resolve_images(client: docker.DockerClient, stack: Stack, mode: str) -> dict[str, str]:
    """Make every image of the stack present; return image key -> local reference."""
    mode = choose_mode(client, stack, mode)
    refs: dict[str, str] = {}
    with build_lock():
        if mode == "official":
            pull_missing(client, official_refs(stack))
        else:
            debian = ensure_offline_base(client)
        for key, spec in stack.images.items():
            if mode == "official":
                base = spec.base
            elif spec.offline_base is None:
                base = debian
            else:
                base = build_recipe(client, f"cachestack-offline/{key}", spec.offline_base, debian)
            if spec.host_wheels:
                refs[key] = ensure_service_image(client, spec, base, mode != "official")
            else:
                refs[key] = build_recipe(client, spec.repository, spec.context, base,
                                         spec.dockerfile, spec.sources)
    return refs
