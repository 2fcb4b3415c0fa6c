"""Helpers of the deployment-format tests (compose, swarm, Kubernetes): names and environments
for a run, waiting for a stack to be ready; running tools is tests/support.py's run."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable

import requests

from orchestrate.stack import describe_stack
from tests.support import require

# Every secret a format may mount: k8s/ holds the proxy's TLS certificate of `up --tls`, and
# k8s/overlays/ha/ the database's of `up --ha` too.
SECRET_NAMES = describe_stack(tls=True).secrets
HA_SECRET_NAMES = describe_stack(tls=True, ha=True).secrets
READY_TIMEOUT_S = 180


def tool(name: str) -> str:
    """Path of an executable; skip (fail in CI) when it is not installed."""
    path = shutil.which(name)
    require(path is not None, f"the {name} command")
    assert path is not None
    return path


def compose_down(down: Callable[[], subprocess.CompletedProcess[str]],
                 deadline_s: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a compose `down` (`down()`), again while Docker 20.10 still counts an endpoint of a
    container it has just removed ("has active endpoints", moby/moby#43286: the engine's race,
    which compose v1 does not wait out); the last result."""
    deadline = time.monotonic() + deadline_s
    while "has active endpoints" in (result := down()).stderr and time.monotonic() < deadline:
        time.sleep(1)
    return result


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def image_env(refs: dict[str, str]) -> dict[str, str]:
    """CACHESTACK_<KEY>_IMAGE for every image of the stack: how compose and swarm get them."""
    return {f"CACHESTACK_{key.upper()}_IMAGE": ref for key, ref in refs.items()}


def wait_ready(base_url: str, timeout_s: float = READY_TIMEOUT_S, verify: str | bool = True
               ) -> None:
    """Poll GET /readyz through a published 127.0.0.1 port until it answers 200 and says a
    change stream reader has the slot (an https one verified with the CA file `verify`): the
    first reader begins a new cache epoch as it makes the slot, which a check run before
    would see as a lost entry."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = requests.get(f"{base_url}/readyz", timeout=3, verify=verify)
            stream = reply.json().get("stream") if reply.status_code == 200 else None
            if isinstance(stream, dict) and stream.get("reading"):
                return
            last = f"HTTP {reply.status_code} {reply.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(1)
    raise AssertionError(f"{base_url}/readyz not ready after {timeout_s}s: {last}")
