"""`sdxl train-vae`: finetune the VAE's decoder on WORK's images — top to bottom (docs/vae.md).

The encoder (encoder + quant_conv) is frozen and stays in eval mode, so the latents `prep cache`
stored and the UNet learns from stay valid; only the decoder (post_quant_conv + decoder) learns,
from random crops of the manifest's images: encode → latent (posterior sample or mean) → decode →
L1 + SSIM loss against the crop (+ a patch discriminator's term with loss.gan_weight > 0,
discriminator.py). The training blocks are `sdxl train`'s: optimiser and parameter
groups, LR schedule in samples, EMA, counters, (seed, step) reseeding, atomic checkpoint folders
with checksums, the verified resume and the finite-weights refusal, metrics.jsonl and its sinks.

  1. device and precision; the checkpoint to resume, verified before anything is loaded
  2. data: training and held-out crops
  3. the VAE, the decoder trainable; optimiser, schedule, EMA; resume
  4. held-out metrics at step 0; the loop: crops → one update → log → evaluate → checkpoint
  5. the grid of held-out crops: original / before / after
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console, dist
from sdxl_trainer.config import VaeTrainConfig, dump_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import load_vae, part_dir
from sdxl_trainer.models.vae_objective import clipped_step
from sdxl_trainer.train.checkpoint_dir import prepare_checkpoints, read_latest
from sdxl_trainer.train.ema import EMA
from sdxl_trainer.train.integrity import check_resume
from sdxl_trainer.train.lr_schedule import LRSchedule
from sdxl_trainer.train.optim import build_optimizer, param_groups
from sdxl_trainer.train.rng import reseed
from sdxl_trainer.train.sinks import close_sinks, emit, log_line, open_sinks, truncate_log
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.vae_train import checkpoint
from sdxl_trainer.vae_train.data import CropData
from sdxl_trainer.vae_train.discriminator import Adversary
from sdxl_trainer.vae_train.quality import make_loss, metrics, read_eval_rows, reconstruct, write_eval_rows, write_grid

EVAL_CSV, GRID = "vae_eval.csv", "vae_grid.png"
GAN_LOGGED = ("pixel_loss", "g_loss", "gan_w", "d_loss")  # the last update's, with the discriminator on


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def build_vae(cfg: VaeTrainConfig, device: torch.device) -> torch.nn.Module:
    """The model's VAE in fp32 with only the decoder side trainable; the encoder side in eval mode for good."""
    vae = load_vae(cfg.model).to(device)
    vae.requires_grad_(False)
    for part in (vae.post_quant_conv, vae.decoder):
        part.requires_grad_(True)
    vae.train()
    vae.encoder.eval()
    vae.quant_conv.eval()
    return vae


def update(vae: torch.nn.Module, crops: torch.Tensor, *, loss_fn, parts: dict[str, Any], cfg: VaeTrainConfig,
           params: list[torch.nn.Parameter], generator: torch.Generator, autocast: torch.dtype | None) -> dict[str, Any]:  # fmt: skip
    """One update; a non-finite loss or gradient skips it (the optimiser and EMA do not move)."""
    state, optimizer = parts["state"], parts["optimizer"]
    with torch.no_grad():  # the frozen encoder: no graph kept
        posterior = vae.encode(crops * 2.0 - 1.0).latent_dist
        latents = posterior.sample(generator) if cfg.latent == "sample" else posterior.mean
    with torch.autocast(crops.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        decoded = vae.decode(latents).sample
    loss = loss_fn((decoded.float() + 1.0) / 2.0, crops)
    adversary, logged = parts.get("adversary"), {}
    gan_now = adversary is not None and adversary.active(state.step)
    if gan_now:  # loss.gan_weight > 0, after the warm-up: + w · (−D(x̂)) (discriminator.py)
        term, logged = adversary.generator_term(decoded, loss, vae.decoder.conv_out.weight)
        logged["pixel_loss"] = float(loss.detach())
        loss = loss + term
    grad_norm, skipped = clipped_step(optimizer, loss, params, cfg.optimizer.max_grad_norm)
    state.record(samples=crops.shape[0], skipped=skipped)
    if not skipped and parts["ema"] is not None:
        parts["ema"].update(vae, step=state.updates)
    if gan_now and not skipped:  # the discriminator's hinge step, on this update's crops
        logged.update(adversary.update(crops * 2.0 - 1.0, decoded))
    return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "skipped": skipped, **logged}


def evaluate(cfg: VaeTrainConfig, parts: dict[str, Any], held: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Held-out metrics of the weights a checkpoint exports (the EMA decoder, when that is exported)."""
    vae = parts["vae"]
    with checkpoint.exported_weights(cfg, parts):
        vae.eval()
        decoded = reconstruct(vae, held, batch_size=cfg.batch_size, device=device)
        vae.train()
        vae.encoder.eval()
        vae.quant_conv.eval()
    return metrics(decoded, held)


def start(cfg: VaeTrainConfig) -> tuple[torch.device, str, Path | None]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("sdxl train-vae runs in one process", where="torchrun",
                        fix="start it with plain `sdxl train-vae` (one GPU)")  # fmt: skip
    part_dir(cfg.model, "vae")  # an SDXL folder with a vae/: checked before any image is read
    device = dist.local_device(dist.DistInfo(), cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision bf16 asked for on a GPU without bf16", where="--precision", fix="use fp32")
    prepare_checkpoints(Path(cfg.out))  # finish what a killed checkpoint writer left
    resume_from = check_resume(cfg, fixed=checkpoint.RESUME_FIXED) if cfg.resume else None
    open_sinks(cfg, Path(cfg.out), main=False)  # only checks the packages: a missing one fails fast
    return device, precision, resume_from


def run(cfg: VaeTrainConfig) -> dict[str, Any]:
    """Finetune the decoder as configured; returns a summary (steps, held-out metrics before/after, checkpoint)."""
    # 1. device, precision, the verified checkpoint to resume; nothing is written into RUN/ before all checks pass
    device, precision, resume_from = start(cfg)
    out = Path(cfg.out)

    # 2. data
    data = CropData(Path(cfg.work), crop=cfg.crop, holdout_count=cfg.eval.holdout_count, seed=cfg.seed)
    held, held_paths = data.held_out()
    loss_fn, loss_name = make_loss(crop=cfg.crop, l1_weight=cfg.loss.l1_weight, ssim_weight=cfg.loss.ssim_weight)
    if cfg.loss.gan_weight:
        loss_name += (f" + {cfg.loss.gan_weight:g}·{'adaptive·' if cfg.loss.gan_adaptive else ''}(−D(x̂)) "
                      f"from update {cfg.loss.gan_start_step + 1} (patch discriminator, hinge)")  # fmt: skip
    console.info(f"train-vae: {len(data.train_rows)} training images, {held.shape[0]} held out, {data.too_small} "
                 f"skipped (short side < crop {cfg.crop}); loss {loss_name}; precision {precision}")  # fmt: skip

    # 3. the VAE (decoder trainable), optimiser, schedule in samples, EMA; resume
    vae = build_vae(cfg, device)
    params = [p for p in vae.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = build_optimizer(param_groups(unet=vae, lr=o.learning_rate, weight_decay=o.weight_decay, name="decoder"),
                                name=o.name, lr=o.learning_rate, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                fused_backward_pass=False, bf16_weights=False, seed=cfg.seed)  # fmt: skip
    schedule = LRSchedule(optimizer, kind=cfg.schedule.kind, warmup_samples=cfg.schedule.warmup_samples,
                          total_samples=cfg.num_steps * cfg.batch_size, min_factor=cfg.schedule.min_factor)  # fmt: skip
    e = cfg.ema
    ema = EMA(vae, decay=e.decay, warmup=e.warmup, power=e.power, update_every=e.update_every,
              device="cpu" if e.device == "cpu" else None) if e.enabled else None  # fmt: skip
    state = TrainState()
    adversary = Adversary(cfg, device) if cfg.loss.gan_weight > 0 else None
    parts = {"vae": vae, "optimizer": optimizer, "schedule": schedule, "ema": ema, "state": state,
             "adversary": adversary}  # fmt: skip
    if resume_from is not None:
        checkpoint.resume(cfg, parts, resume_from)
        console.info(f"resumed from {resume_from} at step {state.step}")

    # every check has passed: the run folder is written from here on
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    metrics_log = out / "metrics.jsonl"
    truncate_log(metrics_log, after_step=state.step)  # a resume redoes the steps after its checkpoint
    eval_rows = read_eval_rows(out / EVAL_CSV, up_to=state.step) if resume_from is not None else []
    sinks = open_sinks(cfg, out, main=True)

    def record_eval(record: dict[str, Any]) -> None:
        scores = evaluate(cfg, parts, held, device)
        record.update({f"eval_{k}": v for k, v in scores.items()})
        eval_rows.append({"step": state.step, **scores})
        write_eval_rows(out / EVAL_CSV, eval_rows)

    # 4. held-out metrics before any update, then the loop
    if state.step == 0:
        first: dict[str, Any] = {"step": 0, "samples": 0}
        record_eval(first)
        log_line(metrics_log, first)
        emit(sinks, first)
        console.info(f"step 0 held out: L1 {first['eval_l1']:.4f}, PSNR {first['eval_psnr']:.2f} dB, "
                     f"SSIM {first['eval_ssim']:.4f}")  # fmt: skip
    generator = torch.Generator(device)
    autocast = torch.bfloat16 if precision == "bf16" else None
    ck, last_ckpt, losses, t0 = cfg.checkpoints, None, [], time.perf_counter()
    try:
        with console.training_progress(cfg.num_steps, done=state.step) as bar:
            while state.step < cfg.num_steps:
                crops, _ = data.batch(state.step, cfg.batch_size)
                reseed(generator, seed=cfg.seed, rank=0, step=state.step)  # the posterior draw: resume-exact
                schedule.step(state.samples_seen + cfg.batch_size)  # the rate of an update includes its batch
                result = update(vae, crops.to(device), loss_fn=loss_fn, parts=parts, cfg=cfg, params=params,
                                generator=generator, autocast=autocast)  # fmt: skip
                bar.advance()
                if result["skipped"]:
                    on_skip(cfg, parts)
                else:
                    losses.append(result["loss"])
                done = state.step == cfg.num_steps
                ckpt_now = done or (ck.every_steps is not None and state.step % ck.every_steps == 0)
                eval_now = ckpt_now or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
                if eval_now or state.step % cfg.logging.every_steps == 0 or state.step == 1:
                    now = time.perf_counter()
                    record = {"step": state.step, "samples": state.samples_seen,
                              "loss": sum(losses) / len(losses) if losses else None, "lr": schedule.lrs(),
                              "grad_norm": result["grad_norm"], "skipped": state.skipped,
                              "samples_per_s": len(losses) * cfg.batch_size / max(now - t0, 1e-9),
                              **{k: result[k] for k in GAN_LOGGED if k in result}}  # fmt: skip
                    if eval_now:
                        record_eval(record)
                    log_line(metrics_log, record)
                    emit(sinks, record)
                    bar.report(record)
                    losses, t0 = [], time.perf_counter()
                if ckpt_now:
                    checkpoint.refuse_non_finite(cfg, parts)
                    last_ckpt = checkpoint.save(cfg, parts)
    finally:
        close_sinks(sinks)

    # 5. original / before (the base VAE) / after (what the checkpoint exports), held-out centre crops
    n = min(cfg.eval.grid_images, held.shape[0])
    before = reconstruct(load_vae(cfg.model).to(device), held[:n], batch_size=cfg.batch_size, device=device)
    with checkpoint.exported_weights(cfg, parts):
        after = reconstruct(vae.eval(), held[:n], batch_size=cfg.batch_size, device=device)
    write_grid(out / GRID, [held[:n], before, after])
    return {"steps": state.step, "skipped": state.skipped, "held_out": len(held_paths),
            "before": eval_rows[0] if eval_rows else None, "after": eval_rows[-1] if eval_rows else None,
            "checkpoint": None if last_ckpt is None else str(last_ckpt)}  # fmt: skip


def on_skip(cfg: VaeTrainConfig, parts: dict[str, Any]) -> None:
    """After ``max_consecutive_skips`` non-finite updates in a row: stop, naming the last good checkpoint."""
    state = parts["state"]
    console.info(f"step {state.step}: non-finite loss or gradient, update skipped ({state.consecutive_skips} in a row)")
    if state.consecutive_skips >= cfg.max_consecutive_skips:
        latest = read_latest(Path(cfg.out))
        raise UserError(f"{state.consecutive_skips} updates in a row had a non-finite loss or gradient",
                        where=f"step {state.step}",
                        fix=f"resume from {latest} with a lower learning rate" if latest else "lower the learning rate")  # fmt: skip
