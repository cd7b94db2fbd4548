"""Learning-rate schedule: linear warm-up, then cosine, linear or constant — counted in samples.

Counting samples rather than optimiser steps keeps the schedule's shape when the batch size or
gradient accumulation changes (or when a run is resumed with a different world size): the same
fraction of the data is seen at the same learning rate.

With ``w`` warm-up samples, ``T`` total samples, ``m`` the final fraction (``min_factor``) and
``p = clamp((s − w) / (T − w), 0, 1)`` the progress after warm-up, the factor at ``s`` samples is

    s < w:     s / w
    constant:  1
    linear:    1 − (1 − m) · p
    cosine:    m + (1 − m) · (1 + cos(π p)) / 2

Convention: the learning rate of an update is taken at the sample count *including* that update's
batch, so the first update already has a non-zero rate (``B / w``) and the schedule is the same
curve for every batch size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from sdxl_trainer.errors import UserError

ScheduleKind = Literal["constant", "linear", "cosine"]
KINDS = ("constant", "linear", "cosine")


def check_schedule(*, kind: str, warmup_samples: int, total_samples: int | None, min_factor: float) -> None:
    """Raise a UserError for a schedule that cannot be followed."""
    if kind not in KINDS:
        raise UserError(f"unknown LR schedule {kind!r}", where="schedule.kind", fix=f"use one of {', '.join(KINDS)}")
    if warmup_samples < 0:
        raise UserError(f"warmup_samples={warmup_samples} must be ≥ 0", where="schedule.warmup")
    if not 0.0 <= min_factor <= 1.0:
        raise UserError(f"min_factor={min_factor} must lie in [0, 1]", where="schedule.min_factor")
    if kind != "constant":
        if total_samples is None or total_samples <= warmup_samples:
            raise UserError(
                f"a {kind} schedule needs a training length beyond the warm-up "
                f"(total {total_samples} samples, warm-up {warmup_samples})",
                where="schedule",
                fix="set the training length, shorten the warm-up, or use a constant schedule",
            )


def lr_at(
    samples_seen: int,
    *,
    kind: ScheduleKind,
    warmup_samples: int,
    total_samples: int | None,
    min_factor: float = 0.0,
) -> float:
    """The factor multiplying each group's base learning rate after ``samples_seen`` samples."""
    if samples_seen < warmup_samples:
        return samples_seen / warmup_samples
    if kind == "constant":
        return 1.0
    p = min(1.0, (samples_seen - warmup_samples) / (total_samples - warmup_samples))
    if kind == "linear":
        return 1.0 - (1.0 - min_factor) * p
    if kind == "cosine":
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise UserError(f"unknown LR schedule {kind!r}", where="schedule.kind", fix=f"use one of {', '.join(KINDS)}")


class LRSchedule:
    """Sets every param group's ``lr`` to ``base_lr × lr_at(samples_seen)``.

    A group without ``base_lr`` gets its current ``lr`` as base when the schedule is built; the
    groups' ``lr`` are then set for 0 samples seen (0 during a warm-up).
    Call :meth:`step` before each optimiser step, with the sample count including that step's
    (global) batch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        kind: ScheduleKind,
        warmup_samples: int,
        total_samples: int | None,
        min_factor: float = 0.0,
    ):
        check_schedule(kind=kind, warmup_samples=warmup_samples, total_samples=total_samples, min_factor=min_factor)
        self.optimizer = optimizer
        self.kind, self.warmup_samples, self.total_samples = kind, warmup_samples, total_samples
        self.min_factor = min_factor
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.samples_seen = 0
        self.replanned_from: int | None = None  # the checkpoint's total_samples when a resume changed the length
        self.saved_config: dict[str, Any] | None = None
        self.factor = self.step(0)  # the groups' lr always equals base_lr × factor(samples_seen)

    def factor_at(self, samples_seen: int) -> float:
        return lr_at(
            samples_seen,
            kind=self.kind,
            warmup_samples=self.warmup_samples,
            total_samples=self.total_samples,
            min_factor=self.min_factor,
        )

    def step(self, samples_seen: int) -> float:
        """Set the groups' learning rates for the update that brings the count to ``samples_seen``."""
        self.samples_seen = int(samples_seen)
        self.factor = self.factor_at(self.samples_seen)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.factor
        return self.factor

    def lrs(self) -> dict[str, float]:
        """Current learning rate per group name (for logging)."""
        return {str(g.get("name", i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "warmup_samples": self.warmup_samples,
            "total_samples": self.total_samples,
            "min_factor": self.min_factor,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config(), "samples_seen": self.samples_seen}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore the position; ``strict`` refuses a checkpoint made with another schedule.

        Only the length (``total_samples``) may differ without ``strict=False``: the run is extended
        or shortened and the schedule re-planned over this run's length (the formula above with the
        new ``T``; the warm-up, counted in samples from 0, is unchanged). ``replanned_from`` then holds
        the checkpoint's length, for the one line the loop prints (train/extend.py).
        The base learning rates travel with the optimiser's own state (its param groups).
        """
        saved = dict(state["config"])
        shape = {k: v for k, v in saved.items() if k != "total_samples"}
        if strict and shape != {k: v for k, v in self.config().items() if k != "total_samples"}:
            raise UserError(
                f"the checkpoint's LR schedule {saved} differs from this run's {self.config()} "
                "(only the length may change on a resume)",
                where="schedule",
                fix="resume with the checkpoint's schedule kind, warm-up and min_factor, "
                "or pass --force to continue with the new ones",
            )
        self.replanned_from = saved.get("total_samples") if saved.get("total_samples") != self.total_samples else None
        self.saved_config = saved
        self.step(int(state["samples_seen"]))
