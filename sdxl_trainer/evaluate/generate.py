"""`sdxl generate`: prompts → PNGs from a checkpoint on disk, with their parameters in the PNG text chunks.

The sampling itself is the sampling core's (sampling/sample.py), the same code the trainer renders
its in-training samples with; this module loads the checkpoint, numbers the files and prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdxl_trainer import console
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.sampling.images import save_png
from sdxl_trainer.sampling.sample import SamplingOptions, generate_images


def options_from_config(cfg: Any) -> SamplingOptions:
    """The sampling options of a GenerateConfig or EvaluateConfig."""
    return SamplingOptions(steps=cfg.steps, cfg_scale=cfg.cfg_scale, cfg_rescale=cfg.cfg_rescale, sampler=cfg.sampler,
                           schedule=cfg.schedule, sigma_max=getattr(cfg, "sigma_max", None),
                           flow_shift=getattr(cfg, "flow_shift", None), max_chunks=cfg.max_chunks,
                           pag_scale=cfg.pag_scale, pag_layers=tuple(cfg.pag_layers))  # fmt: skip


def _next_index(out: Path) -> int:
    taken = [int(p.name.split("-")[0]) for p in out.glob("*.png") if p.name.split("-")[0].isdigit()]
    return max(taken, default=-1) + 1


def run(cfg: Any) -> list[Path]:
    """`sdxl generate`: write ``cfg.num_images`` PNGs per prompt to ``cfg.out``; returns their paths.

    Files are numbered after any already in the folder (``0007-seed3.png``): nothing is overwritten.
    """
    generator = load_generator(cfg.checkpoint, config_dir=cfg.config_dir, lora=cfg.lora, lora_scale=cfg.lora_scale,
                               vae=cfg.vae, device=cfg.device, dtype=cfg.dtype)  # fmt: skip
    width = cfg.width or generator.base_resolution
    height = cfg.height or generator.base_resolution
    options = options_from_config(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_images)]
    images = generate_images(generator, prompts=list(cfg.prompt), negative=cfg.negative, seeds=seeds, width=width,
                             height=height, options=options)  # fmt: skip
    out, start, paths = Path(cfg.out), _next_index(Path(cfg.out)), []
    for i, (image, params) in enumerate(images):
        paths.append(save_png(image, out / f"{start + i:04d}-seed{params['seed']}.png", params))
    rows = [(p.name, prm["seed"], f"{img.mean():.3f}", prm["prompt"][:60]) for p, (img, prm) in zip(paths, images)]
    console.table(f"{len(paths)} images in {out}", rows, columns=("file", "seed", "mean brightness", "prompt"))
    return paths
