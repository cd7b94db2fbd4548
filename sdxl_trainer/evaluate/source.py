"""What a checkpoint path means, and what the sampler must know about the model it names.

`sdxl generate` and `sdxl evaluate` take one path and work out the rest:

==========================================  =================================================================
path                                        what is loaded
==========================================  =================================================================
a diffusers SDXL folder                     that folder; ``sdxl_trainer.json`` says objective, σ_max, shift
                                            and latent normalisation (a foreign folder: read from its
                                            ``scheduler/`` and ``vae/`` configs instead, and said so)
a ``.safetensors`` file (original layout)   the file, with part configs and tokenizers from ``config_dir``
                                            (or the run config's ``model``); objective from its header
a training checkpoint ``RUN/checkpoints/X``  its ``diffusers/`` folder, else ``model.safetensors``, else its
                                            ``lora/`` on the run's base model; settings from the run config
a run folder ``RUN``                        the checkpoint ``RUN/checkpoints/latest`` names
==========================================  =================================================================

The settings come back as an *export info* dict with the keys of ``sdxl_trainer.json``
(docs/checkpoint-formats.md): objective, sigma_max, flow_shift, latent_normalization, plus
``origin`` saying where they were read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.base_objective import objective_from_scheduler, objective_from_single_file
from sdxl_trainer.models.export import EXPORT_INFO, export_info, latent_normalization, read_export_info
from sdxl_trainer.models.loading import read_part_config
from sdxl_trainer.models.lora import DIFFUSERS_WEIGHT_NAME
from sdxl_trainer.schema import read_json
from sdxl_trainer.train.checkpoint_dir import CHECKPOINTS, MARKER, read_latest, verify_checkpoint

KINDS = ("diffusers", "single_file", "lora")
STATE_JSON = "state.json"  # the training state's JSON half (train.checkpoint_dir.save_state), holds "config"


@dataclass(frozen=True)
class CheckpointSource:
    """What to load: ``kind`` "diffusers" (``path`` a folder), "single_file" (``path`` a file) or
    "lora" (``path`` the base diffusers folder, ``lora`` the adapter); ``run_config`` the training
    config when the path came from a training checkpoint."""

    kind: str
    path: Path
    given: Path
    checkpoint: Path | None = None
    lora: Path | None = None
    run_config: dict[str, Any] | None = None


def _run_config(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / STATE_JSON
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text()).get("config")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the training state ({e})", where=str(path)) from e
    return config if isinstance(config, dict) else None


def _is_lora_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UserError(f"cannot read the safetensors file ({e})", where=str(path)) from e
    return any(k.startswith(("lora_unet_", "lora_te")) or ".lora" in k for k in keys)


def _from_checkpoint(folder: Path, given: Path) -> CheckpointSource:
    if (folder / MARKER).is_file():
        verify_checkpoint(folder)  # a truncated file is named here, not deep inside a loader
    config = _run_config(folder)
    if (folder / "diffusers" / "model_index.json").is_file():
        return CheckpointSource("diffusers", folder / "diffusers", given, folder, run_config=config)
    if (folder / "model.safetensors").is_file():
        return CheckpointSource("single_file", folder / "model.safetensors", given, folder, run_config=config)
    if (folder / "lora" / DIFFUSERS_WEIGHT_NAME).is_file():
        base = (config or {}).get("model")
        if not base:
            raise UserError("a LoRA checkpoint without its run config: the base model is unknown", where=str(folder),
                            fix="load the base model and pass this adapter with --lora")  # fmt: skip
        return CheckpointSource("lora", Path(base), given, folder, lora=folder / "lora", run_config=config)
    raise UserError(
        "no model in this checkpoint (no diffusers/, model.safetensors or lora/)",
        where=str(folder),
        fix="train with checkpoints.diffusers or checkpoints.single_file on, or pass another checkpoint",
    )


def resolve_checkpoint(path: Path | str) -> CheckpointSource:
    """Turn a diffusers folder, single file, checkpoint folder or run folder into a :class:`CheckpointSource`."""
    given = Path(path).expanduser()
    if given.is_file():
        if given.suffix != ".safetensors":
            raise UserError("not a checkpoint file", where=str(given), fix="give a .safetensors file or a folder")
        if _is_lora_file(given):
            raise UserError("this file is a LoRA adapter, not a model", where=str(given),
                            fix="pass the base model as CHECKPOINT and this file with --lora")  # fmt: skip
        return CheckpointSource("single_file", given, given)
    if not given.is_dir():
        raise UserError("checkpoint not found", where=str(given), fix="give a run folder, checkpoint folder or model")
    if (given / "model_index.json").is_file():
        return CheckpointSource("diffusers", given, given)
    if (given / CHECKPOINTS).is_dir():
        name = read_latest(given)
        if name is None:
            raise UserError("this run has no checkpoint yet", where=str(given / CHECKPOINTS),
                            fix="wait for the first checkpoint, or pass a model folder")  # fmt: skip
        return _from_checkpoint(given / CHECKPOINTS / name, given)
    if (given / DIFFUSERS_WEIGHT_NAME).is_file():
        raise UserError("this folder is a LoRA adapter, not a model", where=str(given),
                        fix="pass the base model as CHECKPOINT and this folder with --lora")  # fmt: skip
    return _from_checkpoint(given, given)


# ---- export info: what the sampler must know --------------------------------------------------


def _stats_normalization(work: Path, vae_config: dict) -> dict:
    stats = read_json(work / "latent_stats.json", artifact="latent_stats", produced_by="sdxl prep stats")
    return latent_normalization(vae_config, stats["mean"], stats["std"])


def info_from_run_config(config: dict[str, Any], vae_config: dict) -> dict:
    """The ``sdxl_trainer.json`` payload rebuilt from a run config (for single files and LoRA checkpoints)."""
    objective = config.get("objective", {})
    name = objective.get("name", "eps")
    latents = config.get("latents", {})
    if latents.get("normalization") == "per_channel":
        norm = _stats_normalization(Path(config["work"]), vae_config)
    else:
        norm = latent_normalization({"scaling_factor": latents.get("scaling_factor") or vae_config["scaling_factor"]})
    sigma_max = objective.get("sigma_max") if name == "v_ztsnr" else None  # eps/v: read from "config" later
    info = export_info(objective=name, flow_shift=float(objective.get("flow_shift", 3.0)), sigma_max=sigma_max,
                       normalization=norm)  # fmt: skip
    return info | {"config": config, "origin": "run config"}


def info_from_diffusers_configs(scheduler: dict, vae_config: dict) -> dict:
    """A folder not written by us: objective from the scheduler config, normalisation from the VAE's.

    epsilon → eps; v_prediction → v, or v_ztsnr with ``rescale_betas_zero_snr`` (its σ = ∞ terminal
    stands in as NovelAI's 20000); a flow scheduler (``use_flow_sigmas``/``shift``) → flow.
    """
    name, _ = objective_from_scheduler(scheduler)
    flow_shift = scheduler.get("flow_shift", scheduler.get("shift", 3.0))
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        # diffusers decodes z·std/scaling_factor + mean: fold the factor into std to get our (z_raw − mean)/std form
        factor = float(vae_config.get("scaling_factor", 1.0))
        norm = latent_normalization(vae_config, mean, [s / factor for s in std])
    else:
        norm = latent_normalization(vae_config)
    info = export_info(objective=name, flow_shift=float(flow_shift or 3.0), sigma_max=None, normalization=norm)
    return info | {"config": None, "origin": "scheduler/ and vae/ configs (no sdxl_trainer.json)"}


def single_file_objective(path: Path) -> str:
    """The objective a single file says it was trained with: our header key, else ComfyUI's markers."""
    return objective_from_single_file(path)[0]


def read_info(source: CheckpointSource, *, vae_config: dict, scheduler_config: dict | None = None) -> dict:
    """The export info for ``source``: sdxl_trainer.json, else the run config, else what the files say."""
    if source.kind == "diffusers" and (source.path / EXPORT_INFO).is_file():
        return read_export_info(source.path) | {"origin": EXPORT_INFO}
    if source.run_config is not None:
        return info_from_run_config(source.run_config, vae_config)
    if source.kind == "single_file":
        objective = single_file_objective(source.path)
        norm = latent_normalization(vae_config)  # a single file has no other (docs/checkpoint-formats.md)
        info = export_info(objective=objective, flow_shift=3.0, sigma_max=None, normalization=norm)
        return info | {"config": None, "origin": f"{source.path.name} header (objective); VAE scaling_factor"}
    return info_from_diffusers_configs(scheduler_config or {}, vae_config)


def default_config_dir(source: CheckpointSource, config_dir: Path | None) -> Path:
    """Where a single file's part configs and tokenizers come from: ``config_dir``, else the run's base model."""
    if config_dir is not None:
        return Path(config_dir)
    base = (source.run_config or {}).get("model")
    if base and Path(base).is_dir():
        return Path(base)
    raise UserError(
        "a single-file checkpoint needs a diffusers SDXL folder for its part configs and tokenizers",
        where=str(source.path),
        fix="pass --config-dir BASE_MODEL (the diffusers folder the model was trained from)",
    )


def vae_config_of(source: CheckpointSource, config_dir: Path | None) -> dict:
    """The VAE config that goes with ``source`` (for the normalisation fallbacks)."""
    if source.kind == "single_file":
        return read_part_config("vae", default_config_dir(source, config_dir))
    return read_part_config("vae", source.path)
