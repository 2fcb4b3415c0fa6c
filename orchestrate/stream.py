"""What `status` says of the change stream: whether a reader has its replication slot, and how
many bytes of WAL it has yet to confirm.

It asks the replicas' /readyz, through the proxy's published port (it needs no token), which
reports Postgres's own view of the slot (pg_replication_slots: active, confirmed_flush_lsn
against the current WAL position). That holds whichever reader has the slot, and says "not
read" exactly when none has, where the readers' metrics could not: they publish no port, each
knows only itself, and a reader that died says nothing. The lag in seconds is Prometheus's
(`up --monitoring`, the recording rules cachestack:stream_lag_seconds:*).
"""

from __future__ import annotations

from .engine import service_context, service_url
from .errors import reason
from .smoke import call
from .stack import Stack


def describe(stack: Stack) -> str:
    """One line on the change stream of `stack`."""
    url = service_url(stack)
    try:
        reply = call(url, "GET", "/readyz", context=service_context(stack))
    except OSError as exc:
        return f"unknown: {url}/readyz does not answer ({reason(exc)})"
    state = reply.body.get("stream") if isinstance(reply.body, dict) else None
    if reply.status != 200 or state is None:
        return f"unknown: /readyz answered HTTP {reply.status} ({reply.body})"
    if state == "absent":
        return ("no slot: no reader has started yet "
                f"(python -m orchestrate logs stream --project {stack.project})")
    behind = f"{state['behind_bytes']:,} bytes of WAL behind"
    if state["reading"]:
        return f"live, {behind}"
    return (f"NOT READ: no reader has the slot, {behind}; the cache may serve what others "
            f"changed (python -m orchestrate logs stream --project {stack.project})")
