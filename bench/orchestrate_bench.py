"""Time the orchestrator on this engine: a warm `up` (images present) until the smoke checks
pass, an idempotent `up` of the running stack, and a `down --volumes`.

Usage: python bench/orchestrate_bench.py [--runs N] [--images offline|official|auto]
Images are made present first (not timed); each run uses a throwaway project and port.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import uuid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(*args: str) -> float:
    """Run `python -m orchestrate ARGS`; return its wall time; exit on failure."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrate", *args], capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(
            f"orchestrate {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="auto", choices=("official", "offline", "auto"))
    args = parser.parse_args()
    print(f"images ready in {timed('build', '--images', args.images):.1f}s (not counted)")
    figures: dict[str, list[float]] = {"warm up": [], "idempotent up": [], "down": []}
    for run in range(args.runs):
        project = ["--project", f"bench{uuid.uuid4().hex[:6]}", "--port", str(free_port())]
        try:
            figures["warm up"].append(timed("up", *project, "--images", args.images))
            figures["idempotent up"].append(timed("up", *project, "--images", args.images))
        finally:
            figures["down"].append(timed("down", *project, "--volumes"))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in figures.items()))
    for name, values in figures.items():
        print(
            f"{name:<14} median {statistics.median(values):.1f}s  "
            f"min {min(values):.1f}s  max {max(values):.1f}s  (n={len(values)})"
        )


if __name__ == "__main__":
    main()
