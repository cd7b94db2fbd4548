"""Exponential moving average of the trainable weights, with decay warm-up and exact resume.

The shadow copy is fp32 whatever the training precision (a bf16 shadow stops moving once
``(1 - decay) · Δ`` falls below bf16's resolution, which at decay 0.9999 is almost at once). It can
live on the CPU to spare GPU memory. The update is one ``torch._foreach_lerp_`` over all tensors,
with the decay computed on the host from the Python step count, so a GPU-resident EMA never waits
for the device.

Decay warm-up (``warmup="inverse"``, the default): the decay used at optimiser step ``n`` (1-based)
is ``min(decay, (1 + n) / (10 + n))``, so the first updates follow the model closely instead of
averaging in the random initialisation for ~1/(1-decay) steps. ``warmup="power"`` uses Karras et al.'s
``min(decay, 1 - (1 + n) ** -power)`` (power 2/3 for short runs, 3/4 for long ones); ``"none"`` uses
``decay`` from the first step.

``update_every=k`` updates every k-th step with decay ``d(n) ** k``: the EMA horizon stays about
``1 / (1 - decay)`` optimiser steps whatever ``k``, so changing the interval does not change what
``decay`` means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from sdxl_trainer.errors import UserError

Warmup = Literal["none", "inverse", "power"]
ParamSource = nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor]


def ema_decay(step: int, *, decay: float, warmup: Warmup = "inverse", power: float = 2 / 3) -> float:
    """The decay used at optimiser step ``step`` (1-based), after warm-up."""
    if warmup == "none":
        return decay
    if warmup == "inverse":
        return min(decay, (1 + step) / (10 + step))
    if warmup == "power":
        return min(decay, 1.0 - (1.0 + step) ** -power)
    raise UserError(f"unknown EMA warmup {warmup!r}", where="ema.warmup", fix="use none, inverse or power")


def named_trainable(source: ParamSource) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs: a module's parameters that require grad, a mapping, or a list by position.

    Only trainable parameters count: frozen ones never change, so averaging them would only cost
    memory (for LoRA the frozen base model is nearly all of it).
    """
    if isinstance(source, nn.Module):
        return [(n, p) for n, p in source.named_parameters() if p.requires_grad]
    if isinstance(source, Mapping):
        return list(source.items())
    return [(str(i), p) for i, p in enumerate(source)]


class EMA:
    """fp32 shadow weights following the trainable parameters; ``state_dict`` for exact resume."""

    def __init__(
        self,
        parameters: ParamSource,
        *,
        decay: float = 0.9999,
        warmup: Warmup = "inverse",
        power: float = 2 / 3,
        update_every: int = 1,
        device: str | torch.device | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise UserError(f"EMA decay {decay} is outside [0, 1)", where="ema.decay", fix="use e.g. 0.9999")
        if update_every < 1:
            raise UserError(f"EMA update_every={update_every} must be ≥ 1", where="ema.update_every")
        if warmup not in ("none", "inverse", "power"):
            raise UserError(f"unknown EMA warmup {warmup!r}", where="ema.warmup", fix="use none, inverse or power")
        if warmup == "power" and power <= 0:
            raise UserError(f"EMA power {power} must be > 0", where="ema.power", fix="use 2/3 or 3/4")
        named = named_trainable(parameters)
        if not named:
            raise UserError("EMA got no trainable parameters", fix="build the EMA after choosing what trains")
        self.decay, self.warmup, self.power, self.update_every = decay, warmup, power, update_every
        self.device = None if device is None else torch.device(device)
        self.names = [n for n, _ in named]
        with torch.no_grad():
            self.shadow = [
                p.detach().to(device=self.device or p.device, dtype=torch.float32, copy=True) for _, p in named
            ]
        self.num_updates = 0
        self.last_step: int | None = None

    # ── training ────────────────────────────────────────────────────────────────────────────
    def decay_at(self, step: int) -> float:
        """The per-update decay applied at ``step``, including the ``update_every`` compensation."""
        return ema_decay(step, decay=self.decay, warmup=self.warmup, power=self.power) ** self.update_every

    @torch.no_grad()
    def update(self, parameters: ParamSource, *, step: int) -> bool:
        """Move the shadow towards ``parameters`` if ``step`` (1-based optimiser steps) is due.

        Call it only after an optimiser step that was taken (not after a skipped, non-finite one).
        Returns whether an update happened.
        """
        if not isinstance(step, int) or step < 1:
            raise TypeError(f"EMA.update needs a Python int step ≥ 1 (a tensor would sync the device), got {step!r}")
        if step % self.update_every:
            return False
        current = self._match(parameters)
        weight = 1.0 - self.decay_at(step)
        sources = [p.detach().to(device=s.device, dtype=torch.float32) for p, s in zip(current, self.shadow)]
        torch._foreach_lerp_(self.shadow, sources, weight)
        self.num_updates += 1
        self.last_step = step
        return True

    def _match(self, parameters: ParamSource) -> list[torch.Tensor]:
        named = named_trainable(parameters)
        if len(named) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} tensors but got {len(named)}")
        if isinstance(parameters, (nn.Module, Mapping)):
            names = [n for n, _ in named]
            if names != self.names:
                bad = next(a for a, b in zip(names, self.names) if a != b)
                raise ValueError(f"EMA parameter names differ from the ones it was built with (first: {bad!r})")
        for (name, p), s in zip(named, self.shadow):
            if p.shape != s.shape:
                raise ValueError(f"EMA shape mismatch for {name}: {tuple(p.shape)} vs {tuple(s.shape)}")
        return [p for _, p in named]

    # ── using the averaged weights ──────────────────────────────────────────────────────────
    @torch.no_grad()
    def copy_to(self, target: ParamSource) -> None:
        """Overwrite ``target``'s trainable parameters with the shadow (cast to their dtype/device)."""
        for p, s in zip(self._match(target), self.shadow):
            p.copy_(s)

    @contextlib.contextmanager
    def swapped_into(self, target: ParamSource) -> Iterator[None]:
        """Run a block (validation, sampling) with the EMA weights, then put the trained ones back.

        The trained weights are kept as clones on their own device meanwhile: one extra copy of
        the trainable parameters.
        """
        params = self._match(target)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            self.copy_to(target)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    # ── resume ──────────────────────────────────────────────────────────────────────────────
    def config(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "power": self.power, "update_every": self.update_every}

    def state_dict(self) -> dict[str, Any]:
        """Plain values plus one tensor per tracked parameter (the live shadows, not copies)."""
        return {
            "config": self.config(),
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "shadow": dict(zip(self.names, self.shadow)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore shadows and counters in place (shadows stay on this EMA's device).

        ``strict`` also refuses a checkpoint made with a different decay / warm-up / interval,
        since continuing with other settings is not an exact resume.
        """
        if strict and dict(state["config"]) != self.config():
            raise UserError(
                f"the checkpoint's EMA settings {dict(state['config'])} differ from this run's {self.config()}",
                where="ema",
                fix="resume with the same EMA settings, or pass --force to continue with the new ones",
            )
        shadow = state["shadow"]
        if sorted(shadow) != sorted(self.names):
            missing, extra = set(self.names) - set(shadow), set(shadow) - set(self.names)
            raise UserError(
                f"the checkpoint's EMA tracks other parameters (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})",
                where="ema",
                fix="resume with the same model and trainable parameters (full finetune vs LoRA, LoRA targets)",
            )
        for name, s in zip(self.names, self.shadow):
            if shadow[name].shape != s.shape:
                raise UserError(f"EMA shape mismatch for {name}", where="ema", fix="resume with the same model")
            s.copy_(shadow[name])
        self.num_updates = int(state["num_updates"])
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
