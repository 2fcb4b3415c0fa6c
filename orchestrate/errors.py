"""The one error type the CLI turns into a clear message line (no traceback)."""

from __future__ import annotations


class OrchestrateError(Exception):
    """A failure to report as one message line plus the relevant log lines."""

    def __init__(self, message: str, log_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_lines = log_lines or []


def reason(exc: BaseException, limit: int = 200) -> str:
    """The useful first line of an exception (Docker's own explanation when it has one)."""
    text = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0][:limit]
