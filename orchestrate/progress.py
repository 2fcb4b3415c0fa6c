"""The progress of what the orchestrator waits on for a known amount (bench's seconds of load,
audit's keys), drawn by rich: on a terminal a bar for the whole and one for each step, redrawn
in place; in a log (no terminal) one line when each step starts, so the log is not flooded."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn
from rich.progress import Progress as Bars


class Progress:
    """`total` of something (`unit`: seconds, keys) in steps; a context manager that draws the
    bars while it is open. `note` prints a line above them."""

    def __init__(self, total: float, unit: str, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.unit = unit
        self._bars = Bars(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                          TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit),
                          console=self.console, disable=not self.console.is_terminal)
        self._whole = self._bars.add_task("all", total=max(total, 1e-9))
        self._step: TaskID | None = None
        self._done = 0.0

    def __enter__(self) -> Progress:
        self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bars.stop()

    def note(self, line: str) -> None:
        self.console.print(line, markup=False)

    def start(self, label: str, size: float) -> None:
        """A step of `size` begins."""
        self._step = self._bars.add_task(label, total=max(size, 1e-9))
        if not self.console.is_terminal:
            percent = 100 * self._done / self._bars.tasks[self._whole].total
            self.note(f"[{percent:3.0f}%] {label} ({size:.0f} {self.unit})")

    def show(self, done: float) -> None:
        """`done` of the current step is done."""
        assert self._step is not None
        size = self._bars.tasks[self._step].total or 0.0
        self._bars.update(self._step, completed=min(done, size))
        self._bars.update(self._whole, completed=self._done + min(done, size))

    def finish(self) -> None:
        """The current step is over: all of it counts as done."""
        assert self._step is not None
        self.show(self._bars.tasks[self._step].total or 0.0)
        self._done += self._bars.tasks[self._step].total or 0.0
        self._step = None
