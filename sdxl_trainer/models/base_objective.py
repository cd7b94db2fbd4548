"""Which parameterisation a base model was trained in: eps, v, v with zero terminal SNR, or flow.

A diffusers folder says it in ``scheduler/scheduler_config.json`` (``prediction_type`` and
``rescale_betas_zero_snr``; a flow scheduler by its class or ``use_flow_sigmas``), and a folder we
exported says it in ``sdxl_trainer.json`` too. A single original-layout ``.safetensors`` says it with
the empty marker tensors ComfyUI, kohya and reForge read — ``v_pred`` (and ``ztsnr`` with it) — or
with its header (our ``sdxl_trainer.objective``, Stability's ``modelspec.prediction_type``); a file
with none of them is an eps model, as every SDXL release before the v-prediction finetunes.
``sdxl train`` uses this to train in the base model's own parameterisation unless told otherwise,
``sdxl generate`` to sample a foreign checkpoint correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trainer.errors import UserError

EXPORT_INFO = "sdxl_trainer.json"  # as models/export.py writes it beside model_index.json


@dataclass(frozen=True)
class BaseObjective:
    """The objective a base model was trained with, and the evidence (for the console line)."""

    name: str  # eps | v | v_ztsnr | flow
    reason: str


def objective_from_scheduler(config: dict[str, Any]) -> tuple[str, str]:
    """(objective, why) from a diffusers scheduler config; UserError for a prediction type we cannot train."""
    prediction = config.get("prediction_type", "epsilon")
    is_flow = config.get("use_flow_sigmas") or "FlowMatch" in str(config.get("_class_name", ""))
    if prediction == "flow_prediction" or is_flow:
        return "flow", "a flow-matching scheduler"
    if prediction == "v_prediction":
        if config.get("rescale_betas_zero_snr"):
            return "v_ztsnr", "prediction_type v_prediction with rescale_betas_zero_snr"
        return "v", "prediction_type v_prediction"
    if prediction == "epsilon":
        return "eps", "prediction_type epsilon"
    raise UserError(f"scheduler prediction_type {prediction!r} is not eps, v or flow",
                    fix="give the objective: --objective eps | v | v_ztsnr | flow")  # fmt: skip


def objective_from_single_file(path: Path | str) -> tuple[str, str]:
    """(objective, why) from a single file's header and marker keys (nothing but the header is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read the safetensors header: {e}", where=str(path)) from e
    if meta.get("sdxl_trainer.objective"):
        return meta["sdxl_trainer.objective"], "its sdxl_trainer.objective header key"
    if "v_pred" in keys:
        if "ztsnr" in keys:
            return "v_ztsnr", "its v_pred and ztsnr marker keys"
        return "v", "its v_pred marker key"
    if meta.get("modelspec.prediction_type") == "v":
        return "v", "its modelspec.prediction_type header"
    return "eps", "no v_pred marker key"


def base_objective(model: Path | str) -> BaseObjective:
    """The objective of a diffusers folder or a single ``.safetensors`` file."""
    import json

    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        name, why = objective_from_single_file(path)
        return BaseObjective(name, f"{path.name}: {why}")
    export = path / EXPORT_INFO
    if export.is_file():
        try:
            name = json.loads(export.read_text()).get("objective")
        except (OSError, ValueError):
            name = None
        if name in ("eps", "v", "v_ztsnr", "flow"):
            return BaseObjective(name, f"{EXPORT_INFO} of the base model")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise UserError("cannot tell the base model's objective: no scheduler/scheduler_config.json",
                        where=str(path), fix="give it: --objective eps | v | v_ztsnr | flow")  # fmt: skip
    try:
        config = json.loads(scheduler.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read scheduler_config.json: {e}", where=str(scheduler)) from e
    name, why = objective_from_scheduler(config if isinstance(config, dict) else {})
    return BaseObjective(name, f"its scheduler has {why}")
