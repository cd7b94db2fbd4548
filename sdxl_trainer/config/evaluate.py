"""`sdxl generate` and `sdxl evaluate` (docs/evaluate.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from sdxl_trainer.config.base import Section


Sampler = Literal["auto", "euler", "euler_ancestral", "dpmpp_2m", "flow_euler"]


class SamplingSection(Section):
    """How images are sampled; σ_max, flow shift and latent normalisation come from the checkpoint."""

    steps: int = Field(28, ge=1, description="UNet evaluations per image (×2 with CFG)")
    cfg_scale: float = Field(5.0, ge=0, description="classifier-free guidance scale (NovelAI V3: 3.5–5; 1 = off)")
    cfg_rescale: float = Field(0.0, ge=0, le=1, description="CFG rescale φ (Lin et al.: 0.7)")
    sampler: Sampler = Field("auto", description="auto = dpmpp_2m (eps/v), flow_euler (flow)")
    schedule: Literal["auto", "karras", "trailing", "uniform", "beta"] = Field(
        "auto", description="auto = karras (flow: its shifted times); beta = Beta(0.6, 0.6) quantiles, as ComfyUI"
    )
    pag_scale: float = Field(0.0, ge=0, description="perturbed-attention guidance (0 = off; bigASP: 2–5 with CFG 2–5)")
    pag_layers: list[str] = Field(["mid"], min_length=1, description="PAG's self-attention layers, diffusers' names: "
                                  "mid, up_blocks.0, down_blocks.2.attentions.1 (regex) or up.block_0")
    negative: str = Field("", description="negative prompt (the encoded empty prompt by default, as in training)")
    lora: Path | None = Field(None, description="a LoRA file (diffusers/PEFT or kohya) merged into the UNet")
    lora_scale: float = Field(1.0, description="LoRA strength")
    config_dir: Path | None = Field(None, description="single file: diffusers SDXL folder with configs and tokenizers")
    vae: Path | None = Field(None, description="decode with this VAE instead of the checkpoint's: a diffusers "
                             "AutoencoderKL folder (RUN/checkpoints/step-N/vae of `sdxl train-vae`), a train-vae run "
                             "or checkpoint folder, or a VAE .safetensors (vae.safetensors)")
    max_chunks: int = Field(3, ge=1, le=8, description="75-token prompt chunks (as the cache was built)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a GPU, else fp32")

    @field_validator("pag_layers")
    @classmethod
    def _pag_layers(cls, layers: list[str]) -> list[str]:
        return check_pag_layers(layers)


def check_pag_layers(layers: list[str]) -> list[str]:
    """PAG layer names that are non-empty regular expressions (whether the UNet has them is checked when it loads)."""
    for layer in layers:
        if not layer.strip():
            raise ValueError("a PAG layer name is empty")
        try:
            re.compile(layer)
        except re.error as exc:
            raise ValueError(f"PAG layer {layer!r} is not a regular expression ({exc})") from None
    return layers


class GenerateConfig(SamplingSection):
    """`sdxl generate`: prompts → PNGs with their parameters in the PNG text chunks."""

    checkpoint: Path = Field(..., description="diffusers folder, single .safetensors, checkpoint or run folder")
    prompt: list[str] = Field(..., min_length=1, description="one or more prompts")
    out: Path = Field(Path("samples"), description="folder that receives the PNGs (never overwritten)")
    width: int | None = Field(None, gt=0, description="unset: the model's base resolution")
    height: int | None = Field(None, gt=0, description="unset: the model's base resolution")
    seed: int = Field(0, ge=0, description="first seed; image i uses seed + i")
    num_images: int = Field(1, ge=1, description="images per prompt")
    sigma_max: float | None = Field(None, gt=0, description="start σ (karras); unset: the trained σ_max")
    flow_shift: float | None = Field(None, gt=0, description="flow sampling shift; unset: the trained shift")


class EvaluateConfig(SamplingSection):
    """`sdxl evaluate`: REPORT/ with the black-image, coherence, schedule and denoising checks."""

    checkpoint: Path = Field(..., description="run folder, checkpoint folder, diffusers folder or single file")
    out: Path = Field(..., description="report folder: report.md, metrics.json, PNGs with their CSVs")
    checks: list[Literal["black", "coherence", "schedules", "progressive", "extras"]] = Field(
        ["black", "coherence", "schedules", "progressive"],
        description="extras (opt-in): black and coherence again with the beta schedule and with PAG",
    )
    base_resolution: int | None = Field(None, gt=0, description="the training side; unset: UNet sample_size × 8")
    black_prompt: str = Field("solid color, black background, no humans", description="asks for solid black")
    white_prompt: str = Field("solid color, white background, no humans", description="asks for solid white")
    seeds: list[int] = Field([0, 1, 2, 3], min_length=1, description="seeds of the black/white images")
    coherence_prompts: list[str] = Field(["red circle, blue background, simple shapes, no humans"], min_length=1)
    coherence_seeds: list[int] = Field([0, 1], min_length=1)
    coherence_scales: list[float] = Field([1.0, 1.5, 2.0], min_length=1, description="sides / base_resolution")
    coherence_grid: int = Field(8, ge=1, description="side of the low-frequency lattice images are compared on")
    progressive_prompts: list[str] | None = Field(None, description="unset: the black and first coherence prompt")
    progressive_frames: int = Field(8, ge=2, description="x0 previews per strip, at evenly spaced steps")
    density_samples: int = Field(200_000, ge=1000, description="draws of the training-level sampler")
    thumbnail: int = Field(256, ge=16, description="longest side of an image in a grid or strip")
