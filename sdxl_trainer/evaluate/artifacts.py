"""Writing the report's artifacts: CSV tables and matplotlib figures (Agg); image grids: sampling/images.py.

Every PNG of a report has a CSV or JSON of the same stem beside it holding the numbers it shows;
the checks call these helpers with both.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """``rows`` (dicts) as CSV with a header; floats written in full precision (``repr``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def new_figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def finite(value: float) -> float | None:
    """``value`` for metrics.json, or None where it is not finite (JSON has no Infinity)."""
    return float(value) if math.isfinite(value) else None
