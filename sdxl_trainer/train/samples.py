"""In-training samples: every N updates, images from the UNet being trained, as `sdxl generate` would render them.

Why in training and not only in `sdxl evaluate`: a run that goes wrong (no black at zero terminal SNR,
a collapsed style, NaN-free nonsense) shows it in its samples hours before the loss does, and a person
watching wants to see the model change. Peers do the same (kohya --sample_prompts, SimpleTuner
--validation_prompt, OneTrainer sampling); the NovelAI V3 recipe asks for the black-image,
coherence and progressive-denoising checks during training.

What a round renders is exactly what `sdxl generate` renders from the checkpoint of that step: the same
sampling code (sdxl_trainer.sampling), the objective and σ_max / shift built from the same export
info the checkpoint records (:func:`sampling_info`), the same latent normalisation, per-image CPU
seeds. It uses the UNet in memory — no reload, no second copy — under the run's autocast precision,
in eval mode and without gradients, and puts it back in train mode. With EMA on it renders the EMA
weights too (copied in, the trained ones restored bit for bit afterwards).

Memory: the prompts are encoded once at start-up and the text encoders freed; the VAE is loaded
for the round and released after it. A round runs after an update, when the gradients are freed
(``zero_grad(set_to_none=True)``). Beyond what stays resident (weights, optimiser state) it holds
one image's inference activations, or the VAE and its decode — no autocast cast cache (which would
hold a bf16 copy of every fp32 weight, 5.1 GB for SDXL, for the whole round) and, with EMA, the
trained weights wait in host memory rather than as a second device copy. docs/samples.md has the
figures.

Under torchrun rank 0 renders while the other ranks wait at a barrier with a timeout, so no
collective runs on one rank alone. Resume: a round is rendered before the checkpoint of its step is
written, so resuming from a checkpoint neither repeats nor skips a round; the baseline (``at_start``)
is rendered only by a run that starts at step 0.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console, dist
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.config.samples import SamplesSection
from sdxl_trainer.models.export import export_info
from sdxl_trainer.models.loading import load_text_encoders, load_tokenizers, read_part_config
from sdxl_trainer.train.run_vae import load_run_vae
from sdxl_trainer.sampling.black import DEFAULT_PROMPTS, black_image_check
from sdxl_trainer.sampling.coherence import canvas_side, coherence_check
from sdxl_trainer.sampling.generator import (
    Generator,
    decode_latents,
    fill_text_cache,
    geometry,
    latent_affine,
    objective_from_info,
)
from sdxl_trainer.sampling.progressive import progressive_check
from sdxl_trainer.sampling.prompts import read_prompt_lines
from sdxl_trainer.sampling.sample import SamplingOptions, check_size, generation_params, pick_sampler, sample_latents
from sdxl_trainer.train.sample_output import RoundImage, publish_round, write_round
from sdxl_trainer.train.ema import named_trainable
from sdxl_trainer.train.state import TrainState

BLACK_OBJECTIVES = ("v_ztsnr", "flow")  # where the black-image check is the point of the run


@dataclass(frozen=True)
class SampleJob:
    """One prompt of a round, its overrides resolved: rendered once per seed."""

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    seeds: tuple[int, ...]
    options: SamplingOptions


def most_common_bucket(dataset: Any) -> tuple[int, int]:
    """(width, height) of the bucket holding the most training images (ties: the first in cache order)."""
    counts: Counter[tuple[int, int]] = Counter()
    for group, rows in dataset.index.train.items():
        counts[(int(group.bucket_width), int(group.bucket_height))] += sum(len(r) for r in rows)
    return counts.most_common(1)[0][0]


def plan_jobs(s: SamplesSection, *, size: tuple[int, int]) -> list[SampleJob]:
    """The prompts of ``samples.prompts`` (a list or a file) with their per-line overrides applied."""
    base = SamplingOptions(steps=s.steps, cfg_scale=s.cfg, cfg_rescale=s.cfg_rescale, sampler=s.sampler,
                           schedule=s.schedule, max_chunks=s.max_chunks, pag_scale=s.pag_scale,
                           pag_layers=tuple(s.pag_layers))  # fmt: skip
    jobs = []
    for i, line in enumerate(read_prompt_lines(s.prompts)):
        opts = replace(base, steps=line.steps or base.steps, cfg_scale=base.cfg_scale if line.cfg is None else line.cfg)
        jobs.append(SampleJob(index=i, prompt=line.text, negative=s.negative if line.negative is None else line.negative,
                              width=line.width or size[0], height=line.height or size[1],
                              seeds=tuple(s.seeds) if line.seed is None else (line.seed,), options=opts))  # fmt: skip
    return jobs


def sampling_info(cfg: TrainConfig, normalize: Any) -> dict[str, Any]:
    """The export info the checkpoint of this run records (models/export.py), built from the run itself.

    `sdxl generate` builds its objective and latent normalisation from this record; building ours
    from it too (rather than from the training step's own objects) makes the two agree to the bit.
    """
    o = cfg.objective
    if cfg.latents.normalization == "per_channel":  # as loop.run hands it to the export
        norm = {"kind": "per_channel", "mean": [float(v) for v in normalize.shift.tolist()],
                "std": [float(v) for v in (1.0 / normalize.scale).tolist()]}  # fmt: skip
    else:
        norm = {"kind": "scaling_factor", "scaling_factor": float(normalize.scale[0])}
    info = export_info(objective=o.name, flow_shift=o.flow_shift, normalization=norm,
                       sigma_max=o.sigma_max if o.name == "v_ztsnr" else None)  # fmt: skip
    return info | {"config": cfg.model_dump(mode="json"), "origin": "the run being trained"}


class SampleRounds:
    """The rounds of one run: when they are due, and (rank 0) rendering, writing and logging them."""

    def __init__(self, cfg: TrainConfig, *, jobs: list[SampleJob], generator: Generator | None, ema: Any,
                 precision: torch.dtype | None, info: dist.DistInfo, sinks: list, n_updates: int,
                 black: bool):  # fmt: skip
        self.cfg, self.s, self.jobs, self.generator, self.ema = cfg, cfg.samples, jobs, generator, ema
        self.precision, self.info, self.sinks, self.n_updates, self.black = precision, info, sinks, n_updates, black
        self.root = Path(cfg.out) / "samples"

    # ── cadence ──────────────────────────────────────────────────────────────────────────────
    def index(self, state: TrainState) -> int:
        """The round's number on the cadence (0 = the baseline); the slower checks run every N-th."""
        s = self.s
        return state.step // s.every_steps if s.every_steps else state.samples_seen // s.every_samples

    def due(self, state: TrainState, samples_before: int) -> bool:
        s = self.s
        if not s.enabled:
            return False
        if state.step == self.n_updates:  # beside the final checkpoint, whatever the cadence
            return True
        if s.every_steps:
            return state.step % s.every_steps == 0
        return state.samples_seen // s.every_samples > samples_before // s.every_samples

    def baseline(self, state: TrainState) -> float:
        """The round before the first update (``at_start``), for a run that starts at step 0; its seconds."""
        if self.s.enabled and self.s.at_start and state.step == 0:
            return self._round(state)
        return 0.0

    def after_update(self, state: TrainState, samples_before: int) -> float:
        """Render when due (call on every rank after each update, before its checkpoint); the seconds it took."""
        return self._round(state) if self.due(state, samples_before) else 0.0

    def _round(self, state: TrainState) -> float:
        t0 = time.perf_counter()
        if self.info.is_main:
            self.render(state)
        dist.barrier(self.info, f"samples at step {state.step}")  # the others wait for rank 0's round
        return time.perf_counter() - t0

    # ── a round (rank 0) ─────────────────────────────────────────────────────────────────────
    def render(self, state: TrainState) -> Path:
        g, t0 = self.generator, time.perf_counter()
        unet = g.unet
        was_training = unet.training
        unet.eval()
        g.vae = load_run_vae(self.cfg, dtype=self.vae_dtype(), device=g.device)  # only for this round
        try:
            passes = {"raw": contextlib.nullcontext()}
            if self.ema is not None:
                passes["ema"] = ema_weights(self.ema, unet)
            images, checks = [], {}
            for label, weights in passes.items():
                with weights, self.autocast(g.device), torch.no_grad():
                    g.source = {"given": f"{self.cfg.out} step {state.step} ({label} weights, in training)"}
                    images += self.render_images(state, label)
                    checks[label] = self.run_checks(state, label)
        finally:
            g.vae = None
            unet.train(was_training)
            gc.collect()
            if g.device.type == "cuda":
                torch.cuda.empty_cache()  # the VAE's and the round's blocks back, before training allocates again
        seconds = time.perf_counter() - t0
        folder = write_round(self.root, state, images, checks, seconds=seconds, config=self.cfg)
        publish_round(self.sinks, Path(self.cfg.out) / "metrics.jsonl", state, images, checks, seconds=seconds)
        console.info(f"samples: step {state.step}, {len(images)} images in {seconds:.1f} s → samples/{folder.name}")
        return folder

    def autocast(self, device: torch.device):
        # the run's precision, without the cast cache: it would keep a bf16 copy of every fp32 weight
        # for the whole round (SDXL: 5.1 GB) to save re-casting them at each UNet call
        return torch.autocast(device.type, dtype=self.precision or torch.float32, enabled=self.precision is not None,
                              cache_enabled=False)  # fmt: skip

    def vae_dtype(self) -> torch.dtype:
        # as `sdxl generate` decodes: bf16 with a bf16 model, else fp32 (SDXL's VAE overflows in fp16)
        return torch.bfloat16 if self.cfg.precision == "bf16" and self.generator.device.type == "cuda" else torch.float32

    def render_images(self, state: TrainState, label: str) -> list[RoundImage]:
        g, out = self.generator, []
        for job in self.jobs:
            for seed in job.seeds:
                z = sample_latents(g, prompt=job.prompt, negative=job.negative, seed=seed, width=job.width,
                                   height=job.height, options=job.options)  # fmt: skip
                params = generation_params(g, prompt=job.prompt, negative=job.negative, seed=seed, width=job.width,
                                           height=job.height, options=job.options)  # fmt: skip
                params.update(step=state.step, samples_seen=state.samples_seen, weights=label)
                out.append(RoundImage(job.index, seed, label, decode_latents(g, z)[0].cpu(), params))
        return out

    def run_checks(self, state: TrainState, label: str) -> dict[str, Any]:
        """The numbers (and images) of each check due this round, on the weights in the UNet now."""
        g, job, c = self.generator, self.jobs[0], self.s.checks
        width, height, opts, k = job.width, job.height, job.options, self.index(state)
        checks: dict[str, Any] = {}
        if self.black:
            metrics, _, images = black_image_check(g, seeds=list(c.black_seeds), width=width, height=height,
                                                   options=opts, negative=self.s.negative)  # fmt: skip
            checks["black"] = {"metrics": metrics, "images": images}
        if c.coherence_every and k % c.coherence_every == 0:
            base = coherence_side(width, height, g.side_multiple)
            metrics, _, images = coherence_check(g, prompts=[job.prompt], seeds=[job.seeds[0]],
                                                 scales=list(c.coherence_scales), base=base, options=opts,
                                                 negative=job.negative)  # fmt: skip
            checks["coherence"] = {"metrics": metrics, "images": images}
        if c.progressive_every and k % c.progressive_every == 0:
            metrics, _, strips = progressive_check(g, prompts=[job.prompt], seed=job.seeds[0], width=width,
                                                   height=height, frames=c.progressive_frames, options=opts,
                                                   negative=job.negative)  # fmt: skip
            checks["progressive"] = {"metrics": metrics, "images": strips[0]}
        return checks


@contextlib.contextmanager
def ema_weights(ema: Any, unet: torch.nn.Module):
    """The EMA weights in the UNet for one pass; the trained ones wait in host memory and come back bit for bit.

    Unlike ``EMA.swapped_into`` (a device-side clone, fine for validation's short pass) this keeps no
    second device copy of the trainable weights (SDXL full finetune: 10.3 GB) during a round.
    """
    params = [p for _, p in named_trainable(unet)]
    with torch.no_grad():
        saved = [p.detach().to("cpu", copy=True) for p in params]
        ema.copy_to(unet)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def coherence_side(width: int, height: int, multiple: int) -> int:
    """The square canvas of the same area as the sample size (the coherence check's canvases are square)."""
    return canvas_side(round(math.sqrt(width * height)), 1.0, multiple)


def build_sample_rounds(cfg: TrainConfig, *, unet: torch.nn.Module, step: Any, dataset: Any, ema: Any, text: Any,
                        info: dist.DistInfo, sinks: list, n_updates: int) -> SampleRounds:  # fmt: skip
    """Check every sample setting now (every rank), and on rank 0 encode the prompts once.

    A bad prompt file, a size the model cannot take or a sampler that does not fit the objective
    stops the run here, before the first update — not at the first round hours in.
    """
    s = cfg.samples
    black = s.checks.black if s.checks.black is not None else cfg.objective.name in BLACK_OBJECTIVES
    if not s.enabled:
        return SampleRounds(cfg, jobs=[], generator=None, ema=ema, precision=step.autocast_dtype, info=info,
                            sinks=sinks, n_updates=n_updates, black=False)  # fmt: skip
    size = (s.width, s.height) if s.width else most_common_bucket(dataset)
    jobs = plan_jobs(s, size=size)
    generator = training_generator(cfg, unet=unet, normalize=step.normalize, device=step.device)
    for job in jobs:
        check_size(generator, job.width, job.height)
    pick_sampler(generator, s.sampler)  # flow_euler on an eps run, dpmpp_2m on flow: refused now
    if info.is_main:
        encode_prompts_once(generator, cfg, jobs, text=text)
    return SampleRounds(cfg, jobs=jobs, generator=generator if info.is_main else None, ema=ema,
                        precision=step.autocast_dtype, info=info, sinks=sinks, n_updates=n_updates,
                        black=black)  # fmt: skip


def training_generator(cfg: TrainConfig, *, unet: torch.nn.Module, normalize: Any, device: torch.device) -> Generator:
    """A :class:`Generator` around the UNet being trained: no text encoders (prompts are encoded once), no VAE."""
    info = sampling_info(cfg, normalize)
    shift, scale = latent_affine(info["latent_normalization"])
    return Generator(unet=unet, vae=None, tokenizer=None, tokenizer_2=None, text_encoder=None, text_encoder_2=None,
                     objective=objective_from_info(info).to(device), info=info, latent_shift=shift.to(device),
                     latent_scale=scale.to(device), device=device, dtype=torch.float32,
                     **geometry(unet_config=unet.config, vae_config=read_part_config("vae", cfg.model)))  # fmt: skip


def encode_prompts_once(generator: Generator, cfg: TrainConfig, jobs: list[SampleJob], *, text: Any) -> None:
    """Every (prompt, negative) pair a round can ask for, encoded now; the encoders are freed afterwards.

    With on-the-fly text the run's own encoders are used — and with trained encoders they stay
    attached, so each round encodes with the encoders as trained so far.
    """
    s = cfg.samples
    if text is not None and text.train:
        generator.tokenizer, generator.tokenizer_2 = text.tokenizers
        generator.text_encoder, generator.text_encoder_2 = text.encoders
        return
    pairs = [(job.prompt, job.negative) for job in jobs] + [(p, s.negative) for p in DEFAULT_PROMPTS.values()]
    if text is not None:
        fill_text_cache(generator, text.tokenizers, text.encoders, pairs, max_chunks=s.max_chunks)
        return
    encoders = load_text_encoders(cfg.model, device=generator.device)
    fill_text_cache(generator, load_tokenizers(cfg.model), encoders, pairs, max_chunks=s.max_chunks)
    del encoders
    gc.collect()
    if generator.device.type == "cuda":
        torch.cuda.empty_cache()
