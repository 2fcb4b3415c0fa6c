"""The proxy's runtime API, as the orchestrator uses it to replace replicas without failing a
request: wait until HAProxy sends requests to a new replica, drain an old one before it stops.

HAProxy finds the replicas through Docker's DNS and fills the slots of a server template with
their addresses (docker/proxy/haproxy.cfg); a replica is known to it by its address on the
frontend network. Commands go to the API's socket inside the proxy container, through socat,
with `docker exec`: the API is never on a network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from docker.models.containers import Container

from .errors import OrchestrateError
from .waits import until

SOCKET = "/tmp/haproxy.sock"
BACKEND = "replicas"
# srv_op_state in `show servers state`: 2 is running (UP); srv_admin_state bit 0x1 is "forced
# maintenance", 0x8 "forced drain", both set through this API.
UP = "2"
DRAIN = "drain"
DEADLINE_S = 60.0


@dataclass(frozen=True)
class Slot:
    """One server of the template, as HAProxy sees it now."""

    name: str
    address: str
    up: bool
    draining: bool
    sessions: int


class Proxy:
    """The stack's running proxy container."""

    def __init__(self, container: Container) -> None:
        self.container = container

    def ask(self, command: str) -> str:
        result = self.container.exec_run(
            ["sh", "-c", f'echo "$1" | socat stdio unix-connect:{SOCKET}', "sh", command]
        )
        output = result.output.decode(errors="replace")
        if result.exit_code != 0:
            raise OrchestrateError(f"the proxy's runtime API failed on {command!r}: {output}")
        return output

    def slots(self) -> dict[str, Slot]:
        """Every slot that has an address, by address."""
        state = self._table(self.ask(f"show servers state {BACKEND}"), skip=1)
        sessions = {row["svname"]: int(row["scur"] or 0)
                    for row in self._csv(self.ask("show stat"))
                    if row["# pxname"] == BACKEND}
        return {
            row["srv_addr"]: Slot(
                name=row["srv_name"],
                address=row["srv_addr"],
                up=row["srv_op_state"] == UP,
                draining=bool(int(row["srv_admin_state"]) & 0x8),
                sessions=sessions.get(row["srv_name"], 0),
            )
            for row in state
            if row["srv_addr"] not in ("", "-", "0.0.0.0")
        }

    def wait_serving(self, address: str, deadline_s: float = DEADLINE_S) -> None:
        """Wait until HAProxy has found `address` and sends it requests (it passed the checks)."""
        self._wait(lambda slots: address in slots and slots[address].up,
                   f"the proxy did not take {address} into service", deadline_s)

    def drain(self, address: str, deadline_s: float = DEADLINE_S) -> str | None:
        """Stop sending requests to `address` and wait until the ones it has are answered;
        returns its slot (None if HAProxy does not know the address)."""
        slot = self.slots().get(address)
        if slot is None:
            return None
        self.ask(f"set server {BACKEND}/{slot.name} state {DRAIN}")
        self._wait(lambda slots: address not in slots or slots[address].sessions == 0,
                   f"requests to {address} were not answered", deadline_s)
        return slot.name

    def release(self, slot: str, address: str, deadline_s: float = DEADLINE_S) -> None:
        """Once the drained replica at `address` is gone from DNS, make its slot ready for the
        next replica that the template puts there."""
        self._wait(lambda slots: address not in slots,
                   f"the proxy still resolves {address}", deadline_s)
        self.ask(f"set server {BACKEND}/{slot} state ready")

    def _wait(self, done: Callable[[dict[str, Slot]], bool], failure: str,
              deadline_s: float) -> None:
        until(lambda: None if done(self.slots()) else "", deadline_s, failure, poll_s=0.2)

    @staticmethod
    def _table(text: str, skip: int) -> list[dict[str, str]]:
        """A space-separated table whose header line starts with '# '."""
        lines = [line for line in text.splitlines()[skip:] if line.strip()]
        if not lines:
            return []
        header = lines[0].lstrip("# ").split()
        return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]

    @staticmethod
    def _csv(text: str) -> list[dict[str, str]]:
        """A comma-separated table with a header line; none when HAProxy answered nothing."""
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return []
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
