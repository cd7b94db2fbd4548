"""Optimisers: parameter groups (no decay on biases/norms, text-encoder lr) and the three choices."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.optim import build_optimizer, param_groups


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3), nn.LayerNorm(3))


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = _small()
    groups = _by_name(param_groups(unet=model, lr=1e-3, weight_decay=0.1))
    assert set(groups) == {"unet/decay", "unet/no_decay"}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["unet/decay"]["params"]) == {id(model[0].weight), id(model[2].weight)}
    assert ids(groups["unet/no_decay"]["params"]) == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)
    }
    assert groups["unet/decay"]["weight_decay"] == 0.1 and groups["unet/no_decay"]["weight_decay"] == 0.0


def test_groups_cover_every_trainable_parameter_once_and_skip_frozen() -> None:
    model = _unet()
    model(torch.zeros(1, 2, 5, 5))  # materialise the lazy layer
    model[0].requires_grad_(False)
    groups = param_groups(unet=model, lr=1e-3, weight_decay=0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert id(model[1].weight) not in {id(p) for p in _by_name(groups)["unet/decay"]["params"]}  # GroupNorm


def test_text_encoders_get_their_own_lr_when_trained() -> None:
    unet, te1, te2 = _small(), _small(), _small()
    te2.requires_grad_(False)
    groups = _by_name(param_groups(unet=unet, text_encoders=[te1, te2], lr=1e-4, text_encoder_lr=1e-5, weight_decay=0))
    assert set(groups) == {"unet/decay", "unet/no_decay", "text_encoder/decay", "text_encoder/no_decay"}
    assert groups["text_encoder/decay"]["lr"] == 1e-5 and groups["unet/decay"]["lr"] == 1e-4
    te2.requires_grad_(True)
    names = _by_name(param_groups(unet=unet, text_encoders=[te1, te2], lr=1e-4, text_encoder_lr=1e-5, weight_decay=0))
    assert "text_encoder_2/decay" in names
    with pytest.raises(UserError, match="text encoder learning rate"):
        param_groups(unet=unet, text_encoders=[te1], lr=1e-4, weight_decay=0)
    with pytest.raises(UserError, match="nothing to train"):
        param_groups(unet=_small().requires_grad_(False), lr=1e-4, weight_decay=0)


def test_adamw_keeps_group_settings_and_is_not_fused_on_cpu() -> None:
    groups = param_groups(unet=_small(), lr=2e-3, weight_decay=0.05)
    opt = build_optimizer(groups, name="adamw", lr=1e-3, betas=(0.8, 0.95), eps=1e-7)
    assert type(opt) is torch.optim.AdamW
    assert not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 2e-3 and g["base_lr"] == 2e-3 and g["betas"] == (0.8, 0.95) for g in opt.param_groups)
    assert opt.param_groups[0]["eps"] == 1e-7


def test_adafactor_uses_the_given_lr() -> None:
    from transformers.optimization import Adafactor

    deltas = []
    for lr in (1e-3, 2e-3):
        model = _small()
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(param_groups(unet=model, lr=lr, weight_decay=0.0), name="adafactor", lr=lr)
        assert isinstance(opt, Adafactor)
        g = opt.param_groups[0]
        assert not g["relative_step"] and not g["scale_parameter"] and g["beta1"] is None
        model(torch.ones(3, 4)).square().sum().backward()
        opt.step()
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[1], 2 * deltas[0])  # a fixed lr, not Adafactor's relative step


def test_adamw8bit_without_bitsandbytes_is_a_clear_user_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes...` raise ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(UserError, match=r"pip install 'sdxl-trainer\[gpu\]'"):
        build_optimizer(param_groups(unet=_small(), lr=1e-3, weight_decay=0), name="adamw8bit", lr=1e-3)


def test_adamw8bit_passes_the_settings_to_bitsandbytes(monkeypatch) -> None:
    seen = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = FakeAdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    opt = build_optimizer(
        param_groups(unet=_small(), lr=1e-3, weight_decay=0.01), name="adamw8bit", lr=1e-3, weight_decay=0.01,
        betas=(0.9, 0.99), eps=1e-6,
    )
    assert isinstance(opt, FakeAdamW8bit)
    assert seen == {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01}


def test_adamw8bit_that_cannot_step_on_the_device_is_a_clear_user_error(monkeypatch) -> None:
    """bitsandbytes 0.47–0.49 import on a CPU-only machine and fail at the first step (with a message
    listing every tensor): the trial step at build time turns that into one line before training."""

    class CudaOnly(torch.optim.AdamW):
        def step(self, closure=None):
            raise RuntimeError("All input tensors need to be on the same GPU, but found some tensors to not be on a "
                               "GPU:\n [(torch.Size([4096]), device(type='cpu')), …]")  # fmt: skip

    fake_bnb = types.ModuleType("bitsandbytes")
    fake_bnb.__version__ = "0.49.2"
    fake = types.ModuleType("bitsandbytes.optim")
    fake.AdamW8bit = CudaOnly
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake_bnb)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake)
    with pytest.raises(UserError) as info:
        build_optimizer(param_groups(unet=_small(), lr=1e-3, weight_decay=0), name="adamw8bit", lr=1e-3)
    text = str(info.value)
    assert "bitsandbytes 0.49.2 is installed but cannot run 8-bit AdamW on cpu" in text and "same GPU" in text
    assert "≥ 0.50" in text and "\n" not in text and "4096" not in text
    fake_bnb.__version__ = "0.50.2"  # a release that steps on the CPU: no advice to upgrade to what is installed
    with pytest.raises(UserError) as info:
        build_optimizer(param_groups(unet=_small(), lr=1e-3, weight_decay=0), name="adamw8bit", lr=1e-3)
    assert "bitsandbytes 0.50.2 is installed" in str(info.value) and "upgrade" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"name": "sgd"}, "unknown optimizer"), ({"lr": 0.0}, "learning rate"), ({"betas": (0.9, 1.0)}, "betas")],
)
def test_bad_settings(kwargs, match) -> None:
    args = {"name": "adamw", "lr": 1e-3} | kwargs
    with pytest.raises(UserError, match=match):
        build_optimizer(param_groups(unet=_small(), lr=1e-3, weight_decay=0), **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda() -> None:
    model = _small().cuda()
    opt = build_optimizer(param_groups(unet=model, lr=1e-3, weight_decay=0.01), name="adamw", lr=1e-3)
    assert opt.defaults["fused"]
    model(torch.ones(2, 4, device="cuda")).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
