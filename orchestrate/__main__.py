"""Command line: `python -m orchestrate COMMAND [options]` (`--help` lists the commands). The
options are parsed here; each command is a function of orchestrate.commands."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import docker.errors

from . import commands, paths, rotate
from .bench import MAX_SECONDS
from .errors import OrchestrateError, reason
from .output import error
from .stack import (
    DEFAULT_MONITORING_PORT,
    DEFAULT_PORT,
    DEFAULT_PROJECT,
    DEFAULT_REPLICAS,
    MAX_REPLICAS,
    PATRONI_MEMBERS,
)

Handler = Callable[[argparse.Namespace], int | None]
IMAGE_MODES = ("official", "offline", "auto")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line, as every other failure is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {number}")
        return number

    return parse


# --port, --monitoring-port: a TCP port (0, "any port", is not one to publish on).
port_number = whole_number(1, 65535)


def project_name(text: str) -> str:
    """--project: it names containers, networks, volumes and a folder of staged secrets, so
    it is what compose allows as a project name (and never a path)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a project name (lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit)")
    return text


def file_path(text: str) -> Path:
    """--output: a file to write, in a folder that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent}")
    return path


def env_file_path(text: str) -> Path:
    """--env-file: as --output, or a file in build/, the orchestrator's own folder, which
    `build` makes on a fresh clone."""
    if Path(text).parent.resolve() == paths.BUILD:
        return Path(text)
    return file_path(text)


def common_options() -> argparse.ArgumentParser:
    """The options every command takes. Only `up` changes the port; another command given
    one checks that it is the stack's."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", type=project_name, default=DEFAULT_PROJECT,
                        help="project name; labels and names all resources (default %(default)s)")
    common.add_argument("--port", type=port_number,
                        help=f"host port on 127.0.0.1 for the service (a new stack: "
                        f"{DEFAULT_PORT}; then: what it was brought up with)")
    return common


def images_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--images", choices=IMAGE_MODES,
                         help="official: build on the pinned official images; offline: build "
                         "everything from Debian packages; auto: official if a pull works (the "
                         "default of a new stack)")


def up_options(up: argparse.ArgumentParser) -> None:
    """`up`'s options; one not given keeps what the stack was brought up with."""
    images_option(up)
    up.add_argument("--replicas", type=whole_number(1, MAX_REPLICAS),
                    help=f"service replicas behind the proxy (a new stack: {DEFAULT_REPLICAS}; "
                    f"at most {MAX_REPLICAS})")
    up.add_argument("--monitoring", action=argparse.BooleanOptionalAction,
                    help="also run Prometheus, scraping every replica and the proxy")
    up.add_argument("--monitoring-port", type=port_number,
                    help=f"its UI on 127.0.0.1 (default {DEFAULT_MONITORING_PORT})")
    up.add_argument("--tls", action=argparse.BooleanOptionalAction,
                    help="the proxy's port speaks TLS only, with secrets/proxy.crt (the "
                    "project CA's, or your own) and secrets/proxy.key")
    up.add_argument("--ha", action=argparse.BooleanOptionalAction,
                    help="Postgres and Redis highly available: a Patroni cluster, and a Redis "
                    "primary, its replica and three Sentinels")


def down_options(down: argparse.ArgumentParser) -> None:
    down.add_argument("--volumes", action="store_true", help="also remove the named volumes")


def logs_options(logs: argparse.ArgumentParser) -> None:
    logs.add_argument("service", nargs="?", help="a service of the stack (default: all)")


def bench_options(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--seconds", type=whole_number(1, MAX_SECONDS), default=8,
                       help="seconds of load per workload (default 8)")


def backup_options(backup: argparse.ArgumentParser) -> None:
    backup.add_argument("--output", type=file_path,
                        help="the file to write (default backups/<project>-<UTC time>.dump)")


def restore_options(restore: argparse.ArgumentParser) -> None:
    restore.add_argument("file", help="a file `backup` wrote (its .sha256 and .json beside it)")
    restore.add_argument("--yes", action="store_true",
                         help="do it (without: say what it would do)")
    restore.add_argument("--trust-unsigned", action="store_true",
                         help="restore a file whose HMAC does not match secrets/backup_key (not "
                         "made by this orchestrator, or with another key); still as the owner "
                         "role only")


def rotate_options(rotate_: argparse.ArgumentParser) -> None:
    rotate_.add_argument("names", nargs="*", metavar="NAME",
                         help=f"what to rotate (default all: {', '.join(rotate.ROTATABLE)})")


def build_options(build: argparse.ArgumentParser) -> None:
    images_option(build)
    build.add_argument("--env-file", type=env_file_path,
                       help="for compose: write CACHESTACK_<IMAGE>_IMAGE=<ref> lines here "
                       "(compose's --env-file) and do compose's set-up (what `docker compose "
                       "run --rm setup` does)")


def switchover_options(switchover: argparse.ArgumentParser) -> None:
    switchover.add_argument("--to", choices=PATRONI_MEMBERS, metavar="MEMBER",
                            help="the member that takes the lead: the synchronous standby, the "
                            "one with every commit (the default); one of "
                            f"{', '.join(PATRONI_MEMBERS)}")


def no_options(command: argparse.ArgumentParser) -> None:
    pass


# name: (what it does, its function, its own options)
COMMANDS: dict[str, tuple[str, Handler, Callable[[argparse.ArgumentParser], None]]] = {
    "up": ("build, run, check and smoke-test; replace changed replicas one by one",
           commands.up_command, up_options),
    "down": ("remove the project's resources", commands.down_command, down_options),
    "status": ("containers, health, ports; whether the change stream is read, and how far "
               "behind; certificates about to expire",
               commands.status_command, no_options),
    "logs": ("last log lines", commands.logs_command, logs_options),
    "smoke": ("run the smoke checks only", commands.smoke_command, no_options),
    "bench": ("drive the running stack with wrk; write a report to build/report/",
              commands.bench_command, bench_options),
    "audit": ("check every cached user against Postgres once, in paced batches; repair and "
              "count what disagrees (exit 1 if any)", commands.audit_command, no_options),
    "secrets": ("generate missing secret files and stage each container's copies (for compose)",
                commands.secrets_command, no_options),
    "backup": ("pg_dump the database into backups/", commands.backup_command, backup_options),
    "restore": ("replace the database with a backup, with a new cache namespace",
                commands.restore_command, restore_options),
    "rotate": ("new values for secrets, applied while the stack serves", commands.rotate_command,
               rotate_options),
    "build": ("build the images only", commands.build_command, build_options),
    "switchover": ("hand the lead of the Patroni cluster (up --ha) to another member",
                   commands.switchover_command, switchover_options),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="orchestrate", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True)
    common = common_options()
    for name, (summary, handler, options) in COMMANDS.items():
        command = subcommands.add_parser(name, parents=[common], help=summary)
        command.set_defaults(run=handler)
        options(command)
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
