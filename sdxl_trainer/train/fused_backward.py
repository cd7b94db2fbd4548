"""The optimiser step inside backward: each parameter is updated, and its gradient freed, once ready.

A plain update holds every gradient between ``backward()`` and ``optimizer.step()``: 4 bytes per
trained parameter in fp32, 10.3 GB for the SDXL UNet. Here every trained parameter carries a
post-accumulate-grad hook (``Tensor.register_post_accumulate_grad_hook``, the pattern of torch's
tutorial on fusing the optimiser step into the backward pass) that clips the fresh gradient,
steps the optimiser for that parameter alone and drops the gradient, so at most the gradients
autograd is still producing exist at once.

Why changing a weight in the middle of backward is safe: autograd runs a parameter's
AccumulateGrad node, and so the hook, only after every node that feeds it has run, and every node
that saved the parameter for its own backward feeds it; gradient checkpointing recomputes a
segment before that segment's nodes run. No later gradient of the same backward reads the weight.

What changes compared with the plain update (docs/memory.md has the full account):

- clipping is per parameter: the total norm is known only when backward ends, after every update
  was applied, so each gradient is clipped by its own norm to ``max_grad_norm``
  (:func:`clip_grad`, the coefficient formula of ``clip_grad_norm_`` applied to one tensor), as
  kohya's ``--fused_backward_pass`` does. The logged grad_norm is still the total norm before
  clipping, ‖(‖g₁‖, …, ‖gₙ‖)‖, summed in hook order (equal to the plain one up to rounding);
- a parameter whose gradient is not finite keeps its weight and optimiser state (masked with
  ``torch.where``, no host read per parameter); the other parameters are updated, since their
  updates are already applied; the whole update then counts as skipped (no EMA update, counts
  towards ``max_consecutive_skips``) and the masked parameters' update counts are given back;
- no gradient accumulation, no fp16 GradScaler, no DDP: refused where the step is built
  (:func:`sdxl_trainer.train.step.build_train_step`) and in the config.

:class:`FusedBackwardOptimizer` is the one optimiser object the loop, the LR schedule and the
checkpoint see: param groups, ``state_dict``/``load_state_dict`` and ``zero_grad`` as usual;
``step()`` finds no gradient after :meth:`FusedBackwardOptimizer.backward` and does nothing, while
after a plain ``loss.backward()`` (hooks disarmed) it steps like the plain optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.paramwise_optim import ParamwiseOptimizer

WHERE = "optimizer.fused_backward_pass"


def check_fused_backward(*, grad_accum: int, precision: str, world_size: int) -> None:
    """Refuse what the fused step cannot do exactly (the config refuses the first two already)."""
    if grad_accum > 1:
        raise UserError(f"the fused backward pass cannot accumulate gradients (gradient_accumulation_steps="
                        f"{grad_accum}): it frees each gradient at once, and keeping them is the memory it saves",
                        where=WHERE, fix="set gradient_accumulation_steps: 1 (raise batch_size instead), or turn "
                        "fused_backward_pass off")  # fmt: skip
    if precision == "fp16":
        raise UserError("the fused backward pass cannot use fp16's GradScaler, which must see every gradient "
                        "before any update is applied", where=WHERE, fix="use precision: bf16")  # fmt: skip
    if world_size > 1:
        raise UserError(f"the fused backward pass runs in one process only ({world_size} ranks): its updates "
                        "would be applied before DDP has averaged the gradients", where=WHERE,
                        fix="train on one GPU, or turn fused_backward_pass off under torchrun")  # fmt: skip


def clip_grad(grad: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gradient scaled to a norm ≤ ``max_norm``, its fp32 norm before): per-parameter clipping.

    The coefficient is ``clip_grad_norm_``'s, min(1, max_norm / (‖g‖ + 1e-6)), for one tensor.
    ``max_norm=None`` measures without clipping. The norm is accumulated in fp32 also for bf16 grads.
    """
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    if max_norm is None:
        return grad, norm
    return grad.float() * (max_norm / (norm + 1e-6)).clamp(max=1.0), norm


class FusedBackwardOptimizer(ParamwiseOptimizer):
    """A :class:`ParamwiseOptimizer` whose :meth:`backward` steps each parameter inside backward."""

    def __init__(self, groups: Sequence[dict[str, Any]], **kwargs: Any):
        super().__init__(groups, **kwargs)
        self._armed, self._max_grad_norm = False, None
        self._stepped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its gradient's norm)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for g in self.param_groups for p in g["params"]]  # fmt: skip

    def backward(self, loss: torch.Tensor, *, max_grad_norm: float | None) -> tuple[torch.Tensor, bool]:
        """``loss.backward()`` with every parameter clipped, stepped and its gradient freed on arrival.

        Returns (total gradient norm before clipping, on the device; whether every gradient was
        finite — the one host read). When one was not, its parameter was left as it was and its
        update count is given back, so its bias correction and rounding stream go on unshifted.
        """
        self._stepped, self._max_grad_norm, self._armed = [], max_grad_norm, True
        try:
            loss.backward()
        finally:
            self._armed = False
        if not self._stepped:
            raise RuntimeError("no gradient reached the trainable parameters: is anything set to train?")
        norms = torch.stack([norm for _, norm in self._stepped])
        finite = bool(torch.isfinite(norms).all())
        if not finite:  # the rare path: which ones, read on the host
            for (p, _), norm in zip(self._stepped, norms.tolist()):
                if not math.isfinite(norm):
                    self.state[p]["step"] -= 1
        return torch.linalg.vector_norm(norms), finite

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._armed:  # a backward outside backward(): the gradient stays, for step() or a probe
            return
        grad, norm = clip_grad(p.grad, self._max_grad_norm)
        self.step_param(p, grad, finite=torch.isfinite(norm))
        p.grad = None  # the point of it all: the memory goes back before the next gradient is made
        self._stepped.append((p, norm))

    def remove_hooks(self) -> None:
        """Detach from the parameters (the hooks hold this optimiser alive as long as they do)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
