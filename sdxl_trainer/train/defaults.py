"""The `auto` settings of a run, resolved once at start-up: objective and precision.

``objective.name: auto`` trains in the base model's own parameterisation (models/base_objective.py):
an eps model as eps, a v-prediction model as v, a v-prediction zero-terminal-SNR model as v_ztsnr, a
flow model as flow. Training a model in another parameterisation than the one it was trained in is
possible — NovelAI V3 turned SDXL into v_ztsnr, bigASP v2.5 into flow — but it is a long full
finetune, and a LoRA cannot make the switch: so an explicit objective that differs from the base
prints what it means. ``precision: auto`` is bf16 where the device computes it natively.

The resolved values are what RUN/config.yaml and the checkpoints record, so a resume compares like
with like (train/checkpoint.py RESUME_FIXED holds the objective).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError

from sdxl_trainer import console
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.base_objective import BaseObjective, base_objective
from sdxl_trainer.train.checkpoint_dir import resolve_resume

_NAMES = {"eps": "eps-prediction", "v": "v-prediction", "v_ztsnr": "v-prediction with zero terminal SNR",
          "flow": "rectified flow"}  # fmt: skip


def mismatch_warning(base: str, chosen: str, *, lora: bool) -> str:
    """What training ``chosen`` on a ``base`` model means, for a console warning line."""
    what = f"training {chosen} on a base model trained with {_NAMES[base]} ({base})"
    if lora:
        return (f"{what}: a LoRA trained in another parameterisation than its base model will not work well "
                f"(the frozen base still predicts {base}); use --objective {base}, or train the full UNet")  # fmt: skip
    if {base, chosen} == {"v", "v_ztsnr"}:
        return (f"{what}: the schedules differ only near the terminal step, which the model must learn "
                "(or unlearn); expect some thousands of updates before pure-noise samples come right")  # fmt: skip
    return (f"{what}: the model must learn a new parameterisation — a long full finetune (NovelAI V3, bigASP "
            f"v2.5: millions of samples); samples look broken at first. --objective {base} keeps the base's")  # fmt: skip


def auto_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``precision: auto``."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16", f"{torch.cuda.get_device_name(device)} computes bf16"
    if cfg.optimizer.bf16_weights:
        return "bf16", "optimizer.bf16_weights needs it"
    if device.type == "cuda" and not cfg.optimizer.fused_backward_pass:
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16 (fp16 with a gradient scaler)"
    return "fp32", f"on {device.type}" + (", without bf16" if device.type == "cuda" else "")


def _base(cfg: TrainConfig) -> BaseObjective:
    try:
        return base_objective(cfg.model)
    except UserError as e:
        raise UserError(f"objective auto: {e.what}", where=e.where, fix=e.fix) from None


def _resumed_objective(cfg: TrainConfig) -> str | None:
    """The objective the checkpoint ``--resume`` names was trained with; None without a resume, or
    when the checkpoint cannot be read (integrity.check_resume then says what is wrong with it)."""
    if not cfg.resume:
        return None
    try:
        folder = resolve_resume(Path(cfg.out), cfg.resume)
        name = json.loads((folder / "state.json").read_text())["config"]["objective"]["name"]
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def resolve_defaults(cfg: TrainConfig, device: torch.device, *, announce: bool = True) -> TrainConfig:
    """``cfg`` with objective and precision ``auto`` resolved (a new config; ``cfg`` itself if none is auto).

    With ``announce`` each choice is printed as one line (and a warning when an explicit objective
    differs from the base model's); without, nothing is printed (the entry points' second calls).
    """
    changes: dict[str, object] = {}
    resumed = _resumed_objective(cfg) if cfg.objective.name == "auto" else None
    if resumed is not None:  # a resumed run goes on as it was trained, whatever its base model is
        changes["objective"] = resumed
        if announce:
            console.info(f"objective {resumed}: the resumed checkpoint's")
    elif cfg.objective.name == "auto":
        base = _base(cfg)
        changes["objective"] = base.name
        if announce:
            console.info(f"objective {base.name}: the base model's ({base.reason}); --objective changes it")
    elif announce:
        try:
            base = base_objective(cfg.model)
        except UserError:
            base = None  # only a warning is at stake; the model is loaded (and checked) later
        if base is not None and base.name != cfg.objective.name:
            warning = mismatch_warning(base.name, cfg.objective.name, lora=cfg.lora.enabled)
            console.info(f"warning: {warning}")  # --quiet hides it: the objective was asked for explicitly
    if cfg.precision == "auto":
        changes["precision"], why = auto_precision(cfg, device)
        if announce:
            console.info(f"precision {changes['precision']}: auto, {why}; --precision changes it")
    if not changes:
        return cfg
    data = cfg.model_dump()
    if "objective" in changes:
        data["objective"]["name"] = changes["objective"]
    if "precision" in changes:
        data["precision"] = changes["precision"]
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:  # e.g. objective.sigma_max given and the base turned out to be flow
        problem = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise UserError(f"with the resolved {', '.join(f'{k} {v}' for k, v in changes.items())}: {problem}",
                        fix="give --objective / --precision explicitly, or drop the setting") from None  # fmt: skip
