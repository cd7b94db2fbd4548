"""A checkpoint loaded and ready to sample: the :class:`Generator`.

:func:`load_generator` resolves the path (source.py), loads the UNet, VAE, tokenizers and text
encoders, optionally merges a LoRA, and builds the objective from the checkpoint's own record —
objective, σ_max, flow shift, latent normalisation — so nobody has to pass them. :func:`encode_text`
and :func:`decode_latents` are the two ends every sampler run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console
from sdxl_trainer.diffusion import Objective, build_objective
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate.lora_merge import merge_lora
from sdxl_trainer.evaluate.source import (
    CheckpointSource,
    default_config_dir,
    read_info,
    resolve_checkpoint,
    vae_config_of,
)
from sdxl_trainer.models.loading import load_pipeline_parts, load_scheduler_config, quiet_hf, resolve_dtype
from sdxl_trainer.models.text import count_chunks, encode_prompts

GUIDANCE_SPACE = {"eps": "eps", "v": "v", "flow": "flow"}  # objective.prediction → CFG-rescale space
PART_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass
class Generator:
    """Everything needed to turn prompts into images with the diffusion core's samplers."""

    unet: Any
    vae: Any
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any
    objective: Objective  # its table ends at the trained σ_max (flow: t = 1)
    info: dict  # the export info: objective, sigma_max, flow_shift, latent_normalization, origin
    latent_shift: torch.Tensor  # (C,): z_raw = z/scale + shift
    latent_scale: torch.Tensor  # (C,)
    base_resolution: int  # the side the UNet was built for (sample_size × VAE factor)
    side_multiple: int  # image sides must be multiples of this (VAE factor × UNet downsampling)
    vae_factor: int  # pixels per latent position along a side (SDXL: 8)
    device: torch.device
    dtype: torch.dtype
    source: dict = field(default_factory=dict)

    @property
    def flow_shift(self) -> float | None:
        """The shift the flow model was trained with (None for the σ-space objectives)."""
        return self.info.get("flow_shift") if self.objective.prediction == "flow" else None

    @property
    def guidance_space(self) -> str:
        return GUIDANCE_SPACE[self.objective.prediction]


def objective_from_info(info: dict) -> Objective:
    """The :class:`Objective` of an export info, with the σ_max (and table form) the model was trained on."""
    name = info["objective"]
    trained = ((info.get("config") or {}).get("objective")) or {}
    if name == "flow":
        return build_objective("flow")
    if name == "v_ztsnr":
        return build_objective(name, sigma_max=info.get("sigma_max"), ztsnr_rescale=trained.get("ztsnr_rescale", True))
    return build_objective(name, sigma_max=trained.get("sigma_max"))


def latent_affine(norm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with z = (z_raw − shift)·scale: per-channel (mean, 1/std) or (0, scaling_factor)."""
    if norm["kind"] == "per_channel":
        return torch.tensor(norm["mean"], dtype=torch.float32), 1.0 / torch.tensor(norm["std"], dtype=torch.float32)
    if norm["kind"] == "scaling_factor":
        return torch.zeros(4), torch.full((4,), float(norm["scaling_factor"]))
    raise UserError(f"unknown latent normalisation {norm['kind']!r}", fix="re-export the checkpoint")


def resolve_device(device: str) -> torch.device:
    """"auto" → the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for, but CUDA is not available", fix="use --device cpu")
    return dev


def resolve_model_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" → bf16 on a GPU that has it, else fp32 (fp16 is allowed when asked for)."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return resolve_dtype(dtype)


def _load_single_file(path: Path, config_dir: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The four parts and tokenizers of an original-layout file, through diffusers' single-file loader."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers.utils import logging as diffusers_logging

    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()  # its loading bar and dtype notices are not the user's business
    diffusers_logging.disable_progress_bar()
    try:
        with quiet_hf(warnings=True):
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the single file with the configs of {config_dir}: {first}", where=str(path),
                        fix="pass --config-dir: a diffusers SDXL folder of this architecture, with tokenizers")  # fmt: skip
    finally:
        diffusers_logging.set_verbosity(level)
        if bars:
            diffusers_logging.enable_progress_bar()
    return {n: getattr(pipe, n) for n in PART_NAMES}


def _load_parts(source: CheckpointSource, config_dir: Path | None, dtype: torch.dtype) -> dict[str, Any]:
    # The VAE decodes in fp32 unless the UNet runs in bf16: fp16 overflows in SDXL's VAE.
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if source.kind == "single_file":
        parts = _load_single_file(source.path, default_config_dir(source, config_dir), dtype)
        if parts["vae"].dtype != vae_dtype:
            parts["vae"] = parts["vae"].to(vae_dtype)
        return parts
    loaded = load_pipeline_parts(source.path, dtype=dtype, vae_dtype=vae_dtype)
    return {n: getattr(loaded, n) for n in PART_NAMES}


def _geometry(unet, vae) -> dict[str, int]:
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return {"base_resolution": int(unet.config.sample_size) * vae_factor, "side_multiple": vae_factor * unet_factor,
            "vae_factor": vae_factor}  # fmt: skip


def load_generator(
    path: Path | str,
    *,
    config_dir: Path | str | None = None,
    lora: Path | str | None = None,
    lora_scale: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
) -> Generator:
    """Load the checkpoint at ``path`` (any form source.py resolves) into a ready :class:`Generator`."""
    source = resolve_checkpoint(path)
    dev = resolve_device(device)
    dt = resolve_model_dtype(dtype, dev)
    config_dir = Path(config_dir) if config_dir is not None else None
    scheduler = load_scheduler_config(source.path) if source.kind != "single_file" else None
    info = read_info(source, vae_config=vae_config_of(source, config_dir), scheduler_config=scheduler)
    parts = _load_parts(source, config_dir, dt)
    merged = {}
    for adapter, strength in ((source.lora, 1.0), (lora, lora_scale)):  # the checkpoint's own, then the user's
        if adapter is not None:
            merged[str(adapter)] = merge_lora(parts["unet"], adapter, scale=strength)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(dev).eval().requires_grad_(False)
    shift, scale = latent_affine(info["latent_normalization"])
    described = {"given": str(source.given), "kind": source.kind, "path": str(source.path), "loras": merged,
                 "lora_scale": lora_scale, "origin": info.get("origin"), "dtype": str(dt).removeprefix("torch."),
                 "device": str(dev)}  # fmt: skip
    console.info(f"loaded {source.kind} {source.path} ({info['objective']}; settings from {info.get('origin')})")
    return Generator(
        **parts, objective=objective_from_info(info).to(dev), info=info, latent_shift=shift.to(dev),
        latent_scale=scale.to(dev), **_geometry(parts["unet"], parts["vae"]), device=dev, dtype=dt,
        source=described,
    )  # fmt: skip


@torch.no_grad()
def encode_text(generator: Generator, prompts: list[str], negatives: list[str], *, max_chunks: int = 3):
    """(cond, uncond) UNet kwargs for each prompt/negative pair, both at the same chunk count.

    The negative is encoded like any prompt (the empty prompt by default), as the trainer's
    unconditional dropout feeds the encoded empty prompt, not zeros.
    """
    g = generator
    n = max(count_chunks(g.tokenizer, t, max_chunks=max_chunks) for t in [*prompts, *negatives])
    out = []
    for texts in (prompts, negatives):
        hidden, pooled = encode_prompts(g.tokenizer, g.tokenizer_2, g.text_encoder, g.text_encoder_2, texts,
                                        max_chunks=max_chunks, n_chunks=n, device=g.device)  # fmt: skip
        out.append((hidden.to(g.dtype), pooled.to(g.dtype)))
    return out[0], out[1]


def unet_kwargs(hidden: torch.Tensor, pooled: torch.Tensor, *, height: int, width: int) -> dict:
    """SDXL's conditioning: text states, pooled text and time ids (h, w, 0, 0, h, w) — an uncropped image.

    The time ids stay fp32, as in training: the UNet embeds them in fp32, and bf16 cannot hold e.g. 1017.
    """
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=hidden.device)
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(hidden.shape[0], -1)},
    }


@torch.no_grad()
def decode_latents(generator: Generator, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents → RGB in [0, 1] (B, 3, H, W), fp32: z_raw = z/scale + shift, then the VAE."""
    g = generator
    view = (1, -1, 1, 1)
    raw = z.float().to(g.device) / g.latent_scale.view(view) + g.latent_shift.view(view)
    pixels = g.vae.decode(raw.to(next(g.vae.parameters()).dtype)).sample.float()
    return ((pixels + 1) / 2).clamp(0, 1)
