"""Loss weights (min-SNR-γ forms, terminal step), training noise, and the no-host-sync training path."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_trainer.diffusion import (
    OBJECTIVES,
    build_level_sampler,
    build_loss_weight,
    build_noise_sampler,
    build_objective,
    make_training_inputs,
    min_snr_eps,
    min_snr_flow,
    min_snr_flow_hang,
    min_snr_v,
    min_snr_v_plus_one,
    offset_noise,
    perturb_input_noise,
    sdxl_sigmas,
    weighted_mse,
)

GAMMA = 5.0


# --- min-SNR-γ: reference values (facts §"Loss weights") ---------------------------------------------


def test_hang_forms_reference_values() -> None:
    sigmas = sdxl_sigmas()
    s = sigmas[[0, 499, 999]]
    snr = s.pow(-2)
    assert snr[1].item() == pytest.approx(0.384408, abs=5e-7)
    w_eps, w_v = min_snr_eps(s, gamma=GAMMA), min_snr_v(s, gamma=GAMMA)
    assert w_eps[0].item() == pytest.approx(0.0042536, abs=5e-8)
    assert w_v[0].item() == pytest.approx(0.0042500, abs=5e-8)
    assert w_eps[1].item() == 1.0
    assert w_v[1].item() == pytest.approx(0.277670, abs=5e-7)
    assert w_v[2].item() == pytest.approx(0.0046601, abs=5e-8)
    assert min_snr_v(torch.tensor([20000.0], dtype=torch.float64), gamma=GAMMA).item() == pytest.approx(2.5e-9, rel=1e-6)
    # the same as the SNR formulas they stand for: min(SNR, γ)/SNR and min(SNR, γ)/(SNR + 1)
    snr_all = sigmas.pow(-2)
    torch.testing.assert_close(min_snr_eps(sigmas, gamma=GAMMA), snr_all.clamp(max=GAMMA) / snr_all)
    torch.testing.assert_close(min_snr_v(sigmas, gamma=GAMMA), snr_all.clamp(max=GAMMA) / (snr_all + 1))


def test_objective_v_form_is_diffusers_training_script_form() -> None:
    """min(SNR + 1, γ)/(SNR + 1): diffusers' train_text_to_image adds one to SNR for v-prediction."""
    snr = sdxl_sigmas().pow(-2) + 1
    expected = torch.stack([snr, GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    torch.testing.assert_close(min_snr_v_plus_one(sdxl_sigmas(), gamma=GAMMA), expected)


def test_plain_min_snr_starves_the_terminal_step_under_ztsnr() -> None:
    """The failure the default form avoids: Hang's v weight is ~0 at σ = 20000 and exactly 0 at ∞."""
    terminal = torch.tensor([20000.0, math.inf])
    assert min_snr_v(terminal, gamma=GAMMA).tolist()[1] == 0.0
    assert min_snr_v(terminal, gamma=GAMMA)[0].item() < 1e-8
    assert min_snr_flow_hang(torch.tensor([1.0]), gamma=GAMMA).item() == 0.0
    # ... and the ε form written as min(SNR, γ)/SNR would divide by zero there
    snr = terminal.pow(-2)
    assert torch.isnan(snr.clamp(max=GAMMA) / snr)[1]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_min_snr_finite_and_positive_at_the_terminal_step(name: str) -> None:
    objective = build_objective(name)
    weight = build_loss_weight(objective, kind="min_snr", gamma=GAMMA)
    x0 = torch.randn(2, 4, 8, 8)
    level = torch.tensor([1.0, 1.0]) if name == "flow" else objective.sigmas[[-1, -1]].float()
    info = make_training_inputs(x0, torch.randn_like(x0), level, objective=objective).info
    w = weight(info)
    assert torch.isfinite(w).all() and (w > 0).all(), (name, w)
    if name in ("v_ztsnr", "flow"):
        assert w.tolist() == [1.0, 1.0]  # the zero-SNR step keeps full weight


@pytest.mark.parametrize("fn", [min_snr_eps, min_snr_v, min_snr_v_plus_one])
def test_sigma_forms_never_produce_nan_or_inf(fn) -> None:
    sigma = torch.tensor([0.0, 1e-30, 0.03, 1.0, 14.6, 2e4, 1e30, math.inf])
    w = fn(sigma, gamma=GAMMA)
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    assert fn(sigma.bfloat16(), gamma=GAMMA).dtype == torch.float32


def test_flow_forms() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    w = min_snr_flow(t, gamma=GAMMA)
    assert torch.isfinite(w).all() and w[-1].item() == 1.0 and w[0].item() == 0.0
    # min(λ, γ)/λ with λ = 1/t², the x0-error weight hidden in the velocity MSE
    lam = t[1:].pow(-2)
    torch.testing.assert_close(w[1:], lam.clamp(max=GAMMA) / lam)
    snr = ((1 - t[1:]) / t[1:]) ** 2
    torch.testing.assert_close(min_snr_flow_hang(t[1:], gamma=GAMMA), snr.clamp(max=GAMMA) * t[1:] ** 2)


def test_external_weights_multiply_in_and_none_is_ones() -> None:
    objective = build_objective("v_ztsnr")
    info = make_training_inputs(
        torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), objective.sigmas[[0, 500, 999]].float(), objective=objective
    ).info
    external = torch.tensor([0.5, 2.0, 1.5])
    plain = build_loss_weight(objective, kind="none")
    assert plain(info).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(plain(info, external=external), external)
    snr_w = build_loss_weight(objective, kind="min_snr", gamma=GAMMA)
    torch.testing.assert_close(snr_w(info, external=external), snr_w(info) * external)
    hang = build_loss_weight(objective, kind="min_snr", gamma=GAMMA, form="hang")
    assert hang(info)[2].item() < 1e-8 < snr_w(info)[2].item()


def test_build_loss_weight_errors() -> None:
    objective = build_objective("v")
    with pytest.raises(ValueError, match="unknown loss weighting"):
        build_loss_weight(objective, kind="p2")
    with pytest.raises(ValueError, match="unknown min-SNR form"):
        build_loss_weight(objective, kind="min_snr", form="kohya")
    with pytest.raises(ValueError, match="gamma must be positive"):
        build_loss_weight(objective, kind="min_snr", gamma=0.0)


def test_weighted_mse() -> None:
    out, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert weighted_mse(out, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 * 1 + 4 * 0.5) / 2)


# --- training noise --------------------------------------------------------------------------------


def test_offset_noise_is_constant_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 4, 8, 8, generator=g)
    shifted = offset_noise(noise, strength=0.1, generator=g)
    delta = shifted - noise
    torch.testing.assert_close(delta, delta[..., :1, :1].expand_as(delta))
    assert delta[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.05)
    again = offset_noise(noise, strength=0.1, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(again, shifted)


def test_input_perturbation_and_noise_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 4, 8, 8, generator=g)
    perturbed = perturb_input_noise(noise, strength=0.1, generator=g)
    assert (perturbed - noise).std().item() == pytest.approx(0.1, rel=0.05)
    x0 = torch.zeros(8, 4, 16, 16)
    plain = build_noise_sampler()
    noise_a, none = plain(x0, generator=torch.Generator().manual_seed(3))
    assert none is None and noise_a.shape == x0.shape
    noise_b, _ = plain(x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise_a, noise_b)
    both = build_noise_sampler(offset=0.1, perturbation=0.1)
    n1, p1 = both(x0, generator=torch.Generator().manual_seed(3))
    n2, p2 = both(x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(n1, n2) and torch.equal(p1, p2) and not torch.equal(n1, p1)
    with pytest.raises(ValueError):
        build_noise_sampler(offset=-0.1)


# --- the whole training path reads no tensor value on the host ---------------------------------------


def _training_step(name: str, device: str):
    objective = build_objective(name).to(device)
    sample_level = build_level_sampler(objective, terminal_oversample=0.0 if name == "flow" else 0.05)
    sample_noise = build_noise_sampler(offset=0.1, perturbation=0.1)
    loss_weight = build_loss_weight(objective, kind="min_snr", gamma=GAMMA)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(8, 4, 16, 16, device=device)
    external = torch.rand(8, device=device)

    def step():
        level = sample_level(8, generator=gen)
        noise, input_noise = sample_noise(x0, generator=gen)
        noisy, timestep, target, info = make_training_inputs(x0, noise, level, objective=objective, input_noise=input_noise)
        prediction = noisy * 0.5  # stands in for the UNet
        return weighted_mse(prediction, target, loss_weight(info, external=external))

    return step


@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_path_never_reads_tensors_on_host(name: str, monkeypatch) -> None:
    step = _training_step(name, "cpu")

    def refuse(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value in the training path")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    loss = step()
    monkeypatch.undo()
    assert math.isfinite(loss.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_path_does_not_synchronise_on_cuda(name: str) -> None:
    step = _training_step(name, "cuda")
    step()  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item())
