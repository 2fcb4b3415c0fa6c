"""The report of a bench run: a table for the terminal, a PNG (matplotlib, no display needed)
and a self-contained HTML page (the table and the PNG inlined: it can be mailed or attached
as one file), with the figures as JSON beside them for whoever wants to compare runs."""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import OrchestrateError
from .measure import Result

COLUMNS = ("req/s", "p50 ms", "p99 ms", "errors", "hit %", "bypass %", "queries/req",
           "CPU ms/req", "memory MiB")
COLOURS = ("#1f77b4", "#6baed6", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd")
NOTES = (
    "(proxy): the stack's replicas through its proxy, as it serves. (1 container): a temporary "
    "container of the same image and settings, reached on a port of its own: with the cache "
    "on (the replicas' settings), the near cache off (NEAR_CACHE_SIZE=0) or the cache off.",
    "Cache off: REDIS_URL points at a port nothing listens on, so the service's breaker "
    "answers every read from Postgres (X-Cache: BYPASS): its documented \"Redis is down\" "
    "mode.",
    "Hit %: reads answered by the near cache or Redis; bypass %: reads answered by Postgres "
    "alone because Redis was out of reach or slower than CACHE_TIMEOUT_MS. Queries: SQL "
    "statements the service sent to Postgres per request (a /readyz check adds one). CPU: the "
    "service's containers' CPU time per request; memory: theirs after the run, "
    "summed over the replicas.",
)
FOOTNOTE = ("proxy: the stack's replicas through its proxy. cache on, near cache off, cache off: "
            "one temporary container of the same image each, reached directly; cache off = "
            "Redis out of reach, every read from Postgres (X-Cache: BYPASS)")


@dataclass(frozen=True)
class Run:
    """What was run, where and when: the page's heading."""

    project: str
    replicas: int
    seconds: int
    users: int
    cores: int
    taken_at: str  # UTC, to the minute
    command: str
    wrk: str


@dataclass(frozen=True)
class Written:
    html: Path
    png: Path
    json: Path


def require_matplotlib() -> None:
    """Fail before any load runs when the plot could not be drawn at the end."""
    if importlib.util.find_spec("matplotlib") is None:
        raise OrchestrateError("matplotlib is not installed: `pip install -e '.[report]'`")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def rows(results: list[Result]) -> list[tuple[str, ...]]:
    """One row of formatted figures per workload, in COLUMNS' order after the title."""
    return [(r.workload.title, f"{r.load.rps:.0f}", f"{r.load.p50_ms:.2f}",
             f"{r.load.p99_ms:.2f}", str(r.load.errors), _ratio(r.hit_ratio),
             _ratio(r.bypass_ratio),
             f"{r.queries_per_request:.2f}", f"{r.cpu_ms_per_request:.3f}",
             f"{r.memory_mib:.0f}") for r in results]


def table(results: list[Result]) -> list[str]:
    """The figures as aligned text lines, for the terminal."""
    body = rows(results)
    width = max(len("workload"), *(len(row[0]) for row in body))
    line = f"{{:<{width}}}" + "".join(f" {{:>{max(len(c), 7)}}}" for c in COLUMNS)
    return [line.format("workload", *COLUMNS), *(line.format(*row) for row in body)]


def _bars(axes, results: list[Result], values: list[float | None], title: str,
          text: str) -> None:
    """One bar per workload; None (no such figure, as a create's hit ratio) is labelled n/a."""
    bars = axes.bar([r.workload.label for r in results], [v or 0 for v in values],
                    color=COLOURS[:len(results)])
    axes.bar_label(bars, labels=["n/a" if v is None else text.format(v) for v in values],
                   fontsize=8)
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="x", labelsize=8)
    axes.margins(y=0.15)


def plot(results: list[Result], run: Run) -> bytes:
    """Six panels, one bar per workload in each, as PNG bytes (the Agg canvas: no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 8.5), dpi=100, layout="constrained")
    grid = figure.subplots(2, 3)
    _bars(grid[0][0], results, [r.load.rps for r in results], "throughput (req/s)", "{:.0f}")
    latency = grid[0][1]
    positions = range(len(results))
    for offset, name, colour in ((-0.2, "p50", "#7f7f7f"), (0.2, "p99", "#17becf")):
        values = [getattr(r.load, f"{name}_ms") for r in results]
        bars = latency.bar([p + offset for p in positions], values, 0.4, label=name,
                           color=colour)
        latency.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7)
    latency.set_xticks(list(positions), [r.workload.label for r in results])
    latency.tick_params(axis="x", labelsize=8)
    latency.set_title("latency (ms)", fontsize=10)
    latency.legend(fontsize=8)
    latency.margins(y=0.15)
    _bars(grid[0][2], results,
          [None if r.hit_ratio is None else 100 * r.hit_ratio for r in results],
          "hit ratio (%)", "{:.1f}")
    _bars(grid[1][0], results, [r.queries_per_request for r in results],
          "Postgres queries per request", "{:.2f}")
    _bars(grid[1][1], results, [r.cpu_ms_per_request for r in results],
          "service CPU per request (ms)", "{:.3f}")
    _bars(grid[1][2], results, [r.memory_mib for r in results],
          "service memory after the run (MiB)", "{:.0f}")
    figure.suptitle(f"cachestack: {run.wrk}, {run.seconds} s per workload, {run.replicas} "
                    f"replicas, {run.cores} cores, {run.taken_at}\n{run.command}", fontsize=11)
    figure.supxlabel(FOOTNOTE, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def page(results: list[Result], run: Run, png: bytes) -> str:
    """The HTML page: heading, table, the plot inlined as a data: URL, the notes."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("workload", *COLUMNS))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows(results))
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in NOTES)
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cachestack bench: {html.escape(run.project)}
</title><style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}
td:not(:first-child){{text-align:right}}img{{max-width:100%}}code{{background:#eee}}</style>
</head><body><h1>cachestack: the cache at work</h1>
<p>Project <code>{html.escape(run.project)}</code>, {run.replicas} replicas, {run.users} users
seeded, {html.escape(run.wrk)}, {run.seconds} s per workload, {run.cores} cores,
{html.escape(run.taken_at)}. Made by <code>{html.escape(run.command)}</code>.</p>
<table><tr>{head}</tr>{body}</table>
<p><img alt="the figures of the table as bar charts" src="data:image/png;base64,{image}"></p>
<ul>{notes}</ul></body></html>
"""


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: an interrupted run leaves no half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def write(results: list[Result], run: Run, directory: Path) -> Written:
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"bench-{run.project}"
    written = Written(stem.with_suffix(".html"), stem.with_suffix(".png"),
                      stem.with_suffix(".json"))
    png = plot(results, run)
    _write(written.png, png)
    _write(written.html, page(results, run, png).encode())
    figures = {"run": asdict(run), "results": [r.as_dict() for r in results]}
    _write(written.json, (json.dumps(figures, indent=2) + "\n").encode())
    return written
