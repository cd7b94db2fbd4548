"""The "beta" sampling schedule (issue #16): Beta quantiles against closed forms, σ and flow schedules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdxl_trainer.diffusion import beta_flow_times, beta_ppf, beta_sigmas
from sdxl_trainer.diffusion.beta_schedule import beta_cdf, beta_quantiles
from sdxl_trainer.diffusion.schedules import flow_shift, sdxl_sigmas, zero_snr_sigmas
from sdxl_trainer.errors import UserError
from sdxl_trainer.sampling.sample import sampling_sigmas

QS = [1e-6, 0.001, 0.01, 0.1, 0.25, 0.5, 0.6, 0.9, 0.99, 0.999999]
CLOSED = {  # (a, b): the quantile function in closed form
    (0.5, 0.5): lambda q: math.sin(math.pi * q / 2) ** 2,  # the arcsine distribution
    (1.0, 1.0): lambda q: q,  # uniform
    (2.0, 1.0): lambda q: math.sqrt(q),  # CDF x²
    (1.0, 3.0): lambda q: 1 - (1 - q) ** (1 / 3),  # CDF 1 − (1 − x)³
    (3.0, 1.0): lambda q: q ** (1 / 3),
}


@pytest.mark.parametrize("ab", list(CLOSED))
def test_beta_quantiles_match_closed_forms(ab):
    for q in QS:
        assert beta_ppf(q, *ab) == pytest.approx(CLOSED[ab](q), rel=1e-12, abs=1e-15)
        assert beta_cdf(CLOSED[ab](q), *ab) == pytest.approx(q, rel=1e-11, abs=1e-15)


def test_comfyui_default_is_symmetric_and_crowds_at_both_ends():
    for q in QS:
        assert beta_ppf(q, 0.6, 0.6) + beta_ppf(1 - q, 0.6, 0.6) == pytest.approx(1.0, abs=1e-12)
    u = beta_quantiles(10)
    assert u[0] == 1.0 and torch.all(u[1:] < u[:-1])
    gaps = (u[:-1] - u[1:]).tolist()
    assert gaps[0] < gaps[4] and gaps[-1] < gaps[4]  # α = β < 1: small steps at the start and at the end
    with pytest.raises(ValueError):
        beta_ppf(1.5, 0.6, 0.6)


@pytest.mark.parametrize("table", [sdxl_sigmas(), zero_snr_sigmas()], ids=["sdxl", "v_ztsnr"])
def test_beta_sigmas_walk_the_table_from_its_top(table):
    n = 10
    s = beta_sigmas(n, sigmas=table)
    expected_t = [round(beta_ppf(1 - i / n, 0.6, 0.6) * (table.numel() - 1)) for i in range(n)]
    assert s[:-1].tolist() == table.to(torch.float64)[expected_t].tolist()
    assert s[0] == table[-1] and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    many = beta_sigmas(900, sigmas=table)  # quantiles that round to one timestep are kept once
    assert many.numel() - 1 < 900 and torch.all(many[1:] < many[:-1])


def test_beta_flow_times_are_the_shifted_quantiles():
    t = beta_flow_times(8, shift=3.0)
    assert t[0] == 1.0 and t[-1] == 0.0 and torch.all(t[1:] < t[:-1])
    assert torch.allclose(t[:-1], flow_shift(beta_quantiles(8), shift=3.0), rtol=0, atol=0)


def _gen(prediction: str, sigmas: torch.Tensor | None = None):
    obj = SimpleNamespace(prediction=prediction, sigmas=sigmas, sigma_max=None, sigma_min=None)
    return SimpleNamespace(objective=obj, flow_shift=3.0, info={"objective": prediction})


def test_generate_and_evaluate_offer_beta_for_sigma_and_flow_models():
    assert torch.equal(sampling_sigmas(_gen("v", zero_snr_sigmas()), steps=12, schedule="beta"),
                       beta_sigmas(12, sigmas=zero_snr_sigmas()))  # fmt: skip
    assert torch.equal(sampling_sigmas(_gen("flow"), steps=12, schedule="beta"), beta_flow_times(12, shift=3.0))
    with pytest.raises(UserError):
        sampling_sigmas(_gen("flow"), steps=12, schedule="karras")
