"""Terminal output shared by every stage: rich progress bars, summary tables, --quiet."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

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
_state = {"quiet": False}


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
    """A progress bar with count, rate and ETA; yields ``advance(n=1)``. Silent under --quiet."""
    if _state["quiet"]:
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
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


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
