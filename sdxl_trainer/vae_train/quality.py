"""The decoder's training loss and the held-out metrics, all on pixels in [0, 1].

Loss: ``l1_weight · mean|x̂ − x| + ssim_weight · (1 − MS-SSIM(x̂, x))`` (pytorch-msssim, Gaussian
window 11, σ 1.5). MS-SSIM downsamples four times, so pytorch-msssim needs a side above
(11 − 1) · 2⁴ = 160 px; smaller crops use single-scale SSIM instead, and :func:`make_loss` names
which one it built. The decoded image is not clamped in the loss (a clamp would stop the gradient
of pixels that overshoot); the metrics clamp it, as a pipeline does before writing pixels.

Metrics per held-out crop, averaged: L1 (mean absolute error, [0, 1] units), PSNR in dB
(10·log10(1 / MSE)) and SSIM (single scale, as above).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_msssim import ssim

from sdxl_trainer.models.vae_objective import MS_SSIM_MIN_SIDE, WIN, make_similarity, reconstruction_loss

EVAL_COLUMNS = ("step", "l1", "psnr", "ssim")
__all__ = ["MS_SSIM_MIN_SIDE", "make_loss", "metrics", "reconstruct"]


def make_loss(*, crop: int, l1_weight: float, ssim_weight: float) -> tuple[Callable[..., torch.Tensor], str]:
    """``loss(decoded, target)`` on [B, 3, H, W] in [0, 1] and its name (which SSIM it uses); the loss is
    models/vae_objective.py's, shared with the demo kit's VAE fit."""
    similarity, multiscale = make_similarity(crop)
    name = f"{l1_weight:g}·L1 + {ssim_weight:g}·(1 − {'MS-SSIM' if multiscale else 'SSIM'})"
    if not multiscale and ssim_weight:
        name += f" (crop {crop} < {MS_SSIM_MIN_SIDE}: single-scale SSIM)"

    def loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(decoded, target, l1_weight=l1_weight, ssim_weight=ssim_weight, similarity=similarity)

    return loss, name


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, crops: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Held-out crops through the VAE (posterior mean: no noise in the metric), clamped to [0, 1], on the CPU."""
    out = []
    for i in range(0, crops.shape[0], batch_size):
        x = crops[i : i + batch_size].to(device) * 2.0 - 1.0
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu())
    return torch.cat(out)


def metrics(decoded: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean L1, PSNR (dB) and SSIM over the crops (each per crop, then averaged)."""
    mse = (decoded - target).square().flatten(1).mean(1).clamp(min=1e-10)
    return {"l1": float((decoded - target).abs().mean()), "psnr": float((10.0 * torch.log10(1.0 / mse)).mean()),
            "ssim": float(ssim(decoded, target, data_range=1.0, win_size=WIN, size_average=True))}  # fmt: skip


def write_eval_rows(path: Path, rows: list[dict[str, float]]) -> None:
    """RUN/vae_eval.csv: one row per evaluation (step, l1, psnr, ssim), rewritten whole each time."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in EVAL_COLUMNS} for row in rows)
    tmp.replace(path)


def read_eval_rows(path: Path, *, up_to: int) -> list[dict[str, float]]:
    """The rows of an earlier (killed) run up to step ``up_to``: a resume redoes the steps after it."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return [{**row, "step": int(row["step"])} for row in rows if row["step"] <= up_to]


def write_grid(path: Path, rows: list[torch.Tensor]) -> None:
    """A PNG of crops: one row per tensor [N, 3, c, c] in [0, 1] (original / before / after), 2 px gaps."""
    n, c = rows[0].shape[0], rows[0].shape[-1]
    gap = 2
    canvas = np.full((len(rows) * (c + gap) - gap, n * (c + gap) - gap, 3), 255, dtype=np.uint8)
    for r, crops in enumerate(rows):
        pixels = (crops.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i in range(n):
            canvas[r * (c + gap) : r * (c + gap) + c, i * (c + gap) : i * (c + gap) + c] = pixels[i]
    Image.fromarray(canvas).save(path)
