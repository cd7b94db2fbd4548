"""The training blocks together: save at step k, reload into fresh objects, continue → bitwise equal.

A tiny loop that draws from every RNG the real trainer will (a data generator it owns, global torch
noise and dropout, numpy, Python's random), steps an optimiser under a sample-counted schedule with
gradient clipping and an EMA updated every other step. Leaving out any piece of state on resume must
change the result, so each piece is shown to matter (except the schedule's, see below).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sdxl_trainer.train.checkpoint_dir import load_state, resolve_resume, save_state, write_checkpoint
from sdxl_trainer.train.ema import EMA
from sdxl_trainer.train.lr_schedule import LRSchedule
from sdxl_trainer.train.optim import build_optimizer, param_groups
from sdxl_trainer.train.rng import RNGState, seed_everything

STEPS, BATCH = 12, 4


@dataclass
class Run:
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: LRSchedule
    ema: EMA
    data: torch.Generator
    picks: np.random.Generator
    rng: RNGState
    step: int = 0
    samples: int = 0


def _build(optimizer: str, *, init_seed: int) -> Run:
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = build_optimizer(param_groups(unet=model, lr=3e-2, weight_decay=0.01), name=optimizer, lr=3e-2,
                          weight_decay=0.01)
    sched = LRSchedule(opt, kind="cosine", warmup_samples=10, total_samples=STEPS * BATCH, min_factor=0.1)
    ema = EMA(model, decay=0.9, update_every=2)
    data, picks = torch.Generator().manual_seed(1234), np.random.default_rng(7)
    return Run(model, opt, sched, ema, data, picks, RNGState({"data": data, "picks": picks}))


def _train_step(run: Run) -> None:
    x = torch.randn(BATCH, 8, generator=run.data)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(BATCH, 1)  # global torch RNG, like timestep noise
    w = torch.from_numpy(np.random.rand(BATCH)).float() + random.random() + float(run.picks.random())
    loss = (w[:, None] * (run.model(x) - y) ** 2).mean()  # dropout draws from the global torch RNG too
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(run.model.parameters(), 0.5)
    run.samples += BATCH
    run.step += 1
    run.sched.step(run.samples)
    run.opt.step()
    run.ema.update(run.model, step=run.step)


def _save(run: Run, run_dir: Path) -> None:
    def write(folder: Path) -> None:
        save_state(folder, "model", run.model.state_dict())
        save_state(folder, "train", {
            "optimizer": run.opt.state_dict(), "schedule": run.sched.state_dict(), "ema": run.ema.state_dict(),
            "rng": run.rng.state_dict(), "step": run.step, "samples": run.samples,
        })

    write_checkpoint(run_dir, f"step-{run.step:06d}", write)


def _resume(run: Run, run_dir: Path, *, omit: str | None = None) -> None:
    folder = resolve_resume(run_dir, "latest")
    run.model.load_state_dict(load_state(folder, "model"))
    state = load_state(folder, "train")
    if omit != "optimizer":
        run.opt.load_state_dict(state["optimizer"])
    if omit != "schedule":
        run.sched.load_state_dict(state["schedule"])
    if omit != "ema":
        run.ema.load_state_dict(state["ema"])
    if omit != "rng":
        run.rng.load_state_dict(state["rng"])
    run.step, run.samples = state["step"], state["samples"]


def _final(run: Run) -> list[torch.Tensor]:
    opt_tensors = [v for s in run.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [p.detach() for p in run.model.parameters()] + list(run.ema.shadow) + opt_tensors


def _uninterrupted(optimizer: str) -> list[torch.Tensor]:
    seed_everything(0)
    run = _build(optimizer, init_seed=0)
    for _ in range(STEPS):
        _train_step(run)
    return _final(run)


def _interrupted(optimizer: str, run_dir: Path, *, at: int, omit: str | None = None) -> list[torch.Tensor]:
    seed_everything(0)
    first = _build(optimizer, init_seed=0)
    for _ in range(at):
        _train_step(first)
    _save(first, run_dir)
    for _ in range(2):  # the killed run went on a little: its progress must not leak into the resume
        _train_step(first)
    del first
    seed_everything(99)  # a new process: other global RNG states, other initial weights
    second = _build(optimizer, init_seed=99)
    _resume(second, run_dir, omit=omit)
    while second.step < STEPS:
        _train_step(second)
    return _final(second)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("at", [1, 5, 8])
def test_resume_is_bitwise_identical(tmp_path, optimizer, at) -> None:
    assert _same(_interrupted(optimizer, tmp_path, at=at), _uninterrupted(optimizer))


# The schedule is left out on purpose: it is a pure function of the restored sample count, so its
# own state only lets a resume refuse a changed schedule (tested in test_train_lr_schedule.py).
@pytest.mark.parametrize("omit", ["optimizer", "ema", "rng"])
def test_each_piece_of_state_matters(tmp_path, omit) -> None:
    assert not _same(_interrupted("adamw", tmp_path, at=5, omit=omit), _uninterrupted("adamw"))
