"""LR schedule: closed forms, agreement with transformers' step schedules, batch-size invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.lr_schedule import LRSchedule, lr_at


def test_closed_forms() -> None:
    kw = {"warmup_samples": 100, "total_samples": 1100}
    assert lr_at(0, kind="cosine", **kw) == 0.0
    assert lr_at(25, kind="cosine", **kw) == 0.25
    assert lr_at(100, kind="cosine", **kw) == 1.0
    assert lr_at(600, kind="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(350, kind="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1100, kind="cosine", **kw) == pytest.approx(0.0)
    assert lr_at(600, kind="cosine", min_factor=0.1, **kw) == pytest.approx(0.55)
    assert lr_at(1100, kind="cosine", min_factor=0.1, **kw) == pytest.approx(0.1)
    assert lr_at(5000, kind="cosine", min_factor=0.1, **kw) == pytest.approx(0.1)  # past the end: stays at min
    assert lr_at(600, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_at(850, kind="linear", min_factor=0.2, **kw) == pytest.approx(1 - 0.8 * 0.75)
    assert lr_at(50, kind="constant", warmup_samples=100, total_samples=None) == 0.5
    assert lr_at(10**9, kind="constant", warmup_samples=100, total_samples=None) == 1.0
    assert lr_at(0, kind="constant", warmup_samples=0, total_samples=None) == 1.0


def test_matches_transformers_schedules_at_batch_size_one() -> None:
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=50).lr_lambdas[0]
    linear = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=50).lr_lambdas[0]
    for s in range(0, 51):  # past the end transformers' cosine rises again; ours stays at its minimum
        assert lr_at(s, kind="cosine", warmup_samples=10, total_samples=50) == pytest.approx(cosine(s), abs=1e-12)
        assert lr_at(s, kind="linear", warmup_samples=10, total_samples=50) == pytest.approx(linear(s), abs=1e-12)


def _run(batch: int, total: int) -> dict[int, float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = LRSchedule(opt, kind="cosine", warmup_samples=32, total_samples=total)
    seen, lrs = 0, {}
    while seen < total:
        seen += batch
        sched.step(seen)
        lrs[seen] = opt.param_groups[0]["lr"]
    return lrs


def test_changing_the_batch_size_keeps_the_shape() -> None:
    small, big = _run(4, 256), _run(16, 256)
    assert len(small) == 4 * len(big)
    for samples, lr in big.items():
        assert small[samples] == lr
    assert small[4] == pytest.approx(0.1 * 4 / 32)  # the first update already learns


def test_wrapper_scales_each_group_from_its_base_lr() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-4, "name": "te"}])
    sched = LRSchedule(opt, kind="linear", warmup_samples=10, total_samples=110)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # before any update: factor at 0 samples
    sched.step(60)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])
    assert sched.lrs() == pytest.approx({"0": 5e-4, "te": 5e-5})
    sched.step(10)  # the schedule is a function of the sample count, not of how often step() ran
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])


def test_state_round_trip_and_strict_config() -> None:
    def make(total: int):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        return opt, LRSchedule(opt, kind="cosine", warmup_samples=8, total_samples=total)

    opt, sched = make(100)
    sched.step(40)
    opt2, fresh = make(100)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.samples_seen == 40 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _, longer = make(200)  # only the length changed: an extension, re-planned over the new length
    longer.load_state_dict(sched.state_dict())
    assert longer.samples_seen == 40 and longer.replanned_from == 100 and longer.total_samples == 200
    opt3 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    other = LRSchedule(opt3, kind="linear", warmup_samples=8, total_samples=100)
    with pytest.raises(UserError, match="LR schedule"):
        other.load_state_dict(sched.state_dict())
    other.load_state_dict(sched.state_dict(), strict=False)
    assert other.samples_seen == 40


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "step"}, "unknown LR schedule"),
        ({"total_samples": None}, "training length"),
        ({"total_samples": 10}, "training length"),
        ({"warmup_samples": -1}, "warmup"),
        ({"min_factor": 1.5}, "min_factor"),
    ],
)
def test_bad_schedules(kwargs, match) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    args = {"kind": "cosine", "warmup_samples": 10, "total_samples": 100} | kwargs
    with pytest.raises(UserError, match=match):
        LRSchedule(opt, **args)
