"""`sdxl train-vae`'s optional patch discriminator (vae_train/discriminator.py): the network's shape and
hinge loss, nothing changes before the warm-up ends, after it the discriminator trains and the decoder's
loss carries its term, and bad settings are one-line errors. The resume after SIGKILL with it on is
test_train_vae.py's kill test, parametrized."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import VaeTrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.vae_train import loop
from sdxl_trainer.vae_train.discriminator import Adversary, PatchDiscriminator, hinge_d_loss, min_crop
from sdxl_trainer.vae_train.quality import make_loss

BASE = {"device": "cpu", "precision": "fp32", "crop": 32, "batch_size": 4, "latent": "sample",
        "optimizer.learning_rate": 3e-4, "logging.tensorboard": False, "discriminator.channels": 16}  # fmt: skip


def _cfg(model, tmp_path, **kw) -> VaeTrainConfig:
    return load_config(VaeTrainConfig, None, {"model": str(model), "work": str(tmp_path), "out": str(tmp_path / "run"),
                                              **BASE, **kw})  # fmt: skip


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def test_patch_discriminator_shape_and_hinge_loss():
    d = PatchDiscriminator(channels=16, layers=3)
    d.init_weights(torch.Generator().manual_seed(0))
    # 32 → 16 → 8 → 4 (stride 2), then two 4×4 stride-1 convs: 3, 2
    assert d(torch.zeros(5, 3, 32, 32)).shape == (5, 1, 2, 2)
    assert d(torch.zeros(1, 3, min_crop(3), min_crop(3))).shape == (1, 1, 1, 1) and min_crop(3) == 24
    assert [m.num_groups for m in d.modules() if isinstance(m, torch.nn.GroupNorm)] == [32, 32, 32]
    one = torch.ones(2, 1, 2, 2)
    assert hinge_d_loss(2 * one, -2 * one).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(0 * one, 0 * one).item() == 1.0
    assert hinge_d_loss(-one, one).item() == 2.0
    again = PatchDiscriminator(channels=16, layers=3)
    again.init_weights(torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), again.state_dict().values()))


def _updates(cfg, vae, adversary, crops, n):
    params = [p for p in vae.parameters() if p.requires_grad]
    parts = {"state": TrainState(), "optimizer": torch.optim.AdamW(params, lr=1e-3), "ema": None,
             "adversary": adversary}  # fmt: skip
    loss_fn, _ = make_loss(crop=32, l1_weight=1.0, ssim_weight=0.2)
    results, d_weights, vae_weights = [], [], []
    for step in range(n):
        results.append(loop.update(vae, crops, loss_fn=loss_fn, parts=parts, cfg=cfg, params=params,
                                   generator=torch.Generator().manual_seed(step), autocast=None))  # fmt: skip
        d_weights.append(None if adversary is None else _copy(adversary.net))
        vae_weights.append(_copy(vae))
    return results, d_weights, vae_weights


def test_warm_up_changes_nothing_then_the_discriminator_trains_and_adds_its_term(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"loss.gan_weight": 0.5, "loss.gan_start_step": 2})
    crops = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = loop.build_vae(cfg, torch.device("cpu"))
    base, _, plain_weights = _updates(cfg, plain, None, crops, 2)
    vae = loop.build_vae(cfg, torch.device("cpu"))
    adversary = Adversary(cfg, torch.device("cpu"))
    d0 = _copy(adversary.net)
    results, d_weights, vae_weights = _updates(cfg, vae, adversary, crops, 4)
    # updates 1–2 (the warm-up): bitwise the run without a discriminator, which does not move
    assert [r["loss"] for r in results[:2]] == [r["loss"] for r in base]
    assert all(torch.equal(plain_weights[1][k], vae_weights[1][k]) for k in plain_weights[1])
    assert all(torch.equal(d_weights[i][k], d0[k]) for i in (0, 1) for k in d0)
    assert "g_loss" not in results[1] and "d_loss" not in results[1]
    # update 3 on: the discriminator steps (each update), the decoder's loss is pixel loss + w · (−D(x̂))
    assert not all(torch.equal(d_weights[2][k], d0[k]) for k in d0)
    assert not all(torch.equal(d_weights[3][k], d_weights[2][k]) for k in d0)
    for r in results[2:]:
        assert r["loss"] == pytest.approx(r["pixel_loss"] + r["gan_w"] * r["g_loss"], rel=1e-5)
        assert 0 < r["gan_w"] < 0.5 * 1e4 and r["d_loss"] > 0 and not r["d_skipped"]
    assert all(p.grad is None for p in adversary.net.parameters())  # the generator term left D's grads alone


def test_fixed_weight_without_the_adaptive_scale(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"loss.gan_weight": 0.25, "loss.gan_start_step": 0,
                                            "loss.gan_adaptive": False})  # fmt: skip
    crops = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results, _, _ = _updates(cfg, loop.build_vae(cfg, torch.device("cpu")), Adversary(cfg, torch.device("cpu")), crops, 1)
    assert results[0]["gan_w"] == 0.25
    assert results[0]["loss"] == pytest.approx(results[0]["pixel_loss"] + 0.25 * results[0]["g_loss"], rel=1e-6)


def test_gan_settings_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="crop=16 is below the 24 px a 3-layer discriminator needs"):
        _cfg(tiny_model_dir, tmp_path, crop=16, **{"loss.gan_weight": 0.5})
    assert _cfg(tiny_model_dir, tmp_path, crop=16).loss.gan_weight == 0  # off: any crop
    r = CliRunner().invoke(app, ["train-vae", str(tmp_path), "--model", str(tiny_model_dir), "--out",
                                 str(tmp_path / "run"), "--crop", "16", "--gan-weight", "0.5", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and "3-layer discriminator needs" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["train-vae", str(tmp_path), "--model", str(tiny_model_dir), "--out",
                                 str(tmp_path / "run"), "--gan-weight", "-1"])  # fmt: skip
    assert r.exit_code == 2 and "gan_weight" in r.output
