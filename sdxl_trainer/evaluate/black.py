"""The black-image check's report files: the images as a grid, their numbers as CSV, mean vs target.

The check itself (what is sampled and measured, and why) is sampling/black.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.evaluate.artifacts import new_figure, save_figure, write_csv
from sdxl_trainer.sampling.black import TARGETS
from sdxl_trainer.sampling.images import image_grid, thumbnail

CSV_COLUMNS = ("kind", "prompt", "target", "seed", "width", "height", "mean", "std", "abs_error")
SUMMARY_COLUMNS = ("kind", "target", "n", "mean", "mean_std_across_seeds", "mean_pixel_std", "abs_error", "min", "max")


def write_black_artifacts(out: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                          images: list[torch.Tensor], *, thumb: int) -> list[str]:  # fmt: skip
    """black.png (+ black.csv): the images, a row per prompt; black_brightness.png (+ .csv): mean vs target."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    by_kind = [[thumbnail(img, thumb) for img, r in zip(images, rows) if r["kind"] == k] for k in kinds]
    seeds = [r["seed"] for r in rows if r["kind"] == kinds[0]]
    labels = [f"{k}: mean {metrics[k]['mean']:.3f}" for k in kinds]
    image_grid(by_kind, row_labels=labels, col_labels=[f"seed {s}" for s in seeds], cell=thumb).save(out / "black.png")
    write_csv(out / "black.csv", rows, CSV_COLUMNS)
    write_csv(out / "black_brightness.csv", [metrics[k] for k in kinds], SUMMARY_COLUMNS)
    fig, (ax,) = new_figure()
    for i, kind in enumerate(kinds):
        values = [r["mean"] for r in rows if r["kind"] == kind]
        ax.scatter([i] * len(values), values, label=f"{kind} (per seed)", zorder=3)
        ax.hlines(TARGETS[kind], i - 0.3, i + 0.3, colors="red", linestyles="--", zorder=2)
        ax.errorbar([i + 0.15], [metrics[kind]["mean"]], yerr=[metrics[kind]["mean_pixel_std"]], fmt="s", color="k",
                    capsize=4, zorder=3)  # fmt: skip
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("mean pixel brightness (0 black, 1 white)")
    ax.set_title("dots: seeds; squares: mean ± pixel std; red dashes: target", fontsize=9)
    save_figure(fig, out / "black_brightness.png")
    return ["black.png", "black_brightness.png"]
