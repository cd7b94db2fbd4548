"""`sdxl demo --out DIR`: the whole pipeline on synthetic data and a tiny SDXL model, offline, on CPU.

It builds DIR/model (tiny SDXL-architecture diffusers folder, seeded weights, a VAE fitted to the
synthetic images) and DIR/data (synthetic tagged images), then runs every stage through the same
`run` functions the CLI calls — scan → stats → cache → weights → train → evaluate — so the demo
exercises the real code paths, not a mock of them.

It trains four tiny models from the same start on the same cache, differing only in the noise
schedule and objective: an eps-prediction baseline on SDXL's schedule (σ_max = 14.6), a control
with v-prediction on that same schedule, v-prediction with zero terminal SNR at σ_max = 20000
(NovelAI V3), and rectified flow (bigASP v2.5). Asked for a solid black image, the last two reach
black; the baseline stays near mid-grey, because at σ = 14.6 the image mean still shows through the
noise in training, so the model learns to read the mean from its input instead of from the prompt,
and the pure noise it starts from at inference has mean ≈ 0 (docs/diffusion.md §7, docs/demo.md).
The control shows that the schedule, not the eps parameterisation alone, is what matters.

Each run also renders samples while it trains (every SAMPLE_EVERY updates, from the untrained start
to the end): RUN/samples/ shows black emerging for v_ztsnr and flow and not for the eps baseline,
and DIR/samples.png puts the four runs' "black" samples side by side, one row per run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sdxl_trainer import console
from sdxl_trainer.config import CacheConfig, EvaluateConfig, ScanConfig, StatsConfig, TrainConfig, WeightsConfig
from sdxl_trainer.evaluate import report
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.models.tiny import DEMO_BUCKETS, build_tiny_model
from sdxl_trainer.prep import cache, scan, stats, weights
from sdxl_trainer.sampling.black import DEFAULT_PROMPTS, black_image_metrics
from sdxl_trainer.sampling.images import image_grid
from sdxl_trainer.sampling.sample import SamplingOptions
from sdxl_trainer.schema import write_json
from sdxl_trainer.synthetic import build_synthetic_dataset
from sdxl_trainer.train import loop

DEMO_IMAGES = 300
OBJECTIVES = ("eps", "v", "v_ztsnr", "flow")
LABELS = {
    "eps": "eps, SDXL schedule σ_max 14.6 (baseline)",
    "v": "v, SDXL schedule σ_max 14.6 (control)",
    "v_ztsnr": "v, zero terminal SNR, σ_max 20000",
    "flow": "rectified flow, shift 3",
}
TRAIN_STEPS = 600
BLACK_SEEDS = list(range(8))
SAMPLING = SamplingOptions(steps=20, cfg_scale=3.0)
# in-training samples: two prompts, one seed, few steps, every 150 updates (5 rounds of 600). Euler, not
# DPM++ 2M: from σ = 20000 in 8 Karras steps the second-order step overshoots (the finished v_ztsnr
# model's black at seed 0/1: 0.18 with DPM++ 2M, 0.002 with Euler; 0.004 with DPM++ 2M at 20 steps)
SAMPLE_PROMPTS = [DEFAULT_PROMPTS["black"], "red circle, blue background, simple shapes, no humans"]
SAMPLE_EVERY = 150
SAMPLE_STEPS = 8
SAMPLE_SAMPLER = "euler"


def demo_scan_config(data: Path, work: Path, model: Path | None = None) -> ScanConfig:
    """Scan settings for the tiny model: 128-px buckets, small images allowed."""
    return ScanConfig(data_dir=data, out=work, model=model, min_side=64, buckets=DEMO_BUCKETS)


def demo_cache_config(work: Path, model: Path) -> CacheConfig:
    return CacheConfig(work=work, model=model, device="cpu", batch_size=16, flip=True)


def demo_train_config(model: Path, work: Path, out: Path, objective: str, *, steps: int = TRAIN_STEPS,
                      sample_steps: int = SAMPLE_STEPS) -> TrainConfig:  # fmt: skip
    """Same start, data, length and optimiser for every objective; only the schedule/objective differs.

    Samples (the black prompt and a shape, with the black-image check on every run, the baseline
    included) are rendered while training; they do not change what is trained.
    """
    samples = {"prompts": SAMPLE_PROMPTS, "every_steps": SAMPLE_EVERY, "steps": sample_steps, "sampler": SAMPLE_SAMPLER,
               "cfg": SAMPLING.cfg_scale, "checks": {"black": True, "black_seeds": [0]}}  # fmt: skip
    return TrainConfig(
        model=model, work=work, out=out, objective={"name": objective}, num_steps=steps, batch_size=16,
        precision="fp32", device="cpu", seed=0, latents={"normalization": "per_channel"},
        optimizer={"learning_rate": 1e-3, "weight_decay": 0.0}, schedule={"kind": "cosine", "warmup_samples": steps * 16 // 10},
        data={"p_uncond": 0.1, "workers": 1}, logging={"every_steps": 50, "tensorboard": False},
        checkpoints={"single_file": False, "keep_last": 1}, samples=samples,
    )  # fmt: skip


def black_table(results: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    rows = []
    for objective, m in results.items():
        b, w = m["black"], m["white"]
        rows.append((LABELS[objective], f"{b['mean']:.3f} ± {b['mean_std_across_seeds']:.3f}",
                     f"{w['mean']:.3f} ± {w['mean_std_across_seeds']:.3f}", f"{m['separation']:.3f}"))  # fmt: skip
    return rows


def black_over_training(run_dir: Path) -> list[tuple[int, float]]:
    """(step, mean brightness asked for black) of every sampling round of a run, from its metrics.jsonl
    (the last record of a step: a demo re-run into the same folder appends to it)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["check/black/black_mean"] for r in records if "check/black/black_mean" in r}
    return sorted(by_step.items())


def samples_strip(runs: Path, *, image: str = "00-seed0.png", cell: int = 96) -> Image.Image:
    """One row per run: its first sample prompt's image at every round (step 0 = the untrained model)."""
    rows, row_labels, steps = [], [], []
    for objective in OBJECTIVES:
        folders = sorted((runs / objective / "samples").glob("step-*"))
        steps = [int(f.name.removeprefix("step-")) for f in folders]
        rows.append([Image.open(f / image).convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS)
                     for f in folders])  # fmt: skip
        curve = black_over_training(runs / objective)
        label = LABELS[objective].replace("σ", "sigma")  # PIL's default font has ASCII only
        row_labels.append(f"{label}: black {curve[0][1]:.2f} -> {curve[-1][1]:.2f}")
    return image_grid(rows, row_labels=row_labels, col_labels=[f"step {s}" for s in steps], cell=cell)


def auto_threads() -> tuple[int, str]:
    """(torch threads, why) for the tiny models: every core when the machine is idle, one when other
    work keeps a core busy. Measured on 2 cores (docs/demo.md, "Threads"): idle, 2 threads fit the
    VAE 1.5× faster than 1; beside one busy process, 2 threads were 3.7× slower than 1."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = cores - load
    threads = 1 if cores == 1 or free < cores - 0.5 else min(cores, 2)
    return threads, f"auto: 1-minute load {load:.1f} on {cores} core(s)"


def run(out: Path, *, n_images: int = DEMO_IMAGES, seed: int = 0, train_steps: int = TRAIN_STEPS,
        quick: bool = False, threads: int | None = None, kit_only: bool = False) -> dict:
    """Build the kit (reusing it when present) and run every stage; returns timings and black-image numbers.

    ``quick`` shrinks the sampling (2 seeds, 4 steps, two report checks): a smoke test of every code
    path for CI, whose numbers mean nothing. ``threads`` is torch's intra-op thread count for the
    whole demo, the VAE fit included (results are bitwise reproducible for a given count; on a
    machine busy with other work, 1 avoids OpenMP threads fighting for the cores); None picks it
    from the machine's load (:func:`auto_threads`). ``kit_only``
    builds DIR/model and DIR/data, prints where they are and trains nothing; it returns
    ``{"model", "data", "timings"}``.
    """
    if threads is None:
        threads, why = auto_threads()
        console.info(f"torch threads: {threads} ({why}; --threads sets it)")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if kit_only:
            return build_kit(Path(out), n_images=n_images, seed=seed, quick=quick, threads=threads, report=True)
        return _run(Path(out), n_images=n_images, seed=seed, train_steps=train_steps, quick=quick, threads=threads)
    finally:
        torch.set_num_threads(before)


PARTIAL = ".partial"  # DIR/model.partial, DIR/data.partial: a part of the kit while it is being built


def build_into(final: Path, build: Callable[[Path], Any]) -> Path:
    """Run ``build(folder)`` on the sibling ``final.partial``, then rename it to ``final`` once it returns.

    An interrupted build (Ctrl-C, a kill, an error) leaves no ``final``, so the next demo builds it
    again instead of reusing half of it; the leftover ``final.partial`` is removed first. One demo
    at a time per DIR: a second one building the same part at once would remove the first's folder.
    """
    partial = final.with_name(final.name + PARTIAL)
    if partial.exists():
        console.info(f"removing {partial} (left by an interrupted build)")
        shutil.rmtree(partial)
    try:
        build(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, final)
    return final


def build_kit(out: Path, *, n_images: int = DEMO_IMAGES, seed: int = 0, quick: bool = False, threads: int = 2,
              timings: dict[str, float] | None = None, report: bool = False) -> dict:  # fmt: skip
    """DIR/model (the tiny model, its VAE fitted unless ``quick``) and DIR/data (``n_images`` synthetic
    images), each built only when missing or incomplete; ``report`` prints where they are."""
    model, data = out / "model", out / "data"
    timings = {} if timings is None else timings
    if model.exists() and not (model / "model_index.json").is_file():  # half a model from an older version
        console.info(f"removing {model}: it has no model_index.json (an interrupted build)")
        shutil.rmtree(model)
    if not model.exists():  # quick: the VAE stays random (its pixels mean nothing)
        _stage(timings, "build tiny model", lambda: build_into(model, lambda tmp: build_tiny_model(
            tmp, seed=seed, fit_vae=not quick, fit_threads=threads)))  # fmt: skip
    if not data.is_dir():
        _stage(timings, "build synthetic data",
               lambda: build_into(data, lambda tmp: build_synthetic_dataset(tmp, n=n_images, seed=seed)))  # fmt: skip
    if report:
        console.info(f"kit ready (nothing trained):\n  model: {model}\n  data:  {data}\n"
                     f"next: sdxl demo --out {out} runs every stage on it")  # fmt: skip
    return {"model": model, "data": data, "timings": timings}


def _stage(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    console.info(f"[bold cyan]── {name}[/]")
    t0 = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t0
    return result


def _run(out: Path, *, n_images: int, seed: int, train_steps: int, quick: bool, threads: int) -> dict:
    seeds = BLACK_SEEDS[:2] if quick else BLACK_SEEDS
    sampling = SamplingOptions(steps=4, cfg_scale=SAMPLING.cfg_scale) if quick else SAMPLING
    checks = ["black", "schedules"] if quick else ["black", "coherence", "schedules", "progressive"]
    out = Path(out)
    model, data, work = out / "model", out / "data", out / "work"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def stage(name: str, fn) -> Any:
        return _stage(timings, name, fn)

    build_kit(out, n_images=n_images, seed=seed, quick=quick, threads=threads, timings=timings)
    stage("prep scan", lambda: scan.run(demo_scan_config(data, work, model)))
    stage("prep stats", lambda: stats.run(StatsConfig(work=work, model=model, device="cpu")))
    stage("prep cache", lambda: cache.run(demo_cache_config(work, model), verify_after=True))
    stage("prep weights", lambda: weights.run(WeightsConfig(work=work, min_count=2)))
    black: dict[str, dict[str, Any]] = {}
    for objective in OBJECTIVES:
        run_dir = out / "runs" / objective
        cfg = demo_train_config(model, work, run_dir, objective, steps=train_steps,
                                sample_steps=4 if quick else SAMPLE_STEPS)  # fmt: skip
        stage(f"train {objective}", lambda: loop.run(cfg))
        g = load_generator(run_dir, device="cpu", dtype="fp32")
        black[objective] = stage(f"black image {objective}",
                                 lambda: black_image_metrics(g, seeds=seeds, options=sampling))  # fmt: skip
    stage("evaluate v_ztsnr", lambda: report.run(EvaluateConfig(
        checkpoint=out / "runs" / "v_ztsnr", out=out / "report", steps=sampling.steps, cfg_scale=sampling.cfg_scale,
        seeds=seeds[:4], coherence_seeds=[0, 1], density_samples=20_000, device="cpu", dtype="fp32", checks=checks)))  # fmt: skip
    samples_strip(out / "runs").save(out / "samples.png")
    timings["total"] = time.perf_counter() - start
    result = {"timings": timings, "black": black, "quick": quick, "train_steps": train_steps, "seeds": seeds,
              "threads": threads, "black_over_training": {o: black_over_training(out / "runs" / o) for o in OBJECTIVES},
              "sampling": {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale}}  # fmt: skip
    write_json(result, out / "demo.json", artifact="demo", config={"n_images": n_images, "seed": seed})
    console.table(f"black-image test: mean brightness over {len(seeds)} seeds ± its spread (0 black, 1 white)",
                  black_table(black), ("model", "asked for black", "asked for white", "separation"))  # fmt: skip
    curves = result["black_over_training"]
    console.table("asked for black while training (in-training samples, seed 0; DIR/samples.png)",
                  [(LABELS[o], *(f"{v:.3f}" for _, v in c)) for o, c in curves.items()],
                  ("model", *(f"step {s}" for s, _ in curves["eps"])))  # fmt: skip
    console.table("sdxl demo", [(k, f"{v:.1f} s") for k, v in timings.items()], ("stage", "time"))
    return result
