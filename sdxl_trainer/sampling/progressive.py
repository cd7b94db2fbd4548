"""Progressive denoising: the sampler's x0 preview at evenly spaced steps, decoded, as one strip per prompt.

The preview is the denoiser's estimate D(x; σ) before each step (the samplers' callback). At the
first step of a zero-terminal-SNR or flow model it is the model's guess of the image from pure
noise, so it shows the mean colour the prompt asked for; a model trained to σ_max = 14.6 shows the
noise's own mean instead. Each frame's numbers (step, σ, brightness, distance to the final image)
sit in progressive.csv.
"""

from __future__ import annotations

from typing import Any

import torch

from sdxl_trainer.diffusion import preview_collector
from sdxl_trainer.sampling.generator import Generator, decode_latents
from sdxl_trainer.sampling.sample import SamplingOptions, sample_latents


def frame_steps(steps: int, frames: int) -> list[int]:
    """``frames`` step indices spread evenly over 0 … steps−1, first and last included, no repeats."""
    if steps <= frames:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (frames - 1)) for i in range(frames)})


def progressive_check(
    generator: Generator, *, prompts: list[str], seed: int, width: int, height: int, frames: int,
    options: SamplingOptions = SamplingOptions(), negative: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]], list[list[torch.Tensor]]]:  # fmt: skip
    """(metrics, one row per frame, the decoded frames per prompt — previews, then the final image)."""
    keep = frame_steps(options.steps, frames)
    rows, strips, metrics = [], [], {"seed": seed, "steps": keep, "prompts": []}
    for prompt in prompts:
        callback, previews = preview_collector(every=1)
        z = sample_latents(generator, prompt=prompt, negative=negative, seed=seed, width=width, height=height,
                           options=options, callback=callback)  # fmt: skip
        final = decode_latents(generator, z)[0].cpu()
        chosen = [p for p in previews if p["i"] in keep]
        strip = [decode_latents(generator, p["denoised"])[0].cpu() for p in chosen] + [final]
        labels = [(p["i"], p["sigma"]) for p in chosen] + [(options.steps, 0.0)]
        prompt_rows = []
        for frame, (image, (step, sigma)) in enumerate(zip(strip, labels)):
            luma = image.mean(dim=0)
            prompt_rows.append({"prompt": prompt, "seed": seed, "frame": frame, "step": step, "sigma": sigma,
                                "mean_brightness": float(luma.mean()),
                                "std_brightness": float(luma.std(unbiased=False)),
                                "rmse_to_final": float((image - final).pow(2).mean().sqrt())})  # fmt: skip
        rows += prompt_rows
        strips.append(strip)
        metrics["prompts"].append({"prompt": prompt, "first_preview_brightness": prompt_rows[0]["mean_brightness"],
                                   "final_brightness": prompt_rows[-1]["mean_brightness"],
                                   "first_preview_rmse_to_final": prompt_rows[0]["rmse_to_final"]})  # fmt: skip
    return metrics, rows, strips
