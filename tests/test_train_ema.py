"""EMA: the update rule, warm-up, interval, fp32 shadows, LoRA-only tracking and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.checkpoint_dir import load_state, save_state
from sdxl_trainer.train.ema import EMA, ema_decay


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _nudge(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn_like(p))


def test_decay_warmup_closed_forms() -> None:
    assert ema_decay(1, decay=0.9999, warmup="inverse") == pytest.approx(2 / 11)
    assert ema_decay(90, decay=0.9999, warmup="inverse") == pytest.approx(91 / 100)
    assert ema_decay(10**9, decay=0.9999, warmup="inverse") == 0.9999
    assert ema_decay(7, decay=0.9999, warmup="power", power=0.75) == pytest.approx(1 - 8**-0.75)
    assert ema_decay(1, decay=0.5, warmup="none") == 0.5


def test_update_matches_the_recurrence() -> None:
    model = _model()
    ema = EMA(model, decay=0.9, warmup="inverse")
    ref = [p.detach().double().clone() for p in model.parameters()]
    for step in range(1, 8):
        _nudge(model, 0.1)
        assert ema.update(model, step=step)
        d = min(0.9, (1 + step) / (10 + step))
        ref = [d * r + (1 - d) * p.detach().double() for r, p in zip(ref, model.parameters())]
    for r, s in zip(ref, ema.shadow):
        torch.testing.assert_close(s.double(), r, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 7 and ema.last_step == 7


def test_update_every_skips_steps_and_compensates_decay() -> None:
    model = _model()
    ema = EMA(model, decay=0.9, warmup="none", update_every=3)
    before = [s.clone() for s in ema.shadow]
    _nudge(model, 1.0)
    assert not ema.update(model, step=1) and not ema.update(model, step=2)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    assert ema.update(model, step=3)
    w = 1 - 0.9**3
    for b, s, p in zip(before, ema.shadow, model.parameters()):
        torch.testing.assert_close(s, b + w * (p.detach() - b))
    assert ema.num_updates == 1


def test_shadows_are_fp32_for_bf16_params_and_follow_the_device_argument() -> None:
    model = _model().to(torch.bfloat16)
    ema = EMA(model, decay=0.99, device="cpu")
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ema.shadow)
    _nudge(model, 0.1)
    ema.update(model, step=1)
    assert all(s.dtype == torch.float32 for s in ema.shadow)


def test_only_trainable_parameters_are_tracked_lora_style() -> None:
    base = nn.Linear(4, 4)
    base.requires_grad_(False)
    adapter = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
    model = nn.ModuleDict({"base": base, "lora": adapter})
    ema = EMA(model, decay=0.9)
    assert ema.names == ["lora.0.weight", "lora.1.weight"]
    _nudge(model, 0.5)
    frozen_now = base.weight.clone()
    ema.copy_to(model)
    assert torch.equal(base.weight, frozen_now)  # copy_to leaves what the EMA does not track alone
    assert torch.equal(adapter[0].weight, ema.shadow[0])


def test_copy_to_and_swapped_into_restore_the_trained_weights() -> None:
    model = _model()
    ema = EMA(model, decay=0.5)
    _nudge(model, 1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_into(model):
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
        assert not torch.equal(next(model.parameters()), trained[0])
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_positional_parameter_lists_work() -> None:
    model = _model()
    params = [p for p in model.parameters()]
    start = [p.detach().clone() for p in params]
    ema = EMA(params, decay=0.5, warmup="none")
    assert ema.names == [str(i) for i in range(len(params))]
    _nudge(model, 1.0)
    ema.update(params, step=1)
    for s, a, p in zip(ema.shadow, start, params):
        torch.testing.assert_close(s, 0.5 * a + 0.5 * p.detach())
    with pytest.raises(ValueError, match="tracks"):
        ema.update(params[:-1], step=2)


def test_state_round_trip_continues_identically(tmp_path) -> None:
    model = _model()
    ema = EMA(model, decay=0.99)
    for step in range(1, 4):
        _nudge(model, 0.1)
        ema.update(model, step=step)
    save_state(tmp_path, "ema", ema.state_dict())
    fresh = EMA(_model(seed=5), decay=0.99)
    fresh.load_state_dict(load_state(tmp_path, "ema"))
    assert fresh.num_updates == 3 and fresh.last_step == 3
    _nudge(model, 0.1)
    ema.update(model, step=4)
    fresh.update(model, step=4)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, fresh.shadow))


def test_load_refuses_other_settings_or_parameters() -> None:
    ema = EMA(_model(), decay=0.99)
    with pytest.raises(UserError, match="EMA settings"):
        EMA(_model(), decay=0.9).load_state_dict(ema.state_dict())
    EMA(_model(), decay=0.9).load_state_dict(ema.state_dict(), strict=False)  # forced resume
    other = EMA(nn.Linear(3, 4), decay=0.99)
    with pytest.raises(UserError, match="other parameters"):
        other.load_state_dict(ema.state_dict())


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="decay"):
        EMA(_model(), decay=1.0)
    with pytest.raises(UserError, match="update_every"):
        EMA(_model(), update_every=0)
    with pytest.raises(UserError, match="no trainable"):
        EMA(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(TypeError, match="Python int"):
        EMA(_model()).update(_model(), step=torch.tensor(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ema_device", [None, "cpu"])
def test_cuda_params_with_gpu_or_cpu_shadows(ema_device) -> None:
    model = _model().cuda().to(torch.bfloat16)
    ema = EMA(model, decay=0.9, warmup="none", device=ema_device)
    expected_device = "cpu" if ema_device == "cpu" else "cuda"
    assert all(s.device.type == expected_device and s.dtype == torch.float32 for s in ema.shadow)
    before = [s.clone() for s in ema.shadow]
    _nudge(model, 1.0)
    ema.update(model, step=1)
    for b, s, p in zip(before, ema.shadow, model.parameters()):
        torch.testing.assert_close(s, b + 0.1 * (p.detach().float().to(s.device) - b))
