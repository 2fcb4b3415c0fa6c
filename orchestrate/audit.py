"""`python -m orchestrate audit`: one full consistency pass over a running stack's cache.

The pass runs where the service runs: `python -m service audit --json` (service/cache/audit.py)
executed in one of the running replicas, with the replica's image, secrets, Redis user and
network, so it needs nothing the stack does not already have and reaches nothing it could
not. It checks every user entry and pointer Redis holds against Postgres in paced batches
(100 keys, then a pause), so the service it shares Redis and Postgres with barely notices;
it re-checks each disagreement after the auditor's grace period and deletes what persisted,
as a write would (every replica's near cache hears of it). Its JSON lines drive the progress
bars here (orchestrate/progress.py), and the counts by kind end the output. Exit 1 if it
found any inconsistency, 0 if none; one error line when there is no running stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import docker
from docker.models.containers import Container

from .containers import connect, exec_output, project_containers
from .errors import OrchestrateError
from .output import say
from .progress import Progress
from .stack import REPLICA_LABEL

SERVICE = "service"
COMMAND = ["python", "-m", "service", "audit", "--json"]
LABEL = "cached keys audited"
KINDS = {"value": "stale values", "pointer": "stale pointers", "nobody": "wrong nobodies"}


def replica(client: docker.DockerClient, project: str) -> Container:
    """A running replica of the service, to run the pass in; or one error saying there is
    none."""
    running = [c for c in project_containers(client, project, SERVICE)
               if c.status == "running" and c.labels.get(REPLICA_LABEL)]
    if not running:
        raise OrchestrateError(
            f"project {project} has no running service replica: start it with "
            f"`python -m orchestrate up --project {project}`")
    return running[0]


def _lines(chunks: Iterable[tuple[bytes, bytes]], progress_note: list[str]) -> Iterator[dict]:
    """The pass's JSON lines from its stdout as they come; its stderr lines (one per repair)
    go into `progress_note`."""
    pending, errors = b"", b""
    for out, err in chunks:
        pending += out
        errors += err
        *whole, pending = pending.split(b"\n")
        *done_errors, errors = errors.split(b"\n")
        progress_note += [line.decode(errors="replace") for line in done_errors if line]
        for line in whole:
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


def audit(project: str) -> dict[str, int]:
    """Run the full pass in a replica of `project`, with a progress bar; its counts by kind."""
    client = connect()
    container = replica(client, project)
    notes: list[str] = []
    found: dict[str, int] | None = None
    chunks = exec_output(container, COMMAND, container.attrs["Config"]["User"])
    with ExitStack() as open_bars:
        progress: Progress | None = None
        try:
            for line in _lines(chunks, notes):
                if "found" in line:
                    found = line["found"]
                    continue
                if progress is None:
                    progress = open_bars.enter_context(Progress(line["total"], "keys"))
                    progress.note(f"auditing {line['total']} cached keys of project {project} "
                                  f"in {container.name}, in paced batches")
                    progress.start(LABEL, line["total"])
                progress.show(line["done"])
                while notes:
                    progress.note(notes.pop(0))
        except (ValueError, KeyError, TypeError) as exc:
            raise OrchestrateError(f"{container.name}: the audit's output is not what this "
                                   f"orchestrator expects ({exc}); is its image older?") from None
        if progress is not None:
            progress.finish()
    for note in notes:
        say(note)
    if found is None:
        raise OrchestrateError(f"{container.name}: the audit ended without its counts")
    return found


def summary(found: dict[str, int]) -> str:
    """The counts by kind, as the last line says them."""
    return ", ".join(f"{KINDS.get(kind, kind)} {count}" for kind, count in found.items())
