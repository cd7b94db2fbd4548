"""The progressive-denoising check's report files: one strip per prompt as PNG, every frame's numbers as CSV.

The check itself (the x0 previews and what they show) is sampling/progressive.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.evaluate.artifacts import write_csv
from sdxl_trainer.sampling.images import image_grid, thumbnail

CSV_COLUMNS = ("prompt", "seed", "frame", "step", "sigma", "mean_brightness", "std_brightness", "rmse_to_final")


def write_progressive_artifacts(out: Path, rows: list[dict[str, Any]], strips: list[list[torch.Tensor]],
                                *, thumb: int) -> list[str]:  # fmt: skip
    """progressive.png (one strip per prompt, final image last) beside progressive.csv."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    first = [r for r in rows if r["prompt"] == prompts[0]]
    col_labels = [f"step {r['step']} sigma {r['sigma']:.3g}" for r in first[:-1]] + ["final"]  # PIL's font: ASCII
    cells = [[thumbnail(img, thumb) for img in strip] for strip in strips]
    grid = image_grid(cells, row_labels=[p[:60] for p in prompts], col_labels=col_labels, cell=thumb)
    grid.save(out / "progressive.png")
    write_csv(out / "progressive.csv", rows, CSV_COLUMNS)
    return ["progressive.png"]
