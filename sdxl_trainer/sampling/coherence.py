"""High-resolution coherence: the same prompts and seeds at 1×, 1.5× and 2× the training side.

Two ways to start each larger canvas: σ_max **as trained**, and σ_max **scaled with the
resolution**, σ' = σ_max·√(h·w/(h₀·w₀)) (docs/diffusion.md eq. M2). For a flow model the start is
always t = 1; there σ = t/(1−t) and a shift s multiplies every σ by s, so the scaled form multiplies
the trained shift by the same √(area ratio).

The measure (docs/evaluate.md): an image's low-frequency content is its area average on a
``grid × grid`` lattice (RGB in [0, 1]). For each prompt the reference layout R is the mean of that
lattice over the base-resolution images of all seeds. An image's *layout error* is the RMS
difference between its lattice and R; ``coherence = 1 − mean layout error`` over seeds. At 1× it
measures how much seeds differ from each other; a model that stays coherent at 2× keeps about that
value, one that tiles, duplicates or drifts in colour drops below it. ``colour_shift`` is the
mean-colour (DC) part of the error alone — the part σ_max is about.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from sdxl_trainer.diffusion import sigma_max_for_resolution
from sdxl_trainer.sampling.generator import Generator, decode_latents
from sdxl_trainer.sampling.sample import SamplingOptions, generation_params, sample_latents

MODES = ("trained", "scaled")


def low_frequency(image: torch.Tensor, grid: int) -> torch.Tensor:
    """(3, H, W) → (3, grid, grid): area averages, the image's content at the coarsest scale."""
    return F.adaptive_avg_pool2d(image.float().unsqueeze(0), grid)[0]


def layout_error(image: torch.Tensor, reference: torch.Tensor, *, grid: int) -> tuple[float, float]:
    """(RMS difference of the low-frequency lattices, |mean colour difference| as an RGB vector norm/√3)."""
    diff = low_frequency(image, grid) - reference
    return float(diff.pow(2).mean().sqrt()), float(diff.mean(dim=(1, 2)).pow(2).mean().sqrt())


def canvas_side(base: int, scale: float, multiple: int) -> int:
    """``base·scale`` rounded to the nearest side the model accepts."""
    return max(multiple, int(round(base * scale / multiple)) * multiple)


def start_options(generator: Generator, options: SamplingOptions, *, mode: str, side: int,
                  base: int) -> SamplingOptions:  # fmt: skip
    """The sampling options of one canvas: as trained, or with σ_max (flow: the shift) scaled by √(area ratio)."""
    if mode == "trained" or side == base:
        return options
    if generator.objective.prediction == "flow":
        shift = options.flow_shift if options.flow_shift is not None else generator.flow_shift
        return replace(options, flow_shift=float(shift) * side / base)
    start = options.sigma_max if options.sigma_max is not None else generator.objective.sigma_max
    # the scaled start replaces the first Karras point, so it uses the Karras schedule whatever was chosen
    return replace(options, schedule="karras", sigma_max=sigma_max_for_resolution(
        start, height=side, width=side, base_height=base, base_width=base))  # fmt: skip


def _plan(scales: list[float], base: int, multiple: int) -> list[tuple[float, str, int]]:
    plan = []
    for scale in scales:
        side = canvas_side(base, scale, multiple)
        modes = ("trained",) if side == base else MODES  # at the base side both starts are the same
        plan += [(scale, mode, side) for mode in modes]
    return plan


def coherence_check(
    generator: Generator, *, prompts: list[str], seeds: list[int], scales: list[float], base: int, grid: int = 8,
    options: SamplingOptions = SamplingOptions(), negative: str = "",
) -> tuple[dict[str, Any], list[dict[str, Any]], list[torch.Tensor]]:  # fmt: skip
    """(metrics, one row per image, the images); the base side is always included (it is the reference)."""
    scales = [1.0] + [s for s in scales if canvas_side(base, s, generator.side_multiple) != base]
    plan = _plan(scales, base, generator.side_multiple)
    rows, images = [], []
    for prompt in prompts:
        made = {}
        for seed in seeds:
            for scale, mode, side in plan:
                opts = start_options(generator, options, mode=mode, side=side, base=base)
                z = sample_latents(generator, prompt=prompt, negative=negative, seed=seed, width=side, height=side,
                                   options=opts)  # fmt: skip
                params = generation_params(generator, prompt=prompt, negative=negative, seed=seed, width=side,
                                           height=side, options=opts)  # fmt: skip
                made[(seed, scale, mode)] = (decode_latents(generator, z)[0].cpu(), params, side)
        reference = torch.stack([low_frequency(made[(s, 1.0, "trained")][0], grid) for s in seeds]).mean(0)
        for seed in seeds:
            for scale, mode, side in plan:
                image, params, side = made[(seed, scale, mode)]
                rmse, shift = layout_error(image, reference, grid=grid)
                rows.append({"prompt": prompt, "seed": seed, "scale": scale, "mode": mode, "width": side,
                             "height": side, "start_sigma": params["start_sigma"], "flow_shift": params["flow_shift"],
                             "layout_rmse": rmse, "colour_shift": shift,
                             "mean_brightness": float(image.mean())})  # fmt: skip
                images.append(image)
    summary = summarise(rows, plan)
    metrics = {"grid": grid, "base": base, "seeds": list(seeds), "prompts": list(prompts), "summary": summary}
    return metrics, rows, images


def summarise(rows: list[dict[str, Any]], plan: list[tuple[float, str, int]]) -> list[dict[str, Any]]:
    out = []
    for scale, mode, side in plan:
        sel = [r for r in rows if r["scale"] == scale and r["mode"] == mode]
        rmse = sum(r["layout_rmse"] for r in sel) / len(sel)
        out.append({"scale": scale, "mode": mode, "width": side, "height": side, "n": len(sel), "coherence": 1 - rmse,
                    "layout_rmse": rmse, "colour_shift": sum(r["colour_shift"] for r in sel) / len(sel)})  # fmt: skip
    return out
