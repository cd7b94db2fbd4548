"""Training-time noise levels, per sample, from a torch.Generator (docs/diffusion.md §4).

All draws happen on the generator's device and nothing is read back on the host: pass a generator
that lives on the training device. `build_level_sampler` checks the options once and returns a
callable `(batch_size, *, generator) -> level` giving σ for eps/v/v_ztsnr and t for flow.
"""

from __future__ import annotations

import math

import torch

from .objectives import Objective
from .schedules import flow_shift


def uniform_timesteps(
    batch_size: int,
    *,
    generator: torch.Generator,
    num_timesteps: int = 1000,
    t_min: int = 0,
    t_max: int | None = None,
    terminal_oversample: float = 0.0,
) -> torch.Tensor:
    """t ~ U{t_min, …, t_max} (Ho et al. 2020, Algorithm 1); with prob. p the terminal step N−1 instead."""
    t_max = num_timesteps - 1 if t_max is None else t_max
    device = generator.device
    t = torch.randint(t_min, t_max + 1, (batch_size,), generator=generator, device=device)
    if terminal_oversample > 0:
        pick = torch.rand(batch_size, generator=generator, device=device) < terminal_oversample
        t = torch.where(pick, torch.full_like(t, num_timesteps - 1), t)
    return t


def logit_normal_times(
    batch_size: int,
    *,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> torch.Tensor:
    """t = shift(sigmoid(N(m, s²))) = sigmoid(N(m + ln shift, s²)) (Esser et al. 2024, §3.1)."""
    u = torch.randn(batch_size, generator=generator, device=generator.device) * std + mean
    t = flow_shift(torch.sigmoid(u), shift=shift)
    return t_min + (t_max - t_min) * t


def terminal_probability(*, num_timesteps: int, t_min: int, t_max: int, terminal_oversample: float) -> float:
    """P(t = N−1) = p + (1 − p)·[t_max = N−1]/(t_max − t_min + 1): how often the terminal step is trained."""
    uniform = (1.0 / (t_max - t_min + 1)) if t_max == num_timesteps - 1 else 0.0
    return terminal_oversample + (1 - terminal_oversample) * uniform


def build_level_sampler(
    objective: Objective,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    terminal_oversample: float = 0.0,
    shift: float = 1.0,
    logit_std: float = 1.0,
):
    """Per-sample training levels for `objective`: σ = table[uniform index] or flow t (logit-normal).

    Discrete objectives: t_min/t_max are table indices (inclusive), terminal_oversample the extra
    probability of the terminal index. Flow: t_min/t_max bound t ∈ [0, 1] (affinely), the logit-normal
    has mean ln(shift) and std logit_std. Build it from an objective already moved with `.to(device)`,
    so that indexing the table stays on the device.
    """
    if objective.prediction == "flow":
        if terminal_oversample:
            raise ValueError("terminal_oversample applies to discrete tables; flow reaches t = 1 continuously")
        lo, hi = 0.0 if t_min is None else float(t_min), 1.0 if t_max is None else float(t_max)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"flow needs 0 <= t_min < t_max <= 1, got t_min={lo}, t_max={hi}")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f"shift and logit_std must be positive, got shift={shift}, logit_std={logit_std}")

        def sample_flow(batch_size: int, *, generator: torch.Generator) -> torch.Tensor:
            return logit_normal_times(batch_size, generator=generator, mean=math.log(shift), std=logit_std, t_min=lo, t_max=hi)

        return sample_flow

    if shift != 1.0 or logit_std != 1.0:
        raise ValueError("shift and logit_std apply to flow only; the discrete objectives sample indices uniformly")
    n = objective.sigmas.numel()
    lo, hi = 0 if t_min is None else int(t_min), n - 1 if t_max is None else int(t_max)
    if not 0 <= lo <= hi <= n - 1:
        raise ValueError(f"timestep range must satisfy 0 <= t_min <= t_max <= {n - 1}, got {lo}..{hi}")
    if not 0.0 <= terminal_oversample < 1.0:
        raise ValueError(f"terminal_oversample is a probability in [0, 1), got {terminal_oversample}")
    if terminal_oversample and hi != n - 1:
        raise ValueError("terminal_oversample needs the terminal step inside the range: leave t_max at its default")
    sigmas32 = objective.sigmas.float()

    def sample_sigma(batch_size: int, *, generator: torch.Generator) -> torch.Tensor:
        idx = uniform_timesteps(
            batch_size, generator=generator, num_timesteps=n, t_min=lo, t_max=hi, terminal_oversample=terminal_oversample
        )
        return sigmas32.to(idx.device)[idx]

    return sample_sigma
