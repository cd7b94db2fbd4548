"""The coherence check's report files: the canvases as a grid, their numbers as CSV, coherence per scale.

The check itself (the canvases, the measure and why) is sampling/coherence.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.evaluate.artifacts import new_figure, save_figure, write_csv
from sdxl_trainer.sampling.coherence import MODES
from sdxl_trainer.sampling.images import image_grid, thumbnail

CSV_COLUMNS = ("prompt", "seed", "scale", "mode", "width", "height", "start_sigma", "flow_shift", "layout_rmse",
               "colour_shift", "mean_brightness")  # fmt: skip
SUMMARY_COLUMNS = ("scale", "mode", "width", "height", "n", "coherence", "layout_rmse", "colour_shift")


def write_coherence_artifacts(out: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                              images: list[torch.Tensor], *, thumb: int) -> list[str]:  # fmt: skip
    """coherence.png (+ .csv): one row per prompt and seed; coherence_plot.png (+ .csv): coherence per scale."""
    columns = list(dict.fromkeys((r["scale"], r["mode"]) for r in rows))
    keyed = {(r["prompt"], r["seed"], r["scale"], r["mode"]): img for r, img in zip(rows, images)}
    row_keys = list(dict.fromkeys((r["prompt"], r["seed"]) for r in rows))
    cells = [[thumbnail(keyed[(p, s, sc, m)], thumb) for sc, m in columns] for p, s in row_keys]
    sizes = {(r["scale"], r["mode"]): r["width"] for r in rows}
    col_labels = [f"{sc:g}x {m} ({sizes[(sc, m)]}px)" for sc, m in columns]
    row_labels = [f"seed {s}: {p[:40]}" for p, s in row_keys]
    image_grid(cells, row_labels=row_labels, col_labels=col_labels, cell=thumb).save(out / "coherence.png")
    write_csv(out / "coherence.csv", rows, CSV_COLUMNS)
    write_csv(out / "coherence_plot.csv", metrics["summary"], SUMMARY_COLUMNS)
    fig, (ax,) = new_figure()
    for mode, marker in zip(MODES, "os"):
        pts = [(s["scale"], s["coherence"]) for s in metrics["summary"] if s["mode"] == mode or s["scale"] == 1.0]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=marker, label=f"σ_max {mode}")
    ax.set_xlabel("canvas side / training side")
    ax.set_ylabel(f"coherence = 1 − RMS layout error ({metrics['grid']}×{metrics['grid']})")
    ax.set_ylim(max(0.0, math.floor(min(s["coherence"] for s in metrics["summary"]) * 10) / 10 - 0.1), 1.0)
    ax.legend()
    ax.set_title("high-resolution coherence (1× = seed-to-seed spread)")
    save_figure(fig, out / "coherence_plot.png")
    return ["coherence.png", "coherence_plot.png"]
