"""A checkpoint on disk loaded and ready to sample: :func:`load_generator` → :class:`Generator`.

:func:`load_generator` resolves the path (source.py), loads the UNet, VAE, tokenizers and text
encoders, optionally merges a LoRA, and builds the objective from the checkpoint's own record —
objective, σ_max, flow shift, latent normalisation — so nobody has to pass them. The Generator and
what samples with it (text encoding, decoding) are the sampling core's (sampling/generator.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate.lora_merge import merge_lora
from sdxl_trainer.evaluate.source import (
    CheckpointSource,
    default_config_dir,
    read_info,
    resolve_checkpoint,
    vae_config_of,
)
from sdxl_trainer.models.vae_file import load_vae_any
from sdxl_trainer.models.loading import load_pipeline_parts, load_scheduler_config, quiet_hf, resolve_dtype
from sdxl_trainer.train.checkpoint_dir import latest_checkpoint
from sdxl_trainer.sampling.generator import Generator, geometry, latent_affine, objective_from_info

PART_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


def load_generator(
    path: Path | str,
    *,
    config_dir: Path | str | None = None,
    lora: Path | str | None = None,
    lora_scale: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
    vae: Path | str | None = None,
) -> Generator:
    """Load the checkpoint at ``path`` (any form source.py resolves) into a ready :class:`Generator`.

    ``vae`` replaces the checkpoint's VAE for decoding (models/vae_file.load_vae_any: a diffusers
    folder, a `sdxl train-vae` run or checkpoint, or a VAE ``.safetensors``); it must have the same
    architecture. The latent normalisation stays the checkpoint's: it describes the UNet's latents.
    """
    source = resolve_checkpoint(path)
    dev = resolve_device(device)
    dt = resolve_model_dtype(dtype, dev)
    config_dir = Path(config_dir) if config_dir is not None else None
    scheduler = load_scheduler_config(source.path) if source.kind != "single_file" else None
    info = read_info(source, vae_config=vae_config_of(source, config_dir), scheduler_config=scheduler)
    parts = _load_parts(source, config_dir, dt)
    if vae is not None:
        parts["vae"] = load_vae_any(latest_checkpoint(Path(vae)), like=parts["vae"], dtype=parts["vae"].dtype)
    merged = {}
    for adapter, strength in ((source.lora, 1.0), (lora, lora_scale)):  # the checkpoint's own, then the user's
        if adapter is not None:
            merged[str(adapter)] = merge_lora(parts["unet"], adapter, scale=strength)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(dev).eval().requires_grad_(False)
    shift, scale = latent_affine(info["latent_normalization"])
    described = {"given": str(source.given), "kind": source.kind, "path": str(source.path), "loras": merged,
                 "lora_scale": lora_scale, "origin": info.get("origin"), "dtype": str(dt).removeprefix("torch."),
                 "device": str(dev), "vae": None if vae is None else str(vae)}  # fmt: skip
    console.info(f"loaded {source.kind} {source.path} ({info['objective']}; settings from {info.get('origin')})"
                 + (f"; VAE {vae}" if vae is not None else ""))
    return Generator(
        **parts, objective=objective_from_info(info).to(dev), info=info, latent_shift=shift.to(dev),
        latent_scale=scale.to(dev), **geometry(unet_config=parts["unet"].config, vae_config=parts["vae"].config),
        device=dev, dtype=dt,
        source=described,
    )  # fmt: skip
