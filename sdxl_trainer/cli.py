"""The `sdxl` command line: parse → typed config → stage.run(config). No logic here."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import __version__, console
from sdxl_trainer.config import ScanConfig, load_config
from sdxl_trainer.errors import UserError

app = typer.Typer(
    name="sdxl",
    help="Fine-tune Stable Diffusion XL: prep (scan, stats, cache, weights) → train → evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prep_app = typer.Typer(help="Prepare a dataset: scan images, VAE statistics, caches, tag weights.", no_args_is_help=True)
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
    """Print a UserError as one line and exit 2; --debug re-raises it with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                raise
            console.console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML or TOML config; flags override it.")


@prep_app.command("scan")
@user_errors
def scan(
    data_dir: Optional[Path] = typer.Argument(None, help="Folder tree of images with optional <stem>.txt tags."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Work directory (receives manifest.parquet)."),
    hf_dataset: Optional[Path] = typer.Option(None, help="A local Hugging Face dataset instead of DATA_DIR."),
    image_column: Optional[str] = typer.Option(None, help="HF dataset image column."),
    caption_column: Optional[str] = typer.Option(None, help="HF dataset caption column."),
    hf_split: Optional[str] = typer.Option(None, help="HF dataset split."),
    model: Optional[Path] = typer.Option(None, help="SDXL folder whose tokenizer counts 75-token chunks."),
    fast: Optional[bool] = typer.Option(None, "--fast/--full", help="Header-only check instead of a full decode."),
    min_side: Optional[int] = typer.Option(None, help="Skip images whose short side is smaller (default 256)."),
    max_pixels: Optional[int] = typer.Option(None, help="Skip images with more pixels, unallocated."),
    workers: Optional[int] = typer.Option(None, help="Decode processes (0 = all cores)."),
    underscores_to_spaces: Optional[bool] = typer.Option(None, "--underscores-to-spaces", help="Tag '_' → ' '."),
    fold_buckets_below: Optional[int] = typer.Option(None, help="Fold buckets with fewer images into a neighbour."),
    config: Optional[Path] = CONFIG_OPT,
) -> None:
    """Find and validate every image, assign aspect-ratio buckets → WORK/manifest.parquet."""
    from sdxl_trainer.prep import scan as stage

    cfg = load_config(
        ScanConfig,
        config,
        {
            "data_dir": data_dir,
            "out": out,
            "hf_dataset": hf_dataset,
            "image_column": image_column,
            "caption_column": caption_column,
            "hf_split": hf_split,
            "model": model,
            "fast": fast,
            "min_side": min_side,
            "max_pixels": max_pixels,
            "workers": workers,
            "underscores_to_spaces": underscores_to_spaces,
            "buckets.fold_below": fold_buckets_below,
        },
    )
    stage.run(cfg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
