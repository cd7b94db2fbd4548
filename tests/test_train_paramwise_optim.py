"""ParamwiseOptimizer: torch's AdamW and transformers' Adafactor bit for bit on fp32, masking, bf16 state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.checkpoint_dir import flatten_state, unflatten_state
from sdxl_trainer.train.fused_backward import FusedBackwardOptimizer
from sdxl_trainer.train.optim import build_optimizer, param_groups
from sdxl_trainer.train.paramwise_optim import ParamwiseOptimizer

STEPS = 6


def _model(dtype=torch.float32) -> nn.Module:
    """Every shape the UNet has: 4-D conv kernels, 2-D matrices, vectors (factored and not, for Adafactor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.LayerNorm(5))
    return model.to(dtype)


def _library(name: str, groups) -> torch.optim.Optimizer:
    """What build_optimizer returns on CPU without the savers: torch's AdamW, transformers' Adafactor."""
    return build_optimizer(groups, name=name, lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)


def _paramwise(name: str, groups, **kw) -> ParamwiseOptimizer:
    return ParamwiseOptimizer(groups, name=name, lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, **kw)


def _run(model: nn.Module, opt: torch.optim.Optimizer, *, steps: int = STEPS, start: int = 0) -> None:
    """Seeded gradients of different scales per step, and a learning rate that changes (a schedule)."""
    for i in range(start, steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** (i % 3 - 1)).to(p.dtype)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * (1.0 - 0.1 * i)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fp32_math_is_bitwise_the_library_optimizers(name):
    a, b = _model(), _model()
    ref = _library(name, param_groups(unet=a, lr=3e-2, weight_decay=0.1))
    ours = _paramwise(name, param_groups(unet=b, lr=3e-2, weight_decay=0.1))  # groups carry base_lr
    assert type(ref).__name__ == {"adamw": "AdamW", "adafactor": "Adafactor"}[name]
    _run(a, ref)
    _run(b, ours)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):  # same state, same keys (Adafactor's unused RMS aside)
        sa, sb = ref.state[pa], ours.state[pb]
        assert set(sa) - {"RMS"} == set(sb)
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sb)
    assert not torch.equal(a[0].weight, _model()[0].weight)  # the steps did move the weights


def test_masked_update_leaves_parameter_and_state_alone():
    model = _model()
    opt = _paramwise("adamw", param_groups(unet=model, lr=3e-2, weight_decay=0.1))
    _run(model, opt, steps=2)
    p = model[3].weight
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    opt.step_param(p, torch.randn(p.shape), finite=torch.tensor(False))
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items() if k != "step")
    assert opt.state[p]["step"] == before[1]["step"] + 1  # counted: FusedBackwardOptimizer.backward gives it back
    opt.step_param(p, torch.randn(p.shape), finite=torch.tensor(True))
    assert not torch.equal(p, before[0])


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_bf16_weights_keep_fp32_state_through_a_checkpoint(name):
    model = _model(torch.bfloat16)
    opt = build_optimizer(param_groups(unet=model, lr=1e-2, weight_decay=0.0), name=name, lr=1e-2, bf16_weights=True)
    assert type(opt) is ParamwiseOptimizer
    _run(model, opt, steps=3)
    tensors = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    saved = unflatten_state(*flatten_state(opt.state_dict()))
    copy = _model(torch.bfloat16)
    with torch.no_grad():
        for x, y in zip(copy.parameters(), model.parameters()):
            x.copy_(y)
    other = build_optimizer(param_groups(unet=copy, lr=1e-2, weight_decay=0.0), name=name, lr=1e-2, bf16_weights=True)
    other.load_state_dict(saved)  # torch's own load_state_dict would cast the moments to bf16
    _run(model, opt, steps=6, start=3)
    _run(copy, other, steps=6, start=3)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), copy.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())


def test_bf16_rounding_streams_differ_per_parameter_and_step():
    """Two identical parameters given identical gradients round differently (their own streams), and a
    run seeded alike rounds alike."""

    def run(seed):
        torch.manual_seed(0)
        w = torch.rand(4096) * 0.5 + 0.5
        ps = [nn.Parameter(w.bfloat16()), nn.Parameter(w.bfloat16())]
        opt = ParamwiseOptimizer([{"params": ps}], name="adamw", lr=1e-4, seed=seed)
        for _ in range(3):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        return [p.detach().clone() for p in ps]

    a, b = run(0), run(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(run(1)[0], a[0])


def test_build_optimizer_picks_and_refuses():
    fp32, bf16 = _model(), _model(torch.bfloat16)
    groups = lambda m: param_groups(unet=m, lr=1e-3, weight_decay=0.0)  # noqa: E731
    opt = build_optimizer(groups(fp32), name="adafactor", lr=1e-3, fused_backward_pass=True)
    assert isinstance(opt, FusedBackwardOptimizer) and opt.name == "adafactor"
    opt.remove_hooks()
    with pytest.raises(UserError, match="bf16_weights"):  # a library optimiser would round to nearest
        build_optimizer(groups(bf16), name="adamw", lr=1e-3)
    with pytest.raises(UserError, match="needs bf16 trained weights"):
        build_optimizer(groups(fp32), name="adamw", lr=1e-3, bf16_weights=True)
    with pytest.raises(UserError, match="no per-parameter version"):
        build_optimizer(groups(fp32), name="adamw8bit", lr=1e-3, fused_backward_pass=True)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        p = nn.Parameter(torch.ones(3, dtype=torch.float16))
        p.grad = torch.ones_like(p)
        ParamwiseOptimizer([{"params": [p]}], name="adamw", lr=1e-3).step()
