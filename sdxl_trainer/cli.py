"""The `sdxl` command line: parse → typed config → stage.run(config). No logic here."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import __version__, cli_help, cli_inference, cli_options, cli_publish, cli_train, cli_vae, console, disk, locks
from sdxl_trainer.cli_options import load
from sdxl_trainer.config import (CacheConfig, EvaluateConfig, GenerateConfig, ScanConfig, StatsConfig, TrainConfig,
                                 VaeTrainConfig, WeightsConfig)
from sdxl_trainer.errors import UserError

app = typer.Typer(
    name="sdxl",
    help="Fine-tune Stable Diffusion XL: prep (scan, stats, cache, weights) → train → evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: every alias in full, wrapped to the terminal (cli_help.py)
)
prep_app = typer.Typer(help="Prepare a dataset: scan images, VAE statistics, caches, tag weights.", no_args_is_help=True,
                       rich_markup_mode=None)  # fmt: skip
app.add_typer(prep_app, name="prep")

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdxl-trainer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    console.set_quiet(quiet)
    _state["debug"] = debug


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a UserError (or a disk-full / read-only OS error) as one line and exit 2; --debug re-raises it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        cli_options.remember(fn, kwargs)  # so that a bad value is blamed on the option that gave it
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = e if isinstance(e, UserError) else disk.explain(e)
            if err is None or _state["debug"]:
                raise
            console.console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


one_writer = disk.one_writer  # the stage's lock on the folder it writes; OS write errors there → one line


CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML or TOML config; flags override it.")
UNLOCK_OPT = typer.Option(False, locks.FORCE_FLAG, help="Take over a lock left by a process on another host.")


@prep_app.command("scan", cls=cli_help.HelpCommand)
@user_errors
def scan(
    data_dir: Optional[Path] = typer.Argument(None, help="Folder tree of images with optional <stem>.txt tags."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Work directory (receives manifest.parquet)."),
    hf_dataset: Optional[Path] = typer.Option(None, help="A local Hugging Face dataset instead of DATA_DIR."),
    dataset_config: Optional[Path] = typer.Option(
        None, help="A datasets: list (YAML/TOML) or a kohya dataset TOML, instead of DATA_DIR."
    ),
    folder_repeats: Optional[bool] = typer.Option(
        None, "--folder-repeats/--no-folder-repeats", help="A first-level folder 10_name repeats its images 10×."
    ),
    image_column: Optional[str] = typer.Option(None, help="HF dataset image column."),
    caption_column: Optional[str] = typer.Option(None, help="HF dataset caption column."),
    hf_split: Optional[str] = typer.Option(None, help="HF dataset split."),
    allow_outside_paths: Optional[bool] = typer.Option(
        None, "--allow-outside-paths", help="HF dataset: read image paths outside its folder (trusted datasets)."
    ),
    model: Optional[Path] = typer.Option(None, help="SDXL folder whose tokenizer counts 75-token chunks."),
    fast: Optional[bool] = typer.Option(None, "--fast/--full", help="Header-only check instead of a full decode."),
    min_side: Optional[int] = typer.Option(None, help="Skip images whose short side is smaller."),
    max_pixels: Optional[int] = typer.Option(None, help="Skip images with more pixels, unallocated."),
    workers: Optional[int] = typer.Option(None, help="Decode processes (0 = all cores)."),
    underscores_to_spaces: Optional[bool] = typer.Option(None, "--underscores-to-spaces", help="Tag '_' → ' '."),
    resolution: Optional[str] = typer.Option(None, help="Bucket size: 1024 | 768 | 512 | W,H (area, base, sides)."),
    min_bucket_reso: Optional[int] = typer.Option(None, "--min-bucket-reso", "--min_bucket_reso",
                                                  help="Shortest bucket side."),
    max_bucket_reso: Optional[int] = typer.Option(None, "--max-bucket-reso", "--max_bucket_reso",
                                                  help="Longest bucket side."),
    fold_buckets_below: Optional[int] = typer.Option(None, help="Fold buckets with fewer images into a neighbour."),
    alpha_background: Optional[str] = typer.Option(None, help="What transparent pixels become: white | black."),
    max_chunks: Optional[int] = typer.Option(None, help="75-token chunks a caption may use (with --model)."),
    config: Optional[Path] = CONFIG_OPT,
    force_unlock: bool = UNLOCK_OPT,
) -> None:
    """Find and validate every image, assign aspect-ratio buckets → WORK/manifest.parquet."""
    from sdxl_trainer.prep import scan as stage
    from sdxl_trainer.prep.dataset_config import print_notes, read_dataset_config

    entries, notes = read_dataset_config(dataset_config) if dataset_config is not None else (None, [])
    cfg = load(
        ScanConfig,
        config,
        {
            "data_dir": data_dir,
            "out": out,
            "hf_dataset": hf_dataset,
            "datasets": entries,
            "folder_repeats": folder_repeats,
            "image_column": image_column,
            "caption_column": caption_column,
            "hf_split": hf_split,
            "allow_outside_paths": allow_outside_paths,
            "model": model,
            "fast": fast,
            "min_side": min_side,
            "max_pixels": max_pixels,
            "workers": workers,
            "underscores_to_spaces": underscores_to_spaces,
            "buckets.resolution": resolution,
            "buckets.min_side": min_bucket_reso,
            "buckets.max_side": max_bucket_reso,
            "buckets.fold_below": fold_buckets_below,
            "alpha_background": alpha_background,
            "max_chunks": max_chunks,
        },
    )
    print_notes(notes)  # what of a kohya dataset TOML is done differently or left to training
    with one_writer(cfg.out, "prep scan", force_unlock):
        stage.run(cfg)


@prep_app.command("stats", cls=cli_help.HelpCommand)
@user_errors
def stats(
    work: Path = typer.Argument(..., help="Work directory holding manifest.parquet."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="SDXL diffusers folder (its VAE is used)."),
    vae: Optional[Path] = typer.Option(None, help="A separate diffusers AutoencoderKL folder."),
    max_images: Optional[int] = typer.Option(None, help="Measure a seeded random subset (0 = all)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per VAE call."),
    dtype: Optional[str] = typer.Option(None, help="VAE precision: fp32 | bf16 | fp16."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    seed: Optional[int] = typer.Option(None, help="Subset choice and posterior draws."),
    config: Optional[Path] = CONFIG_OPT,
    force_unlock: bool = UNLOCK_OPT,
) -> None:
    """Per-channel mean/std of raw VAE latents → WORK/latent_stats.json."""
    from sdxl_trainer.prep import stats as stage

    overrides = {"work": work, "model": model, "vae": vae, "max_images": max_images, "batch_size": batch_size,
                 "dtype": dtype, "device": device, "seed": seed}  # fmt: skip
    cfg = load(StatsConfig, config, overrides)
    with one_writer(cfg.work, "prep stats", force_unlock):
        stage.run(cfg)


@prep_app.command("cache", cls=cli_help.HelpCommand)
@user_errors
def cache(
    work: Path = typer.Argument(..., help="Work directory holding manifest.parquet; receives cache/."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="SDXL diffusers folder."),
    vae: Optional[Path] = typer.Option(None, help="A separate diffusers AutoencoderKL folder."),
    vae_dtype: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (fp16 only with a fixed VAE)."),
    text_dtype: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    batch_size: Optional[int] = typer.Option(None, help="Images per VAE call."),
    crop: Optional[str] = typer.Option(None, help="center | random (the crop is recorded)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Also cache the mirrored latent."),
    max_chunks: Optional[int] = typer.Option(None, help="75-token chunks per prompt."),
    variants: Optional[int] = typer.Option(None, help="Caption variants per image."),
    keep_first: Optional[int] = typer.Option(None, help="First K tags never shuffled or dropped."),
    max_dropout: Optional[float] = typer.Option(None, help="Largest share of free tags a variant drops."),
    caption_prob: Optional[float] = typer.Option(None, help="Chance a variant uses the caption over the tags."),
    shard_max_mb: Optional[int] = typer.Option(None, help="Close a shard at this size."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Rebuild a cache made with other settings."),
    allow_model_change: Optional[bool] = typer.Option(
        None, "--allow-model-change", help="Accept latent_stats.json measured with another VAE."
    ),
    verify: bool = typer.Option(False, "--verify", help="Re-check row counts, shapes and finiteness afterwards."),
    config: Optional[Path] = CONFIG_OPT,
    force_unlock: bool = UNLOCK_OPT,
) -> None:
    """Latents + chunked CLIP text embeddings of every kept image → WORK/cache/ (resumable)."""
    from sdxl_trainer.prep import cache as stage

    overrides = {"work": work, "model": model, "vae": vae, "vae_dtype": vae_dtype, "text_dtype": text_dtype,
                 "device": device, "batch_size": batch_size, "crop": crop, "flip": flip, "max_chunks": max_chunks,
                 "variants.count": variants, "variants.keep_first": keep_first, "variants.max_dropout": max_dropout,
                 "variants.caption_prob": caption_prob, "shard_max_mb": shard_max_mb, "overwrite": overwrite,
                 "allow_model_change": allow_model_change}  # fmt: skip
    cfg = load(CacheConfig, config, overrides)
    with one_writer(cfg.work, "prep cache", force_unlock):
        stage.run(cfg, verify_after=verify)


@prep_app.command("weights", cls=cli_help.HelpCommand)
@user_errors
def weights(
    work: Path = typer.Argument(..., help="Work directory holding manifest.parquet."),
    alpha: Optional[float] = typer.Option(None, help="Strength: tag weight = (count / reference)^-alpha (0 = off)."),
    min_count: Optional[int] = typer.Option(None, help="Tags on fewer images are not weighed."),
    clip_min: Optional[float] = typer.Option(None, help="Smallest per-tag weight."),
    clip_max: Optional[float] = typer.Option(None, help="Largest per-tag weight."),
    combine: Optional[str] = typer.Option(None, help="Per image: geometric | arithmetic | max."),
    ignore_tag: Optional[list[str]] = typer.Option(None, help="A tag never weighed (repeatable; replaces the default list)."),
    ignore_prefix: Optional[list[str]] = typer.Option(None, help="Tags starting with this are never weighed (repeatable)."),
    show: Optional[int] = typer.Option(None, help="Rows in the printed tables."),
    config: Optional[Path] = CONFIG_OPT,
    force_unlock: bool = UNLOCK_OPT,
) -> None:
    """Tag-frequency loss weights (rare tags lifted, common ones attenuated) → WORK/tag_weights.parquet."""
    from sdxl_trainer.prep import weights as stage

    overrides = {"work": work, "alpha": alpha, "min_count": min_count, "clip_min": clip_min, "clip_max": clip_max,
                 "combine": combine, "ignore_tags": ignore_tag or None, "ignore_prefixes": ignore_prefix or None,
                 "show": show}  # fmt: skip
    cfg = load(WeightsConfig, config, overrides)
    with one_writer(cfg.work, "prep weights", force_unlock):
        stage.run(cfg)


@app.command("demo", cls=cli_help.HelpCommand)
@user_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the tiny model, data and outputs."),
    images: int = typer.Option(300, help="Synthetic images to generate."),
    seed: int = typer.Option(0, help="Seed for the model weights and the data."),
    train_steps: int = typer.Option(600, help="Updates per trained model (four are trained)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke test for CI: random VAE, tiny sampling; the numbers mean nothing."),
    threads: Optional[int] = typer.Option(
        None, min=1, help="torch intra-op threads (unset: all cores when idle, 1 when other work keeps a core busy)."
    ),
    kit_only: bool = typer.Option(False, "--kit-only", help="Build only DIR/model and DIR/data (the kit); train nothing."),
) -> None:
    """Run every stage on synthetic data and a tiny SDXL model (offline, CPU, minutes)."""
    from sdxl_trainer import demo as stage

    stage.run(out, n_images=images, seed=seed, train_steps=train_steps, quick=quick, threads=threads, kit_only=kit_only)


train = cli_train.register(app, user_errors, CONFIG_OPT, one_writer, UNLOCK_OPT)  # sdxl train
train_vae = cli_vae.register(app, user_errors, CONFIG_OPT, one_writer, UNLOCK_OPT)  # sdxl train-vae


generate, evaluate = cli_inference.register(app, user_errors, CONFIG_OPT)  # sdxl generate, sdxl evaluate
publish = cli_publish.register(app, user_errors)  # sdxl publish


@app.command("config", cls=cli_help.HelpCommand)
@user_errors
def config_template(stage: str = typer.Argument(..., help="scan | stats | cache | weights | train | train-vae | generate | evaluate")) -> None:
    """Print a stage's config as commented YAML with every default (a starting point for --config)."""
    from sdxl_trainer.config.docs import STAGES, template

    if stage not in STAGES:
        raise UserError(f"no stage {stage!r}", fix=f"use one of {', '.join(STAGES)}")
    typer.echo("\n".join(template(STAGES[stage][0])))


for _command, _cls in ((scan, ScanConfig), (stats, StatsConfig), (cache, CacheConfig), (weights, WeightsConfig),
                       (train, TrainConfig), (train_vae, VaeTrainConfig), (generate, GenerateConfig),
                       (evaluate, EvaluateConfig)):  # fmt: skip
    cli_help.config_defaults(_cls)(_command)  # each option's help shows its config default


def main() -> None:
    # transformers warns at import about optional vision back-ends we never use; --debug keeps them.
    if "--debug" not in sys.argv:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
