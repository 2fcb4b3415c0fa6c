"""The progress of a bench run: most of it is wrk running for a known time, so the bar counts
load seconds. On a terminal one line per step is redrawn in place as the step runs; in a log
(no terminal) each step is one line when it starts, so the log is not flooded."""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 30


class Progress:
    """A bar over `total` seconds of load; `note` prints a line between the bars."""

    unit = " s"  # what the bar counts, after its figures

    def __init__(self, total: float, stream: TextIO | None = None) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._open = False  # a bar line is on the screen without its newline

    def note(self, line: str) -> None:
        self._close()
        self._write(f"{line}\n")

    def start(self, label: str, seconds: float) -> None:
        """A step of `seconds` of load begins."""
        self._close()
        if self.tty:
            self.show(label, 0.0, seconds)
        else:
            self._write(f"[{self._percent(0.0):3.0f}%] {label} ({seconds:.0f} s)\n")

    def show(self, label: str, elapsed: float, seconds: float) -> None:
        """Redraw the bar (on a terminal only) `elapsed` seconds into a step of `seconds`."""
        if not self.tty:
            return
        fraction = self._percent(min(elapsed, seconds)) / 100
        filled = round(WIDTH * fraction)
        self._write(f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] {100 * fraction:3.0f}%  "
                    f"{label}  {min(elapsed, seconds):.0f}/{seconds:.0f}{self.unit}\x1b[K")
        self._open = True

    def finish(self, label: str, seconds: float) -> None:
        """The step is over: its seconds count as done."""
        self.show(label, seconds, seconds)
        self.done += seconds
        self._close()

    def _percent(self, elapsed: float) -> float:
        return min(100.0, 100 * (self.done + elapsed) / self.total)

    def _close(self) -> None:
        if self._open:
            self._write("\n")
            self._open = False

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
