"""Fit a small AutoencoderKL to a pool of images, quickly and reproducibly, on CPU.

The demo kit's VAE starts random, so decoded pixels mean nothing. This trains it briefly on the
images it will encode (the synthetic demo renders) with the SD VAE's pixel objective minus the GAN
and perceptual terms: L1 + MSE on pixels plus a tiny KL weight. The KL weight only keeps the
posterior honest: its std stays small (the cache stores it and training draws fresh latents from
it), while the mean carries the image.

Why the knobs are what they are (measured on the synthetic renders, see docs/models.md):

- Mostly-flat images are hard for GroupNorm networks: a flat feature map normalised per group
  keeps only the direction of its channel vector, not its size, so colour and brightness must be
  carried by the residual stream. Random small-crop training finds that in a few hundred steps
  when the residual branches start at zero (each block is its shortcut, Goyal et al. 2017) and
  MSE pulls the far-off colours first; L1 alone or random branches often stall for hundreds of
  steps at "everything is black or white".
- Small crops (32 px, 4×4 latents) are four times cheaper than 64 px ones per sample and learn
  faster; the network is fully convolutional and decodes whole 128 px images afterwards.

The crop offset, the pixel loss (L1 + MSE) and the clipped optimiser step are vae_objective.py's,
shared with `sdxl train-vae` (vae_train/); the pool, the schedule, the KL term and the start-up
tweaks below are the fit's own.

Deterministic by ``seed`` for a given ``num_threads``: crops and posterior noise come from one
``torch.Generator``, the global RNG is not used, and the thread count is pinned during the fit
(oneDNN's reductions depend on it), so the same seed on the same machine gives bitwise-identical
weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.vae_objective import clipped_step, crop_offset, reconstruction_loss


@dataclass(frozen=True)
class FitSettings:
    """How long and how hard to train. The defaults fit the demo kit's VAE in about 50 s on 2 cores."""

    steps: int = 600
    batch_size: int = 16
    crop: int = 32  # square training crops, a multiple of 8
    lr: float = 5e-4
    warmup: int = 20
    mse_weight: float = 1.0  # L1 + this · MSE
    kl_weight: float = 1e-6  # the SD VAE recipe's KL weight
    max_grad_norm: float = 1.0
    initial_std: float = 0.01  # posterior std at step 0 (see _start_with_small_std)
    zero_init_residual: bool = True  # see _zero_residual_branches
    num_threads: int = 2  # pinned for reproducibility; the demo machine has 2 cores


def to_pixels(image: Image.Image, *, area: int, multiple: int = 8) -> torch.Tensor:
    """An RGB image scaled to about ``area`` pixels (sides a multiple of 8), as [3, H, W] in [−1, 1]."""
    scale = math.sqrt(area / (image.width * image.height))
    w = max(multiple, round(image.width * scale / multiple) * multiple)
    h = max(multiple, round(image.height * scale / multiple) * multiple)
    # Like the cache's transform: Lanczos going down, bicubic going up.
    resample = Image.Resampling.LANCZOS if w < image.width else Image.Resampling.BICUBIC
    arr = np.asarray(image.convert("RGB").resize((w, h), resample), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def pixel_pool(images: Iterable[Image.Image], *, seed: int, area: int, scale_range=(0.6, 1.0)) -> list[torch.Tensor]:
    """Each image at a random area in ``scale_range`` × ``area`` (the sizes buckets resize to), in [−1, 1]."""
    rng = np.random.default_rng(seed)
    return [to_pixels(img, area=round(area * rng.uniform(*scale_range))) for img in images]


def _random_crops(pool: Sequence[torch.Tensor], *, n: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(pool), (n,), generator=generator).tolist()
    out = []
    for i in picks:
        img = pool[i]
        top, left = crop_offset(img.shape[1], img.shape[2], crop,
                                lambda n: int(torch.randint(n, (1,), generator=generator)))  # fmt: skip
        out.append(img[:, top : top + crop, left : left + crop])
    return torch.stack(out)


def _lr_factor(step: int, *, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10%: the last steps settle flat colours precisely."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _start_with_small_std(vae, *, std: float) -> None:
    """Make the encoder's log-variance start constant at 2·log(std) instead of ≈0 (std ≈ 1).

    A random AutoencoderKL draws latents with std ≈ 1, so the decoder would first learn to see
    through noise and the encoder to inflate the mean to beat it. Starting small, the fit spends its
    steps on the image; the tiny KL weight lets the std rise only where reconstruction allows.
    """
    conv = vae.quant_conv  # 1×1 conv on the encoder's (mean, logvar) output
    half = conv.out_channels // 2
    conv.weight[half:].zero_()
    conv.bias[half:].fill_(2.0 * math.log(std))


@torch.no_grad()
def _zero_residual_branches(vae) -> None:
    """Zero the last conv of every resnet branch, so each block starts as its shortcut."""
    from diffusers.models.resnet import ResnetBlock2D

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()


def _check(pool: Sequence[torch.Tensor], settings: FitSettings) -> list[torch.Tensor]:
    if not pool:
        raise UserError("fit_vae got no images", fix="pass at least one image tensor [3, H, W] in [−1, 1]")
    for name in ("steps", "batch_size", "num_threads"):
        if getattr(settings, name) < 1:
            raise UserError(f"fit_vae: {name}={getattr(settings, name)}", fix=f"use a positive {name}")
    if settings.crop < 8 or settings.crop % 8:
        raise UserError(f"fit_vae: crop={settings.crop}", fix="use a multiple of 8 (the VAE downsamples 8×)")
    bad = [tuple(t.shape) for t in pool if t.ndim != 3 or t.shape[0] != 3]
    if bad:
        raise UserError(f"fit_vae: {len(bad)} image(s) are not [3, H, W], e.g. {bad[0]}", fix="pass RGB tensors")
    usable = [t for t in pool if min(t.shape[1:]) >= settings.crop]
    if not usable:
        raise UserError(
            f"fit_vae: no image has both sides ≥ crop={settings.crop}",
            fix="scale the images up (to_pixels with a larger area) or lower crop",
        )
    return usable


def fit_vae(
    vae,
    pool: Sequence[torch.Tensor],
    *,
    seed: int = 0,
    settings: FitSettings = FitSettings(),
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``vae`` in place on random crops of ``pool`` ([3, H, W] in [−1, 1]); returns the loss per step.

    Images smaller than the crop are skipped. ``on_step(step, loss)`` is called after every update.
    """
    usable = _check(pool, settings)
    generator = torch.Generator().manual_seed(seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)
    _start_with_small_std(vae, std=settings.initial_std)
    if settings.zero_init_residual:
        _zero_residual_branches(vae)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr, fused=True)  # fused: a third of the step time at this size
    losses: list[float] = []
    vae.train()
    try:
        for step in range(settings.steps):
            for group in opt.param_groups:
                group["lr"] = settings.lr * _lr_factor(step, steps=settings.steps, warmup=settings.warmup)
            x = _random_crops(usable, n=settings.batch_size, crop=settings.crop, generator=generator)
            posterior = vae.encode(x).latent_dist
            loss = reconstruction_loss(vae.decode(posterior.sample(generator)).sample, x, mse_weight=settings.mse_weight)
            loss = loss + settings.kl_weight * posterior.kl().mean()
            clipped_step(opt, loss, params, settings.max_grad_norm)  # a non-finite loss or gradient: no step
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        torch.set_num_threads(threads_before)
        vae.eval()
    return losses


@torch.no_grad()
def reconstruction_error(vae, images: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Per image, in [0, 255] units: mean |decoded − input|, decoded and input mean brightness; posterior std.

    Decodes the posterior mean, clamped to [−1, 1] as pipelines do before writing pixels.
    """
    out: dict[str, list[float]] = {"mae": [], "decoded_mean": [], "input_mean": [], "posterior_std": []}
    for img in images:
        posterior = vae.encode(img[None]).latent_dist
        recon = vae.decode(posterior.mean).sample[0].clamp(-1, 1)
        out["mae"].append(float((recon - img).abs().mean() * 127.5))
        out["decoded_mean"].append(float((recon.mean() + 1) * 127.5))
        out["input_mean"].append(float((img.mean() + 1) * 127.5))
        out["posterior_std"].append(float(posterior.std.mean()))
    return out
