"""`sdxl train`: the training loop, top to bottom — WORK/cache → RUN/checkpoints and RUN/metrics.jsonl.

The pieces live in their own files (data.py, step.py, checkpoint.py, ema.py, optim.py,
lr_schedule.py); this file wires them in the order a reader expects:

  1. processes and devices (torchrun or one process)
  2. data: the cache reader and its bucket sampler
  3. the model: UNet (full finetune or LoRA), attention backend, checkpointing, DDP, compile
  4. optimiser, learning-rate schedule (counted in samples), EMA
  5. the step, built once from the config (objective, weights, precision)
  6. resume: every piece's state from the checkpoint
  7. the loop: k micro-batches → one update → log → samples → checkpoint
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console, dist
from sdxl_trainer.config import TrainConfig, dump_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.fp8 import store_base_fp8
from sdxl_trainer.models.loading import load_unet, part_dir
from sdxl_trainer.models.lora import add_lora
from sdxl_trainer.train.checkpoint import resume, save_checkpoint
from sdxl_trainer.train.checkpoint_dir import prepare_checkpoints, read_latest
from sdxl_trainer.train.provenance import check_inputs
from sdxl_trainer.train.compile import compile_model
from sdxl_trainer.train.data import CacheDataset
from sdxl_trainer.train.defaults import resolve_defaults
from sdxl_trainer.train.loader import CacheLoader
from sdxl_trainer.train.ema import EMA
from sdxl_trainer.train.integrity import SKIP_LOG, check_resume, check_skipped_fraction, log_skip, refuse_non_finite
from sdxl_trainer.train.extend import announce_replan
from sdxl_trainer.train.lr_schedule import LRSchedule
from sdxl_trainer.train.rng import reseed  # noqa: F401  (loop.reseed: where readers and tests look for it)
from sdxl_trainer.train.optim import build_optimizer, param_groups
from sdxl_trainer.train.samples import build_sample_rounds
from sdxl_trainer.train.sinks import close_sinks, emit, log_line, open_sinks, truncate_log
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.train.step import StepResult, TrainStep, build_latent_norm, build_train_step, validation_levels
from sdxl_trainer.train.text_mode import TextMode, build_text_mode


# ── 3. the model ────────────────────────────────────────────────────────────────────────────────


def build_unet(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The UNet: all trainable in fp32 (bf16 with optimizer.bf16_weights), or a fp32 LoRA on frozen weights.

    A LoRA's frozen base never receives updates, so under bf16/fp16 autocast it is kept in that
    precision (SDXL: 5.1 GB instead of 10.3 GB), while the adapter stays fp32 (its master weights);
    lora.fp8_base rounds it on to float8 on the CPU (2.6 GB, models/fp8.py): the device never holds 16 bits.
    """
    cfg = resolve_defaults(cfg, torch.device(device), announce=False)  # precision auto, when called alone
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    trained_dtype = torch.bfloat16 if cfg.optimizer.bf16_weights else torch.float32  # docs/memory.md
    unet = load_unet(cfg.model, dtype=frozen_dtype if cfg.lora.enabled else trained_dtype,
                     device="cpu" if cfg.lora.fp8_base else device)  # fmt: skip
    if cfg.lora.enabled:
        add_lora(unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                 target_modules=cfg.lora.target_modules)  # fmt: skip
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.lora.fp8_base:
            store_base_fp8(unet)
    else:
        unet.requires_grad_(True)
    if cfg.attention == "eager":  # diffusers' classic processor: for comparison, or where SDPA misbehaves
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.to(device).train()


def wrap_model(unet: torch.nn.Module, cfg: TrainConfig, info: dist.DistInfo, device: torch.device) -> torch.nn.Module:
    """The one place the UNet gets wrapped (DDP now, FSDP later), then compiled; unwrap with unwrap_model."""
    model = unet
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = compile_model(model, scope=cfg.compile_scope, mode=cfg.compile_mode)
    return model


# ── 5. the step ─────────────────────────────────────────────────────────────────────────────────


def make_optimizer(cfg: TrainConfig, unet: torch.nn.Module, *, text: TextMode | None = None) -> torch.optim.Optimizer:
    """The configured optimiser over the UNet's trainable weights (and the trained text encoders'),
    with the savers of optimizer.fused_backward_pass / bf16_weights; what benchmarks build too."""
    opt = cfg.optimizer
    groups = param_groups(unet=unet, lr=opt.learning_rate, weight_decay=opt.weight_decay,
                          text_encoders=text.trained_modules() if text else (), text_encoder_lr=opt.text_encoder_lr)
    return build_optimizer(groups, name=opt.name, lr=opt.learning_rate, weight_decay=opt.weight_decay,
                           betas=opt.betas, eps=opt.eps, fused_backward_pass=opt.fused_backward_pass,
                           bf16_weights=opt.bf16_weights, seed=cfg.seed)  # fmt: skip


def vae_scaling_factor(model_dir: Path) -> float:
    return float(json.loads((part_dir(model_dir, "vae") / "config.json").read_text())["scaling_factor"])


def make_step(cfg: TrainConfig, device: torch.device, info: dist.DistInfo, *, text: TextMode | None = None) -> TrainStep:
    cfg = resolve_defaults(cfg, device, announce=False)  # objective/precision auto, when called alone
    o, lo = cfg.objective, cfg.loss
    norm = build_latent_norm(
        cfg.latents.normalization,
        scaling_factor=cfg.latents.scaling_factor or vae_scaling_factor(cfg.model),
        stats_path=Path(cfg.work) / "latent_stats.json",
    )
    levels: dict[str, Any] = {"t_min": o.t_min, "t_max": o.t_max, "terminal_oversample": o.terminal_oversample}
    if o.name == "flow":
        levels.update(shift=o.flow_shift, logit_std=o.logit_std)
    return build_train_step(
        objective=o.name, sigma_max=o.sigma_max, device=device, precision=cfg.precision,
        grad_accum=cfg.gradient_accumulation_steps, max_grad_norm=cfg.optimizer.max_grad_norm, normalize=norm,
        weighting=lo.weighting, gamma=lo.gamma, min_snr_form=lo.min_snr_form, use_tag_weights=lo.tag_weights,
        offset_noise=lo.offset_noise, input_perturbation=lo.input_perturbation, level_options=levels,
        world_size=info.world_size, rank=info.rank, text=text, fused_backward=cfg.optimizer.fused_backward_pass,
    )  # fmt: skip


def total_updates(cfg: TrainConfig, *, batches_per_epoch: int, global_batch: int) -> int:
    """The run length in updates, from num_steps, num_samples or num_epochs."""
    if cfg.num_steps is not None:
        return cfg.num_steps
    if cfg.num_samples is not None:
        return math.ceil(cfg.num_samples / global_batch)
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


# ── 7. the loop ─────────────────────────────────────────────────────────────────────────────────


def batch_stream(loader: CacheLoader):
    """Batches forever: each pass of the loader is the rest of one epoch, the next pass the next epoch."""
    while True:
        yield from loader


def sum_over_ranks(value: torch.Tensor, info: dist.DistInfo) -> torch.Tensor:
    """The sum of a scalar over every rank (bounded by the process group's timeout); itself when alone."""
    if not info.distributed:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def validate(step: TrainStep, unet: torch.nn.Module, loader: CacheLoader, *, levels: torch.Tensor, seed: int,
             info: dist.DistInfo) -> list[float]:  # fmt: skip
    """Mean held-out loss per fixed level, over every rank's share; noise seeded per held-out batch."""
    generator = torch.Generator(step.device)
    sums, count = torch.zeros(levels.numel(), device=step.device), torch.zeros((), device=step.device)
    was_training = unet.training
    unet.eval()  # no dropout: the number depends on the weights only
    for batch in loader:
        generator.manual_seed(seed * 1_000_003 + int(batch["step"]))  # batch["step"]: its index in the split
        if step.text is not None:
            step.text.set_fixed_prompts(batch)
        sums += step.validation_losses(unet, batch, levels=levels, generator=generator)
        count += batch["latents"].shape[0]
    unet.train(was_training)
    totals = sum_over_ranks(torch.cat([sums, count[None]]), info)
    return (totals[:-1] / totals[-1].clamp(min=1)).tolist()


class Window:
    """Loss, update and time counters between two log lines; the loss stays on the device until then."""

    def __init__(self, device: torch.device):
        self.device, self.loss, self.taken, self.steps = device, torch.zeros((), device=device), 0, 0
        self.grad_norm, self.t0 = torch.zeros((), device=device), time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.grad_norm = result.grad_norm
        if not result.skipped:  # a skipped update's loss is not finite
            self.loss += result.loss
            self.taken += 1

    def flush(self, state: TrainState, info: dist.DistInfo, *, global_batch: int, lr: dict, epoch: int) -> dict:
        """The log record; every rank must call it (the loss is averaged over ranks)."""
        now = time.perf_counter()
        loss = float(sum_over_ranks(self.loss, info)) / (self.taken * info.world_size) if self.taken else None
        record = {"step": state.step, "samples": state.samples_seen, "loss": loss, "lr": lr,
                  "grad_norm": float(self.grad_norm),
                  "samples_per_s": self.steps * global_batch / max(now - self.t0, 1e-9),
                  "skipped": state.skipped, "epoch": epoch}  # fmt: skip
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.loss.zero_()
        self.taken, self.steps, self.t0 = 0, 0, now
        return record


def on_skip(cfg: TrainConfig, parts: dict[str, Any], info: dist.DistInfo, exports: dict[str, Any], micro: list) -> None:
    """Log a skipped update (its sample ids: RUN/skipped.jsonl); after K in a row, save (the weights are
    still the last good ones, unless the update before went non-finite: refused) and stop."""
    state = parts["state"]
    console.info(f"step {state.step}: non-finite loss or gradient, update skipped ({state.consecutive_skips} in a row)")
    log_skip(Path(cfg.out), state, micro, info)
    if state.consecutive_skips < cfg.max_consecutive_skips:
        return
    refuse_non_finite(cfg, parts)
    if info.is_main:  # resuming from it continues past the bad batches
        save_checkpoint(cfg, parts, exports=exports)
    dist.barrier(info, "checkpoint before stopping")  # torchrun stops every rank when one exits: let it finish
    raise UserError(
        f"{state.consecutive_skips} updates in a row had a non-finite loss or gradient",
        where=f"step {state.step}",
        fix=f"the weights before these updates are saved as {read_latest(Path(cfg.out))}: resume from it with a "
        "lower learning rate, bf16 instead of fp16, or check the cache (sdxl prep cache --verify)",
    )


def validation_record(step: TrainStep, unet, loader: CacheLoader, ema: EMA | None, **kw) -> dict[str, Any]:
    per_level = validate(step, unet, loader, **kw)
    record = {"val_loss": sum(per_level) / len(per_level), "val_loss_levels": per_level}
    if ema is not None:
        with ema.swapped_into(unet):
            record["val_loss_ema"] = sum(validate(step, unet, loader, **kw)) / len(per_level)
    return record


def checkpoint_due(cfg: TrainConfig, state: TrainState, samples_before: int) -> bool:
    ck = cfg.checkpoints
    if ck.every_steps is not None:
        return state.step % ck.every_steps == 0
    if ck.every_samples is not None:
        return state.samples_seen // ck.every_samples > samples_before // ck.every_samples
    return False


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (steps, samples, last loss, last checkpoint)."""
    # 1. processes: one, or one per GPU under torchrun; every collective has a timeout
    info = dist.init(device=cfg.device)
    device = dist.local_device(info, cfg.device)
    cfg = resolve_defaults(cfg, device, announce=info.is_main)  # objective/precision auto → what RUN/config.yaml records
    # Nothing is written into RUN/ until every start-up check has passed: a refused start leaves it as it was.
    out = Path(cfg.out)
    if info.is_main:
        prepare_checkpoints(out)  # finish what a killed checkpoint writer left (nothing in a new run)
    dist.barrier(info, "checkpoints prepared")
    resume_from = check_resume(cfg) if cfg.resume else None  # complete, checksums, settings: before anything slow
    open_sinks(cfg, out, main=False)  # only checks the packages: a missing one fails fast
    sinks: list = []  # opened once RUN/ may be written (below); the sample rounds hold this list

    # 2. data: bucket-pure batches from the cache (per-image repeats and caption dropout from the manifest),
    #    this rank's share, read ahead on threads
    tag_weights = Path(cfg.work) / "tag_weights.parquet" if cfg.loss.tag_weights else None
    dataset = CacheDataset(Path(cfg.work) / "cache", seed=cfg.seed, p_flip=cfg.data.p_flip, p_uncond=cfg.data.p_uncond,
                           tag_weights=tag_weights, holdout_fraction=cfg.validation.holdout_fraction,
                           holdout_count=cfg.validation.holdout_count,
                           manifest=Path(cfg.work) / "manifest.parquet")  # fmt: skip
    model_fp = check_inputs(cfg, dataset.index.ids)  # checksums, model fingerprints, manifest (provenance.py)
    sampler = dataset.train_sampler(batch_size=cfg.batch_size, rank=info.rank, world_size=info.world_size)
    if info.is_main:  # an epoch is the repeated set: num_epochs counts passes over it
        console.info(dataset.describe_epoch(sampler))
    loader = CacheLoader(dataset, sampler, prefetch=cfg.data.prefetch, workers=cfg.data.workers)
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * info.world_size
    n_updates = total_updates(cfg, batches_per_epoch=len(sampler), global_batch=global_batch)

    # 3. the model (seeded alike on every rank, so a LoRA starts the same everywhere)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, device)
    model = wrap_model(unet, cfg, info, device)
    text = build_text_mode(cfg, device, rank=info.rank, world_size=info.world_size)  # None: cached embeddings

    # 4. optimiser, schedule (in samples), EMA of the trainable weights
    optimizer = make_optimizer(cfg, unet, text=text)
    schedule = LRSchedule(optimizer, kind=cfg.schedule.kind, warmup_samples=cfg.schedule.warmup_samples,
                          total_samples=n_updates * global_batch, min_factor=cfg.schedule.min_factor)  # fmt: skip
    e = cfg.ema
    ema = EMA(unet, decay=e.decay, warmup=e.warmup, power=e.power, update_every=e.update_every,
              device="cpu" if e.device == "cpu" else None) if e.enabled else None  # fmt: skip

    # 5. the step: every option turned into callables once
    step = make_step(cfg, device, info, text=text)
    trainable = step.trainable_parameters(model)  # once: walking every module per update costs a few %
    generator = torch.Generator(device)
    state = TrainState()
    parts = dict(unet=model, optimizer=optimizer, schedule=schedule, loader=loader, ema=ema, step=step, state=state,
                 text=text, model_fingerprint=model_fp)  # fmt: skip
    exports: dict[str, Any] = {}
    if text is not None:  # the loaded (maybe trained) encoders are the ones exported
        exports.update(tokenizers=text.tokenizers, text_encoders=text.encoders)
    if cfg.latents.normalization == "per_channel":  # exported so that pipelines decode with the same stats
        exports["latents"] = {"latents_mean": step.normalize.shift.tolist(),
                              "latents_std": (1.0 / step.normalize.scale).tolist()}  # fmt: skip

    # in-training samples (samples.py): every setting checked and the prompts encoded now, before any update
    samples = build_sample_rounds(cfg, unet=unet, step=step, dataset=dataset, ema=ema, text=text, info=info,
                                  sinks=sinks, n_updates=n_updates)  # fmt: skip

    # 6. resume: weights, optimiser, schedule, data position, EMA, counters
    if resume_from is not None:
        resume(cfg, parts, resume_from)
        console.info(f"resumed from {resume_from} at step {state.step} ({state.samples_seen} samples)")
        announce_replan(schedule, global_batch=global_batch)  # a changed --num-steps: one line (extend.py)

    # every check has passed: the run folder is written from here on
    metrics = out / "metrics.jsonl"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        if resume_from is not None:  # the updates after the checkpoint are done again: their old records go
            for log in (metrics, out / SKIP_LOG):
                truncate_log(log, after_step=state.step)
    sinks.extend(open_sinks(cfg, out, main=info.is_main))
    dist.barrier(info, "train start")

    # held-out split, fixed levels and fixed noise: a validation loss comparable across runs and resumes
    val_loader, val_levels = None, None
    if cfg.validation.every_steps:
        held = dataset.holdout_batches(batch_size=cfg.validation.batch_size, rank=info.rank, world_size=info.world_size)
        val_loader = CacheLoader(dataset, held, prefetch=cfg.data.prefetch, workers=1, augment=False)
        val_levels = validation_levels(step.objective, cfg.validation.levels, device=device)

    # 7. the loop: k micro-batches → one update; log, validate and checkpoint on their cadences
    last_ckpt, record = None, {}
    stream, window = batch_stream(loader), Window(device)
    try:
        with console.training_progress(n_updates, done=state.step, enabled=info.is_main) as bar:
            window.t0 += samples.baseline(state)  # the untrained model's images; rounds are not training time
            while state.step < n_updates:
                micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
                reseed(generator, seed=cfg.seed, rank=info.rank, step=state.step)  # resume-exact randomness
                if text is not None:  # a fresh prompt variant per sample, a function of (seed, step)
                    text.set_prompts(micro, seed=cfg.seed, step=state.step)
                samples_before = state.samples_seen
                schedule.step(state.samples_seen + global_batch)  # the rate of an update includes its batch
                result = step.update(model, micro, optimizer=optimizer, generator=generator, state=state,
                                     params=trainable, ema=ema, ema_source=unet)  # fmt: skip
                bar.advance()
                window.add(result)
                if result.skipped:
                    on_skip(cfg, parts, info, exports, micro)
                val_now = val_loader is not None and state.step % cfg.validation.every_steps == 0
                # step 1 too: a run logged to a file shows its loss and speed from the first update
                if val_now or state.step % cfg.logging.every_steps == 0 or state.step in (1, n_updates):
                    record = window.flush(state, info, global_batch=global_batch, lr=schedule.lrs(),
                                          epoch=sampler.epoch)  # fmt: skip
                    if val_now:
                        record.update(validation_record(step, unet, val_loader, ema, levels=val_levels,
                                                        seed=cfg.validation.seed, info=info))  # fmt: skip
                    if info.is_main:
                        log_line(metrics, record)
                        emit(sinks, record)
                        bar.report(record)
                window.t0 += samples.after_update(state, samples_before)  # when due: rank 0 renders, others wait
                if checkpoint_due(cfg, state, samples_before) or state.step == n_updates:
                    refuse_non_finite(cfg, parts)  # every rank: never a checkpoint (or 'latest') of NaN
                    if info.is_main:
                        last_ckpt = save_checkpoint(cfg, parts, exports=exports)
                    dist.barrier(info, f"checkpoint at step {state.step}")
    finally:
        loader.close()
        if val_loader is not None:
            val_loader.close()
        close_sinks(sinks)
    dist.shutdown(info)
    check_skipped_fraction(cfg, state)  # after the last checkpoint: an error, but nothing lost
    return {"steps": state.step, "samples": state.samples_seen, "skipped": state.skipped,
            "last": record, "checkpoint": None if last_ckpt is None else str(last_ckpt)}  # fmt: skip
