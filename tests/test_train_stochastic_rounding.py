"""Stochastic rounding to bf16: unbiased, only ever the two neighbours, reproducible — and why it is needed.

Statistical bounds: one rounding of x, whose bf16 neighbours are lo < x < hi = lo + u, is hi with
probability p = (x − lo)/u, so it has mean x and variance u²·p(1 − p). The mean of n independent
roundings therefore lies within 5·u·√(p(1 − p)/n) of x except with probability < 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_trainer.train.paramwise_optim import ParamwiseOptimizer
from sdxl_trainer.train.stochastic_rounding import rounding_seed, stochastic_round_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bf16 value at or towards zero from x, the next one away from zero), as fp32."""
    toward_zero = (x.view(torch.int32) & -65536).view(torch.float32)
    away = ((toward_zero.view(torch.int32)) + 65536).view(torch.float32)
    return toward_zero, away


@pytest.mark.parametrize("x", [1.0 + 2**-9, 1.0 + 2**-7 * 0.9, -3.1415927, 1e-3 + 1e-7, -2.5e-6, 123.456])
def test_mean_of_many_roundings_is_the_fp32_value(x):
    n = 1 << 20
    value = torch.full((n,), x, dtype=torch.float32)
    rounded = stochastic_round_bf16(value, generator=torch.Generator().manual_seed(0)).double()
    lo, hi = (t[0].double() for t in _neighbours(value[:1]))
    assert set(rounded.unique().tolist()) <= {lo.item(), hi.item()}  # only ever the two neighbours
    u = (hi - lo).abs().item()
    p = abs(float(value[0].double()) - lo.item()) / u
    bound = 5 * u * math.sqrt(p * (1 - p) / n)
    assert abs(rounded.mean().item() - float(value[0].double())) < bound
    assert 0.01 < p < 0.99  # the cases above are not representable: both neighbours occur
    assert abs((rounded == hi).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_representable_values_and_zero_come_back_unchanged():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.0, 0.15625, 3.0e38, -1.0e-30]).bfloat16().float()
    exact = exact.repeat(1000)
    out = stochastic_round_bf16(exact, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.float(), exact) and out.dtype == torch.bfloat16
    assert torch.equal(torch.signbit(out.float()), torch.signbit(exact))


def test_same_seed_same_bits_other_seed_other_bits():
    x = torch.randn(4096)
    a = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(rounding_seed(0, 3, 7)))
    b = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(rounding_seed(0, 3, 7)))
    c = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(rounding_seed(0, 3, 8)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    seeds = {rounding_seed(s, i, t) for s in range(3) for i in range(50) for t in range(50)}
    assert len(seeds) == 3 * 50 * 50 and max(seeds) < 2**63


def test_refuses_other_dtypes():
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round_bf16(torch.ones(3, dtype=torch.float64))


def _train(weights: torch.Tensor, grads: list[torch.Tensor], *, lr: float, rounding=None) -> list[torch.Tensor]:
    """AdamW over a fixed gradient sequence (no weight decay), so that its updates do not depend on the
    weights and the trajectories differ by rounding alone. The weights after every update."""
    p = torch.nn.Parameter(weights.clone())
    opt = ParamwiseOptimizer([{"params": [p]}], name="adamw", lr=lr, seed=5)
    if rounding is not None:
        opt._write = lambda param, value, **kw: param.copy_(rounding(value))
    path = [p.detach().float().clone()]
    for g in grads:
        p.grad = g.to(p.dtype)
        opt.step()
        path.append(p.detach().float().clone())
    return path


def test_small_updates_add_up_with_stochastic_rounding_and_stall_with_round_to_nearest():
    """lr 1e-4 on weights in [0.5, 1), where bf16's step u is 2⁻⁸ ≈ 3.9e-3: every AdamW update Δ (≈ lr)
    is below u/2, so round-to-nearest never moves a weight, while stochastic rounding follows fp32.

    From a bf16 weight, the update lands a fraction p = |Δ|/u into a bf16 interval, so each rounding
    adds an independent zero-mean error of variance u²·p(1 − p). After N updates the bf16 − fp32 error
    of a weight has mean 0 and variance Σₜ u²·pₜ(1 − pₜ) (computed from the fp32 path's own updates):
    its mean over D weights lies within 5·√(mean variance / D) of 0, and its mean square within a few
    per cent of the mean variance (relative sampling error √(2/D) ≈ 0.6 %).
    """
    torch.manual_seed(0)
    d, steps, lr, u = 1 << 16, 40, 1e-4, 2.0**-8
    w0 = (0.5 + 0.45 * torch.rand(d)).bfloat16().float()
    direction = torch.randn(d).sign()
    grads = [direction * (1 + 0.5 * torch.rand(d)) for _ in range(steps)]  # a steady push, as in a finetune
    fp32 = _train(w0, grads, lr=lr)
    sr = _train(w0.bfloat16(), grads, lr=lr)[-1]
    rtn = _train(w0.bfloat16(), grads, lr=lr, rounding=lambda v: v.to(torch.bfloat16))[-1]
    moved = (fp32[-1] - w0).abs().mean().item()
    assert moved > 0.9 * steps * lr  # the fp32 path moves every weight by ≈ N·lr ≈ u
    assert torch.equal(rtn, w0)  # round-to-nearest: stalled, every update lost
    p = torch.stack([(b - a).abs() / u for a, b in zip(fp32, fp32[1:])])
    assert p.max() < 0.5  # every update is below half a bf16 step
    variance = (u**2 * p * (1 - p)).sum(0).mean().item()
    err = sr - fp32[-1]
    assert abs(err.mean().item()) < 5 * math.sqrt(variance / d)
    assert 0.9 < err.pow(2).mean().item() / variance < 1.1
    assert ((sr - w0) * direction).mean().item() < -0.95 * moved  # SR moved with fp32 (−sign: descent)
