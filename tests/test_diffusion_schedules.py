"""Schedules against shared/reference/diffusion-facts.md and against diffusers' own implementations."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_trainer.diffusion import (
    NOVELAI_SIGMA_MAX,
    alpha_bar_from_sigma,
    betas_from_alpha_bar,
    check_sigma_table,
    flow_log_snr,
    flow_shift,
    flow_sigma,
    flow_times,
    karras_sigmas,
    log_snr_from_sigma,
    mean_signal_fraction,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    schedule_curves,
    sdxl_alpha_bar,
    sdxl_sigmas,
    sigma_from_alpha_bar,
    sigma_max_for_resolution,
    sigma_to_t,
    snr_from_sigma,
    t_to_sigma,
    trailing_sigmas,
    trailing_timesteps,
    uniform_sigmas,
    with_terminal_sigma,
    zero_snr_sigmas,
)

F64 = torch.float64


def _t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --- SDXL's discrete schedule (facts §"SDXL's discrete schedule") ----------------------------------


def test_sdxl_alpha_bar_values() -> None:
    alpha_bar = sdxl_alpha_bar()
    assert alpha_bar.dtype == F64 and alpha_bar.shape == (1000,)
    assert alpha_bar[0].item() == pytest.approx(0.99915, abs=1e-12)
    assert alpha_bar[499].item() == pytest.approx(0.27766965, abs=5e-9)
    assert alpha_bar[999].item() == pytest.approx(0.00466010, abs=5e-9)


def test_sdxl_alpha_bar_matches_diffusers_float32() -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert sched.alphas_cumprod[999].item() == pytest.approx(0.004660095, abs=1e-9)
    torch.testing.assert_close(sched.alphas_cumprod.double(), sdxl_alpha_bar(), rtol=1e-5, atol=1e-7)


def test_sdxl_sigmas_and_terminal_snr() -> None:
    sigmas = sdxl_sigmas()
    assert sigmas[0].item() == pytest.approx(0.02916716, abs=5e-9)
    assert sigmas[499].item() == pytest.approx(1.6128862, abs=5e-8)
    assert sigmas[999].item() == pytest.approx(14.6146412, abs=5e-8)
    assert snr_from_sigma(sigmas[999]).item() == pytest.approx(0.00468192, abs=5e-9)
    # SNR = ᾱ/(1 − ᾱ) both ways, and ᾱ = 1/(1 + σ²) inverts σ(ᾱ)
    alpha_bar = sdxl_alpha_bar()
    torch.testing.assert_close(snr_from_sigma(sigmas), alpha_bar / (1 - alpha_bar))
    torch.testing.assert_close(alpha_bar_from_sigma(sigmas), alpha_bar)
    torch.testing.assert_close(log_snr_from_sigma(sigmas), (alpha_bar / (1 - alpha_bar)).log())


def test_scaled_linear_betas_definition() -> None:
    betas = scaled_linear_betas()
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    torch.testing.assert_close(betas, torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2)
    torch.testing.assert_close(betas_from_alpha_bar(sdxl_alpha_bar()), betas)


# --- Zero terminal SNR -----------------------------------------------------------------------------


def test_lin_rescale_values() -> None:
    alpha_bar = sdxl_alpha_bar(zero_terminal_snr=True)
    assert alpha_bar[999].item() == 0.0
    assert alpha_bar[0].item() == pytest.approx(0.99915, abs=1e-12)
    assert alpha_bar[499].item() == pytest.approx(0.24235917, abs=5e-9)
    assert betas_from_alpha_bar(alpha_bar)[999].item() == pytest.approx(1.0, abs=1e-12)
    sigmas = sigma_from_alpha_bar(alpha_bar)
    assert sigmas[997].item() == pytest.approx(1124.553, abs=5e-4)
    assert sigmas[998].item() == pytest.approx(2254.238, abs=5e-4)
    assert math.isinf(sigmas[999].item())


def test_lin_rescale_matches_diffusers() -> None:
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

    betas = scaled_linear_betas()
    theirs = torch.cumprod(1 - diffusers_rescale(betas.clone()), dim=0)
    torch.testing.assert_close(rescale_zero_terminal_snr(sdxl_alpha_bar()), theirs, rtol=1e-10, atol=1e-12)
    # and diffusers' float32 scheduler built with the flag agrees on all but its 2⁻²⁴ terminal stand-in
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    assert sched.alphas_cumprod[-1].item() == pytest.approx(2.0**-24)
    torch.testing.assert_close(sched.alphas_cumprod[:-1].double(), theirs[:-1], rtol=1e-4, atol=1e-7)


def test_high_sigma_table_default_is_lin_rescale_with_finite_terminal() -> None:
    table = zero_snr_sigmas()
    assert NOVELAI_SIGMA_MAX == 20000.0
    assert table[-1].item() == 20000.0 and torch.isfinite(table).all()
    torch.testing.assert_close(table[:-1], sigma_from_alpha_bar(sdxl_alpha_bar(zero_terminal_snr=True))[:-1])
    check_sigma_table(table)
    replaced = zero_snr_sigmas(sigma_max=30000.0, rescale=False)
    torch.testing.assert_close(replaced[:-1], sdxl_sigmas()[:-1])
    assert replaced[-1].item() == 30000.0


def test_finite_stand_ins_for_infinite_sigma() -> None:
    # diffusers' Euler sets ᾱ_999 = 2⁻²⁴ (σ = 4096), ComfyUI's zsnr ᾱ_999 = 4.8973451890853435e-08 (σ ≈ 4518.8)
    assert sigma_from_alpha_bar(_t(2.0**-24)).item() == pytest.approx(4096.0, abs=1e-3)
    assert sigma_from_alpha_bar(_t(4.8973451890853435e-08)).item() == pytest.approx(4518.8, abs=0.05)
    for stand_in in (4096.0, 4518.8, NOVELAI_SIGMA_MAX):
        table = zero_snr_sigmas(sigma_max=stand_in)
        assert sigma_to_t(_t(stand_in), sigmas=table).item() == 999.0


@pytest.mark.parametrize("bad", [math.inf, -1.0, 0.0])
def test_with_terminal_sigma_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite positive"):
        with_terminal_sigma(sdxl_sigmas(), bad)


def test_with_terminal_sigma_rejects_non_increasing() -> None:
    with pytest.raises(ValueError, match="second-to-last"):
        zero_snr_sigmas(sigma_max=1000.0)  # below σ[998] = 2254 of the rescaled table


def test_check_sigma_table_rejects_infinite_and_unsorted() -> None:
    with pytest.raises(ValueError, match="finite"):
        check_sigma_table(sigma_from_alpha_bar(sdxl_alpha_bar(zero_terminal_snr=True)))
    with pytest.raises(ValueError, match="increasing"):
        check_sigma_table(sdxl_sigmas().flip(0))


# --- σ ↔ t -----------------------------------------------------------------------------------------


def test_sigma_to_t_reference_values() -> None:
    assert sigma_to_t(_t(1.0), sigmas=sdxl_sigmas()).item() == pytest.approx(353.8904, abs=5e-5)
    raised = with_terminal_sigma(sdxl_sigmas(), 20000.0)
    t = sigma_to_t(_t(20000.0, 100.0), sigmas=raised)
    assert t[0].item() == pytest.approx(999.0, abs=1e-9)
    assert t[1].item() == pytest.approx(998.2669, abs=5e-5)


def test_sigma_to_t_clamps_and_inverts() -> None:
    sigmas = sdxl_sigmas()
    t = sigma_to_t(_t(0.0, 1e-6, 1e6, math.inf), sigmas=sigmas)
    assert t.tolist() == [0.0, 0.0, 999.0, 999.0]
    assert torch.equal(sigma_to_t(sigmas, sigmas=sigmas), torch.arange(1000, dtype=F64))
    grid = torch.linspace(0, 999, 777, dtype=F64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(grid, sigmas=sigmas), sigmas=sigmas), grid)


def test_sigma_to_t_matches_diffusers_karras_timesteps() -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    sched.set_timesteps(5)
    ours = sigma_to_t(sched.sigmas[:-1].double(), sigmas=sdxl_sigmas())
    torch.testing.assert_close(ours, sched.timesteps.double(), rtol=0, atol=2e-3)


def test_sigma_to_t_float32_on_bfloat16_input() -> None:
    t = sigma_to_t(torch.tensor([1.0], dtype=torch.bfloat16), sigmas=sdxl_sigmas())
    assert t.dtype == torch.float32 and t.item() == pytest.approx(353.8904, abs=1e-3)


# --- sampling schedules ----------------------------------------------------------------------------


def test_karras_reference_values() -> None:
    high = karras_sigmas(5, sigma_min=0.0292, sigma_max=20000.0)
    torch.testing.assert_close(high, _t(20000, 3728.78, 407.272, 15.6732, 0.0292, 0), rtol=2e-6, atol=0)
    sigmas = sdxl_sigmas()
    sdxl = karras_sigmas(5, sigma_min=sigmas[0].item(), sigma_max=sigmas[-1].item())
    torch.testing.assert_close(sdxl, _t(14.614641, 4.796535, 1.274100, 0.247950, 0.029167, 0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [5, 28, 40])
def test_karras_matches_diffusers(n: int) -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    sched.set_timesteps(n)
    sigmas = sdxl_sigmas()
    ours = karras_sigmas(n, sigma_min=sigmas[0].item(), sigma_max=sigmas[-1].item())
    torch.testing.assert_close(ours.float(), sched.sigmas, rtol=1e-5, atol=1e-6)


def test_trailing_reference_and_diffusers() -> None:
    from diffusers import EulerDiscreteScheduler

    assert trailing_timesteps(5).tolist() == [999, 799, 599, 399, 199]
    for n in (5, 10, 30):
        sched = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
        )
        sched.set_timesteps(n)
        assert trailing_timesteps(n).tolist() == sched.timesteps.long().tolist()
    table = zero_snr_sigmas()
    sig = trailing_sigmas(5, sigmas=table)
    assert sig[0].item() == 20000.0 and sig[-1].item() == 0.0  # the first step starts at σ_max
    torch.testing.assert_close(sig[1:-1], table[[799, 599, 399, 199]])


def test_uniform_sigmas_span_the_table() -> None:
    table = zero_snr_sigmas()
    sig = uniform_sigmas(10, sigmas=table)
    assert sig.shape == (11,) and sig[-1].item() == 0.0
    assert sig[0].item() == pytest.approx(20000.0) and sig[-2].item() == pytest.approx(table[0].item())
    assert bool((sig[1:] < sig[:-1]).all())


def test_flow_shift_reference_values() -> None:
    assert flow_shift(_t(0.5, 0.25, 0.001), shift=3.0).tolist() == pytest.approx([0.75, 0.5, 0.0029940], abs=5e-8)
    # shift s is the same as moving the logit by ln s
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    torch.testing.assert_close(flow_shift(t, shift=3.0), torch.sigmoid(torch.logit(t) + math.log(3.0)))
    times = flow_times(4, shift=3.0)
    assert times[0].item() == 1.0 and times[-1].item() == 0.0 and times.shape == (5,)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_shift_matches_diffusers_timesteps(shift: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = torch.linspace(1, 1000, 1000, dtype=F64).flip(0) / 1000
    torch.testing.assert_close((1000 * flow_shift(base, shift=shift)).float(), sched.timesteps, rtol=1e-6, atol=1e-4)
    if shift == 3.0:
        assert sched.timesteps[[0, 500, 999]].tolist() == pytest.approx([1000, 750, 2.99401], abs=1e-4)


# --- high-resolution coherence ---------------------------------------------------------------------


def test_sigma_max_for_resolution_doubles_with_side() -> None:
    assert sigma_max_for_resolution(14.6, height=2048, width=2048) == pytest.approx(29.2)
    assert sigma_max_for_resolution(14.6, height=1024, width=1024) == pytest.approx(14.6)
    assert sigma_max_for_resolution(10.0, height=512, width=2048) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        sigma_max_for_resolution(14.6, height=0, width=1024)


def test_mean_signal_fraction() -> None:
    # a 1024² latent (128²): at SDXL's σ_max the image mean is still 98.7 % signal; at 20000 it is gone
    at_sdxl = mean_signal_fraction(14.6146412, latent_height=128, latent_width=128).item()
    assert at_sdxl == pytest.approx(1 / (1 + 14.6146412**2 / 128**2), rel=1e-12)
    assert at_sdxl == pytest.approx(0.98713, abs=1e-5)
    assert mean_signal_fraction(20000.0, latent_height=128, latent_width=128).item() < 5e-5
    # doubling the side and σ_max together keeps the fraction (NovelAI's rule), doubling the side alone raises it
    base = mean_signal_fraction(14.6, latent_height=128, latent_width=128)
    torch.testing.assert_close(mean_signal_fraction(29.2, latent_height=256, latent_width=256), base)
    assert mean_signal_fraction(14.6, latent_height=256, latent_width=256) > base
    curve = mean_signal_fraction(torch.logspace(-1, 5, 20, dtype=F64), latent_height=64, latent_width=64)
    assert bool((curve[1:] < curve[:-1]).all())


# --- the curves evaluate plots -----------------------------------------------------------------------


def test_schedule_curves_for_the_plots() -> None:
    curves = {c.name: c for c in schedule_curves()}
    assert set(curves) == {"sdxl", "zero_snr_rescale", "high_sigma_20000", "flow_shift_1", "flow_shift_3", "flow_shift_6"}
    torch.testing.assert_close(curves["sdxl"].sigma, sdxl_sigmas())
    assert curves["zero_snr_rescale"].log_snr[-1].item() == -math.inf
    assert curves["high_sigma_20000"].sigma[-1].item() == 20000.0
    assert curves["high_sigma_20000"].log_snr[-1].item() == pytest.approx(-2 * math.log(20000.0))
    for name, curve in curves.items():
        assert curve.u.shape == curve.sigma.shape == curve.log_snr.shape
        assert bool((curve.sigma[1:] >= curve.sigma[:-1]).all()), name
    # flow: log SNR = 2·log((1−t)/t); t = 0.5 is SNR 1, and shift 3 moves it to u = 0.25
    assert flow_log_snr(_t(0.5)).item() == 0.0 and flow_sigma(_t(0.5)).item() == 1.0
    shift3 = curves["flow_shift_3"]
    i = int((shift3.u - 0.25).abs().argmin())
    assert shift3.log_snr[i].item() == pytest.approx(0.0, abs=0.02)
