"""Samplers: the black-image effect in closed form, σ = 20000 in fp32/bf16, accuracy, determinism, callbacks."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_trainer.diffusion import (
    SAMPLERS,
    ancestral_step,
    build_objective,
    c_in,
    c_out_v,
    c_skip_v,
    flow_times,
    get_sampler,
    karras_sigmas,
    preview_collector,
    prior_noise,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
    sdxl_sigmas,
    t_to_sigma,
)

LEVELS = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
SIGMA_MIN = 0.0292
SDXL_SIGMA_MAX = sdxl_sigmas()[-1].item()  # 14.6146


def flat_image_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for flat images of brightness m ∈ LEVELS (equally likely), x = m·1 + σε.

    log p(m | x) = N·(m·x̄ − m²/2)/σ² + const, N = pixels per image, x̄ = the image mean.
    """
    n = x[0].numel()
    mean = x.flatten(1).mean(1, keepdim=True).double()
    logits = n * (LEVELS * mean - LEVELS**2 / 2) / sigma.double().view(-1, 1) ** 2
    brightness = (logits.softmax(dim=1) * LEVELS).sum(dim=1)
    return brightness.float().view(-1, 1, 1, 1).expand_as(x)


def _brightness_shares(final: torch.Tensor) -> torch.Tensor:
    nearest = (final.flatten(1).double().mean(1)[None, :] - LEVELS[:, None]).abs().argmin(0)
    return torch.bincount(nearest, minlength=5).double() / final.shape[0]


def _sample_flat(sigma_max: float, *, batch: int = 2000, model=flat_image_denoiser, seed: int = 0):
    x = prior_noise((batch, 4, 32, 32), sigma_max=sigma_max, generator=torch.Generator().manual_seed(seed))
    sigmas = karras_sigmas(40, sigma_min=SIGMA_MIN, sigma_max=sigma_max)
    return sample_euler(model, x, sigmas)


def test_black_image_effect_in_closed_form() -> None:
    """From SDXL's σ_max = 14.6 pure noise almost never becomes black; from σ_max = 20000 it does, ~1 in 5."""
    from_sdxl = _brightness_shares(_sample_flat(SDXL_SIGMA_MAX))
    from_high = _brightness_shares(_sample_flat(20000.0))
    assert from_sdxl[0].item() <= 0.005  # measured: 0.05 % (1 of 2000)
    assert from_sdxl[2].item() > 0.6  # pulled to mid-grey: the starting noise's mean is ~0
    assert 0.15 <= from_high[0].item() <= 0.25  # measured: 17.6 %, the data holds 20 %
    assert ((from_high >= 0.15) & (from_high <= 0.25)).all(), from_high


def _v_unet_from_denoiser(denoiser, table):
    """The v-prediction network whose σ-space denoiser is `denoiser`: F = (D − c_skip·x)/c_out."""

    def unet(noisy, timestep):
        sigma = t_to_sigma(timestep, sigmas=table).float()
        x = noisy.float() / c_in(sigma).view(-1, 1, 1, 1)
        return (denoiser(x, sigma) - c_skip_v(sigma).view(-1, 1, 1, 1) * x) / c_out_v(sigma).view(-1, 1, 1, 1)

    return unet


def test_black_image_effect_through_the_v_ztsnr_unet_wrapper() -> None:
    """The same experiment driven through objective.denoiser(v-UNet) at σ_max = 20000 gives the same images."""
    objective = build_objective("v_ztsnr")
    wrapped = objective.denoiser(_v_unet_from_denoiser(flat_image_denoiser, objective.sigmas))
    direct = _sample_flat(20000.0, batch=400, seed=1)
    through_unet = _sample_flat(20000.0, batch=400, seed=1, model=wrapped)
    b_direct, b_unet = direct.flatten(1).mean(1), through_unet.flatten(1).mean(1)
    assert (b_direct - b_unet).abs().max().item() < 0.05
    assert torch.equal(_brightness_shares(direct), _brightness_shares(through_unet))


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_starting_at_sigma_20000_is_sane(name: str, dtype: torch.dtype) -> None:
    objective = build_objective("v_ztsnr")
    seen: list[torch.Tensor] = []

    def unet(noisy, timestep):  # a bf16/fp32 network that predicts v ≈ −0.9·(its input)
        seen.append(noisy)
        assert noisy.dtype == dtype and torch.isfinite(noisy).all()
        return (-0.9 * noisy).to(dtype)

    denoiser = objective.denoiser(unet, dtype=dtype)
    x = prior_noise((2, 4, 64, 64), sigma_max=20000.0, generator=torch.Generator().manual_seed(0)).to(dtype)
    previews: list[torch.Tensor] = []
    sigmas = karras_sigmas(12, sigma_min=objective.sigma_min, sigma_max=objective.sigma_max)
    out = get_sampler(name)(
        denoiser, x, sigmas, callback=lambda info: previews.append(info["denoised"]), generator=torch.Generator().manual_seed(1)
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(torch.isfinite(p).all() for p in previews) and len(previews) == 12
    first = seen[0].float()
    assert first.var().item() == pytest.approx(1.0, abs=0.03)  # c_in·x = x/√(σ²+1) has unit variance
    assert first.mean().abs().item() < 0.03


def _gaussian_denoiser(mu: float, s: float):
    """Exact E[x0 | x] for x0 ~ N(μ, s²) per dimension: μ + s²/(s² + σ²)·(x − μ)."""

    def denoise(x, sigma):
        sig2 = sigma.view(-1, 1, 1, 1).double() ** 2
        return (mu + s**2 / (s**2 + sig2) * (x.double() - mu)).float()

    return denoise


def test_ode_samplers_converge_at_their_order() -> None:
    """Euler is first order (error ÷3 for 3× the steps), DPM++ 2M second order (÷9) on the exact ODE."""
    mu, s, sigma_max = 0.3, 0.5, 80.0
    x = prior_noise((4, 4, 16, 16), sigma_max=sigma_max, generator=torch.Generator().manual_seed(0))
    exact = mu + (x.double() - mu) * s / math.sqrt(s**2 + sigma_max**2)  # the probability-flow ODE solved exactly
    errors = {}
    for name, sampler in (("euler", sample_euler), ("dpmpp_2m", sample_dpmpp_2m)):
        for n in (30, 100, 300):
            out = sampler(_gaussian_denoiser(mu, s), x, karras_sigmas(n, sigma_min=0.002, sigma_max=sigma_max))
            errors[name, n] = (out.double() - exact).abs().max().item()
    assert 2.5 < errors["euler", 100] / errors["euler", 300] < 3.6, errors
    assert 7.0 < errors["dpmpp_2m", 100] / errors["dpmpp_2m", 300] < 12.0, errors
    assert errors["dpmpp_2m", 30] < errors["euler", 30] / 3
    assert errors["dpmpp_2m", 300] < 1e-3


def test_samplers_from_20000_reach_the_data_distribution() -> None:
    mu, s = 0.3, 0.5
    x = prior_noise((16, 4, 32, 32), sigma_max=20000.0, generator=torch.Generator().manual_seed(0))
    for sampler, n in ((sample_dpmpp_2m, 60), (sample_euler, 400), (sample_euler_ancestral, 400)):
        sigmas = karras_sigmas(n, sigma_min=0.0292, sigma_max=20000.0)
        out = sampler(_gaussian_denoiser(mu, s), x, sigmas, generator=torch.Generator().manual_seed(2))
        assert out.mean().item() == pytest.approx(mu, abs=0.01), sampler.__name__
        assert out.std().item() == pytest.approx(s, rel=0.06), sampler.__name__


def test_flow_euler_solves_the_rectified_flow_ode() -> None:
    mu, s = 0.3, 0.5

    def flow_gaussian_denoiser(x, t):  # E[x0 | x_t], x_t = (1−t)·x0 + t·ε, x0 ~ N(μ, s²)
        t = t.view(-1, 1, 1, 1).double()
        gain = (1 - t) * s**2 / ((1 - t) ** 2 * s**2 + t**2)
        return (mu + gain * (x.double() - (1 - t) * mu)).float()

    x = prior_noise((4, 4, 16, 16), sigma_max=1.0, generator=torch.Generator().manual_seed(0))
    exact = mu + s * x  # the flow ODE for Gaussian data maps x_1 to μ + s·x_1
    err = {
        n: (sample_flow_euler(flow_gaussian_denoiser, x, flow_times(n, shift=3.0)) - exact).abs().max().item()
        for n in (50, 500)
    }
    assert err[500] < 0.02 and 7.0 < err[50] / err[500] < 13.0, err  # first order
    # a point mass is reached exactly, whatever the steps: Euler is exact on straight paths
    point = sample_flow_euler(lambda x, t: torch.full_like(x, 0.7), x, flow_times(3, shift=6.0))
    torch.testing.assert_close(point, torch.full_like(x, 0.7))


def test_flow_objective_denoiser_with_flow_euler() -> None:
    objective = build_objective("flow")
    target = torch.full((2, 4, 8, 8), -0.4)
    velocity_unet = lambda x, timestep: (x - target) / (timestep / 1000).view(-1, 1, 1, 1)  # noqa: E731
    x = prior_noise((2, 4, 8, 8), sigma_max=1.0, generator=torch.Generator().manual_seed(0))
    out = sample_flow_euler(objective.denoiser(velocity_unet), x, flow_times(4, shift=3.0))
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


def test_determinism_under_a_generator() -> None:
    model = _gaussian_denoiser(0.0, 1.0)
    sigmas = karras_sigmas(8, sigma_min=0.03, sigma_max=20000.0)
    x = prior_noise((2, 4, 8, 8), sigma_max=20000.0, generator=torch.Generator().manual_seed(0))
    a = sample_euler_ancestral(model, x, sigmas, generator=torch.Generator().manual_seed(7))
    b = sample_euler_ancestral(model, x, sigmas, generator=torch.Generator().manual_seed(7))
    c = sample_euler_ancestral(model, x, sigmas, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(prior_noise((3,), sigma_max=2.0, generator=torch.Generator().manual_seed(1)),
                       prior_noise((3,), sigma_max=2.0, generator=torch.Generator().manual_seed(1)))
    for sampler in (sample_euler, sample_dpmpp_2m):
        assert torch.equal(sampler(model, x, sigmas), sampler(model, x, sigmas))


def test_ancestral_step_splits_the_variance() -> None:
    down, up = ancestral_step(20000.0, 3728.78)
    assert down**2 + up**2 == pytest.approx(3728.78**2)
    assert ancestral_step(5.0, 2.0, eta=0.0) == (2.0, 0.0)
    assert ancestral_step(5.0, 0.0) == (0.0, 0.0)


def test_callback_receives_x0_previews() -> None:
    sigmas = karras_sigmas(6, sigma_min=0.03, sigma_max=20000.0)
    x = prior_noise((2, 4, 8, 8), sigma_max=20000.0, generator=torch.Generator().manual_seed(0))
    calls: list[dict] = []
    sample_euler(_gaussian_denoiser(0.5, 0.1), x, sigmas, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(6))
    assert [c["sigma"] for c in calls] == pytest.approx(sigmas[:-1].tolist())
    assert [c["sigma_next"] for c in calls] == pytest.approx(sigmas[1:].tolist())
    assert {"i", "sigma", "sigma_next", "x", "denoised"} <= set(calls[0])
    assert calls[0]["denoised"].shape == x.shape
    assert calls[-1]["denoised"].mean().item() == pytest.approx(0.5, abs=0.02)  # the preview converges
    callback, previews = preview_collector(every=2)
    sample_dpmpp_2m(_gaussian_denoiser(0.5, 0.1), x, sigmas, callback=callback)
    assert [p["i"] for p in previews] == [0, 2, 4] and previews[0]["denoised"].device.type == "cpu"


def test_sampler_registry_and_errors() -> None:
    assert set(SAMPLERS) == {"euler", "euler_ancestral", "dpmpp_2m", "flow_euler"}
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match="at least two"):
        sample_euler(_gaussian_denoiser(0, 1), torch.zeros(1, 1, 2, 2), torch.tensor([1.0]))
