"""Prompts → latents → images with the diffusion core's samplers: the sampling every path uses.

The sampling schedule starts where the model was trained to start — σ_max of its table (14.6 for
eps/v on SDXL's schedule, 20000 for NovelAI's v_ztsnr) or flow time 1 on the trained shift —
unless ``sigma_max``/``flow_shift`` override it (the high-resolution check does). Each image is drawn
from its own seed (a CPU generator: the same seed gives the same image on any device and in any
batch), so `sdxl generate`, `sdxl evaluate` and the trainer's samples agree for the same weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from sdxl_trainer import __version__, console
from sdxl_trainer.diffusion import (
    beta_flow_times,
    beta_sigmas,
    flow_times,
    get_sampler,
    guided_denoiser,
    karras_sigmas,
    prior_noise,
    trailing_sigmas,
    uniform_sigmas,
)
from sdxl_trainer.errors import UserError
from sdxl_trainer.sampling.generator import Generator, decode_latents, encode_text, unet_kwargs
from sdxl_trainer.sampling.pag import PAG_DEFAULT_LAYERS, perturbed_unet_fn

SAMPLER_CHOICES = ("auto", "euler", "euler_ancestral", "dpmpp_2m", "flow_euler")
SCHEDULE_CHOICES = ("auto", "karras", "trailing", "uniform", "beta")
FLOW_SAMPLERS = ("flow_euler", "euler")  # Euler's step is the same interpolation in t as in σ


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; None for sigma_max/flow_shift means "as the checkpoint was trained"."""

    steps: int = 28
    cfg_scale: float = 5.0
    cfg_rescale: float = 0.0
    sampler: str = "auto"
    schedule: str = "auto"
    sigma_max: float | None = None
    flow_shift: float | None = None
    max_chunks: int = 3
    pag_scale: float = 0.0  # perturbed-attention guidance (0 = off): one more UNet pass per step
    pag_layers: tuple[str, ...] = PAG_DEFAULT_LAYERS


def pick_sampler(generator: Generator, name: str) -> str:
    """"auto" → DPM++ 2M for the σ-space objectives, flow Euler for flow; refuses a mismatched pair."""
    flow = generator.objective.prediction == "flow"
    if name == "auto":
        return "flow_euler" if flow else "dpmpp_2m"
    if name not in SAMPLER_CHOICES:
        raise UserError(f"unknown sampler {name!r}", fix=f"use one of {', '.join(SAMPLER_CHOICES)}")
    if flow and name not in FLOW_SAMPLERS:
        raise UserError(f"sampler {name} works in σ-space; this is a flow model", fix="use flow_euler (or auto)")
    if not flow and name == "flow_euler":
        raise UserError(f"flow_euler is for flow models; this one is {generator.info['objective']}",
                        fix="use euler, euler_ancestral or dpmpp_2m (or auto)")  # fmt: skip
    return name


def sampling_sigmas(
    generator: Generator, *, steps: int, schedule: str = "auto", sigma_max: float | None = None,
    flow_shift: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """The descending levels a sampler visits (σ, or flow t), ending in 0; ``steps`` UNet evaluations."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    obj = generator.objective
    if obj.prediction == "flow":
        if schedule not in ("auto", "beta"):
            raise UserError(f"schedule {schedule} is for σ-space models; a flow model uses its shifted times",
                            fix="use --schedule auto or beta; change --flow-shift to move the steps")  # fmt: skip
        if sigma_max is not None:
            raise UserError("sigma_max does not apply to a flow model (it starts at t = 1)", fix="use --flow-shift")
        shift = flow_shift if flow_shift is not None else generator.flow_shift
        if schedule == "beta":
            return beta_flow_times(steps, shift=float(shift))
        return flow_times(steps, shift=float(shift))
    if flow_shift is not None:
        raise UserError("flow_shift applies to flow models only", fix=f"this model is {generator.info['objective']}")
    schedule = "karras" if schedule == "auto" else schedule
    if schedule == "karras":
        start = obj.sigma_max if sigma_max is None else float(sigma_max)
        if steps == 1:  # Karras' ramp needs two points; one step goes straight from the start to 0
            return torch.tensor([start, 0.0], dtype=torch.float64)
        return karras_sigmas(steps, sigma_min=obj.sigma_min, sigma_max=start)
    if sigma_max is not None:
        raise UserError(f"sigma_max overrides the start of the karras schedule only, not {schedule}",
                        fix="use --schedule karras with --sigma-max")  # fmt: skip
    if schedule == "trailing":
        return trailing_sigmas(steps, sigmas=obj.sigmas.cpu())
    if schedule == "uniform":
        return uniform_sigmas(steps, sigmas=obj.sigmas.cpu())
    if schedule == "beta":
        return beta_sigmas(steps, sigmas=obj.sigmas.cpu())
    raise UserError(f"unknown schedule {schedule!r}", fix=f"use one of {', '.join(SCHEDULE_CHOICES)}")


def check_size(generator: Generator, width: int, height: int) -> None:
    m = generator.side_multiple
    if width <= 0 or height <= 0 or width % m or height % m:
        raise UserError(f"image size {width}x{height} is not a positive multiple of {m}",
                        fix=f"this model needs sides divisible by {m}")  # fmt: skip


def unet_fn(generator: Generator):
    """The UNet as the diffusion core's denoisers call it: (x, t, **conditioning) → raw output."""
    unet = generator.unet

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return unet(x, t, return_dict=False, **kwargs)[0]

    return call


def guided_model(generator: Generator, options: SamplingOptions, *, cond: dict, uncond: dict):
    """(denoiser, extra_args) for the samplers: CFG (skipped at scale 1), its rescale, and PAG when pag_scale > 0."""
    g = generator
    if options.pag_scale < 0:
        raise UserError(f"pag_scale must be at least 0, got {options.pag_scale}", fix="use 0 (off) or e.g. 3")
    denoiser = g.objective.denoiser(unet_fn(g), dtype=g.dtype)
    perturbed = None
    if options.pag_scale > 0:
        perturbed = g.objective.denoiser(perturbed_unet_fn(g.unet, options.pag_layers), dtype=g.dtype)
    if options.cfg_scale == 1.0 and perturbed is None:  # no guidance: the negative would cancel out, skip its call
        return denoiser, cond
    model = guided_denoiser(denoiser, scale=options.cfg_scale, phi=options.cfg_rescale, space=g.guidance_space,
                            pag_scale=options.pag_scale, perturbed=perturbed)  # fmt: skip
    return model, {"cond": cond, "uncond": None if options.cfg_scale == 1.0 else uncond}


@torch.no_grad()
def sample_latents(
    generator: Generator, *, prompt: str, negative: str = "", seed: int, width: int, height: int,
    options: SamplingOptions = SamplingOptions(), callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """One image's normalised latents (1, C, h, w), fp32, from ``seed``."""
    g = generator
    check_size(g, width, height)
    sampler = get_sampler(pick_sampler(g, options.sampler))
    sigmas = sampling_sigmas(g, steps=options.steps, schedule=options.schedule, sigma_max=options.sigma_max,
                             flow_shift=options.flow_shift)  # fmt: skip
    (hidden, pooled), (neg_hidden, neg_pooled) = encode_text(g, [prompt], [negative], max_chunks=options.max_chunks)
    cond = unet_kwargs(hidden, pooled, height=height, width=width)
    uncond = unet_kwargs(neg_hidden, neg_pooled, height=height, width=width)
    model, extra = guided_model(g, options, cond=cond, uncond=uncond)
    rng = torch.Generator("cpu").manual_seed(int(seed))
    shape = (1, g.unet.config.in_channels, height // g.vae_factor, width // g.vae_factor)
    x = prior_noise(shape, sigma_max=float(sigmas[0]), generator=rng, device=g.device)
    return sampler(model, x, sigmas, extra_args=extra, callback=callback, generator=rng).float()


def generation_params(generator: Generator, *, prompt: str, negative: str, seed: int, width: int, height: int,
                      options: SamplingOptions) -> dict[str, Any]:  # fmt: skip
    """Everything that determines an image, resolved (sampler, start level), for its PNG and the report."""
    sigmas = sampling_sigmas(generator, steps=options.steps, schedule=options.schedule, sigma_max=options.sigma_max,
                             flow_shift=options.flow_shift)  # fmt: skip
    flow = generator.objective.prediction == "flow"
    return {
        "prompt": prompt, "negative": negative, "seed": int(seed), "width": width, "height": height,
        **asdict(options), "sampler": pick_sampler(generator, options.sampler),
        "schedule": "flow" if flow else ("karras" if options.schedule == "auto" else options.schedule),
        "start_sigma": float(sigmas[0]), "pag_layers": list(options.pag_layers),
        "flow_shift": generator.flow_shift if options.flow_shift is None else options.flow_shift,
        "objective": generator.info["objective"], "checkpoint": generator.source.get("given"),
        "loras": generator.source.get("loras"), "lora_scale": generator.source.get("lora_scale"),
        "sdxl_trainer": __version__,
    }  # fmt: skip


def generate_images(
    generator: Generator, *, prompts: list[str], negative: str = "", seeds: list[int], width: int, height: int,
    options: SamplingOptions = SamplingOptions(),
) -> list[tuple[torch.Tensor, dict[str, Any]]]:  # fmt: skip
    """(RGB image (3, H, W) in [0, 1], its parameters) for every prompt × seed, prompt-major."""
    guided_model(generator, options, cond={}, uncond={})  # a bad PAG scale or layer: refused before the progress bar
    out = []
    with console.progress("generating", len(prompts) * len(seeds), unit="img") as advance:
        for prompt in prompts:
            for seed in seeds:
                z = sample_latents(generator, prompt=prompt, negative=negative, seed=seed, width=width, height=height,
                                   options=options)  # fmt: skip
                params = generation_params(generator, prompt=prompt, negative=negative, seed=seed, width=width,
                                           height=height, options=options)  # fmt: skip
                out.append((decode_latents(generator, z)[0].cpu(), params))
                advance()
    return out
