"""Where training records go: RUN/metrics.jsonl always, TensorBoard and W&B when configured.

A record is one JSON object per line in metrics.jsonl; the sinks get it flattened to name → number
(:func:`scalars`). Sample images reach the same sinks through train/sample_output.py.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from sdxl_trainer import console
from sdxl_trainer.config.train import TrainConfig
from sdxl_trainer.errors import UserError


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, *, after_step: int) -> int:
    """Drop the records of steps after ``after_step`` from a JSON-lines log (and a torn last line from a
    kill mid-write): a resume redoes those steps, so each step is logged once. Written to a temporary
    file and os.replace'd: a kill leaves the old log or the new one. Returns how many records went."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None
            dropped += 1
            continue
        if isinstance(step, int) and step > after_step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        console.info(f"{path.name}: {dropped} records after step {after_step} removed (the resume redoes those steps)")
    return dropped


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A log record as flat name → number (lr per group, validation per level)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items()})
        elif isinstance(value, list):
            flat.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and key != "step":
            flat[key] = float(value)
    return flat


def _logging_package(name: str, module: str):
    """Import the module behind ``logging.<name>``, or stop with what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logging.{name} is on but the {name} package is not installed",
                        fix=f"pip install {name}, or set logging.{name}: false") from None  # fmt: skip


def open_sinks(cfg: TrainConfig, out: Path, *, main: bool) -> list[tuple[str, Any]]:
    """TensorBoard and W&B as configured (``cfg.logging``: any config with a LoggingSection, e.g. `sdxl
    train-vae`'s), besides RUN/metrics.jsonl. Every rank checks the packages
    (so a missing one stops all ranks at once); only the main rank opens the writers."""
    sinks: list[tuple[str, Any]] = []
    if cfg.logging.tensorboard:
        tensorboard = _logging_package("tensorboard", "torch.utils.tensorboard")
        if main:
            sinks.append(("tensorboard", tensorboard.SummaryWriter(log_dir=str(out / "tensorboard"))))
    if cfg.logging.wandb:
        wandb = _logging_package("wandb", "wandb")
        if main:
            run = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                             mode=cfg.logging.wandb_mode, dir=str(out), config=cfg.model_dump(mode="json"))  # fmt: skip
            sinks.append(("wandb", run))
    return sinks


def emit(sinks: list[tuple[str, Any]], record: dict[str, Any]) -> None:
    for kind, sink in sinks:
        if kind == "tensorboard":
            for name, value in scalars(record).items():
                sink.add_scalar(name, value, global_step=record["step"])
            sink.flush()
        else:
            sink.log(scalars(record), step=record["step"])


def close_sinks(sinks: list[tuple[str, Any]]) -> None:
    for kind, sink in sinks:
        if kind == "tensorboard":
            sink.close()
        else:
            sink.finish()
