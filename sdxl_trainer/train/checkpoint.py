"""A training checkpoint: the state an exact resume needs, plus the model formats users load.

Layout of ``RUN/checkpoints/step-NNNNNN/`` (written atomically by :mod:`checkpoint_dir`):

- ``trainable.safetensors`` — the trained weights in the dtype they train in: fp32, or bf16 with
  ``optimizer.bf16_weights`` (LoRA: the adapter's tensors only);
- ``text_encoders.safetensors`` — with ``text.train_encoders``: both encoders' weights in fp32;
- ``state.safetensors`` + ``state.json`` — counters, optimiser, LR schedule, data position, EMA
  shadows, fp16 loss scale and the run config (no pickle anywhere);
- full finetune: ``diffusers/`` (StableDiffusionXLPipeline folder, scheduler matching the objective,
  latent normalisation in the VAE config) and ``model.safetensors`` (original layout, ComfyUI/A1111);
- LoRA: ``lora/`` (diffusers/PEFT) and ``lora_kohya.safetensors``.

With EMA on (and ``checkpoints.export_ema``), the exported formats carry the EMA weights — what
users sample from — while ``trainable.safetensors`` keeps the raw ones, which resume needs.

Randomness needs no saved state: every update reseeds from (seed, step) (see loop.reseed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contextlib

import torch

from sdxl_trainer import console
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import fingerprint
from sdxl_trainer.diffusion.schedules import NOVELAI_SIGMA_MAX
from sdxl_trainer.models.comfy_workflow import write_workflow
from sdxl_trainer.models.export import save_diffusers_pipeline, save_single_file, unwrap_model
from sdxl_trainer.models.loading import load_text_encoders, load_tokenizers
from sdxl_trainer.train.run_vae import load_run_vae
from sdxl_trainer.models.lora import load_lora_state_dict, lora_state_dict, save_lora_diffusers, save_lora_kohya
from sdxl_trainer.train.checkpoint_dir import (
    keep_last,
    load_state,
    load_tensors,
    save_state,
    save_tensors,
    write_checkpoint,
)

# Changing these between a checkpoint and its resume changes what the run *is*; --force accepts it.
# (bf16_weights: the weights' dtype; fused_backward_pass: per-parameter instead of total-norm clipping.)
RESUME_FIXED = ("batch_size", "gradient_accumulation_steps", "objective", "lora", "latents", "text",
                "optimizer.bf16_weights", "optimizer.fused_backward_pass")  # fmt: skip


def trainable_state(unet: torch.nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What training changed, as trained (fp32 or bf16): the adapter's tensors for LoRA, every parameter otherwise."""
    if cfg.lora.enabled:
        return lora_state_dict(unet)
    return {n: p.detach() for n, p in unwrap_model(unet).named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(unet: torch.nn.Module, cfg: TrainConfig, tensors: dict[str, torch.Tensor]) -> None:
    if cfg.lora.enabled:
        load_lora_state_dict(unet, tensors)
        return
    params = dict(unwrap_model(unet).named_parameters())
    if set(tensors) != set(params):
        raise UserError("the checkpoint's weights do not fit this UNet", fix="resume with the same --model")
    saved, now = {str(v.dtype) for v in tensors.values()}, {str(p.dtype) for p in params.values()}
    if saved != now and not cfg.force:  # --force converts: bf16 → fp32 exactly, fp32 → bf16 to nearest
        raise UserError(f"the checkpoint's weights are {', '.join(sorted(saved))}, this run trains "
                        f"{', '.join(sorted(now))}", where="optimizer.bf16_weights",
                        fix="resume with the checkpoint's optimizer.bf16_weights, or pass --force to convert")  # fmt: skip
    for name, value in tensors.items():
        params[name].copy_(value)


def save_checkpoint(cfg: TrainConfig, parts: dict[str, Any], *, exports: dict[str, Any]) -> Path:
    """One atomic checkpoint folder: training state (exact resume) plus the formats users load."""
    unet, state = parts["unet"], parts["state"]

    def write(folder: Path) -> None:
        weights = {k: v.contiguous() for k, v in trainable_state(unet, cfg).items()}
        save_tensors(folder / "trainable.safetensors", weights)
        if parts.get("text") is not None and parts["text"].train:
            save_tensors(folder / "text_encoders.safetensors", parts["text"].state())
        save_state(folder, "state", {
            "train": state.state_dict(), "optimizer": parts["optimizer"].state_dict(),
            "schedule": parts["schedule"].state_dict(), "data": parts["loader"].state_dict(),
            "ema": None if parts["ema"] is None else parts["ema"].state_dict(),
            "scaler": None if parts["step"].scaler is None else parts["step"].scaler.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "model_fingerprint": parts.get("model_fingerprint"),  # compared on resume (models/fingerprint.py)
        })  # fmt: skip
        export_model(folder, cfg, unet, exports, ema=parts["ema"])

    folder = write_checkpoint(Path(cfg.out), f"step-{state.step:06d}", write)
    if cfg.checkpoints.keep_last:
        keep_last(Path(cfg.out), cfg.checkpoints.keep_last)
    return folder


def export_model(folder: Path, cfg: TrainConfig, unet: torch.nn.Module, exports: dict[str, Any], *,
                 ema: Any = None) -> None:  # fmt: skip
    """LoRA: diffusers/PEFT and kohya files. Full finetune: a diffusers folder and one single file.

    With ``ema`` (and checkpoints.export_ema) the EMA weights are swapped in for the export and the
    trained ones put back bit for bit afterwards.
    """
    unet = unwrap_model(unet)
    use_ema = ema is not None and cfg.checkpoints.export_ema
    with ema.swapped_into(unet) if use_ema else contextlib.nullcontext():
        _export(folder, cfg, unet, exports)


def _export(folder: Path, cfg: TrainConfig, unet: torch.nn.Module, exports: dict[str, Any]) -> None:
    ck = cfg.checkpoints
    if cfg.lora.enabled:
        save_lora_diffusers(folder / "lora", unet, dtype=ck.dtype)
        save_lora_kohya(folder / "lora_kohya.safetensors", unet, dtype=ck.dtype)
        return
    if not (ck.diffusers or ck.single_file):
        return
    # the frozen parts, loaded on the writing rank the first time they are needed (on-the-fly text
    # mode has put its own, maybe trained, encoders and tokenizers there already)
    if "vae" not in exports:
        exports["vae"] = load_run_vae(cfg)  # --model's, or --vae (run_vae.py)
    if "text_encoders" not in exports:
        exports.update(tokenizers=load_tokenizers(cfg.model), text_encoders=load_text_encoders(cfg.model))
    te1, te2 = exports["text_encoders"]
    norm = exports.get("latents", {})
    if ck.diffusers:
        tok1, tok2 = exports["tokenizers"]
        save_diffusers_pipeline(folder / "diffusers", unet=unet, vae=exports["vae"], text_encoder=te1,
                                text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, objective=cfg.objective.name,
                                flow_shift=cfg.objective.flow_shift,
                                sigma_max=cfg.objective.sigma_max if cfg.objective.name == "v_ztsnr" else None,
                                dtype=ck.dtype, config=cfg, **norm)  # fmt: skip
    if ck.single_file:
        o = cfg.objective
        record = {"flow": {"sdxl_trainer.flow_shift": str(o.flow_shift)},
                  "v_ztsnr": {"sdxl_trainer.sigma_max": str(o.sigma_max or NOVELAI_SIGMA_MAX)}}.get(o.name)  # fmt: skip
        path = save_single_file(folder / "model.safetensors", unet=unet, vae=exports["vae"], text_encoder=te1,
                                text_encoder_2=te2, dtype=ck.dtype, objective=o.name, metadata=record)  # fmt: skip
        write_workflow(path, **workflow_settings(cfg))  # ComfyUI: how to sample it (models/comfy_workflow.py)


def workflow_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The ComfyUI workflow's sampling settings: the run's objective and shift, and its sample settings."""
    s = cfg.samples
    prompt = s.prompts[0] if isinstance(s.prompts, list) and s.prompts else "a photo"
    return {"objective": cfg.objective.name, "flow_shift": cfg.objective.flow_shift,
            "prompt": prompt.split(" --")[0].strip() or "a photo", "negative": s.negative or "",
            "width": s.width or 1024, "height": s.height or 1024, "steps": s.steps, "cfg": s.cfg, "seed": 0,
            "filename_prefix": Path(cfg.out).name or "sdxl_trainer"}  # fmt: skip


def _with_new_defaults(saved: dict[str, Any], cls: type, fixed: tuple[str, ...]) -> dict[str, Any]:
    """``saved`` with the section keys added since it was written at their defaults: a checkpoint from
    before a key existed (lora.fp8_base) was trained as that key's default describes."""
    out = dict(saved)
    for name in dict.fromkeys(k.split(".")[0] for k in fixed):  # optimizer.bf16_weights: the optimizer section
        field = cls.model_fields[name]
        if isinstance(out.get(name), dict) and field.default_factory is not None:
            out[name] = {**field.default_factory().model_dump(mode="json"), **out[name]}
    return out


def _setting(config: dict[str, Any], key: str) -> Any:
    """A setting of a dumped config; a dotted key names a setting inside a section."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def check_resume_config(saved: dict[str, Any], cfg: Any, *, fixed: tuple[str, ...] = RESUME_FIXED) -> None:
    """Refuse (without --force) a resume whose ``fixed`` settings differ from the checkpoint's;
    ``cfg`` is any stage config with ``force`` (TrainConfig; `sdxl train-vae`'s VaeTrainConfig)."""
    saved, now = _with_new_defaults(saved, type(cfg), fixed), cfg.model_dump(mode="json")
    changed = [k for k in fixed if _setting(saved, k) != _setting(now, k)]
    if changed and not cfg.force:
        raise UserError(
            f"the checkpoint was trained with other {', '.join(changed)} "
            f"({'; '.join(f'{k}: {_setting(saved, k)} → {_setting(now, k)}' for k in changed)})",
            where="--resume",
            fix="resume with the checkpoint's settings, or pass --force to continue with the new ones",
        )


def resume(cfg: TrainConfig, parts: dict[str, Any], folder: Path) -> Path:
    """Load every part's state from ``folder``, which integrity.check_resume has verified (checksums,
    settings) before the run wrote or loaded anything."""
    state = load_state(folder, "state")
    if parts.get("model_fingerprint") is not None:
        warning = fingerprint.check(state.get("model_fingerprint"), parts["model_fingerprint"], parts=fingerprint.ALL_PARTS,
                                    what="the checkpoint", where=str(folder), model=str(cfg.model),
                                    allow=cfg.allow_model_change, fix="resume with the checkpoint's --model")  # fmt: skip
        if warning:
            console.info(f"[yellow]warning: {warning}[/]")
    strict = not cfg.force
    load_trainable_state(parts["unet"], cfg, load_tensors(folder / "trainable.safetensors"))
    if parts.get("text") is not None and parts["text"].train:
        if not (folder / "text_encoders.safetensors").is_file():
            raise UserError("the checkpoint has no trained text encoders", where=str(folder),
                            fix="resume with text.train_encoders as the checkpoint was trained")  # fmt: skip
        parts["text"].load_state(load_tensors(folder / "text_encoders.safetensors"))
    parts["optimizer"].load_state_dict(state["optimizer"])
    parts["schedule"].load_state_dict(state["schedule"], strict=strict)
    parts["loader"].load_state_dict(state["data"], strict=strict)
    if (state["ema"] is None) != (parts["ema"] is None):
        raise UserError("EMA was switched on or off since the checkpoint", where="ema.enabled",
                        fix="resume with the checkpoint's EMA setting")  # fmt: skip
    if parts["ema"] is not None:
        parts["ema"].load_state_dict(state["ema"], strict=strict)
    if parts["step"].scaler is not None and state["scaler"]:
        parts["step"].scaler.load_state_dict(state["scaler"])
    parts["state"].load_state_dict(state["train"])
    return folder
