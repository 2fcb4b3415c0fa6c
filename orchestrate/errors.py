"""The one error type the CLI turns into a clear message line (no traceback)."""

from __future__ import annotations


class OrchestrateError(Exception):
    """A failure to report as one message line plus the relevant log lines."""

    def __init__(self, message: str, log_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_lines = log_lines or []
