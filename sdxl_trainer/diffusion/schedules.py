"""Noise schedules: SDXL's discrete table, zero terminal SNR, σ↔timestep, sampling schedules, flow shift.

Notation (docs/diffusion.md §1): the variance-preserving forward process is
x_t = √ᾱ·x0 + √(1−ᾱ)·ε; in σ-space (Karras et al. 2022, EDM) the same point is x = x0 + σ·ε with
σ = √((1−ᾱ)/ᾱ), and SNR = ᾱ/(1−ᾱ) = 1/σ². Tables are float64 tensors of length N (N = 1000 for
SDXL), index 0 the least noisy. Sampling schedules are descending and end with a trailing 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SDXL_BETA_START = 0.00085
SDXL_BETA_END = 0.012
SDXL_NUM_TIMESTEPS = 1000
NOVELAI_SIGMA_MAX = 20000.0
"""NovelAI V3's finite stand-in for σ = ∞ at the zero-SNR terminal step (Ossa et al. 2024, §2.2)."""


def scaled_linear_betas(
    *, num_timesteps: int = SDXL_NUM_TIMESTEPS, beta_start: float = SDXL_BETA_START, beta_end: float = SDXL_BETA_END
) -> torch.Tensor:
    """β_i = (linspace(√β_start, √β_end, N))_i² — the "scaled_linear" schedule of SD/SDXL (Rombach et al. 2022)."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64) ** 2


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """β_t = 1 − ᾱ_t/ᾱ_{t−1}, β_0 = 1 − ᾱ_0 (inverse of Ho et al. 2020, eq. 4)."""
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ) (Karras et al. 2022, Table 1, VP column); ᾱ = 0 gives σ = ∞."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1 + σ²) (inverse of σ = √((1 − ᾱ)/ᾱ)); σ = ∞ gives ᾱ = 0."""
    return 1.0 / (1.0 + sigma**2)


def snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """SNR = 1/σ² = ᾱ/(1 − ᾱ) (Kingma et al. 2021, §2); σ = ∞ gives 0, σ = 0 gives ∞."""
    return sigma.pow(-2)


def log_snr_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """log SNR = −2·log σ (Kingma et al. 2021, §2): the x axis of every schedule comparison plot."""
    return -2.0 * sigma.log()


def rescale_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """√ᾱ ← (√ᾱ − √ᾱ_T)·√ᾱ_0/(√ᾱ_0 − √ᾱ_T): ᾱ_T = 0, ᾱ_0 kept (Lin et al. 2023, Algorithm 1)."""
    root = alpha_bar.sqrt()
    root_0, root_T = root[0].clone(), root[-1].clone()
    return ((root - root_T) * root_0 / (root_0 - root_T)) ** 2


def with_terminal_sigma(sigmas: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Replace the last table entry by a finite σ_max (NovelAI V3 §2.2: σ ≈ 20000 stands in for ∞)."""
    if not math.isfinite(sigma_max) or sigma_max <= 0:
        raise ValueError(f"sigma_max must be a finite positive number, got {sigma_max}")
    if sigmas.numel() > 1 and not sigma_max > float(sigmas[-2]):
        raise ValueError(
            f"sigma_max={sigma_max} is not above the second-to-last table entry {float(sigmas[-2]):.6g}: "
            "the table would stop increasing; pick a larger sigma_max"
        )
    out = sigmas.clone()
    out[-1] = sigma_max
    return out


def sdxl_alpha_bar(*, zero_terminal_snr: bool = False) -> torch.Tensor:
    """ᾱ of SDXL's scaled_linear(0.00085, 0.012, 1000), optionally Lin-rescaled so that ᾱ_999 = 0."""
    alpha_bar = alpha_bar_from_betas(scaled_linear_betas())
    return rescale_zero_terminal_snr(alpha_bar) if zero_terminal_snr else alpha_bar


def sdxl_sigmas() -> torch.Tensor:
    """SDXL's training σ table, σ_0 = 0.0292 … σ_999 = 14.6146 (σ = √((1 − ᾱ)/ᾱ))."""
    return sigma_from_alpha_bar(sdxl_alpha_bar())


def zero_snr_sigmas(*, sigma_max: float = NOVELAI_SIGMA_MAX, rescale: bool = True) -> torch.Tensor:
    """High-σ zero-terminal-SNR table: Lin-rescaled σ (σ_999 = ∞) with σ_999 := σ_max (NovelAI V3 §2.2).

    rescale=False keeps SDXL's table and only replaces its last entry (14.6 → σ_max); see
    docs/diffusion.md §2 for why the rescaled form is the default.
    """
    alpha_bar = sdxl_alpha_bar(zero_terminal_snr=rescale)
    return with_terminal_sigma(sigma_from_alpha_bar(alpha_bar), sigma_max)


def check_sigma_table(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a table once, at build time: 1-D, finite, positive, strictly increasing (for σ↔t)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"a sigma table must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas > 0).all()):
        raise ValueError("a sigma table must be finite and positive; replace σ = ∞ with with_terminal_sigma()")
    if not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("a sigma table must be strictly increasing (index 0 = least noise)")
    return sigmas


def sigma_to_t(sigma: torch.Tensor, *, sigmas: torch.Tensor) -> torch.Tensor:
    """t(σ): linear interpolation of log σ over the table, clamped to [0, N−1] (k-diffusion DiscreteSchedule)."""
    dtype = torch.promote_types(sigma.dtype, torch.float32) if sigma.is_floating_point() else torch.float32
    log_sigmas = sigmas.to(device=sigma.device, dtype=dtype).log()
    log_sigma = sigma.to(dtype).log()
    high = torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True).clamp(1, log_sigmas.numel() - 1)
    low = high - 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    return low.to(dtype) + w


def t_to_sigma(t: torch.Tensor, *, sigmas: torch.Tensor) -> torch.Tensor:
    """σ(t) = exp((1 − w)·log σ_⌊t⌋ + w·log σ_⌈t⌉), w = t − ⌊t⌋ (k-diffusion DiscreteSchedule.t_to_sigma)."""
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    log_sigmas = sigmas.to(device=t.device, dtype=dtype).log()
    t = t.to(dtype).clamp(0, log_sigmas.numel() - 1)
    low = t.floor().long().clamp(max=log_sigmas.numel() - 2)
    w = t - low.to(dtype)
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


# --- sampling schedules: descending σ, trailing 0 -------------------------------------------------


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0 (Karras et al. 2022, eq. 5)."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 steps, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def trailing_timesteps(n: int, *, num_timesteps: int = SDXL_NUM_TIMESTEPS) -> torch.Tensor:
    """round(arange(N, 0, −N/n)) − 1: starts at the terminal step N−1 (Lin et al. 2023, §3.3, Table 2)."""
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"trailing spacing needs 1 <= n <= {num_timesteps}, got {n}")
    return (torch.arange(num_timesteps, 0, -num_timesteps / n, dtype=torch.float64).round() - 1).long()


def trailing_sigmas(n: int, *, sigmas: torch.Tensor) -> torch.Tensor:
    """σ at the trailing timesteps of the table, then 0 (Lin et al. 2023, §3.3)."""
    return _append_zero(sigmas.to(torch.float64)[trailing_timesteps(n, num_timesteps=sigmas.numel())])


def uniform_sigmas(n: int, *, sigmas: torch.Tensor) -> torch.Tensor:
    """σ(t) at t = linspace(N−1, 0, n), then 0 (k-diffusion DiscreteSchedule.get_sigmas)."""
    t = torch.linspace(sigmas.numel() - 1, 0, n, dtype=torch.float64)
    return _append_zero(t_to_sigma(t, sigmas=sigmas.to(torch.float64)))


def flow_shift(t: torch.Tensor, *, shift: float) -> torch.Tensor:
    """t' = s·t/(1 + (s − 1)·t), i.e. logit t' = logit t + ln s (Esser et al. 2024, §5.3.2)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(n: int, *, shift: float = 1.0) -> torch.Tensor:
    """Flow sampling times: t' = shift(linspace(1, 0, n + 1)), from pure noise t = 1 down to t = 0."""
    if n < 1:
        raise ValueError(f"flow_times needs n >= 1 steps, got {n}")
    return flow_shift(torch.linspace(1, 0, n + 1, dtype=torch.float64), shift=shift)


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """σ = t/(1 − t): x_t/(1 − t) = x0 + t/(1 − t)·ε puts flow time t in σ-space (∞ at t = 1)."""
    return t / (1 - t)


def flow_log_snr(t: torch.Tensor) -> torch.Tensor:
    """log SNR = 2·log((1 − t)/t) for x_t = (1 − t)·x0 + t·ε (Esser et al. 2024, §2: λ = log a²/b²)."""
    return 2.0 * ((1 - t) / t).log()


class ScheduleCurve(NamedTuple):
    """One schedule for the comparison plots: position u ∈ [0, 1] (timestep/(N−1) or flow time before shift)."""

    name: str
    u: torch.Tensor
    sigma: torch.Tensor
    log_snr: torch.Tensor


def schedule_curves(*, sigma_max: float = NOVELAI_SIGMA_MAX, flow_shifts=(1.0, 3.0, 6.0), num: int = 1000):
    """σ(u) and log-SNR(u) for SDXL, Lin's zero-SNR rescale (σ_T = ∞), the high-σ table and flow shifts."""
    tables = {
        "sdxl": sdxl_sigmas(),
        "zero_snr_rescale": sigma_from_alpha_bar(sdxl_alpha_bar(zero_terminal_snr=True)),
        f"high_sigma_{sigma_max:g}": zero_snr_sigmas(sigma_max=sigma_max),
    }
    u_table = torch.linspace(0, 1, SDXL_NUM_TIMESTEPS, dtype=torch.float64)
    curves = [ScheduleCurve(name, u_table, sig, log_snr_from_sigma(sig)) for name, sig in tables.items()]
    u = torch.linspace(0, 1, num, dtype=torch.float64)
    for shift in flow_shifts:
        t = flow_shift(u, shift=shift)
        curves.append(ScheduleCurve(f"flow_shift_{shift:g}", u, flow_sigma(t), flow_log_snr(t)))
    return curves


# --- high-resolution coherence ---------------------------------------------------------------------


def sigma_max_for_resolution(
    sigma_max: float, *, height: int, width: int, base_height: int = 1024, base_width: int = 1024
) -> float:
    """σ_max' = σ_max·√(h·w/(h₀·w₀)): doubling the canvas side doubles σ_max (Ossa et al. 2024)."""
    if min(height, width, base_height, base_width) <= 0:
        raise ValueError(f"sizes must be positive, got {height}x{width} over {base_height}x{base_width}")
    return sigma_max * math.sqrt((height * width) / (base_height * base_width))


def mean_signal_fraction(
    sigma: torch.Tensor | float, *, latent_height: int, latent_width: int, mean_std: float = 1.0
) -> torch.Tensor:
    """Signal share of a channel's spatial mean at noise σ: s²/(s² + σ²/(h·w)) (docs/diffusion.md eq. M1).

    The mean of h·w noisy positions carries the image mean (spread s across images) plus noise of
    standard deviation σ/√(h·w); the fraction is also the optimal linear estimator's gain.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    noise_var = sigma**2 / (latent_height * latent_width)
    return mean_std**2 / (mean_std**2 + noise_var)
