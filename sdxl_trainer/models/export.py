"""Checkpoint export: a diffusers pipeline folder and one original-layout ``.safetensors``.

* :func:`save_diffusers_pipeline` writes a folder ``StableDiffusionXLPipeline.from_pretrained`` loads
  and samples correctly: its scheduler matches the training objective and its VAE config carries the
  latent normalisation. Beside ``model_index.json`` sits ``sdxl_trainer.json`` (objective, σ_max,
  flow shift, latent normalisation), so our own tools never have to guess.
* :func:`save_single_file` writes the four parts in the Stability/ldm key layout ComfyUI and A1111
  load (mapping in :mod:`sdxl_trainer.models.export_ldm`).

docs/checkpoint-formats.md describes both formats and what other tools do with them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.loading import DType, quiet_hf, read_part_config, resolve_dtype
from sdxl_trainer.schema import normal_permissions, read_json, temp_dir, temp_file, write_json

OBJECTIVES = ("eps", "v", "v_ztsnr", "flow")
EXPORT_INFO = "sdxl_trainer.json"
EXPORT_ARTIFACT = "model_export"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "v_ztsnr": "v_prediction", "flow": "flow"}


# ---- shared checks ---------------------------------------------------------------------------


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under ``torch.compile`` (``_orig_mod``) and (Distributed)DataParallel wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel) or type(module).__name__ == "DataParallel":
            module = module.module
        else:
            return module


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def _check_no_adapters(unet: torch.nn.Module) -> None:
    """A UNet with PEFT layers would be saved under names no loader knows: merge or save the adapter."""
    if any(".base_layer." in k or ".lora_" in k for k in unet.state_dict()):
        raise ValueError(
            "the UNet carries LoRA adapter layers: export sdxl_trainer.models.lora.merged_unet(unet) for a "
            "full model, or the adapter alone with save_lora_diffusers / save_lora_kohya"
        )


def _fresh_target(path: Path) -> None:
    """Refuse to overwrite: a checkpoint folder or file is written once."""
    if (path.is_dir() and any(path.iterdir())) or path.is_file():
        raise FileExistsError(f"{path} already exists; pick a new path (checkpoints are never overwritten)")


# ---- the diffusers pipeline folder ------------------------------------------------------------


def scheduler_for(objective: str, *, flow_shift: float = 3.0):
    """The scheduler ``StableDiffusionXLPipeline`` samples a model trained with ``objective`` with.

    eps/v/v_ztsnr: SDXL's own EulerDiscreteScheduler (v_ztsnr: ``rescale_betas_zero_snr`` and trailing
    spacing, so sampling starts at the terminal step). flow: diffusers' FlowMatchEulerDiscreteScheduler
    cannot run in the SDXL pipeline (it has no ``init_noise_sigma``/``scale_model_input``), so the
    flow Euler sampler is written as DPMSolverMultistepScheduler in first-order flow mode, which takes
    exactly Euler steps on the shifted flow sigmas (a test checks it against FlowMatchEuler).
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    _check_objective(objective)
    if objective == "flow":
        if not (math.isfinite(flow_shift) and flow_shift > 0):
            raise ValueError(f"flow_shift must be a finite positive number, got {flow_shift}")
        return DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            solver_order=1,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=float(flow_shift),
            final_sigmas_type="zero",
        )
    config = dict(read_part_config("scheduler"))  # SDXL base's EulerDiscreteScheduler config
    config["prediction_type"] = PREDICTION_TYPES[objective]
    if objective == "v_ztsnr":
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return EulerDiscreteScheduler.from_config(config)


def _floats(values: Any, name: str, channels: int) -> list[float]:
    out = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    if len(out) != channels or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be {channels} finite numbers (one per latent channel), got {values!r}")
    return out


def latent_normalization(vae_config: Mapping[str, Any], latents_mean: Any = None, latents_std: Any = None) -> dict:
    """The record of how latents were normalised: per-channel z = (z_raw − mean)/std, or z = scaling_factor·z_raw."""
    if (latents_mean is None) != (latents_std is None):
        raise ValueError("give latents_mean and latents_std together (per-channel normalisation) or neither")
    if latents_mean is None:
        return {"kind": "scaling_factor", "scaling_factor": float(vae_config["scaling_factor"])}
    channels = int(vae_config.get("latent_channels", 4))
    mean, std = _floats(latents_mean, "latents_mean", channels), _floats(latents_std, "latents_std", channels)
    if min(std) <= 0:
        raise ValueError(f"latents_std must be positive, got {std}")
    return {"kind": "per_channel", "mean": mean, "std": std}


def _vae_config_update(norm: dict) -> dict[str, Any]:
    """VAE config keys for the pipeline's decode: it computes z·latents_std/scaling_factor + latents_mean."""
    if norm["kind"] == "per_channel":
        # Our z is (z_raw − mean)/std with no further factor, so scaling_factor must be 1 (Playground
        # v2.5 uses the same keys with its own factor, 0.5).
        return {"scaling_factor": 1.0, "latents_mean": norm["mean"], "latents_std": norm["std"]}
    return {"scaling_factor": norm["scaling_factor"], "latents_mean": None, "latents_std": None}


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A ``dtype`` copy built on the meta device, so only the cast weights are allocated (not a full clone)."""
    if all(p.dtype == dtype for p in module.state_dict().values() if p.is_floating_point()):
        return module
    with torch.device("meta"):
        # diffusers models are built from their config dict, transformers models from a config object
        build = getattr(type(module), "from_config", type(module))
        copy = build(module.config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    copy.load_state_dict(state, assign=True, strict=True)
    persistent = set(state)
    for name, buffer in module.named_buffers():  # non-persistent buffers (position_ids) are not in the state dict
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            setattr(copy.get_submodule(owner) if owner else copy, leaf, buffer.clone())
    return copy.eval()


def _write_slow_tokenizer_files(folder: Path) -> None:
    """Add CLIP's vocab.json + merges.txt beside tokenizer.json (transformers ≥ 5 saves only the latter;
    older transformers and other tools read the former), and drop loading options saved as config."""
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: expected a BPE (CLIP) tokenizer, found {model.get('type')}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    # CLIP's slow tokenizer skips the first line of merges.txt: keep the version header.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_diffusers_pipeline(
    out_dir: Path | str,
    *,
    unet,
    vae,
    text_encoder,
    text_encoder_2,
    tokenizer,
    tokenizer_2,
    objective: str,
    flow_shift: float = 3.0,
    sigma_max: float | None = None,
    latents_mean: Sequence[float] | torch.Tensor | None = None,
    latents_std: Sequence[float] | torch.Tensor | None = None,
    dtype: DType | None = None,
    config: Any = None,
) -> Path:
    """Write an SDXL diffusers folder for ``objective`` to ``out_dir`` (new or empty); returns it.

    ``sigma_max`` (v_ztsnr only) and ``flow_shift`` (flow only) are recorded in ``sdxl_trainer.json``;
    ``latents_mean``/``latents_std`` (4 each, raw-latent statistics) select per-channel normalisation.
    ``dtype`` (e.g. "fp16") saves a cast copy; None keeps the modules' own. ``config`` (the run config)
    is stored as provenance. The folder appears whole or not at all (written beside it, then renamed).
    """
    from diffusers import StableDiffusionXLPipeline

    _check_objective(objective)
    if sigma_max is not None and objective != "v_ztsnr":
        raise ValueError(f"sigma_max applies to objective v_ztsnr only, not {objective}")
    if sigma_max is not None and not (math.isfinite(sigma_max) and sigma_max > 0):
        raise ValueError(f"sigma_max must be a finite positive number, got {sigma_max}")
    unet, vae, text_encoder, text_encoder_2 = (unwrap_model(m) for m in (unet, vae, text_encoder, text_encoder_2))
    _check_no_adapters(unet)
    norm = latent_normalization(vae.config, latents_mean, latents_std)
    scheduler = scheduler_for(objective, flow_shift=flow_shift)
    out_dir = Path(out_dir)
    _fresh_target(out_dir)
    if dtype is not None:
        dt = resolve_dtype(dtype)
        unet, vae, text_encoder, text_encoder_2 = (_cast_copy(m, dt) for m in (unet, vae, text_encoder, text_encoder_2))
    with quiet_hf(warnings=True):
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )  # fmt: skip
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir)
    try:
        with quiet_hf():
            pipe.save_pretrained(tmp, safe_serialization=True)
        vae_config_path = tmp / "vae" / "config.json"
        vae_config = json.loads(vae_config_path.read_text(encoding="utf-8"))
        vae_config.update(_vae_config_update(norm))
        vae_config_path.write_text(json.dumps(vae_config, indent=2) + "\n", encoding="utf-8")
        standard_clip_layout(tmp / "text_encoder")
        normal_permissions(tmp)  # safetensors writes its files owner-only
        for name in ("tokenizer", "tokenizer_2"):
            _write_slow_tokenizer_files(tmp / name)
        info = export_info(objective=objective, flow_shift=flow_shift, sigma_max=sigma_max, normalization=norm)
        write_json(info, tmp / EXPORT_INFO, artifact=EXPORT_ARTIFACT, config=config)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); os.replace needs the name free on every platform
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


CLIP_PREFIX = "text_model."


def standard_clip_layout(folder: Path) -> None:
    """Store the CLIP-L text encoder under the key names of the SDXL base repository (``text_model.…``).

    transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; transformers 4 (and tools
    built on it) then find none of its keys and load random weights with a mere warning. Both versions
    load the prefixed layout, so the file is rewritten in it (tensors unchanged, header kept).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}
        if all(k.startswith(CLIP_PREFIX) or k.startswith("text_projection") for k in keys):
            return
        tensors = {(k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k): f.get_tensor(k) for k in keys}
    save_file(tensors, str(path), metadata=metadata)


def export_info(*, objective: str, flow_shift: float, sigma_max: float | None, normalization: dict) -> dict:
    """The payload of ``sdxl_trainer.json``: what a sampler must know that diffusers' configs do not say."""
    _check_objective(objective)
    return {
        "objective": objective,
        "prediction_type": PREDICTION_TYPES[objective],
        "sigma_max": None if sigma_max is None else float(sigma_max),
        "flow_shift": float(flow_shift) if objective == "flow" else None,
        "latent_normalization": normalization,
    }


def read_export_info(model_dir: Path | str) -> dict:
    """``sdxl_trainer.json`` of an exported folder (provenance keys included); UserError if absent or foreign."""
    return read_json(Path(model_dir) / EXPORT_INFO, artifact=EXPORT_ARTIFACT, produced_by="sdxl train")


# ---- the single file --------------------------------------------------------------------------


def ldm_state_dict(*, unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """All four parts in the original SDXL key layout (tensors shared with the modules where unchanged)."""
    unet, vae, text_encoder, text_encoder_2 = (unwrap_model(m) for m in (unet, vae, text_encoder, text_encoder_2))
    _check_no_adapters(unet)
    out = export_ldm.unet_to_ldm(unet.state_dict(), unet.config)
    out.update(export_ldm.vae_to_ldm(vae.state_dict(), vae.config))
    out.update(export_ldm.clip_l_to_ldm(text_encoder.state_dict()))
    layers = text_encoder_2.config.num_hidden_layers
    out.update(export_ldm.clip_g_to_ldm(text_encoder_2.state_dict(), num_layers=layers))
    return out


def single_file_metadata(objective: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors header: Stability's model-spec keys, our record, and the caller's ``extra``."""
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }
    if objective is not None:
        _check_objective(objective)
        if objective != "flow":  # the model spec has no value for flow matching
            meta["modelspec.prediction_type"] = "epsilon" if objective == "eps" else "v"
        meta["sdxl_trainer.objective"] = objective
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        meta[key] = value
    return meta


def save_single_file(
    path: Path | str,
    *,
    unet,
    vae,
    text_encoder,
    text_encoder_2,
    dtype: DType = "fp16",
    objective: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one ``.safetensors`` in the original SDXL layout (ComfyUI, A1111); returns ``path``.

    With ``objective`` "v" or "v_ztsnr" the file also holds the empty marker tensors ``v_pred`` (and
    ``ztsnr``) that ComfyUI reads to pick v-prediction (and the zero-SNR schedule) on its own. The file
    is written beside ``path`` and renamed into place.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints end in .safetensors, got {path.name}")
    _fresh_target(path)
    header = single_file_metadata(objective, metadata)
    dt = resolve_dtype(dtype)
    tensors = {k: v.detach().to("cpu", dt).contiguous() for k, v in ldm_state_dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2
    ).items()}  # fmt: skip
    if objective in ("v", "v_ztsnr"):
        tensors["v_pred"] = torch.empty(0)
    if objective == "v_ztsnr":
        tensors["ztsnr"] = torch.empty(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        normal_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
