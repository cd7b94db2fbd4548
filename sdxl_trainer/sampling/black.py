"""The black-image check: does the model reach a solid black (and white) image when asked for one?

A model trained only up to SDXL's σ_max = 14.6 reads the image mean out of the "pure noise" it starts
from, and that mean is ~0: asked for black it lands near mid-grey (docs/diffusion.md §7). Zero
terminal SNR (v_ztsnr at σ_max = 20000) and rectified flow start from true noise, so the prompt
decides the mean. The metric is in pixel space, after the model's own VAE: brightness = mean of R, G
and B in [0, 1]; per image its mean (target 0 for black, 1 for white) and its spatial std (0 for a
solid colour).
"""

from __future__ import annotations

from typing import Any

import torch

from sdxl_trainer.sampling.generator import Generator
from sdxl_trainer.sampling.sample import SamplingOptions, generate_images

DEFAULT_PROMPTS = {
    "black": "solid color, black background, no humans",
    "white": "solid color, white background, no humans",
}
TARGETS = {"black": 0.0, "white": 1.0}


def brightness(image: torch.Tensor) -> dict[str, float]:
    """Mean and spatial std of per-pixel brightness (mean of R, G, B) of a (3, H, W) image in [0, 1]."""
    luma = image.float().mean(dim=0)
    return {"mean": float(luma.mean()), "std": float(luma.std(unbiased=False))}


def _summary(kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    means = torch.tensor([r["mean"] for r in rows], dtype=torch.float64)
    target = TARGETS[kind]
    return {
        "kind": kind, "target": target, "n": len(rows), "mean": float(means.mean()),
        "mean_std_across_seeds": float(means.std(unbiased=False)),
        "mean_pixel_std": sum(r["std"] for r in rows) / len(rows), "abs_error": abs(float(means.mean()) - target),
        "min": float(means.min()), "max": float(means.max()),
    }  # fmt: skip


def black_image_check(
    generator: Generator, *, seeds: list[int], prompts: dict[str, str] | None = None, width: int | None = None,
    height: int | None = None, options: SamplingOptions = SamplingOptions(), negative: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]], list[torch.Tensor]]:  # fmt: skip
    """(metrics, one row per image, the images) for the black and white prompts at every seed."""
    prompts = prompts or DEFAULT_PROMPTS
    width = width or generator.base_resolution
    height = height or generator.base_resolution
    rows, images, summaries = [], [], {}
    for kind, prompt in prompts.items():
        made = generate_images(generator, prompts=[prompt], negative=negative, seeds=seeds, width=width, height=height,
                               options=options)  # fmt: skip
        kind_rows = []
        for image, params in made:
            stats = brightness(image)
            kind_rows.append({"kind": kind, "prompt": prompt, "target": TARGETS[kind], "seed": params["seed"],
                              "width": width, "height": height, **stats,
                              "abs_error": abs(stats["mean"] - TARGETS[kind])})  # fmt: skip
            images.append(image)
        summaries[kind] = _summary(kind, kind_rows)
        rows += kind_rows
    metrics: dict[str, Any] = {**summaries, "width": width, "height": height, "seeds": list(seeds)}
    if {"black", "white"} <= set(summaries):
        # how far apart the two prompts end: 1 for a model that follows both perfectly, 0 for one that ignores them
        metrics["separation"] = summaries["white"]["mean"] - summaries["black"]["mean"]
    return metrics, rows, images


def black_image_metrics(generator: Generator, **kwargs) -> dict[str, Any]:
    """The black-image numbers only (for the demo's table): see :func:`black_image_check` for the arguments."""
    return black_image_check(generator, **kwargs)[0]
