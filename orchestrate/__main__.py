"""Command line: `python -m orchestrate up|down|status|logs|smoke|secrets|build|audit|...`."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import docker.errors

from . import audit, backup, bench, engine, images, rotate
from .containers import project_containers
from .errors import OrchestrateError, reason
from .output import error, say, step
from .secretfiles import api_token, ensure_secrets, expiring_certificates, stage_secrets
from .smoke import run_smoke
from .stack import (
    DEFAULT_MONITORING_PORT,
    DEFAULT_PORT,
    DEFAULT_PROJECT,
    DEFAULT_REPLICAS,
    MAX_REPLICAS,
    Stack,
    describe_stack,
)


def existing(project: str) -> None:
    """Refuse a command for a project with no containers (a typo, or a stack that is down)."""
    if not project_containers(engine.connect(), project):
        raise OrchestrateError(f"project {project} has no containers "
                               f"(python -m orchestrate up --project {project})")


def up(args: argparse.Namespace) -> None:
    if args.monitoring and args.monitoring_port == args.port:
        raise OrchestrateError(f"--port and --monitoring-port cannot both be {args.port}")
    stack = describe_stack(args.project, args.port, args.replicas,
                           args.monitoring_port if args.monitoring else None, args.tls)
    started = time.monotonic()
    timings = engine.up(stack, args.images)
    summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
    say(
        f"stack {stack.project} is up at {engine.service_url(stack)} "
        f"in {time.monotonic() - started:.1f}s ({summary})"
    )


def down(args: argparse.Namespace) -> None:
    removed = engine.down(args.project, args.volumes)
    for item in removed:
        say(f"removed {item}")
    say(f"project {args.project}: " + ("down" if removed else "nothing to remove"))


def running_stack(args: argparse.Namespace, replicas: int = DEFAULT_REPLICAS) -> Stack:
    """The project as it runs: with TLS at the proxy if its proxy was brought up so."""
    tls = engine.serves_tls(engine.connect(), args.project)
    return describe_stack(args.project, args.port, replicas, tls=tls)


def status(args: argparse.Namespace) -> None:
    existing(args.project)
    for row in engine.status(describe_stack(args.project, args.port)):
        say(
            "{service:<9} {container:<28} {id:<12} {state:<10} {health:<10} {ports:<16} "
            "{proxy:<6} {by:<11} {image}".format(**row)
        )
    for warning in expiring_certificates(running_stack(args)):
        say(f"warning: {warning}")


def logs(args: argparse.Namespace) -> None:
    for line in engine.logs(args.project, args.service):
        say(line)


def smoke(args: argparse.Namespace) -> None:
    existing(args.project)
    stack = running_stack(args)
    if not run_smoke(engine.service_url(stack), api_token(),
                     context=engine.service_context(stack)):
        raise OrchestrateError("smoke checks failed")


def secrets(args: argparse.Namespace) -> None:
    # What any format may mount, the proxy's TLS certificate (compose.tls.yml) included.
    stack = describe_stack(args.project, args.port, tls=True)
    created = ensure_secrets(stack)
    say(f"generated {', '.join(created)}" if created else "all secrets present")
    for service in stack.services:
        staged = stage_secrets(stack, service)
        say(f"staged for {service.name}: {', '.join(str(p) for p in staged.values())}")


def build(args: argparse.Namespace) -> None:
    # Every image compose may run, Prometheus's (its profile monitoring) included.
    stack = describe_stack(args.project, args.port, monitoring_port=DEFAULT_MONITORING_PORT)
    with step("images"):
        refs = images.resolve_images(engine.connect(), stack, args.images)
        for key, ref in refs.items():
            say(f"{key}: {ref}")
    if args.env_file:  # for compose: the images' references, and compose's set-up
        lines = [f"CACHESTACK_{key.upper()}_IMAGE={ref}\n" for key, ref in refs.items()]
        try:
            args.env_file.write_text("".join(lines))
        except OSError as exc:
            raise OrchestrateError(f"cannot write {args.env_file}: {exc.strerror}") from None
        say(f"wrote {args.env_file}")
        secrets(args)


def whole_number(text: str, low: int, high: int) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {number}")
    return number


def replica_count(text: str) -> int:
    """--replicas: a whole number from 1 to MAX_REPLICAS (the proxy's slots)."""
    return whole_number(text, 1, MAX_REPLICAS)


def port_number(text: str) -> int:
    """--port, --monitoring-port: a TCP port (0, "any port", is not one to publish on)."""
    return whole_number(text, 1, 65535)


def project_name(text: str) -> str:
    """--project: it names containers, networks, volumes and a folder of staged secrets, so
    it is what compose allows as a project name (and never a path)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a project name (lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit)")
    return text


def file_path(text: str) -> Path:
    """--output, --env-file: a file to write, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent}")
    return path


def backup_command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    path, manifest = backup.backup(describe_stack(args.project, args.port), args.output)
    say(f"backed up project {args.project} to {path} ({manifest.bytes / 2**20:.1f} MiB, "
        f"SHA-256 in {path.name}.sha256) in {time.monotonic() - started:.1f}s")


def restore_command(args: argparse.Namespace) -> int:
    dump = Path(args.file)
    manifest = backup.verify(args.project, dump, args.trust_unsigned)
    client = engine.connect()
    stack = running_stack(args, engine.replica_count(client, args.project))
    if not args.yes:
        say(f"this would replace the database of project {args.project} with {dump} (taken "
            f"{manifest.taken_at}, {manifest.bytes / 2**20:.1f} MiB) and give the cache a new "
            "namespace; run it again with --yes")
        return 2
    started = time.monotonic()
    backup.restore(stack, dump, manifest)
    refs = images.resolve_images(client, stack, args.images)
    engine.realise(client, stack, refs, {})
    if not run_smoke(engine.service_url(stack), api_token(),
                     context=engine.service_context(stack)):
        raise OrchestrateError("restored, but the smoke checks failed")
    say(f"restored project {args.project} from {dump} in {time.monotonic() - started:.1f}s")
    return 0


def rotate_command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    done = rotate.rotate(running_stack(args), args.names)
    say(f"rotated {len(done)} secret(s) of project {args.project} in "
        f"{time.monotonic() - started:.1f}s; the old values are refused now")


def bench_command(args: argparse.Namespace) -> None:
    existing(args.project)
    written = bench.bench(describe_stack(args.project, args.port), args.images, args.seconds)
    say(f"wrote {written.html} and {written.png} (the figures in {written.json.name})")


def audit_command(args: argparse.Namespace) -> int:
    found = audit.audit(args.project)
    say(f"project {args.project}: {audit.summary(found)}")
    return 1 if sum(found.values()) else 0


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line, as every other failure is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--project",
        type=project_name,
        default=DEFAULT_PROJECT,
        help="project name; labels and names all resources (default %(default)s)",
    )
    common.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="host port on 127.0.0.1 for the service (default %(default)s)",
    )
    common.add_argument(
        "--images",
        choices=("official", "offline", "auto"),
        default="auto",
        help="official: build on the pinned official images; offline: build everything from "
        "Debian packages; auto: official if a pull works (default)",
    )
    parser = Parser(prog="orchestrate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, run: Callable[[argparse.Namespace], int | None], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help)
        sub.set_defaults(run=run)
        return sub

    up_command = command("up", up, "build, run, check and smoke-test; replace changed "
                         "replicas one by one")
    up_command.add_argument("--replicas", type=replica_count, default=DEFAULT_REPLICAS,
                            help=f"service replicas behind the proxy (default {DEFAULT_REPLICAS},"
                            f" at most {MAX_REPLICAS})")
    up_command.add_argument("--monitoring", action="store_true",
                            help="also run Prometheus, scraping every replica and the proxy")
    up_command.add_argument("--monitoring-port", type=port_number, default=DEFAULT_MONITORING_PORT,
                            help="its UI on 127.0.0.1 (default %(default)s)")
    up_command.add_argument("--tls", action="store_true",
                            help="the proxy's port speaks TLS only, with secrets/proxy.crt (the "
                            "project CA's, or your own) and secrets/proxy.key")
    command("down", down, "remove the project's resources").add_argument(
        "--volumes", action="store_true", help="also remove the named volumes"
    )
    command("status", status, "containers, health, ports; certificates about to expire")
    command("logs", logs, "last log lines").add_argument(
        "service", nargs="?", help="a service of the stack (default: all)"
    )
    command("smoke", smoke, "run the smoke checks only")
    command("bench", bench_command, "drive the running stack with wrk; write a report to "
            "build/report/").add_argument("--seconds", default=8,
                                          type=lambda t: whole_number(t, 1, bench.MAX_SECONDS),
                                          help="seconds of load per workload (default 8)")
    command("audit", audit_command, "check every cached user against Postgres once, in paced "
            "batches; repair and count what disagrees (exit 1 if any)")
    command(
        "secrets", secrets,
        "generate missing secret files and stage each container's copies (for compose)",
    )
    command("backup", backup_command, "pg_dump the database into backups/").add_argument(
        "--output", type=file_path,
        help="the file to write (default backups/<project>-<UTC time>.dump)")
    restore = command("restore", restore_command,
                      "replace the database with a backup, with a new cache namespace")
    restore.add_argument("file", help="a file `backup` wrote (its .sha256 and .json beside it)")
    restore.add_argument("--yes", action="store_true", help="do it (without: say what it would do)")
    restore.add_argument("--trust-unsigned", action="store_true",
                         help="restore a file whose HMAC does not match secrets/backup_key (not "
                         "made by this orchestrator, or with another key); still as the owner "
                         "role only")
    command("rotate", rotate_command, "new values for secrets, applied while the stack serves"
            ).add_argument("names", nargs="*", metavar="NAME",
                           help=f"what to rotate (default all: {', '.join(rotate.ROTATABLE)})")
    command("build", build, "build the images only").add_argument(
        "--env-file", type=file_path,
        help="for compose: write CACHESTACK_<IMAGE>_IMAGE=<ref> lines here (compose's --env-file) "
        "and do compose's set-up (what `docker compose run --rm setup` does)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.run(args) or 0
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
