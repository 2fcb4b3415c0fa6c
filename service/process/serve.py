"""`python -m service`: serve the API with granian, a multi-process production server.

granian was chosen by measurement on this project's 2-core machines (bench/RESULTS.md,
"Measurements behind the code"). Each worker process runs a few blocking threads, so that one
request's wait on Postgres or Redis overlaps another's work; many more threads than
that only fight over the GIL. On SIGTERM granian stops taking connections at once, answers
the requests it has, then exits 0 (tests/service/test_shutdown.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from ..settings import THREADS
from . import logs
from .config import ConfigError, Settings

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs this process may keep busy: those it may run on, fewer under a CPU quota (a
    container's `--cpus`, a pod's CPU limit; cgroup v2's cpu.max or v1's CFS quota), rounded
    up, at least 1. A pod limited to one CPU on a 32-CPU node runs one worker, not 32 that
    share that CPU and each hold a worker's memory."""
    cpus = len(os.sched_getaffinity(0))
    for quota_file, period_file in (("cpu.max", None),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup / quota_file).read_text().split()
            if period_file is not None:
                fields.append((cgroup / period_file).read_text().strip())
            quota, period = fields[0], int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if quota not in ("max", "-1") and period > 0:
            cpus = min(cpus, math.ceil(int(quota) / period))
        break
    return max(1, cpus)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0],
                                     epilog="python -m service migrate --help: the schema step; "
                                     "python -m service audit --help: one consistency pass")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="worker processes (default: one per CPU it may use)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"blocking threads per worker (default: THREADS, or {THREADS})")
    return parser.parse_args(argv)


def check_address(host: str, port: int) -> None:
    """Fail with one clear line when the address cannot be listened on (granian would
    print a Rust backtrace)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def hold_stop_signals() -> None:
    """Before a fork: SIGTERM and SIGINT wait, blocked, until the new worker can take them.

    A worker signalled right after its fork lost the signal: Python drops the signals that
    arrive before its after-fork hooks run (tests/service/test_shutdown.py saw it about one
    start in ten on a busy machine), and the worker then served on while the main process
    waited for it for ever. Blocked, a signal stays pending in the kernel instead."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """After a fork, in the main process: what arrived meanwhile is handled now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_outright() -> None:
    """In a worker just forked, until granian installs the worker's own signal handlers:
    SIGTERM and SIGINT stop it at once, the one held since the fork too.

    granian forks its workers with its main process's handlers, which in a worker only set a
    flag in its copy of the server, and installs the worker's own only once the app is
    loaded (a few hundred ms). A worker told to stop meanwhile, as when a replica is stopped
    soon after it started, never heard it: it went on serving, and the main process waited
    for it for ever. A worker that has not started serving has nothing to finish."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    release_stop_signals()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()  # fail now, with one clear line, not in every worker
        check_address(args.host, args.port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure()
    if settings.api_tokens is None:  # said here once, rather than by every worker
        logging.getLogger("service").warning(
            "API_TOKENS_FILE is not set: the API is open to anyone who reaches it")
    threads = args.threads or settings.threads
    # The workers load the app by its import path and read their settings from the
    # environment: this is how they learn the thread count (the pool's default size).
    os.environ["THREADS"] = str(threads)
    # Counters from all workers are summed from files in this directory at scrape time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="cachestack-metrics-")

    from granian import Granian
    from granian.constants import Interfaces

    os.register_at_fork(before=hold_stop_signals, after_in_parent=release_stop_signals,
                        after_in_child=stop_outright)
    Granian(
        "service.wsgi:app",
        address=args.host,
        port=args.port,
        interface=Interfaces.WSGI,
        workers=args.workers,
        blocking_threads=threads,
        respawn_failed_workers=True,
    ).serve()
    return 0

