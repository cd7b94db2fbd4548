"""models/vae_objective.py: the pieces the demo kit's VAE fit and `sdxl train-vae` share."""

from __future__ import annotations

import numpy as np
import torch

from sdxl_trainer.models.vae_objective import clipped_step, crop_offset, make_similarity, reconstruction_loss


def test_crop_offset_draws_top_then_left_within_the_image():
    asked = []
    assert crop_offset(50, 70, 32, lambda n: asked.append(n) or n - 1) == (18, 38)  # the last window
    assert asked == [19, 39]
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left = crop_offset(40, 33, 32, lambda n: int(rng.integers(n)))
        assert 0 <= top <= 8 and 0 <= left <= 1


def test_reconstruction_loss_terms():
    x = torch.zeros(1, 3, 32, 32)
    y = torch.full((1, 3, 32, 32), 0.5)
    assert reconstruction_loss(y, x).item() == 0.5  # L1 alone
    assert reconstruction_loss(y, x, mse_weight=2.0).item() == 0.5 + 2.0 * 0.25
    assert reconstruction_loss(y, x, l1_weight=0.0, mse_weight=1.0).item() == 0.25
    similarity, multiscale = make_similarity(32)
    assert not multiscale and make_similarity(168)[1]
    z = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert abs(reconstruction_loss(z, z, ssim_weight=0.5, similarity=similarity).item()) < 1e-6


def test_clipped_step_clips_and_skips_non_finite():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    norm, skipped = clipped_step(opt, (w * w).sum() / 2, [w], 1.0)  # gradient w, norm 5, clipped to 1
    assert not skipped and norm.item() == 5.0 and torch.allclose(w.detach(), torch.tensor([2.4, 3.2]))
    assert w.grad is None
    before = w.detach().clone()
    norm, skipped = clipped_step(opt, (w * float("nan")).sum(), [w], 1.0)
    assert skipped and torch.equal(w.detach(), before)  # the optimiser did not move
