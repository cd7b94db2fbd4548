"""The optimiser step inside backward on the tiny SDXL UNet: the plain path's weights, freed gradients, skips.

Exactness: on CPU the plain path's optimisers run torch's single-tensor AdamW and transformers'
Adafactor, whose math ParamwiseOptimizer repeats op for op, and the gradients are the same numbers
(the backward is the same graph; an update lands only after every use of its weight), so the fused
path must give bitwise the same weights — with clipping off, against the library optimisers; with
per-parameter clipping, against the plain step clipping each gradient by the same `clip_grad`.
Only the logged total norm is summed in another order (hook order): equal to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_train_step import _ToyUNet, _step, make_batch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import load_unet
from sdxl_trainer.train.ema import EMA
from sdxl_trainer.train.fused_backward import FusedBackwardOptimizer, clip_grad
from sdxl_trainer.train.optim import build_optimizer, param_groups
from sdxl_trainer.train.paramwise_optim import ParamwiseOptimizer
from sdxl_trainer.train.state import TrainState

LR, WD = 1e-3, 0.01


@pytest.fixture(scope="module")
def templates(tiny_model_dir):
    return {torch.float32: load_unet(tiny_model_dir), torch.bfloat16: load_unet(tiny_model_dir, dtype=torch.bfloat16)}


def _unet(templates, dtype=torch.float32):
    return copy.deepcopy(templates[dtype]).train()


def _optimizer(unet, name, **kw):
    groups = param_groups(unet=unet, lr=LR, weight_decay=WD)
    return build_optimizer(groups, name=name, lr=LR, weight_decay=WD, seed=7, **kw)


class PerParameterClip(ParamwiseOptimizer):
    """The plain path with the fused path's clipping: every gradient clipped by its own norm, then stepped."""

    max_grad_norm = 0.005  # clips about a third of the tiny UNet's tensors

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.step_param(p, clip_grad(p.grad, self.max_grad_norm)[0])


def _train(unet, optimizer, step, *, steps: int = 3):
    state, gen = TrainState(), torch.Generator().manual_seed(0)
    results = [step.update(unet, [make_batch(unet, seed=i)], optimizer=optimizer, generator=gen, state=state)
               for i in range(steps)]  # fmt: skip
    assert not any(r.skipped for r in results)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, results


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_equals_the_library_optimizer_without_clipping(templates, name):
    fused_unet, plain_unet = _unet(templates), _unet(templates)
    fused, fused_results = _train(fused_unet, _optimizer(fused_unet, name, fused_backward_pass=True),
                                  _step(max_grad_norm=None, fused_backward=True))  # fmt: skip
    plain, plain_results = _train(plain_unet, _optimizer(plain_unet, name), _step(max_grad_norm=None))
    assert _same(fused, plain) and not _same(fused, templates[torch.float32].state_dict())
    for f, p in zip(fused_results, plain_results):
        assert torch.equal(f.loss, p.loss)
        torch.testing.assert_close(f.grad_norm, p.grad_norm, rtol=1e-6, atol=0)  # summed in hook order


@pytest.mark.parametrize(("name", "dtype"), [("adamw", torch.float32), ("adafactor", torch.bfloat16)])
def test_fused_equals_per_parameter_clipping_in_the_plain_path(templates, name, dtype):
    """Also with bf16 weights: the stochastic rounding is seeded per (parameter, update), not by call order."""
    fused_unet, plain_unet = _unet(templates, dtype), _unet(templates, dtype)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    bf16 = dtype == torch.bfloat16
    opt = _optimizer(fused_unet, name, fused_backward_pass=True, bf16_weights=bf16)
    fused, _ = _train(fused_unet, opt, _step(max_grad_norm=PerParameterClip.max_grad_norm, precision=precision,
                                              fused_backward=True))  # fmt: skip
    groups = param_groups(unet=plain_unet, lr=LR, weight_decay=WD)
    reference = PerParameterClip(groups, name=name, lr=LR, weight_decay=WD, seed=7)
    plain, _ = _train(plain_unet, reference, _step(max_grad_norm=None, precision=precision))
    assert _same(fused, plain)
    clipped = sum(bool(norm > PerParameterClip.max_grad_norm) for _, norm in opt._stepped)  # the last update's
    assert 0.2 * len(opt._stepped) < clipped < 0.9 * len(opt._stepped)  # clipping acted, not on every tensor


def test_each_gradient_is_freed_as_soon_as_its_parameter_is_stepped(templates):
    unet = _unet(templates)
    params = list(unet.parameters())
    live = []
    for p in params:  # registered first, so it runs before the optimiser's hook: sees this gradient arrive
        p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params)))
    opt = _optimizer(unet, "adamw", fused_backward_pass=True)
    _step(fused_backward=True).update(unet, [make_batch(unet)], optimizer=opt, generator=torch.Generator(),
                                      state=TrainState())  # fmt: skip
    assert len(live) == len(params) and max(live) == 1  # one gradient at a time, never two
    assert all(p.grad is None for p in params) and len(opt.state) == len(params)
    opt.step()  # nothing left to step: a no-op
    assert all(int(s["step"]) == 1 for s in opt.state.values())

    live.clear()  # a backward outside the fused step (hooks disarmed) keeps its gradients, like the plain path
    _step().loss(unet, make_batch(unet), generator=torch.Generator()).backward()
    assert max(live) == len(params) and all(p.grad is not None for p in params)
    opt.step()
    assert all(int(s["step"]) == 2 for s in opt.state.values())


def test_a_non_finite_loss_skips_the_backward(templates):
    unet = _unet(templates)
    opt = _optimizer(unet, "adamw", fused_backward_pass=True)
    bad = make_batch(unet)
    bad["latents"][0, 1, 2, 3] = float("nan")
    before, state = copy.deepcopy(unet.state_dict()), TrainState()
    result = _step(fused_backward=True).update(unet, [bad], optimizer=opt, generator=torch.Generator(), state=state)
    assert result.skipped and not torch.isfinite(result.loss) and not torch.isfinite(result.grad_norm)
    assert opt.state_dict()["state"] == {} and _same(unet.state_dict(), before)  # no hook ever ran
    assert all(p.grad is None for p in unet.parameters())
    assert (state.step, state.updates, state.skipped, state.consecutive_skips) == (1, 0, 1, 1)


def test_a_non_finite_gradient_leaves_its_parameter_and_counts_the_update_skipped(templates):
    unet = _unet(templates)
    opt, ema = _optimizer(unet, "adamw", fused_backward_pass=True), EMA(unet, decay=0.9)
    step, state, gen = _step(fused_backward=True), TrainState(), torch.Generator().manual_seed(0)
    poisoned = unet.conv_in.weight
    handle = poisoned.register_hook(lambda g: g * float("inf"))  # the loss stays finite
    before = copy.deepcopy(unet.state_dict())
    result = step.update(unet, [make_batch(unet)], optimizer=opt, generator=gen, state=state, ema=ema)
    assert result.skipped and torch.isfinite(result.loss) and not torch.isfinite(result.grad_norm)
    assert torch.equal(poisoned, before["conv_in.weight"])  # masked: weight and moments as they were
    assert int(opt.state[poisoned]["step"]) == 0 and not opt.state[poisoned]["exp_avg"].any()
    moved = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before) - 1  # every other parameter took its update: already applied
    assert (state.updates, state.skipped, ema.num_updates) == (0, 1, 0)
    handle.remove()
    assert not step.update(unet, [make_batch(unet)], optimizer=opt, generator=gen, state=state, ema=ema).skipped
    assert int(opt.state[poisoned]["step"]) == 1 and int(opt.state[unet.conv_out.weight]["step"]) == 2
    assert torch.isfinite(poisoned).all() and ema.num_updates == 1


def test_two_host_reads_per_fused_update(monkeypatch):
    """The loss's finiteness before backward, the gradients' after it (Adafactor: its step count is an int,
    where AdamW's CPU step tensor would add `item` calls that are not device reads)."""
    model = _ToyUNet()
    batch = {"latents": torch.randn(2, 4, 8, 8), "text_hidden": torch.randn(2, 77, 8).half(),
             "text_pooled": torch.randn(2, 8).half(), "time_ids": torch.ones(2, 6), "tag_weight": torch.ones(2)}  # fmt: skip
    opt = build_optimizer(param_groups(unet=model, lr=0.1, weight_decay=0.0), name="adafactor", lr=0.1,
                          fused_backward_pass=True)  # fmt: skip
    step, reads = _step(fused_backward=True), []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = step.update(model, [batch], optimizer=opt, generator=torch.Generator(), state=TrainState())
    monkeypatch.undo()
    assert not result.skipped and reads == ["__bool__", "__bool__"]


def test_gradient_checkpointing_recomputes_before_any_update(templates):
    """Recomputed segments read their weights during backward: they must still see the old ones."""
    fused_unet, plain_unet = _unet(templates), _unet(templates)
    for unet in (fused_unet, plain_unet):
        unet.enable_gradient_checkpointing()
    fused, _ = _train(fused_unet, _optimizer(fused_unet, "adamw", fused_backward_pass=True),
                      _step(max_grad_norm=None, fused_backward=True), steps=2)  # fmt: skip
    plain, _ = _train(plain_unet, _optimizer(plain_unet, "adamw"), _step(max_grad_norm=None), steps=2)
    assert _same(fused, plain)


def test_refusals():
    with pytest.raises(UserError, match="cannot accumulate"):
        _step(fused_backward=True, grad_accum=2)
    with pytest.raises(UserError, match="GradScaler"):
        _step(fused_backward=True, precision="fp16")
    with pytest.raises(UserError, match="DDP"):
        _step(fused_backward=True, world_size=2, rank=1)
    model = _ToyUNet()
    plain_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fused_backward_pass=True"):
        _step(fused_backward=True).update(model, [{}], optimizer=plain_opt, generator=torch.Generator(),
                                          state=TrainState())  # fmt: skip
    opt = build_optimizer(param_groups(unet=model, lr=0.1, weight_decay=0.0), name="adamw", lr=0.1,
                          fused_backward_pass=True)  # fmt: skip
    assert isinstance(opt, FusedBackwardOptimizer)
