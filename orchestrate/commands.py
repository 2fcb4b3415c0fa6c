"""What each command of `python -m orchestrate` does, given its parsed arguments
(orchestrate/__main__.py): one function `<command>_command` each, returning the exit code
(None: 0) or raising OrchestrateError with the one line to print.

`up` records what the stack is brought up with (orchestrate.record); every other command
reads that record, so that what it makes again (restore, rotate) or reaches (smoke, bench) is
the stack as it was brought up, whatever defaults the options have.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from . import audit, backup, bench, engine, images, patroni, record, rotate, sentinels, stream
from .containers import project_containers
from .errors import OrchestrateError
from .output import say, step
from .secretfiles import api_token, ensure_secrets, expiring_certificates, stage_secrets
from .smoke import run_smoke
from .stack import DEFAULT_MONITORING_PORT, Settings, describe_stack


def existing(project: str) -> None:
    """Refuse a command for a project with no containers (a typo, or a stack that is down)."""
    if not project_containers(engine.connect(), project):
        raise OrchestrateError(f"project {project} has no containers "
                               f"(python -m orchestrate up --project {project})")


def chosen_settings(args: argparse.Namespace, recorded: Settings | None) -> Settings:
    """`up`'s settings: the options given, and for the others what the stack was brought up
    with (a new stack: the defaults)."""
    kept = recorded or Settings()
    monitoring = kept.monitoring_port is not None if args.monitoring is None else args.monitoring
    monitoring_port = args.monitoring_port or kept.monitoring_port or DEFAULT_MONITORING_PORT
    settings = Settings(
        port=args.port or kept.port,
        images=args.images or kept.images,
        replicas=args.replicas or kept.replicas,
        monitoring_port=monitoring_port if monitoring else None,
        tls=kept.tls if args.tls is None else args.tls,
        ha=kept.ha if args.ha is None else args.ha,
    )
    if settings.monitoring_port == settings.port:
        raise OrchestrateError(f"--port and --monitoring-port cannot both be {settings.port}")
    return settings


def recorded_settings(args: argparse.Namespace) -> Settings:
    """What the project was brought up with, which a --port given must agree with. A project
    with no containers has nothing to keep: the command finds nothing to act on and says so."""
    client = engine.connect()
    settings = record.read(client, args.project)
    if settings is None:
        if project_containers(client, args.project):
            raise OrchestrateError(
                f"project {args.project} has no record of what it was brought up with (compose "
                "made it, or an older orchestrator): bring it up with `python -m orchestrate up "
                f"--project {args.project}` and its options")
        return Settings()
    if args.port is not None and args.port != settings.port:
        raise OrchestrateError(
            f"project {args.project} was brought up with --port {settings.port}, not "
            f"{args.port}: leave --port out, or move it with `up --port {args.port}`")
    return settings


def up_command(args: argparse.Namespace) -> None:
    settings = chosen_settings(args, record.read(engine.connect(), args.project))
    stack = settings.stack(args.project)
    started = time.monotonic()
    timings = engine.up(stack, settings)
    summary = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
    say(
        f"stack {stack.project} is up at {engine.service_url(stack)} "
        f"in {time.monotonic() - started:.1f}s ({summary})"
    )


def down_command(args: argparse.Namespace) -> None:
    removed = engine.down(args.project, args.volumes)
    for item in removed:
        say(f"removed {item}")
    say(f"project {args.project}: " + ("down" if removed else "nothing to remove"))


def status_command(args: argparse.Namespace) -> None:
    existing(args.project)
    settings = record.read(engine.connect(), args.project)
    # A project the orchestrator did not bring up (compose's): every certificate it may use.
    stack = (settings or Settings(tls=True)).stack(args.project)
    for row in engine.status(stack):
        say(
            "{service:<10} {container:<28} {id:<12} {state:<10} {health:<10} {ports:<16} "
            "{proxy:<6} {by:<11} {image}".format(**row)
        )
    if settings and settings.ha:
        for line in sentinels.status_lines(stack):
            say(line)
    for line in patroni.status_lines(engine.connect(), args.project):
        say(line)
    # Where a stack the orchestrator did not bring up serves, it cannot know.
    if settings and any(service.name == "stream" for service in stack.services):
        say(f"change stream: {stream.describe(stack)}")
    for warning in expiring_certificates(stack):
        say(f"warning: {warning}")


def logs_command(args: argparse.Namespace) -> None:
    for line in engine.logs(args.project, args.service):
        say(line)


def smoke_command(args: argparse.Namespace) -> None:
    existing(args.project)
    stack = recorded_settings(args).stack(args.project)
    if not run_smoke(engine.service_url(stack), api_token(),
                     context=engine.service_context(stack)):
        raise OrchestrateError("smoke checks failed")


def secrets_command(args: argparse.Namespace) -> None:
    # What any format may mount: the proxy's TLS certificate (compose.tls.yml) and the members
    # of the highly available database (compose.ha.yml) included.
    stacks = [describe_stack(args.project, tls=True, ha=ha) for ha in (False, True)]
    created = [name for stack in stacks for name in ensure_secrets(stack)]
    say(f"generated {', '.join(created)}" if created else "all secrets present")
    services = {service.name: (stack, service) for stack in stacks for service in stack.services}
    for stack, service in services.values():
        staged = stage_secrets(stack, service)
        say(f"staged for {service.name}: {', '.join(str(p) for p in staged.values())}")


def build_command(args: argparse.Namespace) -> None:
    # Every image compose may run, Prometheus's (its profile monitoring) and the highly
    # available database's (compose.ha.yml) included.
    single, ha = (describe_stack(args.project, monitoring_port=DEFAULT_MONITORING_PORT, ha=ha)
                  for ha in (False, True))
    stack = dataclasses.replace(single, images={**single.images, **ha.images})
    with step("images"):
        refs = images.resolve_images(engine.connect(), stack, args.images or "auto")
        for key, ref in refs.items():
            say(f"{key}: {ref}")
    if args.env_file:  # for compose: the images' references, and compose's set-up
        lines = [f"CACHESTACK_{key.upper()}_IMAGE={ref}\n" for key, ref in refs.items()]
        try:
            args.env_file.parent.mkdir(exist_ok=True)  # build/ on a fresh clone
            args.env_file.write_text("".join(lines))
        except OSError as exc:
            raise OrchestrateError(f"cannot write {args.env_file}: {exc.strerror}") from None
        say(f"wrote {args.env_file}")
        secrets_command(args)


def backup_command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    path, manifest = backup.backup(args.project, args.output)
    say(f"backed up project {args.project} to {path} ({manifest.bytes / 2**20:.1f} MiB, "
        f"SHA-256 in {path.name}.sha256) in {time.monotonic() - started:.1f}s")


def restore_command(args: argparse.Namespace) -> int:
    dump = Path(args.file)
    manifest = backup.verify(args.project, dump, args.trust_unsigned)
    settings = recorded_settings(args)
    stack = settings.stack(args.project)
    if not args.yes:
        say(f"this would replace the database of project {args.project} with {dump} (taken "
            f"{manifest.taken_at}, {manifest.bytes / 2**20:.1f} MiB) and give the cache a new "
            "namespace; run it again with --yes")
        return 2
    started = time.monotonic()
    backup.restore(stack, dump, manifest)
    client = engine.connect()
    engine.realise(client, stack, images.resolve_images(client, stack, settings.images), {})
    if not run_smoke(engine.service_url(stack), api_token(),
                     context=engine.service_context(stack)):
        raise OrchestrateError("restored, but the smoke checks failed")
    say(f"restored project {args.project} from {dump} in {time.monotonic() - started:.1f}s")
    return 0


def rotate_command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    done = rotate.rotate(recorded_settings(args).stack(args.project), args.names)
    say(f"rotated {len(done)} secret(s) of project {args.project} in "
        f"{time.monotonic() - started:.1f}s; the old values are refused now")


def bench_command(args: argparse.Namespace) -> None:
    existing(args.project)
    settings = recorded_settings(args)
    written = bench.bench(settings.stack(args.project), settings.images, args.seconds)
    say(f"wrote {written.html} and {written.png} (the figures in {written.json.name})")


def audit_command(args: argparse.Namespace) -> int:
    found = audit.audit(args.project)
    say(f"project {args.project}: {audit.summary(found)}")
    return 1 if sum(found.values()) else 0



def switchover_command(args: argparse.Namespace) -> None:
    existing(args.project)
    if not recorded_settings(args).ha:
        raise OrchestrateError(f"project {args.project} has one Postgres, not a Patroni "
                               "cluster: a switchover needs `up --ha`")
    started = time.monotonic()
    former, new = patroni.switchover(engine.connect(), args.project, args.to)
    say(f"project {args.project}: {new} leads, {former} is its replica "
        f"({time.monotonic() - started:.1f}s)")
