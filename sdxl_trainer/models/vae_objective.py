"""The pieces both VAE training loops use: the demo kit's fit (vae_fit.py, the whole tiny VAE) and
`sdxl train-vae` (vae_train/, the decoder of any SDXL VAE). Here in models/ so that both can import it.

- :func:`crop_offset` — where a random square crop starts, top then left, from the caller's draw
  (train-vae: numpy seeded by (seed, step); the fit: its torch generator);
- :func:`reconstruction_loss` — ``l1·mean|x̂ − x| + mse·mean (x̂ − x)² + ssim·(1 − similarity(x̂, x))``,
  the terms with weight 0 left out; :func:`make_similarity` picks MS-SSIM or single-scale SSIM by crop;
- :func:`clipped_step` — zero the gradients, backward, clip the norm, step unless the loss or the norm
  is non-finite (the optimiser then does not move), gradients freed.

Each computes what the loops computed before they shared it, operation for operation, so the demo
kit's fitted VAE and train-vae's runs are bitwise what they were (tests/test_vae_fit.py,
tests/test_train_vae.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from pytorch_msssim import ms_ssim, ssim

WIN = 11
MS_SSIM_MIN_SIDE = (WIN - 1) * 2**4 + 1  # 161: pytorch-msssim asserts side > 160 for its 5 scales


def crop_offset(height: int, width: int, crop: int, draw: Callable[[int], int]) -> tuple[int, int]:
    """(top, left) of a ``crop``-square window inside height × width; ``draw(n)`` returns an int in [0, n)."""
    top = draw(height - crop + 1)
    left = draw(width - crop + 1)
    return top, left


def make_similarity(crop: int) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]:
    """``similarity(x̂, x)`` on [0, 1] pixels (window 11, σ 1.5) and whether it is MS-SSIM (crop ≥ 161)."""
    multiscale = crop >= MS_SSIM_MIN_SIDE
    fn = ms_ssim if multiscale else ssim

    def similarity(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn(decoded, target, data_range=1.0, win_size=WIN)

    return similarity, multiscale


def reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor, *, l1_weight: float = 1.0,
                        mse_weight: float = 0.0, ssim_weight: float = 0.0,
                        similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The pixel loss; ``similarity`` (e.g. :func:`make_similarity`'s, pixels in [0, 1]) only with ``ssim_weight``."""
    err = decoded - target
    total = err.abs().mean() if l1_weight == 1.0 else l1_weight * err.abs().mean()
    if mse_weight:
        total = total + mse_weight * err.square().mean()
    if ssim_weight:
        if similarity is None:
            raise ValueError("reconstruction_loss: ssim_weight without a similarity function")
        total = total + ssim_weight * (1.0 - similarity(decoded, target))
    return total


def clipped_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter],
                 max_norm: float | None) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """One optimiser step on ``loss``; returns (gradient norm before clipping, skipped)."""
    params = list(params)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    skipped = not bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped
