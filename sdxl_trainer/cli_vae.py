"""``sdxl train-vae``: decoder finetuning of the model's VAE (sdxl_trainer/vae_train/, docs/vae.md).
Registered on cli.py's app by :func:`register`, like cli_train.py; flags named as `sdxl train`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import cli_help, console
from sdxl_trainer.cli_options import load, parse_sets
from sdxl_trainer.config import VaeTrainConfig


def register(app: typer.Typer, user_errors: Callable[..., Any], CONFIG_OPT: Any, one_writer: Callable[..., Any],
             UNLOCK_OPT: Any) -> Callable[..., Any]:  # fmt: skip
    """Add ``train-vae`` to ``app``; returns the command function."""

    @app.command("train-vae", cls=cli_help.HelpCommand)
    @user_errors
    def train_vae(
        work: Optional[Path] = typer.Argument(None, help="Work directory holding manifest.parquet (sdxl prep scan)."),
        config: Optional[Path] = CONFIG_OPT,
        model: Optional[Path] = typer.Option(None, "--model", "-m", "--model-path", "--model_path",
                                             help="SDXL diffusers folder whose vae/ is finetuned."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", "--output-dir", "--output_dir",
                                           help="Run directory (checkpoints with vae/, metrics, vae_eval.csv, grid)."),
        crop: Optional[int] = typer.Option(None, help="Square training crop in pixels, a multiple of 8."),
        latent: Optional[bool] = typer.Option(None, "--latent-sample/--latent-mean",
                                              help="Decode a posterior sample (as the cache stores) or its mean."),
        learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--learning_rate", "--lr",
                                                      "--vae-learning-rate", "--vae_learning_rate",
                                                      help="Peak decoder learning rate."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch_size", help="Crops per update."),
        num_steps: Optional[int] = typer.Option(None, "--num-steps", "--num_steps", help="Run length in updates."),
        ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the decoder (exported)."),
        gan_weight: Optional[float] = typer.Option(None, "--gan-weight", "--gan_weight",
                                                   help="Patch-discriminator (hinge) term weight; 0 = off (default)."),
        gan_start_step: Optional[int] = typer.Option(None, "--gan-start-step", "--gan_start_step",
                                                     help="Updates before the discriminator starts (default 500)."),
        precision: Optional[str] = typer.Option(None, help="auto (bf16 on a bf16 GPU, else fp32) | bf16 | fp32."),
        save_checkpoints: Optional[int] = typer.Option(None, "--save-checkpoints", "--save_checkpoints",
                                                       help="Write a checkpoint every N updates."),
        resume: Optional[str] = typer.Option(None, help="latest | a run or checkpoint folder."),
        force: Optional[bool] = typer.Option(None, "--force", help="Resume despite a changed batch size, crop or loss."),
        allow_model_change: Optional[bool] = typer.Option(None, "--allow-model-change", "--allow_model_change",
                                                          help="Resume although --model's VAE is not the checkpoint's."),
        seed: Optional[int] = typer.Option(None, help="Seed for everything random."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config key: --set loss.ssim_weight=0.5 (repeatable)."),
        force_unlock: bool = UNLOCK_OPT,
    ) -> None:
        """Finetune the VAE decoder (encoder frozen: caches stay valid) → RUN/checkpoints/step-N/vae/."""
        from sdxl_trainer.vae_train import loop as stage

        overrides = {
            "work": work, "model": model, "out": out, "crop": crop,
            "latent": None if latent is None else ("sample" if latent else "mean"),
            "optimizer.learning_rate": learning_rate, "batch_size": batch_size, "num_steps": num_steps,
            "ema.enabled": ema, "loss.gan_weight": gan_weight, "loss.gan_start_step": gan_start_step,
            "precision": precision, "checkpoints.every_steps": save_checkpoints, "resume": resume,
            "force": force, "allow_model_change": allow_model_change, "seed": seed, "device": device,
        }  # fmt: skip
        cfg = load(VaeTrainConfig, config, overrides, parse_sets(set_))
        with one_writer(cfg.out, "train-vae", force_unlock):
            summary = stage.run(cfg)
        console.table("sdxl train-vae", [(k, v) for k, v in summary.items()], ("", ""))

    return train_vae
