"""The commands that use a trained model: ``sdxl generate`` (prompts → PNGs) and ``sdxl evaluate``
(the NovelAI V3 checks → a report). Registered on the CLI's app by :func:`register` (cli.py), kept
here so that cli.py stays the pipeline's stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import cli_help, console
from sdxl_trainer.cli_options import load, parse_sets
from sdxl_trainer.config import EvaluateConfig, GenerateConfig


def register(app: typer.Typer, user_errors: Callable[..., Any], CONFIG_OPT: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Add ``generate`` and ``evaluate`` to ``app``; returns the two command functions."""

    @app.command("generate", cls=cli_help.HelpCommand)
    @user_errors
    def generate(
        checkpoint: Path = typer.Argument(..., help="Run, checkpoint or diffusers folder, or a single .safetensors."),
        prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
        negative: Optional[str] = typer.Option(None, help="Negative prompt (unset: the empty prompt, as trained)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps."),
        cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale (1 = off)."),
        cfg_rescale: Optional[float] = typer.Option(None, help="CFG rescale φ (0.7 is Lin et al.'s)."),
        pag_scale: Optional[float] = typer.Option(None, help="Perturbed-attention guidance scale (0 = off)."),
        pag_layers: Optional[list[str]] = typer.Option(None, help="PAG layers, e.g. mid, up_blocks.0 (repeatable)."),
        sampler: Optional[str] = typer.Option(None, help="auto | euler | euler_ancestral | dpmpp_2m | flow_euler."),
        schedule: Optional[str] = typer.Option(None, help="auto | karras | trailing | uniform | beta."),
        width: Optional[int] = typer.Option(None, help="Image width (unset: the model's base resolution)."),
        height: Optional[int] = typer.Option(None, help="Image height."),
        seed: Optional[int] = typer.Option(None, help="First seed; image i uses seed + i."),
        num_images: Optional[int] = typer.Option(None, help="Images per prompt."),
        sigma_max: Optional[float] = typer.Option(None, help="Start σ (unset: the trained σ_max)."),
        flow_shift: Optional[float] = typer.Option(None, help="Flow sampling shift (unset: the trained one)."),
        lora: Optional[Path] = typer.Option(None, help="A LoRA (diffusers/PEFT or kohya file) merged into the UNet."),
        lora_scale: Optional[float] = typer.Option(None, help="LoRA strength."),
        config_dir: Optional[Path] = typer.Option(None, help="For a single file: an SDXL diffusers folder (configs, tokenizers)."),
        vae: Optional[Path] = typer.Option(None, help="Decode with this VAE: a diffusers VAE folder, a train-vae run/checkpoint, or a .safetensors."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
        dtype: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16."),
        config: Optional[Path] = CONFIG_OPT,
    ) -> None:
        """Prompts → PNGs, sampled with the objective, σ_max/shift and latent normalisation the checkpoint stores."""
        from sdxl_trainer.evaluate import generate as stage

        overrides = {"checkpoint": checkpoint, "prompt": prompt, "negative": negative, "out": out, "steps": steps,
                     "cfg_scale": cfg, "cfg_rescale": cfg_rescale, "sampler": sampler, "schedule": schedule,
                     "width": width, "height": height, "seed": seed, "num_images": num_images, "sigma_max": sigma_max,
                     "flow_shift": flow_shift, "lora": lora, "lora_scale": lora_scale, "config_dir": config_dir,
                     "vae": vae, "device": device, "dtype": dtype}  # fmt: skip
        overrides |= {"pag_scale": pag_scale, "pag_layers": pag_layers or None}
        paths = stage.run(load(GenerateConfig, config, overrides))
        console.table("sdxl generate", [(str(p),) for p in paths], ("image",))


    @app.command("evaluate", cls=cli_help.HelpCommand)
    @user_errors
    def evaluate(
        checkpoint: Path = typer.Argument(..., help="Run, checkpoint or diffusers folder, or a single .safetensors."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (report.md, metrics.json, PNGs)."),
        check: Optional[list[str]] = typer.Option(None, "--check", help="black | coherence | schedules | progressive | extras (repeatable)."),
        steps: Optional[int] = typer.Option(None, help="Sampling steps of every image."),
        cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale."),
        pag_scale: Optional[float] = typer.Option(None, help="Perturbed-attention guidance scale (0 = off)."),
        pag_layers: Optional[list[str]] = typer.Option(None, help="PAG layers, e.g. mid (repeatable)."),
        seeds: Optional[list[int]] = typer.Option(None, "--seed", help="Black/white-image seeds (repeatable)."),
        base_resolution: Optional[int] = typer.Option(None, help="The training side (unset: from the UNet config)."),
        lora: Optional[Path] = typer.Option(None, help="A LoRA merged into the UNet."),
        config_dir: Optional[Path] = typer.Option(None, help="For a single file: an SDXL diffusers folder."),
        vae: Optional[Path] = typer.Option(None, help="Decode with this VAE (folder, train-vae run/checkpoint, .safetensors)."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config key: --set coherence_scales=[1,2]."),
        config: Optional[Path] = CONFIG_OPT,
    ) -> None:
        """Black-image (ZTSNR), high-resolution coherence, schedules and progressive denoising → REPORT/."""
        from sdxl_trainer.evaluate import report as stage

        overrides = {"checkpoint": checkpoint, "out": out, "checks": check or None, "steps": steps, "cfg_scale": cfg,
                     "seeds": seeds or None, "base_resolution": base_resolution, "lora": lora, "config_dir": config_dir,
                     "vae": vae, "device": device}  # fmt: skip
        overrides |= {"pag_scale": pag_scale, "pag_layers": pag_layers or None}
        stage.run(load(EvaluateConfig, config, overrides, parse_sets(set_)))

    return generate, evaluate
