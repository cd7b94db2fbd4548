"""Fitting the demo kit's VAE (models/vae_fit.py): it learns, it is reproducible, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdxl_trainer.errors import UserError
from sdxl_trainer.models import tiny, vae_fit
from sdxl_trainer.synthetic import render, synthetic_items

SHORT = vae_fit.FitSettings(steps=6, batch_size=4, crop=16, num_threads=1)


def _vae(seed: int = 0) -> AutoencoderKL:
    return tiny._seeded(seed, 1, lambda: AutoencoderKL(**tiny.vae_config()))


def _pool(n: int = 12, seed: int = 3) -> list[torch.Tensor]:
    return vae_fit.pixel_pool([render(it) for it in synthetic_items(n, seed=seed)], seed=seed, area=64 * 64)


def test_to_pixels_scales_to_the_area_in_multiples_of_8_and_minus_one_to_one():
    img = Image.new("RGB", (300, 150), (255, 0, 0))
    px = vae_fit.to_pixels(img, area=64 * 64)
    assert px.shape[0] == 3 and px.shape[1] % 8 == 0 and px.shape[2] % 8 == 0
    assert abs(px.shape[1] * px.shape[2] - 64 * 64) < 0.2 * 64 * 64
    assert px.shape[2] > px.shape[1]  # aspect ratio kept
    assert torch.allclose(px[0], torch.ones_like(px[0])) and torch.allclose(px[1], -torch.ones_like(px[1]))


def test_same_seed_gives_identical_weights_and_leaves_global_rng_and_threads_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, b, c = _vae(), _vae(), _vae()
    pool = _pool()
    la = vae_fit.fit_vae(a, pool, seed=1, settings=SHORT)
    lb = vae_fit.fit_vae(b, pool, seed=1, settings=SHORT)
    vae_fit.fit_vae(c, pool, seed=2, settings=SHORT)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert la == lb and len(la) == SHORT.steps
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training  # left in eval mode


def test_a_short_fit_learns_to_tell_black_from_white():
    """60 small steps: the loss falls by a quarter and solid black decodes darker than white by a wide gap.

    The full fit (600 steps at 32 px) reaches MAE ≈ 9/255 and black/white within 1/255 of their
    targets (docs/models.md); this only checks the direction in seconds.
    """
    vae = _vae()
    pool = vae_fit.pixel_pool([render(it) for it in synthetic_items(24, seed=3)], seed=3, area=96 * 96)
    settings = vae_fit.FitSettings(steps=60, batch_size=8, crop=32, num_threads=1)
    losses = vae_fit.fit_vae(vae, pool, seed=0, settings=settings)
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5  # measured: 1.13 → 0.70
    black = vae_fit.to_pixels(Image.new("RGB", (64, 64), (0, 0, 0)), area=64 * 64)
    white = vae_fit.to_pixels(Image.new("RGB", (64, 64), (255, 255, 255)), area=64 * 64)
    err = vae_fit.reconstruction_error(vae, [black, white])
    assert err["decoded_mean"][1] - err["decoded_mean"][0] > 120  # of 255; measured 170 (57 vs 227)
    assert all(s < 0.1 for s in err["posterior_std"])  # the posterior stays narrow (starts at 0.01)


def test_fit_tiny_vae_uses_its_own_seed_and_thins_solid_black_and_white():
    imgs = tiny.vae_fit_images(seed=0, n=100)
    items = synthetic_items(100, seed=0)
    bw = sum(it.shape is None and it.background in ("black", "white") for it in items)
    assert bw > 20 and len(imgs) == 100 - bw + (bw + 3) // 4  # solid black/white kept 1 in 4
    vae = _vae()
    losses = tiny.fit_tiny_vae(vae, seed=0, settings=SHORT)
    assert len(losses) == SHORT.steps and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(
    ("pool", "settings", "match"),
    [
        ([], SHORT, "no images"),
        ([torch.zeros(3, 64, 64)], vae_fit.FitSettings(crop=12), "multiple of 8"),
        ([torch.zeros(3, 64, 64)], vae_fit.FitSettings(steps=0), "steps=0"),
        ([torch.zeros(1, 64, 64)], SHORT, "not \\[3, H, W\\]"),
        ([torch.zeros(3, 8, 8)], SHORT, "no image has both sides"),
    ],
)
def test_bad_input_is_a_user_error(pool, settings, match):
    with pytest.raises(UserError, match=match):
        vae_fit.fit_vae(_vae(), pool, settings=settings)
