"""Writing the report's artifacts: CSV tables, labelled image grids and matplotlib figures (Agg).

Every PNG of a report has a CSV or JSON of the same stem beside it holding the numbers it shows;
the checks call these helpers with both.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
PAD = 4


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


def thumbnail(image: torch.Tensor, size: int) -> Image.Image:
    """(3, H, W) in [0, 1] → an RGB image whose longer side is ``size`` (aspect kept)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array, mode="RGB")
    h, w = array.shape[:2]
    scale = size / max(h, w)
    return pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """Split ``text`` at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(cells: Sequence[Sequence[Image.Image | None]], *, row_labels: Sequence[str],
               col_labels: Sequence[str], cell: int) -> Image.Image:  # fmt: skip
    """A grid of thumbnails (None = empty cell), column labels on top (wrapped), a label above each row."""
    rows, cols = len(cells), max(len(r) for r in cells)
    step_x, step_y = cell + PAD, cell + PAD + LABEL_HEIGHT
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, cell) for label in col_labels]
    top = LABEL_HEIGHT * max((len(w) for w in wrapped), default=1) + PAD
    grid = Image.new("RGB", (cols * step_x + PAD, top + rows * step_y + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((PAD + c * step_x, 1 + k * LABEL_HEIGHT), line, fill="black")
    for r, row in enumerate(cells):
        y = top + r * step_y
        draw.text((PAD, y), row_labels[r], fill="black")
        for c, img in enumerate(row):
            if img is not None:
                grid.paste(img, (PAD + c * step_x, y + LABEL_HEIGHT))
    return grid


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
