"""One training update of the SDXL UNet, built from the diffusion core (docs/diffusion.md §3–5).

Per micro-batch: normalise the cached latents, draw a level (σ, or t for flow) and noise, build the
UNet input and target with the objective, run the UNet under autocast with SDXL's added conditioning
(pooled text embedding + micro-conditioning time ids), weight the per-sample MSE (min-SNR × tag
weight), and back-propagate loss/k. After k micro-batches: unscale (fp16), measure the gradient norm
and clip, then step — or skip the whole update when the loss or the gradient is not finite. With the
optimiser step fused into backward (train/fused_backward.py) there is one micro-batch, a non-finite
loss skips the backward, and the optimiser clips and steps each parameter while backward runs.

Everything configurable is fixed when :func:`build_train_step` runs; the step reads no config.
Host synchronisation: none per micro-batch; one boolean read per update, the skip decision (the
optimiser call itself cannot be made conditional on a device tensor for every optimiser, and the
caller needs the answer anyway to count consecutive skips and to gate the EMA). Fused: two, the
loss's finiteness before backward and the gradients' after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from sdxl_trainer.diffusion import (
    Objective,
    build_level_sampler,
    build_loss_weight,
    build_noise_sampler,
    build_objective,
    make_training_inputs,
    weighted_mse,
)
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import read_json
from sdxl_trainer.train.fused_backward import FusedBackwardOptimizer, check_fused_backward
from sdxl_trainer.train.state import TrainState

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_NORMS = ("scaling_factor", "per_channel")
STATS_PRODUCER = "sdxl prep stats WORK --model MODEL"
BATCH_KEYS = ("latents", "text_hidden", "text_pooled", "time_ids", "tag_weight")


# ── latent normalisation ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class LatentNorm:
    """z = (z_raw − shift)·scale per channel: SDXL's z·scaling_factor, or NovelAI's (z − mean)/std."""

    shift: torch.Tensor  # (C,) fp32
    scale: torch.Tensor  # (C,) fp32

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        view = (1, -1, *([1] * (raw.ndim - 2)))
        return (raw.float() - self.shift.view(view)) * self.scale.view(view)

    def to(self, device: torch.device | str) -> "LatentNorm":
        return LatentNorm(self.shift.to(device), self.scale.to(device))


def scaling_factor_norm(scaling_factor: float, *, channels: int = 4) -> LatentNorm:
    """SDXL's own normalisation: z = z_raw·scaling_factor (0.13025), the same for every channel."""
    if not scaling_factor > 0:
        raise UserError(f"latent scaling_factor {scaling_factor} must be > 0", where="latents.scaling_factor")
    return LatentNorm(torch.zeros(channels), torch.full((channels,), float(scaling_factor)))


def per_channel_norm(*, mean: Sequence[float], std: Sequence[float]) -> LatentNorm:
    """NovelAI V3's scale-and-shift: z = (z_raw − mean_c)/std_c, measured by `sdxl prep stats`."""
    mean_t, std_t = torch.tensor(list(mean), dtype=torch.float64), torch.tensor(list(std), dtype=torch.float64)
    if mean_t.shape != std_t.shape or mean_t.ndim != 1:
        raise UserError(f"latent mean ({len(mean)}) and std ({len(std)}) need one value per channel")
    if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t > 0).all()):
        raise UserError("latent statistics must be finite with std > 0", fix="re-run `sdxl prep stats`")
    return LatentNorm(mean_t.float(), (1.0 / std_t).float())


def read_latent_stats(path: Path) -> LatentNorm:
    """WORK/latent_stats.json → the per-channel normalisation."""
    doc = read_json(Path(path), artifact="latent_stats", produced_by=STATS_PRODUCER)
    try:
        return per_channel_norm(mean=doc["mean"], std=doc["std"])
    except (KeyError, TypeError) as e:
        raise UserError(f"latent_stats.json lacks per-channel mean/std ({e})", where=str(path),
                        fix=f"re-run `{STATS_PRODUCER}`") from None  # fmt: skip


def build_latent_norm(kind: str, *, scaling_factor: float | None = None, stats_path: Path | None = None,
                      channels: int = 4) -> LatentNorm:  # fmt: skip
    """"scaling_factor" (needs `scaling_factor`) | "per_channel" (needs WORK/latent_stats.json)."""
    if kind == "scaling_factor":
        if scaling_factor is None:
            raise UserError("latent normalisation scaling_factor needs the VAE's scaling_factor")
        return scaling_factor_norm(scaling_factor, channels=channels)
    if kind == "per_channel":
        if stats_path is None:
            raise UserError("per_channel latent normalisation needs WORK/latent_stats.json",
                            fix=f"run `{STATS_PRODUCER}` first")  # fmt: skip
        norm = read_latent_stats(stats_path)
        if norm.shift.numel() != channels:
            raise UserError(f"latent_stats.json has {norm.shift.numel()} channels, the UNet takes {channels}",
                            where=str(stats_path), fix="measure the stats with this model's VAE")  # fmt: skip
        return norm
    raise UserError(f"unknown latent normalisation {kind!r}", fix=f"use one of {', '.join(LATENT_NORMS)}")


# ── the step ─────────────────────────────────────────────────────────────────────────────────────


class StepResult(NamedTuple):
    loss: torch.Tensor  # mean weighted loss over the update's micro-batches (this rank), detached, on device
    grad_norm: torch.Tensor  # total gradient norm before clipping (after the DDP all-reduce), on device
    skipped: bool  # the update was not applied: non-finite loss or gradient


@dataclass(frozen=True)
class TrainStep:
    """The callables of one run's update, fixed at build time (see :func:`build_train_step`)."""

    objective: Objective
    sample_level: Callable[..., torch.Tensor]
    sample_noise: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    loss_weight: Callable[..., torch.Tensor]
    normalize: LatentNorm
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32 throughout
    grad_accum: int
    max_grad_norm: float | None  # None: measure the norm, do not clip
    use_tag_weights: bool
    world_size: int
    rank: int
    scaler: Any  # torch.amp.GradScaler for fp16, else None; its state_dict belongs in the checkpoint
    text: Any = None  # train.text_mode.TextMode: encode batch["prompts"] each step instead of the cached text
    fused_backward: bool = False  # the optimiser steps inside backward (a FusedBackwardOptimizer; one micro-batch)

    def autocast(self):
        """The forward's autocast, without its cast cache: the cache keeps every fp32 weight's bf16 copy
        until the forward ends (SDXL: 5.1 GB), which gradient checkpointing would otherwise have freed;
        each UNet weight is used once per forward, so nothing is cast twice (docs/memory.md)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)  # fmt: skip

    def conditioning(self, b: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, pooled) in fp32: the cached embeddings, or the prompts encoded now (on-the-fly mode).

        fp32 because autocast casts for the matmuls; fp32 keeps the fp32 path exact.
        """
        if self.text is None:
            return b["text_hidden"].float(), b["text_pooled"].float()
        if "prompts" not in b:
            raise ValueError("on-the-fly text mode needs batch['prompts'] (TextMode.set_prompts)")
        with self.autocast():
            hidden, pooled = self.text.encode(b["prompts"])
        return hidden.float(), pooled.float()

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch's tensors on the training device (non-blocking from pinned memory)."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def draw(self, x0: torch.Tensor, *, generator: torch.Generator):
        """(level, noise, input noise) for this rank's rows of the global micro-batch.

        Every rank draws the whole global micro-batch from the same generator state and keeps rows
        [rank·b, (rank+1)·b) — the rows the batch sampler gives it — so a sample's noise does not
        depend on the world size, and N ranks of batch b train exactly like one process of N·b.
        The extra draws cost (N−1)·b latents of random numbers, nothing next to a UNet pass.
        """
        b, n = x0.shape[0], x0.shape[0] * self.world_size
        whole = x0 if self.world_size == 1 else x0.new_empty((n, *x0.shape[1:]))
        rows = slice(self.rank * b, (self.rank + 1) * b)
        level = self.sample_level(n, generator=generator)[rows]
        noise, input_noise = self.sample_noise(whole, generator=generator)
        return level, noise[rows], None if input_noise is None else input_noise[rows]

    def loss(self, unet: nn.Module, batch: Mapping[str, Any], *, generator: torch.Generator) -> torch.Tensor:
        """The weighted loss of one micro-batch (a scalar on the device; not divided by k)."""
        b = self.to_device(batch)
        x0 = self.normalize(b["latents"])
        level, noise, input_noise = self.draw(x0, generator=generator)
        noisy, timestep, target, info = make_training_inputs(x0, noise, level, objective=self.objective,
                                                             input_noise=input_noise)  # fmt: skip
        hidden, pooled = self.conditioning(b)
        added = {"text_embeds": pooled, "time_ids": b["time_ids"].float()}
        with self.autocast():
            output = unet(noisy, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
        external = b["tag_weight"] if self.use_tag_weights else None
        return weighted_mse(output, target, self.loss_weight(info, external=external))

    @torch.no_grad()
    def validation_losses(self, unet: nn.Module, batch: Mapping[str, Any], *, levels: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:  # fmt: skip
        """Σ over the batch of the plain (unweighted) MSE at each fixed level: (L,), on the device.

        One noise draw from `generator` serves every level, so with a generator seeded per held-out
        batch the numbers are comparable across runs, resumes and world sizes.
        """
        b = self.to_device(batch)
        x0 = self.normalize(b["latents"])
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        hidden, pooled = self.conditioning(b)
        added = {"text_embeds": pooled, "time_ids": b["time_ids"].float()}
        sums = []
        for i in range(levels.numel()):
            level = levels[i].expand(x0.shape[0])
            noisy, timestep, target, _ = make_training_inputs(x0, noise, level, objective=self.objective)
            with self.autocast():
                output = unet(noisy, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added,
                              return_dict=False)[0]  # fmt: skip
            sums.append((output.float() - target).pow(2).flatten(1).mean(1).sum())
        return torch.stack(sums)

    def update(
        self,
        model: nn.Module,
        micro_batches: Sequence[Mapping[str, Any]],
        *,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        state: TrainState,
        params: Sequence[torch.Tensor] | None = None,
        ema: Any = None,
        ema_source: nn.Module | None = None,
    ) -> StepResult:
        """Accumulate k micro-batches, clip, step — or skip — then count it in `state` and update `ema`.

        `model` may be a DDP wrapper (gradients are all-reduced on the last micro-batch only);
        `params` is :meth:`trainable_parameters` of it, built once by the caller (default: built
        here, on every call); `ema_source` is the unwrapped model the EMA was built from (default: `model`).
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        if self.fused_backward:
            return self._fused_update(model, micro_batches[0], optimizer=optimizer, generator=generator, state=state,
                                      ema=ema, ema_source=ema_source)  # fmt: skip
        params = self.trainable_parameters(model) if params is None else params
        total = torch.zeros((), device=self.device)
        samples = 0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            no_sync = getattr(model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = self.loss(model, batch, generator=generator)
                scaled = loss / self.grad_accum
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            total += loss.detach()
            samples += int(batch["latents"].shape[0])
        grad_norm = self._unscale_and_clip(params, optimizer)
        finite = torch.isfinite(grad_norm)
        if self.world_size == 1:  # under DDP the all-reduced gradient decides, identically on every rank
            finite = finite & torch.isfinite(total)
        skipped = not bool(finite)  # the one host read per update
        if not skipped and self.scaler is None:
            optimizer.step()
        elif not skipped:
            self.scaler.step(optimizer)
        if self.scaler is not None:
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.record(samples=samples * self.world_size, skipped=skipped)
        if ema is not None and not skipped:
            ema.update(ema_source if ema_source is not None else model, step=state.updates)
        return StepResult(total / self.grad_accum, grad_norm.detach(), skipped)

    def trainable_parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """What the update clips: the model's trainable weights, then the trained text encoders'.

        Walking every module for them costs ~1–2 ms on the tiny UNet (more with LoRA's extra
        modules), a few per cent of a CPU update, so the loop builds this list once. Wrappers (DDP,
        torch.compile) yield the same tensors as the module they wrap.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        if self.text is not None:  # trained text encoders: clipped together with the UNet
            params += self.text.trained_parameters()
        return params

    def _fused_update(self, model: nn.Module, batch: Mapping[str, Any], *, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, state: TrainState, ema: Any, ema_source: nn.Module | None) -> StepResult:  # fmt: skip
        """One micro-batch; its backward clips and steps each parameter (train/fused_backward.py).

        A non-finite loss is known before backward: the backward is skipped and nothing moves. A
        non-finite gradient leaves its parameter as it was while the others take their update,
        and the update counts as skipped.
        """
        if not isinstance(optimizer, FusedBackwardOptimizer):
            raise ValueError("a fused-backward step needs build_optimizer(..., fused_backward_pass=True)")
        loss = self.loss(model, batch, generator=generator)
        grad_norm = torch.full((), float("nan"), device=self.device)
        skipped = not bool(torch.isfinite(loss))  # host read 1
        if not skipped:
            grad_norm, finite = optimizer.backward(loss, max_grad_norm=self.max_grad_norm)  # host read 2
            skipped = not finite
        optimizer.zero_grad(set_to_none=True)  # nothing left after a fused backward; a skipped one made none
        state.record(samples=int(batch["latents"].shape[0]), skipped=skipped)
        if ema is not None and not skipped:
            ema.update(ema_source if ema_source is not None else model, step=state.updates)
        return StepResult(loss.detach(), grad_norm.detach(), skipped)

    def _unscale_and_clip(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise RuntimeError("no gradient reached the trainable parameters: is anything set to train?")
        if self.max_grad_norm is None:
            return torch.nn.utils.get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)


def validation_levels(objective: Objective, fractions: Sequence[float], *, device: torch.device | str) -> torch.Tensor:
    """Fixed levels at fractions of the schedule: σ of table index round(f·(N−1)), or flow t = f."""
    if any(not 0.0 <= f <= 1.0 for f in fractions) or not fractions:
        raise UserError(f"validation levels {list(fractions)} must be fractions in [0, 1]", where="validation.levels")
    if objective.prediction == "flow":
        if any(f in (0.0, 1.0) for f in fractions):
            raise UserError("flow validation levels must lie strictly inside (0, 1)", where="validation.levels")
        return torch.tensor(list(fractions), dtype=torch.float32, device=device)
    n = objective.sigmas.numel()
    return objective.sigmas[[round(f * (n - 1)) for f in fractions]].float().to(device)


def build_train_step(
    *,
    objective: str | Objective,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    normalize: LatentNorm,
    weighting: str = "none",
    gamma: float = 5.0,
    min_snr_form: str = "objective",
    use_tag_weights: bool = True,
    offset_noise: float = 0.0,
    input_perturbation: float = 0.0,
    sigma_max: float | None = None,
    level_options: Mapping[str, Any] | None = None,
    world_size: int = 1,
    rank: int = 0,
    text: Any = None,
    fused_backward: bool = False,
) -> TrainStep:
    """Check every option once and fix the step's callables.

    objective: "eps" | "v" | "v_ztsnr" | "flow" (or a built Objective); precision: "fp32" | "bf16" |
    "fp16" (autocast; the weights keep their dtype, fp16 adds a GradScaler); level_options: keyword
    arguments of `build_level_sampler` (t_min, t_max, terminal_oversample, shift, logit_std); text:
    a train.text_mode.TextMode for on-the-fly text (None: the batch's cached embeddings);
    fused_backward: the optimiser (a FusedBackwardOptimizer) steps inside backward, one micro-batch,
    no fp16, one process.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}", fix=f"use one of {', '.join(PRECISIONS)}")
    if grad_accum < 1 or not 0 <= rank < world_size:
        raise UserError(f"need gradient accumulation ≥ 1 ({grad_accum}) and 0 ≤ rank ({rank}) < world size "
                        f"({world_size})")  # fmt: skip
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise UserError(f"max_grad_norm {max_grad_norm} must be > 0 (or unset: no clipping)")
    if fused_backward:
        check_fused_backward(grad_accum=grad_accum, precision=precision, world_size=world_size)
    try:
        obj = build_objective(objective, sigma_max=sigma_max) if isinstance(objective, str) else objective
        obj = obj.to(device)
        sample_level = build_level_sampler(obj, **dict(level_options or {}))
        sample_noise = build_noise_sampler(offset=offset_noise, perturbation=input_perturbation)
        loss_weight = build_loss_weight(obj, kind=weighting, gamma=gamma, form=min_snr_form)
    except ValueError as e:
        raise UserError(str(e), where="objective / loss settings") from None
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return TrainStep(objective=obj, sample_level=sample_level, sample_noise=sample_noise, loss_weight=loss_weight,
                     normalize=normalize.to(device), device=device, autocast_dtype=dtype, grad_accum=grad_accum,
                     max_grad_norm=max_grad_norm, use_tag_weights=use_tag_weights, world_size=world_size, rank=rank,
                     scaler=scaler, text=text, fused_backward=fused_backward)  # fmt: skip
