"""Where training records go: RUN/metrics.jsonl always, TensorBoard and W&B when configured.

A record is one JSON object per line in metrics.jsonl; the sinks get it flattened to name → number
(:func:`scalars`). Sample images reach the same sinks through train/sample_output.py.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from sdxl_trainer.config.train import TrainConfig
from sdxl_trainer.errors import UserError


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
    """TensorBoard and W&B as configured, besides RUN/metrics.jsonl. Every rank checks the packages
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
