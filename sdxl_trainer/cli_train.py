"""``sdxl train``: the staged form (``--work WORK`` holding a cache) and the one-command form
(``--data-dir DATA``: every prep stage first, sdxl_trainer/pipeline.py). Registered on cli.py's app
by :func:`register`, like cli_inference.py, so that cli.py stays short."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import cli_help, console
from sdxl_trainer.cli_options import load, parse_sets
from sdxl_trainer.config import TrainConfig, read_config_file
from sdxl_trainer.errors import UserError


def _run_dir(out: Path | None, config: Path | None) -> Path:
    """RUN for the one-command path's default WORK (RUN/work): --out, else the config file's ``out``."""
    if out is None and config is not None:
        out = read_config_file(config).get("out")
    if out is None:
        raise UserError("no run directory", fix="give --out RUN (WORK defaults to RUN/work)")
    return Path(out)


def register(app: typer.Typer, user_errors: Callable[..., Any], CONFIG_OPT: Any, one_writer: Callable[..., Any],
             UNLOCK_OPT: Any) -> Callable[..., Any]:  # fmt: skip
    """Add ``train`` to ``app``; returns the command function."""

    @app.command("train", cls=cli_help.HelpCommand)
    @user_errors
    def train(
        config: Optional[Path] = CONFIG_OPT,
        model: Optional[Path] = typer.Option(None, "--model", "-m", "--model-path", "--model_path",
                                             help="SDXL diffusers folder to start from."),
        work: Optional[Path] = typer.Option(None, help="Work directory holding cache/ (with --data-dir: RUN/work)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", "--output-dir", "--output_dir",
                                           help="Run directory (checkpoints, metrics, config)."),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", "--data_dir",
            help="One command: scan, stats, cache and weights this folder into WORK first (each skipped when current)."),
        hf_dataset: Optional[Path] = typer.Option(None, "--hf-dataset", help="One command, from a local HF dataset."),
        prep_config: Optional[Path] = typer.Option(None, "--prep-config",
            help="One command: YAML/TOML with sections scan, stats, cache, weights (e.g. scan.datasets)."),
        dataset_config: Optional[Path] = typer.Option(None, "--dataset-config", "--dataset_config",
            help="One command: a datasets: list (ours, or kohya's dataset TOML) instead of --data-dir."),
        resolution: Optional[str] = typer.Option(None, help="One command: bucket size, 1024 | 768 | 512 | W,H."),
        min_bucket_reso: Optional[int] = typer.Option(None, "--min-bucket-reso", "--min_bucket_reso",
                                                      help="One command: shortest bucket side."),
        max_bucket_reso: Optional[int] = typer.Option(None, "--max-bucket-reso", "--max_bucket_reso",
                                                      help="One command: longest bucket side."),
        finetune_vae: bool = typer.Option(False, "--finetune-vae", "--finetune_vae",
            help="One command: finetune the VAE decoder into RUN/vae/ after the scan (sdxl train-vae; docs/vae.md)."),
        vae_learning_rate: Optional[float] = typer.Option(None, "--vae-learning-rate", "--vae_learning_rate",
                                                          help="With --finetune-vae: the decoder's peak rate (1e-5)."),
        vae_steps: Optional[int] = typer.Option(None, "--vae-steps", "--vae_steps",
                                                help="With --finetune-vae: its length in updates (1000)."),
        objective: Optional[str] = typer.Option(None, help="auto (the base model's) | eps | v | v_ztsnr | flow."),
        sigma_max: Optional[float] = typer.Option(None, help="Terminal σ (unset: 20000 for v_ztsnr, SDXL's 14.6 for eps/v)."),
        flow_shift: Optional[float] = typer.Option(None, help="Flow: logit-normal shift."),
        latent_norm: Optional[str] = typer.Option(None, help="scaling_factor | per_channel (WORK/latent_stats.json)."),
        min_snr_gamma: Optional[float] = typer.Option(None, help="min-SNR γ; giving it turns min-SNR loss weighting on."),
        tag_weights: Optional[bool] = typer.Option(None, "--tag-weights/--no-tag-weights", help="Use WORK/tag_weights.parquet."),
        offset_noise: Optional[float] = typer.Option(None, help="Offset-noise strength (≈0.1)."),
        lora: Optional[bool] = typer.Option(None, "--lora/--full", help="Train a LoRA adapter instead of the full UNet."),
        lora_rank: Optional[int] = typer.Option(None, help="LoRA rank."),
        lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (with --lora-rank alone: = rank)."),
        fp8_base: Optional[bool] = typer.Option(
            None, "--fp8-base/--no-fp8-base", "--fp8_base", help="LoRA: keep the frozen UNet base in float8 (half of bf16)."
        ),
        caption_dropout_rate: Optional[float] = typer.Option(None, "--caption-dropout-rate", "--caption_dropout_rate",
            help="Share of samples trained on the empty prompt (for CFG; data.p_uncond)."),  # fmt: skip
        ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the trained weights."),
        ema_decay: Optional[float] = typer.Option(None, help="EMA decay."),
        optimizer: Optional[str] = typer.Option(None, help="adamw | adamw8bit | adafactor."),
        learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--learning_rate", "--lr", help="Peak learning rate."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch_size", help="Samples per device per micro-batch."),
        gradient_accumulation_steps: Optional[int] = typer.Option(
            None, "--gradient-accumulation-steps", "--gradient_accumulation_steps", help="Micro-batches per update."
        ),
        num_epochs: Optional[float] = typer.Option(None, "--num-epochs", "--num_epochs", help="Run length in epochs."),
        num_steps: Optional[int] = typer.Option(None, "--num-steps", "--num_steps", help="Run length in updates."),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", "--num_samples", help="Run length in samples."),
        use_adafactor: bool = typer.Option(False, "--use-adafactor", "--use_adafactor", help="Same as --optimizer adafactor."),
        fused_backward_pass: Optional[bool] = typer.Option(
            None, "--fused-backward-pass", "--fused_backward_pass",
            help="Full finetune: step each parameter inside backward and free its gradient at once (docs/memory.md).",
        ),
        bf16_weights: Optional[bool] = typer.Option(
            None, "--bf16-weights", "--bf16_weights",
            help="Full finetune: keep the trained weights in bf16 with no fp32 master copy; every update is "
            "stochastically rounded.",
        ),
        precision: Optional[str] = typer.Option(
            None, help="auto (bf16 on a bf16 GPU, fp16 on an older one, fp32 on CPU) | bf16 | fp16 | fp32."
        ),
        gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
        enable_compile: Optional[bool] = typer.Option(None, "--enable-compile", "--enable_compile", help="torch.compile the UNet."),
        compile_mode: Optional[str] = typer.Option(None, "--compile-mode", "--compile_mode", help="torch.compile mode."),
        compile_scope: Optional[str] = typer.Option(
            None, "--compile-scope", "--compile_scope", help="blocks (each transformer block) | model (whole UNet)."
        ),
        save_checkpoints: Optional[int] = typer.Option(
            None, "--save-checkpoints", "--save_checkpoints", help="Write a checkpoint every N updates."
        ),
        push_to_hub: Optional[bool] = typer.Option(None, "--push-to-hub", "--push_to_hub",
            help="After the run, publish its last checkpoint to the Hub (with --hub-model-id)."),
        hub_model_id: Optional[str] = typer.Option(None, "--hub-model-id", "--hub_model_id", help="Hub USER/NAME."),
        hub_private: Optional[bool] = typer.Option(None, "--hub-private", "--hub_private",
                                                   help="Create the Hub repository private."),
        use_wandb: Optional[bool] = typer.Option(None, "--use-wandb", "--use_wandb", help="Log to Weights & Biases."),
        wandb_project: Optional[str] = typer.Option(None, "--wandb-project", "--wandb_project"),
        wandb_run_name: Optional[str] = typer.Option(None, "--wandb-run-name", "--wandb_run_name"),
        resume: Optional[str] = typer.Option(None, help="latest | a run or checkpoint folder."),
        force: Optional[bool] = typer.Option(None, "--force", help="Resume despite a changed batch size or objective."),
        allow_model_change: Optional[bool] = typer.Option(
            None, "--allow-model-change", help="Train although the cache, latent stats or checkpoint came from other model parts."
        ),
        seed: Optional[int] = typer.Option(None, help="Seed for everything random."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
        max_skipped_fraction: Optional[float] = typer.Option(
            None, "--max-skipped-fraction", "--max_skipped_fraction",
            help="Exit 2 at the end when more than this share of the updates was skipped (default 0.01).",
        ),
        sample_prompts: Optional[Path] = typer.Option(
            None, "--sample-prompts", "--sample_prompts", help="File of sample prompts, one a line (kohya style: --n --w --h --d --s --l)."
        ),
        sample_every_n_steps: Optional[int] = typer.Option(
            None, "--sample-every-n-steps", "--sample_every_n_steps", help="Render the sample prompts every N updates."
        ),
        sample_every_n_samples: Optional[int] = typer.Option(
            None, "--sample-every-n-samples", "--sample_every_n_samples", help="Or every N samples (global)."
        ),
        sample_sampler: Optional[str] = typer.Option(None, "--sample-sampler", "--sample_sampler", help="As generate's --sampler."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Any config key: --set loss.gamma=5 (repeatable)."),
        force_unlock: bool = UNLOCK_OPT,
    ) -> None:
        """Train → RUN/ (checkpoints: a diffusers pipeline, ComfyUI/A1111 file, LoRA, state; samples/).

        One command from a folder: sdxl train --data-dir DATA --model MODEL --out RUN (scan, stats,
        cache and weights into RUN/work first; re-run the same command to resume). Staged: sdxl train
        --work WORK --model MODEL --out RUN, WORK made by the sdxl prep commands.
        """
        from sdxl_trainer.train import loop as stage

        overrides = {
            "model": model, "work": work, "out": out, "objective.name": objective, "objective.sigma_max": sigma_max,
            "objective.flow_shift": flow_shift, "latents.normalization": latent_norm,
            "loss.weighting": "min_snr" if min_snr_gamma is not None else None, "loss.gamma": min_snr_gamma,
            "loss.tag_weights": tag_weights, "loss.offset_noise": offset_noise, "lora.enabled": lora,
            "lora.rank": lora_rank, "lora.alpha": lora_alpha, "lora.fp8_base": fp8_base, "ema.enabled": ema,
            "ema.decay": ema_decay,
            "optimizer.name": "adafactor" if use_adafactor else optimizer, "optimizer.learning_rate": learning_rate,
            "optimizer.fused_backward_pass": fused_backward_pass, "optimizer.bf16_weights": bf16_weights,
            "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
            "num_epochs": num_epochs, "num_steps": num_steps, "num_samples": num_samples, "precision": precision,
            "gradient_checkpointing": gradient_checkpointing, "compile": enable_compile, "compile_mode": compile_mode,
            "compile_scope": compile_scope, "checkpoints.every_steps": save_checkpoints, "logging.wandb": use_wandb,
            "logging.wandb_project": wandb_project, "logging.wandb_run_name": wandb_run_name, "resume": resume,
            "force": force, "allow_model_change": allow_model_change, "seed": seed, "device": device,
            "max_skipped_fraction": max_skipped_fraction, "hub.push_to_hub": push_to_hub,
            "hub.model_id": hub_model_id, "hub.private": hub_private,
            "samples.prompts": sample_prompts, "samples.every_steps": sample_every_n_steps,
            "samples.every_samples": sample_every_n_samples, "samples.sampler": sample_sampler,
            "data.p_uncond": caption_dropout_rate,
        }  # fmt: skip
        if lora and lora_rank is not None and lora_alpha is None:
            overrides["lora.alpha"] = float(lora_rank)
        one_command = any(v is not None for v in (data_dir, hf_dataset, prep_config, dataset_config))
        if one_command:
            overrides["work"] = work or _run_dir(out, config) / "work"
        elif any(v is not None for v in (resolution, min_bucket_reso, max_bucket_reso)):
            raise UserError("--resolution and --min/max-bucket-reso set how `prep scan` buckets the images",
                            fix="use them with --data-dir (one command), or give them to `sdxl prep scan`")  # fmt: skip
        elif finetune_vae:
            raise UserError("--finetune-vae is a stage of the one-command path", where="--finetune-vae",
                            fix="use it with --data-dir, or run `sdxl train-vae WORK --model MODEL --out RUN`")  # fmt: skip
        if not finetune_vae and (vae_learning_rate is not None or vae_steps is not None):
            raise UserError("--vae-learning-rate and --vae-steps set the VAE finetune", where="--vae-*",
                            fix="add --finetune-vae (with --data-dir)")  # fmt: skip
        cfg = load(TrainConfig, config, overrides, parse_sets(set_))
        if one_command:
            from sdxl_trainer import pipeline

            src = pipeline.DataSource(data_dir=data_dir, hf_dataset=hf_dataset, prep_config=prep_config,
                                      dataset_config=dataset_config,
                                      resolution=resolution, min_bucket_reso=min_bucket_reso,
                                      max_bucket_reso=max_bucket_reso, force_unlock=force_unlock,
                                      finetune_vae=finetune_vae, vae_learning_rate=vae_learning_rate,
                                      vae_steps=vae_steps)  # fmt: skip
            summary = pipeline.run(src, cfg)
            summary.pop("stages", None)
        else:
            with one_writer(cfg.out, "train", force_unlock):
                summary = stage.run(cfg)
        console.table("sdxl train", [(k, v) for k, v in summary.items() if k != "last"], ("", ""))
        if cfg.hub.push_to_hub:  # the run is complete; an upload failure is one line and RUN/publish/ stays
            from sdxl_trainer import publish

            publish.run(cfg.out, repo_id=cfg.hub.model_id, private=cfg.hub.private, what=cfg.hub.what)


    return train
