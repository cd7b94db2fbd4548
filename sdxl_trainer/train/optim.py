"""Optimisers and their parameter groups: AdamW (fused on CUDA), 8-bit AdamW, Adafactor.

Parameter groups follow common practice: no weight decay on biases and normalisation weights
(decaying a LayerNorm gain towards 0 only fights the normalisation), and the text encoders, when
trained, get their own learning rate (they are usually trained 2–10× slower than the UNet or not at
all). Each group carries a ``name`` and its ``base_lr``: the LR schedule scales ``base_lr`` into
``lr`` every step, and both are saved with the optimiser's state, so a resumed run continues with
the learning rates it had.

Full finetunes can trade the library optimisers for :class:`~sdxl_trainer.train.paramwise_optim.
ParamwiseOptimizer` (AdamW or Adafactor, the same math one parameter at a time): needed for bf16
weights (stochastic rounding, fp32 state) and for the optimiser step inside backward
(:class:`~sdxl_trainer.train.fused_backward.FusedBackwardOptimizer`). See docs/memory.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.fused_backward import FusedBackwardOptimizer
from sdxl_trainer.train.paramwise_optim import PARAMWISE, ParamwiseOptimizer

OptimizerName = Literal["adamw", "adamw8bit", "adafactor"]
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")

# Parameters of these modules are scale/shift terms of a normalisation: never weight-decayed.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # torch ≥ 2.4
)


def no_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """True for biases, normalisation weights and any other vector/scalar parameter."""
    return param.ndim < 2 or param_name.endswith("bias") or isinstance(module, _NORM_TYPES)


def _split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, plain = [], []
    seen: set[int] = set()
    for _, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # tied weights appear under several modules
                continue
            seen.add(id(p))
            (plain if no_decay(module, pname, p) else decay).append(p)
    return decay, plain


def param_groups(
    *,
    unet: nn.Module,
    text_encoders: Sequence[nn.Module] = (),
    lr: float,
    text_encoder_lr: float | None = None,
    weight_decay: float,
    name: str = "unet",
) -> list[dict[str, Any]]:
    """Groups for :func:`build_optimizer`: ``{unet,text_encoder}/{decay,no_decay}``, empty ones left out.
    ``name`` names the main model's groups (`sdxl train-vae`: ``decoder``).

    Only parameters with ``requires_grad`` are included (LoRA: just the adapters). Text encoders
    are grouped only when they have trainable parameters; they then need ``text_encoder_lr``.
    """
    groups: list[dict[str, Any]] = []

    def add(prefix: str, model: nn.Module, group_lr: float) -> None:
        decay, plain = _split_decay(model)
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", plain, 0.0)):
            if params:
                groups.append({"name": f"{prefix}/{suffix}", "params": params, "lr": group_lr,
                               "base_lr": group_lr, "weight_decay": wd})

    add(name, unet, lr)
    trained_te = [te for te in text_encoders if any(p.requires_grad for p in te.parameters())]
    if trained_te and text_encoder_lr is None:
        raise UserError(
            "text encoders are trained but have no learning rate",
            where="optimizer.text_encoder_lr",
            fix="set a text encoder learning rate (often 2–10× below the UNet's), or freeze them",
        )
    for i, te in enumerate(trained_te):
        add(f"text_encoder_{i + 1}" if len(trained_te) > 1 else "text_encoder", te, text_encoder_lr)
    if not groups:
        raise UserError("nothing to train: no parameter requires grad", fix="enable full finetune or LoRA")
    return groups


def _on_cuda(groups: Sequence[dict[str, Any]]) -> bool:
    devices = {p.device.type for g in groups for p in g["params"]}
    return devices == {"cuda"}


def build_optimizer(
    groups: Sequence[dict[str, Any]],
    *,
    name: OptimizerName,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused_backward_pass: bool = False,
    bf16_weights: bool = False,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """An optimiser over ``groups`` (per-group ``lr``/``weight_decay`` win over the defaults here).

    - ``adamw``: ``torch.optim.AdamW``, the fused kernel when every parameter is on CUDA.
    - ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` (optional dependency: CUDA, or the CPU from
      bitsandbytes 0.50), after one trial step on each parameter device (see ``_check_8bit_steps_on``).
    - ``adafactor``: ``transformers.optimization.Adafactor`` with a fixed, scheduled ``lr``
      (``relative_step=False, scale_parameter=False``) and no first moment (``beta1=None``), which is
      what makes it small; ``betas`` and ``eps`` are AdamW's and Adafactor keeps its own defaults.

    ``fused_backward_pass`` (a :class:`FusedBackwardOptimizer`: hooks on every parameter, stepped by
    ``TrainStep`` inside backward) or ``bf16_weights`` (every parameter bf16, updates stochastically
    rounded from ``seed``; a :class:`ParamwiseOptimizer`) take AdamW or Adafactor, computed the same
    way as the library ones.
    """
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}", where="optimizer.name", fix=f"use one of {', '.join(OPTIMIZERS)}")
    if lr <= 0:
        raise UserError(f"learning rate {lr} must be > 0", where="optimizer.lr")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise UserError(f"betas {tuple(betas)} must lie in [0, 1)", where="optimizer.betas")
    groups = [dict(g) for g in groups]  # the optimiser keeps these dicts; don't alias the caller's
    for g in groups:
        g.setdefault("base_lr", g.get("lr", lr))
    betas = tuple(betas)
    _check_weight_dtypes(groups, bf16_weights=bf16_weights)
    if fused_backward_pass or bf16_weights:
        if name not in PARAMWISE:
            raise UserError(f"optimizer {name} has no per-parameter version for fused_backward_pass / bf16_weights",
                            where="optimizer.name", fix=f"use one of {', '.join(PARAMWISE)}")  # fmt: skip
        cls = FusedBackwardOptimizer if fused_backward_pass else ParamwiseOptimizer
        return cls(groups, name=name, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, seed=seed)
    if name == "adamw":
        fused = _on_cuda(groups)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        bnb_optim = _import_bitsandbytes_optim()
        for device in sorted({p.device for g in groups for p in g["params"]}, key=str):
            _check_8bit_steps_on(device, bnb_optim)
        return bnb_optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(
        groups, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False
    )


def _check_weight_dtypes(groups: Sequence[dict[str, Any]], *, bf16_weights: bool) -> None:
    """bf16 trained weights only with bf16_weights: a library optimiser would round them to nearest,
    which drops every update below half a bf16 step (most of them), and keep its state in bf16."""
    dtypes = {p.dtype for g in groups for p in g["params"]}
    if bf16_weights and dtypes != {torch.bfloat16}:
        raise UserError(f"optimizer.bf16_weights needs bf16 trained weights, got {sorted(map(str, dtypes))}",
                        where="optimizer.bf16_weights", fix="build the UNet with loop.build_unet from the same "
                        "config (it loads bf16 weights), and do not train the text encoders")  # fmt: skip
    if not bf16_weights and torch.bfloat16 in dtypes:
        raise UserError("bf16 trained weights need optimizer.bf16_weights (stochastic rounding, fp32 state)",
                        where="optimizer.bf16_weights", fix="set optimizer.bf16_weights: true, or train fp32 weights")


def _import_bitsandbytes_optim() -> Any:
    try:
        return importlib.import_module("bitsandbytes.optim")
    except ImportError as e:
        raise UserError(
            f"optimizer adamw8bit needs bitsandbytes, which is not installed ({e})",
            where="optimizer.name",
            fix="pip install 'sdxl-trainer[gpu]' (on a CUDA GPU; on the CPU it needs bitsandbytes ≥ 0.50), or use "
            "adamw or adafactor",
        ) from e


# bitsandbytes keeps tensors below 4096 elements in 32-bit state; the probe must reach the 8-bit kernels.
_PROBE_NUMEL = 4096


def _release(version: str) -> tuple[int, ...]:
    """(0, 50, 2) from "0.50.2" (or "0.50.2.dev0"); () when unreadable, which sorts below every release."""
    parts = []
    for piece in version.split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _check_8bit_steps_on(device: torch.device, bnb_optim: Any) -> None:
    """One 8-bit AdamW step on a throwaway tensor on ``device``, so that a bitsandbytes build without
    kernels for it stops the run here with one line, not with a traceback at the first update after
    the model has loaded. On the CPU, 0.43.3 raises AssertionError ("Torch not compiled with CUDA
    enabled") and 0.47.0–0.49.2 RuntimeError ("All input tensors need to be on the same GPU");
    0.50.0 and 0.50.2 step (tested, docs/training-blocks.md)."""
    probe = torch.zeros(_PROBE_NUMEL, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        bnb_optim.AdamW8bit([probe]).step()
    except Exception as e:  # whatever the build raises (RuntimeError, AssertionError, NotImplementedError …)
        version = getattr(importlib.import_module("bitsandbytes"), "__version__", "?")
        reason = (str(e).strip().splitlines() or [""])[0][:200]  # 0.47–0.49 list every tensor after line one
        if device.type != "cpu":
            fix = "check that the bitsandbytes build fits this GPU and CUDA (python -m bitsandbytes)"
        elif _release(version) < (0, 50):
            fix = "upgrade to bitsandbytes ≥ 0.50 (older releases run it on CUDA only)"
        else:  # a release that does step on the CPU failed here: the reason above is the lead
            fix = "check the bitsandbytes install (python -m bitsandbytes)"
        raise UserError(
            f"bitsandbytes {version} is installed but cannot run 8-bit AdamW on {device} ({type(e).__name__}: {reason})",
            where="optimizer.name",
            fix=f"{fix}, or use adamw or adafactor",
        ) from e
