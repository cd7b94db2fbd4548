"""Terminal output shared by every stage: rich progress bars, summary tables, --quiet."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")

console = Console(stderr=True)
_state = {"quiet": False, "live": 0}  # live: progress bars open now (rich shows one live display at a time)


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and tables (errors still print)."""
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


class _Rate(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s"


@contextmanager
def progress(description: str, total: int | None, unit: str = "it") -> Iterator[Any]:
    """A progress bar with count, rate and ETA; yields ``advance(n=1)``. Silent under --quiet.

    Inside another bar (e.g. the trainer rendering samples under its own bar) it is silent too:
    rich can show one live display at a time, and the outer bar is the one a person follows.
    """
    if _state["quiet"] or _state["live"]:
        yield lambda n=1: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with bar, _live():
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def _live() -> Iterator[None]:
    _state["live"] += 1
    try:
        yield
    finally:
        _state["live"] -= 1


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar."""
    if total is None and isinstance(items, Sequence):
        total = len(items)
    with progress(description, total, unit) as advance:
        for item in items:
            yield item
            advance()


def table(title: str, rows: Iterable[Sequence[Any]], columns: Sequence[str] = ("", "")) -> None:
    """Print a summary table (skipped under --quiet)."""
    if _state["quiet"]:
        return
    t = Table(title=title, show_header=any(columns))
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*(str(x) for x in r))
    console.print(t)


def info(message: str) -> None:
    if not _state["quiet"]:
        console.print(message)


def format_bytes(n: float) -> str:
    """A byte count for people: 812 B, 12.3 MB, 1.2 GB, 3.40 TB (decimal units, as `df -H`)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if round(abs(n), 0 if unit == "B" else 1) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.2f} TB"


# ── the training bar ─────────────────────────────────────────────────────────────────────────────


def record_text(record: Mapping[str, Any]) -> str:
    """loss, learning rate and samples/s of a training log record, as one short phrase."""
    loss = record.get("loss")
    lrs = list(dict.fromkeys(f"{v:.2e}" for v in (record.get("lr") or {}).values()))  # one per distinct rate
    parts = [f"loss {loss:.4f}" if loss is not None else "loss – (skipped)", f"lr {'/'.join(lrs) or '–'}"]
    if record.get("samples_per_s") is not None:
        parts.append(f"{record['samples_per_s']:,.2f} samples/s")
    return " · ".join(parts)


def _clock(seconds: float) -> str:
    return str(_dt.timedelta(seconds=round(max(seconds, 0.0))))


class TrainProgress:
    """What the training loop holds: ``advance()`` per update, ``report(record)`` per log record.

    The bar (on stderr) shows the last record's loss, learning rate and samples/s. When stdout is not
    a terminal (``sdxl train … > train.log``) each report is also one plain line there, because a
    redirected rich bar shows nothing until it ends.
    """

    def __init__(self, bar: Progress | None, task: Any, *, total: int, done: int, plain: TextIO | None):
        self.bar, self.task, self.total, self.plain = bar, task, total, plain
        self.start_step, self.step, self.t0 = done, done, time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def report(self, record: Mapping[str, Any]) -> None:
        text = record_text(record)
        if self.bar is not None:
            self.bar.update(self.task, stats=text)
        if self.plain is not None:
            elapsed = time.perf_counter() - self.t0
            done = self.step - self.start_step
            eta = elapsed / done * (self.total - self.step) if done else 0.0
            width = len(str(self.total))
            print(f"step {record.get('step', self.step):>{width}}/{self.total} · {text} · elapsed {_clock(elapsed)}"
                  f" · eta {_clock(eta)}", file=self.plain, flush=True)  # fmt: skip


@contextmanager
def training_progress(total: int, *, done: int = 0, enabled: bool = True,
                      plain_lines: bool | None = None) -> Iterator[TrainProgress]:  # fmt: skip
    """The training bar: count, rate, ETA and the last log record; ``enabled=False`` (other ranks) is silent.

    ``plain_lines``: also print each report as a line on stdout; None: when stdout is not a terminal.
    """
    show = enabled and not _state["quiet"]
    lines = not sys.stdout.isatty() if plain_lines is None else plain_lines
    stream = sys.stdout if lines else None
    if not show:
        yield TrainProgress(None, None, total=total, done=done, plain=None)
        return
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), _Rate("step"), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
                   transient=False)  # fmt: skip
    with bar, _live():
        task = bar.add_task("train", total=total, completed=done, stats="")
        yield TrainProgress(bar, task, total=total, done=done, plain=stream)


# ── a fixed number of steps with a status (the demo kit's VAE fit) ──────────────────────────────


@contextmanager
def step_progress(description: str, total: int, *, unit: str = "step", plain_lines: bool | None = None,
                  every_s: float = 30.0) -> Iterator[Any]:  # fmt: skip
    """A bar with count, rate, ETA and a short status (e.g. the loss); yields ``advance(text="")``, one call a step.

    When stdout is not a terminal (``make demo > log``) it also prints plain lines there, because a
    redirected rich bar shows nothing until it ends: one at every tenth of ``total`` or after
    ``every_s`` seconds without one, whichever comes first, and one at the last step.
    ``plain_lines``: force those lines on or off. Silent under --quiet.
    """
    lines = not sys.stdout.isatty() if plain_lines is None else plain_lines
    if _state["quiet"]:
        yield lambda text="": None
        return
    width, t0 = len(str(total)), time.perf_counter()
    state = {"step": 0, "last_line": t0, "tenth": 0}

    def line(text: str) -> None:
        now = time.perf_counter()
        step, tenth = state["step"], state["step"] * 10 // max(total, 1)
        if step < total and tenth == state["tenth"] and now - state["last_line"] < every_s:
            return
        state["tenth"], state["last_line"] = tenth, now
        eta = (now - t0) / step * (total - step)
        status = f" · {text}" if text else ""
        print(f"{description} {step:>{width}}/{total} {unit}s{status} · elapsed {_clock(now - t0)} · eta {_clock(eta)}",
              file=sys.stdout, flush=True)  # fmt: skip

    if _state["live"]:  # inside another bar: no second live display, plain lines only
        bar = None
    else:
        bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                       console=console, transient=False)  # fmt: skip

    def advance(text: str = "") -> None:
        state["step"] += 1
        if bar is not None:
            bar.update(task, advance=1, status=text)
        if lines:
            line(text)

    if bar is None:
        yield advance
        return
    with bar, _live():
        task = bar.add_task(description, total=total, status="")
        yield advance
