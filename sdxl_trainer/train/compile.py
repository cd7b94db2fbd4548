"""torch.compile for training: the whole UNet, or each repeated transformer block (regional compilation).

Two scopes (config ``compile_scope``):

- ``blocks`` (default): every ``BasicTransformerBlock`` is compiled in place, and blocks of one width
  share one compiled graph (the same code at the same shapes), so the compile cost is that of a
  block, not of the whole UNet. Convolutions, resnets and the
  up/down sampling stay eager. This is what diffusers and the PyTorch regional-compilation recipe
  recommend for UNets; on the tiny model on the CPU it reaches its first update 3.2× sooner than
  the whole model, and compiles 9× less over three buckets (docs/benchmarks.md, "torch.compile").
- ``model``: ``torch.compile`` of the whole (maybe DDP-wrapped) UNet — the most fusion, the longest
  compile (minutes per bucket shape on CPU, also minutes for SDXL on a GPU).

Shapes. Aspect-ratio buckets change the latent height and width from batch to batch. We leave
``dynamic=None`` (PyTorch's *automatic dynamic*) on purpose: the first shape compiles a static graph,
the first change recompiles once with the changed dimensions symbolic, and later buckets reuse that
graph. ``dynamic=False`` would compile once per bucket — and past ``recompile_limit`` (8) torch
silently runs the rest eagerly — while ``dynamic=True`` makes every dimension symbolic from the
start. For ``blocks`` a bucket only changes the token count, so a run compiles at most 2 training
graphs whatever its bucket count; ``model`` may need one more when the dynamic graph was traced on a
square bucket (equal height and width share one symbol, a guard a non-square bucket breaks).

Order with the other wrappers: DDP first, compile after (``loop.wrap_model``), so that whole-model
compile splits its graph at DDP's gradient buckets; regional compile changes modules inside the
DDP-wrapped UNet in place, where the order does not matter. Parameter names are unchanged by
``blocks``; ``model`` adds an ``_orig_mod`` wrapper that ``models.export.unwrap_model`` removes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export import unwrap_model

CompileScope = Literal["model", "blocks"]
COMPILE_SCOPES = ("model", "blocks")


# What diffusers' ModelMixin.compile_repeated_blocks compiles for UNet2DConditionModel. That method
# (and the class's `_repeated_blocks`) exists from diffusers 0.35 on; we do the same three lines here
# so that regional compile also works with the older diffusers pyproject.toml allows, and so that
# fullgraph is our choice.
DEFAULT_REPEATED = ("BasicTransformerBlock",)


def repeated_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's modules of the classes it lists in ``_repeated_blocks`` (UNet: BasicTransformerBlock)."""
    names = set(getattr(unet, "_repeated_blocks", None) or DEFAULT_REPEATED)
    return [m for m in unet.modules() if type(m).__name__ in names]


def compile_model(model: nn.Module, *, scope: CompileScope, mode: str = "default") -> nn.Module:
    """``model`` compiled as ``scope`` says; returns what the step calls (the same module for ``blocks``)."""
    if scope == "model":
        return torch.compile(model, mode=mode, dynamic=None)
    if scope != "blocks":
        raise UserError(f"unknown compile scope {scope!r}", where="compile_scope",
                        fix=f"use one of {', '.join(COMPILE_SCOPES)}")  # fmt: skip
    unet = unwrap_model(model)
    blocks = repeated_blocks(unet)
    if not blocks:
        raise UserError(
            f"compile_scope blocks: {type(unet).__name__} names no repeated blocks to compile",
            where="compile_scope",
            fix="use compile_scope: model (whole-UNet compile)",
        )
    for block in blocks:
        # fullgraph: a graph break inside a transformer block is a bug to see, not a silent slow path
        block.compile(mode=mode, dynamic=None, fullgraph=True)
    return model
