"""AdamW and Adafactor one parameter at a time, in fp32 math, written back in the parameter's dtype.

The two memory savers for full finetunes need an optimiser that torch's and transformers' do not
give: one that can step a single parameter on demand (``step_param``, called from inside backward
by :mod:`fused_backward`), leave a parameter untouched when its gradient is not finite without a
host read (``finite=``), and write an update into bf16 weights by stochastic rounding
(:mod:`stochastic_rounding`) instead of round-to-nearest.

The math is torch.optim.AdamW's single-tensor update and transformers' Adafactor update (with the
settings ``build_optimizer`` uses: no first moment, fixed lr, ``eps=(1e-30, 1e-3)``,
``clip_threshold=1``, ``decay_rate=-0.8``), op for op, so on fp32 weights the result is bitwise
theirs on CPU (tests/test_train_paramwise_optim.py). It is computed out of place so that a
non-finite gradient can be masked with one ``torch.where`` per tensor.

State stays fp32 whatever the weights' dtype (AdamW: 8 bytes/param; Adafactor's factored second
moment: rows + columns), and has the same keys as torch's AdamW and transformers' Adafactor, so a
checkpoint's optimiser state loads into either (Adafactor's unused ``RMS`` is not kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sdxl_trainer.train.stochastic_rounding import rounding_seed, stochastic_round_bf16

PARAMWISE = ("adamw", "adafactor")
# transformers' Adafactor defaults, with the settings build_optimizer passes it (lr ours and scheduled)
ADAFACTOR_DEFAULTS = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
                      "scale_parameter": False, "relative_step": False, "warmup_init": False}  # fmt: skip


def adamw_math(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, step: float,
               lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(new p, new exp_avg, new exp_avg_sq) after AdamW's ``step``-th update (1-based), all fp32, inputs untouched."""
    beta1, beta2 = betas
    new_p = p.mul(1 - lr * weight_decay) if weight_decay != 0 else p
    m = exp_avg.lerp(grad, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    return new_p.addcdiv(m, denom, value=-(lr / bias_correction1)), m, v


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def adafactor_math(p: torch.Tensor, grad: torch.Tensor, second: dict[str, torch.Tensor], *, step: int, lr: float,
                   weight_decay: float, eps: tuple[float, float], clip_threshold: float,
                   decay_rate: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(new p, new second-moment state) after Adafactor's ``step``-th update without first moment.

    ``second`` holds ``exp_avg_sq_row``/``exp_avg_sq_col`` (a parameter of ≥ 2 dims, factored over
    its last two) or ``exp_avg_sq``.
    """
    beta2t = 1.0 - math.pow(step, decay_rate)
    update = grad**2 + eps[0]
    if "exp_avg_sq_row" in second:
        row = second["exp_avg_sq_row"].mul(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col = second["exp_avg_sq_col"].mul(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        new = {"exp_avg_sq_row": row, "exp_avg_sq_col": col}
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
    else:
        full = second["exp_avg_sq"].mul(beta2t).add_(update, alpha=1.0 - beta2t)
        new = {"exp_avg_sq": full}
        update = full.rsqrt().mul_(grad)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    update.mul_(lr)
    new_p = p.add(p, alpha=-weight_decay * lr) if weight_decay != 0 else p
    return new_p.add(-update), new


class ParamwiseOptimizer(torch.optim.Optimizer):
    """AdamW (``name="adamw"``) or Adafactor over param groups, steppable one parameter at a time.

    ``step()`` steps every parameter that has a gradient; ``step_param(p, grad)`` just one. fp32
    parameters get the new value exactly; bf16 parameters get it stochastically rounded, the
    random bits seeded from (``seed``, the parameter's index in the groups, its update count).
    """

    def __init__(self, groups: Sequence[dict[str, Any]], *, name: str, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0):  # fmt: skip
        if name not in PARAMWISE:
            raise ValueError(f"ParamwiseOptimizer implements {PARAMWISE}, not {name!r}")
        if name == "adamw":
            defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        else:
            defaults = {"lr": lr, "weight_decay": weight_decay, **ADAFACTOR_DEFAULTS}
        super().__init__(list(groups), defaults)
        self.name, self.seed = name, seed
        # param → (group position, flat index): load_state_dict replaces the group dicts, not their order;
        # the flat index tells the parameters' rounding streams apart
        pairs = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        self._where = {p: (gi, index) for index, (gi, p) in enumerate(pairs)}
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter with a gradient (none are left after a fused backward pass)."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, p.grad)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, grad: torch.Tensor, *, finite: torch.Tensor | None = None) -> None:
        """Apply one update to ``p`` from ``grad``; with ``finite`` (a device bool) keep ``p`` and its
        state as they were where it is False — without reading it on the host."""
        gi, index = self._where[p]
        group, state = self.param_groups[gi], self.state[p]
        p32, g32 = p.float(), grad.float()  # .float() of an fp32 tensor is the tensor itself: no copy
        if self.name == "adamw":
            if not state:  # torch's layout: a CPU float step, moments like the parameter but fp32
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p32), exp_avg_sq=torch.zeros_like(p32))
            state["step"] += 1
            step = state["step"].item()
            new_p, m, v = adamw_math(p32, g32, state["exp_avg"], state["exp_avg_sq"], step=step, lr=group["lr"],
                                     betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])  # fmt: skip
            new_state = {"exp_avg": m, "exp_avg_sq": v}
        else:
            if not state:
                state.update(step=0, **_adafactor_zeros(g32))
            state["step"] += 1
            step = state["step"]
            second = {k: v for k, v in state.items() if k.startswith("exp_avg_sq")}
            new_p, new_state = adafactor_math(p32, g32, second, step=step, lr=group["lr"],
                                              weight_decay=group["weight_decay"], eps=group["eps"],
                                              clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"])  # fmt: skip
        for key, value in new_state.items():
            state[key].copy_(value if finite is None else torch.where(finite, value, state[key]))
        if finite is not None:
            new_p = torch.where(finite, new_p, p32)
        self._write(p, new_p, index=index, step=int(step))

    def _write(self, p: torch.Tensor, value: torch.Tensor, *, index: int, step: int) -> None:
        if p.dtype == torch.float32:
            p.copy_(value)
            return
        if p.dtype != torch.bfloat16:
            raise TypeError(f"ParamwiseOptimizer trains fp32 or bf16 weights, not {p.dtype}")
        generator = self._generators.get(p.device)
        if generator is None:
            generator = self._generators[p.device] = torch.Generator(p.device)
        generator.manual_seed(rounding_seed(self.seed, index, step))
        p.copy_(stochastic_round_bf16(value, generator=generator))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that the state stays fp32 (torch casts it to the parameter's dtype: bf16) and is
        a copy (torch may keep the given tensors, which the next update would then change in place)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and key == "step":  # AdamW's count stays where it was saved (CPU)
                    self.state[p][key] = value.clone()
                elif torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
            self.state[p].pop("RMS", None)  # transformers' Adafactor keeps it; this one does not use it


def _adafactor_zeros(grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero second-moment state: factored over the last two dims for a parameter of ≥ 2 dims."""
    if grad.ndim >= 2:
        return {"exp_avg_sq_row": grad.new_zeros(grad.shape[:-1]),
                "exp_avg_sq_col": grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])}  # fmt: skip
    return {"exp_avg_sq": torch.zeros_like(grad)}
