"""Command line: `python -m orchestrate up|down|status|logs|smoke|secrets|build`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import docker.errors

from . import engine, images
from .errors import OrchestrateError, reason
from .output import error, say, step
from .secretfiles import ensure_secrets, stage_secrets
from .smoke import run_smoke
from .stack import DEFAULT_PORT, DEFAULT_PROJECT, describe_stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--project",
        default=DEFAULT_PROJECT,
        help="project name; labels and names all resources (default %(default)s)",
    )
    common.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="host port on 127.0.0.1 for the service (default %(default)s)",
    )
    common.add_argument(
        "--images",
        choices=("official", "offline", "auto"),
        default="auto",
        help="official: pull pinned images; offline: build from Debian "
        "packages; auto: official if a pull works (default)",
    )
    parser = argparse.ArgumentParser(prog="orchestrate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", parents=[common], help="build, run, check and smoke-test")
    down = commands.add_parser("down", parents=[common], help="remove the project's resources")
    down.add_argument("--volumes", action="store_true", help="also remove the named volumes")
    commands.add_parser("status", parents=[common], help="containers, health, ports")
    logs = commands.add_parser("logs", parents=[common], help="last log lines")
    logs.add_argument("service", nargs="?", help="postgres, redis or service (default: all)")
    commands.add_parser("smoke", parents=[common], help="run the smoke checks only")
    commands.add_parser(
        "secrets", parents=[common],
        help="generate missing secret files and stage each container's copies (for compose)",
    )
    build = commands.add_parser("build", parents=[common], help="build or pull the images only")
    build.add_argument(
        "--env-file",
        help="also write CACHESTACK_<IMAGE>_IMAGE=<ref> lines here (for docker-compose --env-file)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    stack = describe_stack(args.project, args.port)
    if args.command == "up":
        started = time.monotonic()
        timings = engine.up(stack, args.images)
        summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
        say(
            f"stack {stack.project} is up at {engine.service_url(stack)} "
            f"in {time.monotonic() - started:.1f}s ({summary})"
        )
    elif args.command == "down":
        removed = engine.down(stack.project, args.volumes)
        for item in removed:
            say(f"removed {item}")
        say(f"project {stack.project}: " + ("down" if removed else "nothing to remove"))
    elif args.command == "status":
        rows = engine.status(stack.project)
        if not rows:
            say(f"project {stack.project}: no containers")
        for row in rows:
            say(
                "{service:<9} {container:<28} {id:<12} {state:<10} {health:<10} {ports:<16} "
                "{image}".format(**row)
            )
    elif args.command == "logs":
        for line in engine.logs(stack.project, args.service):
            say(line)
    elif args.command == "smoke":
        engine.connect()
        if not run_smoke(engine.service_url(stack)):
            raise OrchestrateError("smoke checks failed")
    elif args.command == "secrets":
        created = ensure_secrets(stack)
        say(f"generated {', '.join(created)}" if created else "all secrets present")
        for service in stack.services:
            staged = stage_secrets(stack, service)
            say(f"staged for {service.name}: {', '.join(str(p) for p in staged.values())}")
    elif args.command == "build":
        with step("images"):
            refs = images.resolve_images(engine.connect(), stack, args.images)
            for key, ref in refs.items():
                say(f"{key}: {ref}")
        if args.env_file:
            lines = [f"CACHESTACK_{key.upper()}_IMAGE={ref}\n" for key, ref in refs.items()]
            Path(args.env_file).write_text("".join(lines))
            say(f"wrote {args.env_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except OrchestrateError as exc:
        error(exc.message, exc.log_lines)
    except docker.errors.DockerException as exc:
        error(f"Docker engine error: {reason(exc, 300)}", [])
    except KeyboardInterrupt:
        error("interrupted", [])
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
