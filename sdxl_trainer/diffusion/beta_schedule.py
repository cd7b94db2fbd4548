"""The "beta" sampling schedule: steps placed at quantiles of a Beta(α, β) distribution over time.

Lee et al. 2024 ("Beta Sampling is All You Need") observe that a sampler's steps matter most at the
start and the end of the trajectory and place them at the quantiles of Beta(α, β): with α = β < 1
the quantiles crowd towards both ends. ComfyUI ships it as its "beta" scheduler with α = β = 0.6,
the default here; the bigASP v2.5 flow model is sampled with it.

For a schedule of n steps, the i-th level (i = 0 … n−1) sits at the quantile u_i = F⁻¹(1 − i/n) of
Beta(α, β), so u_0 = 1 (the start: pure noise) and the levels fall towards u = 0:

- σ-space models (a discrete table of N σ's): timestep round(u_i·(N − 1)), its σ; consecutive equal
  timesteps (the quantiles can round alike where they crowd) are kept once, so a schedule may have
  fewer than n steps, then 0;
- flow models: time t_i = shift(u_i) (the trained shift, :func:`flow_shift`), then 0.

The Beta quantile function is computed here (no SciPy): the regularized incomplete beta function
I_x(α, β) by its continued fraction (evaluated with the modified Lentz method), inverted by
bisection to double precision. Pure math: torch and math only.
"""

from __future__ import annotations

import math

import torch

from sdxl_trainer.diffusion.schedules import flow_shift

BETA_ALPHA = 0.6  # ComfyUI's beta scheduler defaults
BETA_BETA = 0.6
_TINY = 1e-300
_EPS = 1e-15


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), converging for x < (a + 1)/(a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    value = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even term d_2m
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # then d_2m+1
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            value *= c * d
        if abs(c * d - 1.0) < _EPS:
            return value
    raise ArithmeticError(f"incomplete beta did not converge at x={x}, a={a}, b={b}")


def beta_cdf(x: float, a: float, b: float) -> float:
    """I_x(a, b), the CDF of Beta(a, b) at x ∈ [0, 1]."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """F⁻¹(q) of Beta(a, b): the x with I_x(a, b) = q, by bisection (the CDF is increasing)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile must lie in [0, 1], got {q}")
    if q in (0.0, 1.0):
        return q
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # no double between them: converged
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_quantiles(n: int, *, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """u_i = F⁻¹(1 − i/n) for i = 0 … n−1: descending from 1, float64."""
    if n < 1:
        raise ValueError(f"the beta schedule needs n >= 1 steps, got {n}")
    return torch.tensor([beta_ppf(1.0 - i / n, alpha, beta) for i in range(n)], dtype=torch.float64)


def beta_sigmas(n: int, *, sigmas: torch.Tensor, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """σ of the table at timesteps round(u_i·(N − 1)), consecutive repeats kept once, then 0."""
    table = sigmas.to(torch.float64)
    steps = (beta_quantiles(n, alpha=alpha, beta=beta) * (table.numel() - 1)).round().long()
    steps = torch.unique_consecutive(steps)
    return torch.cat([table[steps], table.new_zeros(1)])


def beta_flow_times(n: int, *, shift: float = 1.0, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> torch.Tensor:
    """Flow times shift(u_i), then 0: the beta quantiles on the trained shift."""
    u = beta_quantiles(n, alpha=alpha, beta=beta)
    return torch.cat([flow_shift(u, shift=shift), u.new_zeros(1)])
