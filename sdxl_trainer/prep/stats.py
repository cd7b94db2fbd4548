"""`sdxl prep stats`: per-channel mean/std of raw VAE latents (NovelAI V3's scale-and-shift).

SDXL divides latents by one `scaling_factor` (0.13025 ≈ 1/7.68) for all four channels, but the
channels differ in mean and spread (NovelAI, appendix: mean ≈ [4.81, 0.16, 1.35, −1.78], std ≈
[9.92, 6.28, 7.60, 6.00] on anime data), so the UNet sees non-zero-mean, unequal-variance inputs.
Measuring them on *your* data lets training normalise z = (z_raw − mean)/std per channel.

The latents are the ones training will see: the image's bucket crop (center), one draw from the
VAE posterior, raw (no scaling). Moments are merged batch by batch in float64 with Chan et al.'s
parallel update, which stays exact for millions of values where a running sum of squares would not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdxl_trainer import console, dist
from sdxl_trainer.config import StatsConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.fingerprint import model_fingerprint
from sdxl_trainer.models.loading import load_vae, resolve_dtype
from sdxl_trainer.prep.pixels import read_manifest
from sdxl_trainer.prep.transforms import apply_crop, plan_crop, to_tensor
from sdxl_trainer.schema import write_json

NOVELAI_MEAN = (4.8119, 0.1607, 1.3538, -1.7753)
NOVELAI_STD = (9.9181, 6.2753, 7.5978, 5.9956)


@dataclass
class ChannelMoments:
    """Streaming per-channel count, mean and sum of squared deviations (float64)."""

    channels: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.channels) if self.mean is None else self.mean
        self.m2 = np.zeros(self.channels) if self.m2 is None else self.m2

    def update(self, latents: torch.Tensor) -> None:
        """Merge a batch [B, C, H, W] (Chan, Golub & LeVeque 1979, the pairwise variance update)."""
        x = latents.detach().to("cpu", torch.float64).transpose(0, 1).reshape(self.channels, -1)
        n_b = x.shape[1]
        mean_b = x.mean(dim=1).numpy()
        m2_b = ((x - x.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).numpy()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel."""
        return np.sqrt(self.m2 / max(self.count, 1))


def _batches(rows: list[dict], batch_size: int):
    """Group rows by bucket (one tensor shape per batch), then cut into batches."""
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_bucket.setdefault((r["bucket_width"], r["bucket_height"]), []).append(r)
    for (bw, bh), group in sorted(by_bucket.items()):
        for i in range(0, len(group), batch_size):
            yield bw, bh, group[i : i + batch_size]


@torch.no_grad()
def measure(cfg: StatsConfig) -> tuple[ChannelMoments, int, int]:
    """Encode the (sampled) kept images and return their latent moments, count, failures."""
    rows, source = read_manifest(cfg.work)
    if cfg.max_images and len(rows) > cfg.max_images:
        rows = sorted(random.Random(cfg.seed).sample(rows, cfg.max_images), key=lambda r: r["path"])
    device = dist.local_device(dist.DistInfo(), cfg.device)
    vae = load_vae(cfg.model, vae=cfg.vae, dtype=resolve_dtype(cfg.dtype), device=device)
    moments = ChannelMoments(channels=vae.config.latent_channels)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    failed = 0
    with console.progress("latent stats", len(rows), "img") as advance:
        for bw, bh, batch in _batches(rows, cfg.batch_size):
            pixels = []
            for r in batch:
                image, _reason = source.try_open(r)
                if image is None:
                    failed += 1
                    continue
                crop = plan_crop(width=image.width, height=image.height, bucket_width=bw, bucket_height=bh)
                pixels.append(to_tensor(apply_crop(image, crop, bucket_width=bw, bucket_height=bh)))
            if pixels:
                x = torch.stack(pixels).to(device, vae.dtype)
                latents = vae.encode(x).latent_dist.sample(generator).float()
                if not torch.isfinite(latents).all():
                    raise UserError(
                        f"the VAE produced non-finite latents in bucket {bw}x{bh} (images {[r['path'] for r in batch]})",
                        fix="encode in fp32 (--dtype fp32) or use a fixed fp16 VAE (--vae)",
                    )
                moments.update(latents)
            advance(len(batch))
    if moments.count == 0:
        raise UserError("no image could be encoded", where=str(cfg.work / "manifest.parquet"), fix="re-run `sdxl prep scan`")
    return moments, len(rows) - failed, failed


def run(cfg: StatsConfig) -> dict:
    """Measure, write WORK/latent_stats.json, print the table beside SDXL's and NovelAI's values."""
    # which VAE these statistics belong to: `prep cache` and `train` compare it with theirs
    fingerprint = model_fingerprint(cfg.model, vae=cfg.vae, parts=("vae",))
    moments, n_images, failed = measure(cfg)
    result = {
        "mean": [float(v) for v in moments.mean],
        "std": [float(v) for v in moments.std],
        "count": n_images,
        "values_per_channel": int(moments.count),
        "failed": failed,
        "vae_fingerprint": fingerprint["parts"]["vae"],
        "model_fingerprint": fingerprint,
        "model": str(cfg.model),
        "vae": str(cfg.vae) if cfg.vae else None,
    }
    write_json(result, Path(cfg.work) / "latent_stats.json", artifact="latent_stats", config=cfg)
    sdxl_std = 1 / 0.13025
    rows = [
        (f"ch{c}", f"{m:+.4f}", f"{s:.4f}", f"{sdxl_std:.4f}", f"{NOVELAI_MEAN[c]:+.4f}", f"{NOVELAI_STD[c]:.4f}")
        for c, (m, s) in enumerate(zip(result["mean"], result["std"]))
    ]
    console.table(
        f"raw VAE latent statistics over {n_images} images ({failed} unreadable)",
        rows,
        ("channel", "mean", "std", "SDXL 1/scaling_factor", "NovelAI mean", "NovelAI std"),
    )
    return result
