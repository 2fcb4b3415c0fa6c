"""The load generator: wrk driving load.lua (this package's data: the one script every benchmark
of this repository uses, so these figures compare with bench/RESULTS.md's), in a container of
its own on the stack's frontend network, so that the host needs nothing but Docker.

The container is made as the stack's are (orchestrate.containers.create_container): hardened,
as nobody, the API token a secret file (load.lua reads it there: it is in no environment or
command line), named and labelled `<project>-bench-wrk` in the project, so that `down` and
`bench` on its way out remove it. The script and the files of paths it reads are the run's
folder, mounted read-only at /bench. One container per run: its exit code and output are
wrk's.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import docker
from docker.models.containers import Container
from docker.types import Mount

from ..containers import create_container, remove
from ..errors import OrchestrateError
from ..progress import Progress
from ..stack import API_TOKENS, Hardening, SecretMount, Service, Stack, secret_target
from .servers import VARIANT_PREFIX

SCRIPT = Path(__file__).with_name("load.lua")
THREADS, CONNECTIONS = 2, 32  # as bench/run.py drives the service
WORK_TARGET = "/bench"  # where the container finds the run's folder
NOBODY = 65534
POLL_S = 0.25
# How long past its duration a run may take (starting, connecting, writing its figures).
GRACE_S = 60
LOADGEN = Service(
    name=VARIANT_PREFIX + "wrk",
    image="wrk",
    user=f"{NOBODY}:{NOBODY}",
    command=(),
    environment=(("BENCH_TOKEN_FILE", secret_target(API_TOKENS)),),
    secrets=(SecretMount(API_TOKENS, secret_target(API_TOKENS), NOBODY, NOBODY),),
    networks=("frontend",),
    volumes=(),
    healthcheck=None,
    hardening=Hardening(restart="no", mem_limit="128m", pids_limit=64),
)


@dataclass(frozen=True)
class Wrk:
    """What wrk measured in one run (load.lua's BENCH line)."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers and socket errors

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def prepare(work: Path) -> None:
    """Put the script beside the run's files of paths, all readable by the container's user
    (nobody): they hold the seeded users' ids and emails, nothing secret."""
    shutil.copy(SCRIPT, work / SCRIPT.name)
    work.chmod(0o755)
    for path in work.iterdir():
        path.chmod(0o644)


def paths_args(name: str) -> tuple[str, ...]:
    """load.lua's `paths` mode on the run's file `name`: each thread walks its share of it,
    round and round."""
    return ("paths", f"{WORK_TARGET}/{name}", str(THREADS))


def create_args(tag: str) -> tuple[str, ...]:
    """load.lua's `create` mode: a user with a new username and email on every request."""
    return ("create", "ours", str(THREADS), f"bench_{tag}_c")


def parse(output: str) -> Wrk:
    """load.lua's BENCH line (its done() writes the figures as JSON)."""
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise OrchestrateError("wrk printed no figures", output.strip().splitlines()[-5:])
    figures = json.loads(line.removeprefix("BENCH "))
    return Wrk(requests=figures["requests"], seconds=figures["duration_us"] / 1e6,
               p50_ms=figures["p50_us"] / 1000, p99_ms=figures["p99_us"] / 1000,
               errors=figures["status_errors"] + figures["socket_errors"])


@dataclass(frozen=True)
class Generator:
    """wrk runs against `stack`, from the image `image`, reading the run's folder `work`."""

    client: docker.DockerClient
    stack: Stack
    image: str
    work: Path

    def run(self, url: str, args: tuple[str, ...], seconds: int, progress: Progress,
            label: str) -> Wrk:
        """Drive `url` (on the frontend network) for `seconds` with load.lua's `args`, showing
        the progress as it runs."""
        command = (f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
                   "-s", f"{WORK_TARGET}/{SCRIPT.name}", url, "--", *args)
        work = Mount(WORK_TARGET, str(self.work), type="bind", read_only=True)
        container = create_container(self.client, self.stack, replace(LOADGEN, command=command),
                                     self.image, "bench", binds=[work])
        try:
            container.start()
            progress.start(label, seconds)
            started = time.monotonic()
            while _running(container):
                elapsed = time.monotonic() - started
                if elapsed > seconds + GRACE_S:
                    raise OrchestrateError(f"wrk did not finish {seconds} s of load on {url} "
                                           f"within {seconds + GRACE_S} s")
                progress.show(elapsed)
                time.sleep(POLL_S)
            code = container.wait()["StatusCode"]
            out = container.logs(stdout=True, stderr=False).decode(errors="replace")
            err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        finally:
            remove(container)
        progress.finish()
        if code != 0:
            raise OrchestrateError(f"wrk exited {code} on {url}",
                                   (err or out).strip().splitlines()[-5:])
        return parse(out)


def _running(container: Container) -> bool:
    container.reload()
    return container.status in ("created", "running")
