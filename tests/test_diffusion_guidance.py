"""CFG and CFG rescale against the reference vector and diffusers' rescale_noise_cfg."""

from __future__ import annotations

import pytest
import torch

from sdxl_trainer.diffusion import (
    build_objective,
    c_out_v,
    c_skip_v,
    cfg,
    cfg_rescaled,
    guided_denoiser,
    karras_sigmas,
    prior_noise,
    rescale_cfg,
    sample_euler,
)


def test_reference_vector() -> None:
    pos, neg = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 1.0, 1.0, 2.0]])
    assert cfg(pos, neg, scale=7.5).tolist() == [[7.5, 8.5, 16.0, 17.0]]
    out = cfg_rescaled(pos, neg, scale=7.5, phi=0.7)
    torch.testing.assert_close(out, torch.tensor([[3.621641, 4.104527, 7.726168, 8.209053]]), rtol=0, atol=1e-6)
    assert cfg_rescaled(pos, neg, scale=7.5, phi=0.0).tolist() == cfg(pos, neg, scale=7.5).tolist()
    assert cfg(pos, neg, scale=1.0).tolist() == pos.tolist()


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.7, 1.0])
def test_rescale_matches_diffusers(phi: float) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    guided = cfg(pos, neg, scale=5.0)
    torch.testing.assert_close(rescale_cfg(guided, pos, phi=phi), rescale_noise_cfg(guided, pos, guidance_rescale=phi))


def _v_model_pair():
    """A pair of fixed v-predictions and the σ-space denoiser D = c_skip·x + c_out·F built from them."""
    g = torch.Generator().manual_seed(1)
    f_pos, f_neg = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 0.5

    def model(x, sigma, *, which):
        f = f_pos if which == "pos" else f_neg
        return c_skip_v(sigma).view(-1, 1, 1, 1) * x + c_out_v(sigma).view(-1, 1, 1, 1) * f

    return model, f_pos, f_neg


@pytest.mark.parametrize("sigma_value", [0.5, 14.6, 20000.0])
def test_guided_denoiser_rescales_in_v_space(sigma_value: float) -> None:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    model, f_pos, f_neg = _v_model_pair()
    sigma = torch.full((2,), sigma_value)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigma_value
    guided = guided_denoiser(model, scale=5.0, phi=0.7, space="v")
    got = guided(x, sigma, cond={"which": "pos"}, uncond={"which": "neg"})
    f = rescale_noise_cfg(cfg(f_pos, f_neg, scale=5.0), f_pos, guidance_rescale=0.7)
    expected = c_skip_v(sigma).view(-1, 1, 1, 1) * x + c_out_v(sigma).view(-1, 1, 1, 1) * f
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # without rescale, guidance is the same in every space
    plain = guided_denoiser(model, scale=5.0, space="v")(x, sigma, cond={"which": "pos"}, uncond={"which": "neg"})
    d_pos, d_neg = model(x, sigma, which="pos"), model(x, sigma, which="neg")
    torch.testing.assert_close(plain, cfg(d_pos, d_neg, scale=5.0))


@pytest.mark.parametrize("space", ["x0", "eps", "flow"])
def test_guided_denoiser_other_spaces_round_trip(space: str) -> None:
    model, _, _ = _v_model_pair()
    sigma = torch.full((2,), 0.7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    d_pos, d_neg = model(x, sigma, which="pos"), model(x, sigma, which="neg")
    if space == "x0":
        expected = cfg_rescaled(d_pos, d_neg, scale=4.0, phi=0.7)
    else:  # ε and flow velocity share the form (x − D)/level
        f_pos, f_neg = (x - d_pos) / 0.7, (x - d_neg) / 0.7
        expected = x - 0.7 * cfg_rescaled(f_pos, f_neg, scale=4.0, phi=0.7)
    got = guided_denoiser(model, scale=4.0, phi=0.7, space=space)(x, sigma, cond={"which": "pos"}, uncond={"which": "neg"})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_guided_sampling_from_20000_is_finite() -> None:
    objective = build_objective("v_ztsnr")
    model, _, _ = _v_model_pair()
    sigmas = karras_sigmas(10, sigma_min=objective.sigma_min, sigma_max=objective.sigma_max)
    x = prior_noise((2, 4, 8, 8), sigma_max=20000.0, generator=torch.Generator().manual_seed(0))
    extra = {"cond": {"which": "pos"}, "uncond": {"which": "neg"}}
    out = sample_euler(guided_denoiser(model, scale=5.0, phi=0.7), x, sigmas, extra_args=extra)
    assert torch.isfinite(out).all()


def test_guided_denoiser_errors() -> None:
    model, _, _ = _v_model_pair()
    with pytest.raises(ValueError, match="unknown guidance space"):
        guided_denoiser(model, scale=5.0, space="sample")
    with pytest.raises(ValueError, match="phi must lie in"):
        guided_denoiser(model, scale=5.0, phi=1.5)
