"""Training-time level sampling: uniform discrete (terminal included, oversampling, ranges), logit-normal flow."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_trainer.diffusion import (
    build_level_sampler,
    build_objective,
    flow_shift,
    logit_normal_times,
    terminal_probability,
    uniform_timesteps,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uniform_covers_every_step_including_the_terminal_one() -> None:
    t = uniform_timesteps(200_000, generator=_gen())
    assert t.dtype == torch.int64 and t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t, minlength=1000)
    assert (counts > 0).all()
    assert counts[999].item() == pytest.approx(200, rel=0.35)


def test_terminal_oversampling_frequency() -> None:
    n = 200_000
    t = uniform_timesteps(n, generator=_gen(), terminal_oversample=0.1)
    expected = terminal_probability(num_timesteps=1000, t_min=0, t_max=999, terminal_oversample=0.1)
    assert expected == pytest.approx(0.1 + 0.9 / 1000)
    assert (t == 999).float().mean().item() == pytest.approx(expected, abs=4 * math.sqrt(expected / n))
    # the rest stays uniform
    rest = torch.bincount(t[t != 999], minlength=1000)[:999].float()
    assert rest.std().item() / rest.mean().item() < 0.1


def test_range_limits_and_determinism() -> None:
    t = uniform_timesteps(10_000, generator=_gen(), t_min=200, t_max=700)
    assert t.min().item() == 200 and t.max().item() == 700
    assert torch.equal(uniform_timesteps(64, generator=_gen(5)), uniform_timesteps(64, generator=_gen(5)))
    assert not torch.equal(uniform_timesteps(64, generator=_gen(5)), uniform_timesteps(64, generator=_gen(6)))


@pytest.mark.parametrize("name", ["eps", "v", "v_ztsnr"])
def test_level_sampler_returns_table_sigmas(name: str) -> None:
    objective = build_objective(name)
    sigma = build_level_sampler(objective)(4096, generator=_gen())
    assert sigma.shape == (4096,) and sigma.dtype == torch.float32
    assert torch.isin(sigma, objective.sigmas.float()).all()
    limited = build_level_sampler(objective, t_min=0, t_max=99)(4096, generator=_gen())
    assert limited.max().item() <= objective.sigmas[99].item() * (1 + 1e-6)
    if name == "v_ztsnr":
        oversampled = build_level_sampler(objective, terminal_oversample=0.5)(4096, generator=_gen())
        assert (oversampled == 20000.0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_logit_normal_shift_is_mean_ln_shift() -> None:
    shifted = logit_normal_times(100_000, generator=_gen(1), shift=3.0)
    moved = logit_normal_times(100_000, generator=_gen(1), mean=math.log(3.0))
    torch.testing.assert_close(shifted, moved, rtol=0, atol=1e-6)
    logits = torch.logit(moved.double())
    assert logits.mean().item() == pytest.approx(math.log(3.0), abs=0.02)
    assert logits.std().item() == pytest.approx(1.0, abs=0.02)
    wide = torch.logit(logit_normal_times(100_000, generator=_gen(2), std=2.0).double())
    assert wide.std().item() == pytest.approx(2.0, abs=0.04)
    # bigASP's shift 3: the median t moves from 0.5 to 0.75
    assert moved.median().item() == pytest.approx(flow_shift(torch.tensor(0.5), shift=3.0).item(), abs=0.01)


def test_flow_level_sampler_range_and_shift() -> None:
    flow = build_objective("flow")
    t = build_level_sampler(flow, shift=3.0)(50_000, generator=_gen())
    assert 0.0 < t.min().item() and t.max().item() < 1.0
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    bounded = build_level_sampler(flow, t_min=0.2, t_max=0.6)(50_000, generator=_gen())
    assert 0.2 <= bounded.min().item() and bounded.max().item() <= 0.6


def test_level_sampler_errors() -> None:
    v, flow = build_objective("v_ztsnr"), build_objective("flow")
    with pytest.raises(ValueError, match="flow reaches t = 1"):
        build_level_sampler(flow, terminal_oversample=0.1)
    with pytest.raises(ValueError, match="0 <= t_min < t_max <= 1"):
        build_level_sampler(flow, t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="flow only"):
        build_level_sampler(v, shift=3.0)
    with pytest.raises(ValueError, match="t_min <= t_max"):
        build_level_sampler(v, t_min=10, t_max=1000)
    with pytest.raises(ValueError, match="terminal step inside the range"):
        build_level_sampler(v, t_max=900, terminal_oversample=0.1)
    with pytest.raises(ValueError, match="probability"):
        build_level_sampler(v, terminal_oversample=1.0)
