"""Objectives: σ-space scalings, exact-target round trips, the Objective bundle, purity and no host sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl_trainer.diffusion import (
    OBJECTIVES,
    build_loss_weight,
    build_objective,
    c_in,
    c_noise_share,
    c_out_eps,
    c_out_v,
    c_skip_eps,
    c_skip_v,
    eps_to_x0_eps,
    eps_training_inputs,
    make_training_inputs,
    output_to_x0_eps,
    sdxl_sigmas,
    v_to_x0_eps,
    v_training_inputs,
    zero_snr_sigmas,
)

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = torch.logspace(torch.log10(torch.tensor(0.03)), torch.log10(torch.tensor(20000.0)), 64, dtype=torch.float64)
TIMES = torch.linspace(0, 1, 65, dtype=torch.float64)


def _data(batch: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    return x0, torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)


def test_v_scalings_reference_values() -> None:
    one, big = torch.tensor([1.0]), torch.tensor([20000.0])
    assert (c_skip_v(one).item(), c_out_v(one).item(), c_in(one).item()) == pytest.approx((0.5, -0.7071068, 0.7071068))
    assert c_skip_v(big).item() == pytest.approx(2.5e-9, rel=1e-6)
    assert c_out_v(big).item() == pytest.approx(-0.999999999, abs=1e-7)
    assert c_in(big).item() == pytest.approx(5e-5, rel=1e-6)
    assert c_skip_eps(big).item() == 1.0 and c_out_eps(big).item() == -20000.0
    # the limits are finite and exact, never ∞/∞
    inf, zero = torch.tensor([float("inf")]), torch.tensor([0.0])
    assert (c_in(inf).item(), c_noise_share(inf).item(), c_skip_v(inf).item(), c_out_v(inf).item()) == (0.0, 1.0, 0.0, -1.0)
    assert (c_in(zero).item(), c_noise_share(zero).item()) == (1.0, 0.0)


def test_v_target_limits_to_minus_x0() -> None:
    x0, noise = _data(3)
    sigma = torch.full((3,), 20000.0, dtype=torch.float64)
    target = v_training_inputs(x0, noise, sigma, sigmas=zero_snr_sigmas()).target
    torch.testing.assert_close(target, (noise - 20000.0 * x0) / (20000.0**2 + 1) ** 0.5, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target.double(), -x0, rtol=0, atol=6e-5 * noise.abs().max().item())  # = α·ε, α = 5e-5
    at_inf = v_training_inputs(x0, noise, torch.full((3,), float("inf")), sigmas=zero_snr_sigmas())
    torch.testing.assert_close(at_inf.target.double(), -x0.float().double())  # exactly −x0 at SNR = 0
    torch.testing.assert_close(at_inf.noisy.double(), noise.float().double())  # and the input is pure noise


def test_noisy_is_c_in_times_sigma_space_point() -> None:
    x0, noise = _data(4)
    sigma = torch.tensor([0.03, 1.0, 14.6, 20000.0], dtype=torch.float64)
    for make in (eps_training_inputs, v_training_inputs):
        noisy = make(x0, noise, sigma, sigmas=zero_snr_sigmas()).noisy
        expected = (x0 + sigma.view(-1, 1, 1, 1) * noise) / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
        torch.testing.assert_close(noisy.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_target_round_trips_x0(name: str, dtype: torch.dtype) -> None:
    """Feeding the exact target back as the model output gives x0 (and ε) back, σ 0.03..20000 / t ∈ [0, 1]."""
    objective = build_objective(name)
    levels = TIMES if name == "flow" else SIGMAS
    x0, noise = _data(levels.numel(), dtype)
    inputs = objective.make_training_inputs(x0, noise, levels.to(dtype))
    x0_hat, eps_hat = output_to_x0_eps(inputs.target, inputs.noisy, levels.to(dtype), objective=objective)
    assert inputs.noisy.shape == x0.shape and inputs.timestep.shape == (levels.numel(),)
    if name == "eps":
        # x0 = (x_t − √(1−ᾱ)ε)/√ᾱ loses ~ulp/√ᾱ: exact in fp64, fp32 only where ε training happens (σ ≤ 14.6)
        keep = slice(None) if dtype == torch.float64 else levels <= 14.7
        x0_hat, x0, eps_hat, noise = x0_hat[keep], x0[keep], eps_hat[keep], noise[keep]
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(x0_hat.double(), x0.double(), rtol=0, atol=tol)
    eps_keep = slice(1, None) if name == "flow" else slice(None)  # at t = 0 the input holds no ε
    torch.testing.assert_close(eps_hat[eps_keep].double(), noise[eps_keep].double(), rtol=0, atol=tol)


def test_timestep_and_info_per_objective() -> None:
    x0, noise = _data(4)
    for name, table in (("eps", sdxl_sigmas()), ("v", sdxl_sigmas()), ("v_ztsnr", zero_snr_sigmas())):
        objective = build_objective(name)
        torch.testing.assert_close(objective.sigmas, table)
        sigma = table[[0, 10, 500, 999]].float()
        inputs = make_training_inputs(x0.float(), noise.float(), sigma, objective=objective)
        assert inputs.timestep.tolist() == [0.0, 10.0, 500.0, 999.0]
        torch.testing.assert_close(inputs.info.sigma, sigma)
        torch.testing.assert_close(inputs.info.snr, sigma.double().pow(-2).float())
    flow = build_objective("flow")
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    inputs = make_training_inputs(x0.float(), noise.float(), t, objective=flow)
    assert inputs.timestep.tolist() == [0.0, 250.0, 500.0, 1000.0]
    torch.testing.assert_close(inputs.target, (noise - x0).float())
    torch.testing.assert_close(inputs.noisy[3], noise[3].float())  # t = 1 is pure noise
    assert inputs.info.snr.tolist() == [float("inf"), 9.0, 1.0, 0.0]


def test_input_noise_changes_input_not_target() -> None:
    x0, noise = _data(2, torch.float32)
    other = torch.randn_like(noise)
    for name, level in (("v_ztsnr", torch.tensor([1.0, 100.0])), ("flow", torch.tensor([0.3, 0.9]))):
        objective = build_objective(name)
        plain = objective.make_training_inputs(x0, noise, level)
        perturbed = objective.make_training_inputs(x0, noise, level, input_noise=other)
        torch.testing.assert_close(plain.target, perturbed.target)
        assert not torch.allclose(plain.noisy, perturbed.noisy)


def test_build_objective_options_and_errors() -> None:
    assert build_objective("v_ztsnr").sigma_max == 20000.0
    assert build_objective("v_ztsnr", sigma_max=4096.0).sigma_max == 4096.0
    assert build_objective("v").sigma_max == pytest.approx(14.6146412)
    assert build_objective("v", sigma_max=29.2).sigmas[-1].item() == 29.2  # resolution-scaled σ_max
    assert build_objective("v_ztsnr", ztsnr_rescale=False).sigmas[998].item() == pytest.approx(sdxl_sigmas()[998].item())
    assert build_objective("flow").sigmas is None and build_objective("flow").sigma_max == 1.0
    with pytest.raises(ValueError, match="unknown objective 'x0'"):
        build_objective("x0")
    with pytest.raises(ValueError, match="flow has no sigma_max"):
        build_objective("flow", sigma_max=10.0)
    with pytest.raises(ValueError, match="finite"):
        build_objective("v_ztsnr", sigma_max=float("inf"))
    assert build_objective("v_ztsnr").to("cpu").sigmas.device.type == "cpu"


@pytest.mark.parametrize("name", ["eps", "v", "v_ztsnr"])
def test_denoiser_from_exact_unet_output_is_exact(name: str) -> None:
    """discrete_denoiser inverts the training parameterisation: an oracle UNet gives D = x0."""
    objective = build_objective(name)
    x0, noise = _data(5, torch.float32)
    sigma = objective.sigmas[[0, 300, 700, 998, 999]].float()
    x = x0 + sigma.view(-1, 1, 1, 1) * noise  # σ-space point
    seen = {}

    def oracle_unet(noisy, timestep):
        seen["t"] = timestep
        inputs = objective.make_training_inputs(x0, noise, sigma)
        torch.testing.assert_close(noisy, inputs.noisy, rtol=1e-5, atol=1e-5)
        return inputs.target

    denoised = objective.denoiser(oracle_unet)(x, sigma)
    atol = 2e-3 if name == "eps" else 1e-5  # ε: x − σ·ε̂ at σ = 14.6 cancels ~2 digits
    torch.testing.assert_close(denoised, x0, rtol=0, atol=atol)
    torch.testing.assert_close(seen["t"], torch.tensor([0.0, 300.0, 700.0, 998.0, 999.0]))


def test_flow_denoiser_from_exact_unet_output_is_exact() -> None:
    objective = build_objective("flow")
    x0, noise = _data(4, torch.float32)
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    inputs = objective.make_training_inputs(x0, noise, t)
    denoised = objective.denoiser(lambda x, timestep: inputs.target)(inputs.noisy, t)
    torch.testing.assert_close(denoised, x0, rtol=0, atol=1e-6)


def test_eps_cannot_recover_x0_at_zero_snr_but_v_can() -> None:
    """Why ZTSNR needs v: at σ = ∞ the ε target is the input itself and x0 = (x_t − ε̂)/0."""
    x0, noise = _data(2, torch.float32)
    sigma = torch.full((2,), float("inf"))
    eps_in = eps_training_inputs(x0, noise, sigma, sigmas=zero_snr_sigmas())
    torch.testing.assert_close(eps_in.target, eps_in.noisy)
    assert not torch.isfinite(eps_to_x0_eps(eps_in.target, eps_in.noisy, sigma)[0]).any()
    v_in = v_training_inputs(x0, noise, sigma, sigmas=zero_snr_sigmas())
    torch.testing.assert_close(v_to_x0_eps(v_in.target, v_in.noisy, sigma)[0], x0)


# --- purity and no host synchronisation -------------------------------------------------------------


def test_import_pulls_in_neither_diffusers_nor_transformers() -> None:
    code = (
        "import sys, sdxl_trainer.diffusion\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'diffusers', 'transformers', 'peft', 'PIL', 'pyarrow'})\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout


def test_package_docstring_lists_every_public_name() -> None:
    import sdxl_trainer.diffusion as diffusion

    missing = [name for name in diffusion.__all__ if name not in diffusion.__doc__]
    assert not missing, f"add to the package docstring: {missing}"


@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_math_traces_without_graph_breaks(name: str) -> None:
    """fullgraph tracing fails on .item(), .tolist() or `if tensor:` — the training math has none."""
    objective = build_objective(name)
    loss_weight = build_loss_weight(objective, kind="min_snr", gamma=5.0)

    def step(x0, noise, level, external):
        noisy, timestep, target, info = make_training_inputs(x0, noise, level, objective=objective)
        x0_hat, _ = objective.output_to_x0_eps(target, noisy, level)
        return noisy, timestep, target, loss_weight(info, external=external), x0_hat

    x0, noise = _data(4, torch.float32)
    level = torch.tensor([0.2, 0.5, 0.9, 1.0]) if name == "flow" else objective.sigmas[[0, 10, 500, 999]].float()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x0, noise, level, torch.ones(4)), step(x0, noise, level, torch.ones(4))):
        torch.testing.assert_close(got, want)
