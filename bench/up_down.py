"""Time the orchestrator on this engine: a warm `up` (images present) until the smoke checks
pass, an idempotent `up` of the running stack, and a `down --volumes`.

Usage: python bench/up_down.py [--runs N] [--images offline|official|auto]
Images are made present first (not timed); each run uses a throwaway project and port. The
baseline, timed in every run, is one `docker run --rm` of the service image: the figures are
also printed as multiples of it, which a faster or slower machine changes less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

from processes import free_port


def timed_command(*command: str) -> float:
    """Run a command; return its wall time; exit on failure."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(
            f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed


def timed(*args: str) -> float:
    """Run `python -m orchestrate ARGS`; return its wall time."""
    return timed_command(sys.executable, "-m", "orchestrate", *args)


def service_image(mode: str) -> str:
    """Make the images present (not timed) and return the service image's reference."""
    env_file = f"/tmp/orchestrate-bench-{os.getpid()}.env"
    timed("build", "--images", mode, "--env-file", env_file)
    with open(env_file) as handle:
        refs = dict(line.strip().split("=", 1) for line in handle if "=" in line)
    os.unlink(env_file)
    return refs["CACHESTACK_SERVICE_IMAGE"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="auto", choices=("official", "offline", "auto"))
    args = parser.parse_args()
    image = service_image(args.images)
    figures: dict[str, list[float]] = {"baseline": [], "warm up": [], "idempotent up": [],
                                       "down": []}
    for run in range(args.runs):
        figures["baseline"].append(timed_command("docker", "run", "--rm", image, "true"))
        project = ["--project", f"bench{uuid.uuid4().hex[:6]}", "--port", str(free_port())]
        try:
            figures["warm up"].append(timed("up", *project, "--images", args.images))
            figures["idempotent up"].append(timed("up", *project, "--images", args.images))
        finally:
            figures["down"].append(timed("down", *project, "--volumes"))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in figures.items()))
    baseline = statistics.median(figures["baseline"])
    for name, values in figures.items():
        median = statistics.median(values)
        print(
            f"{name:<14} median {median:.1f}s  min {min(values):.1f}s  max {max(values):.1f}s  "
            f"(n={len(values)})  = {median / baseline:.1f}x one docker run"
        )


if __name__ == "__main__":
    main()
