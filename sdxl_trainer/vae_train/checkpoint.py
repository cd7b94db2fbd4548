"""A `sdxl train-vae` checkpoint, in the trainer's atomic checkpoint folders (train/checkpoint_dir.py).

``RUN/checkpoints/step-NNNNNN/``:

- ``trainable.safetensors`` — the decoder's weights (post_quant_conv + decoder) as trained (fp32);
- ``state.safetensors`` + ``state.json`` — counters, optimiser, LR schedule, EMA shadows, run config,
  and with ``loss.gan_weight`` > 0 the discriminator's weights and Adam state;
- ``vae/`` — the whole finetuned VAE as a diffusers ``AutoencoderKL`` folder (fp32; the EMA decoder
  with EMA on and ``checkpoints.export_ema``): its encoder is the base model's, bit for bit;
- ``vae.safetensors`` — the same VAE as one original-layout file (ComfyUI "Load VAE", A1111; fp32;
  models/vae_file.py), its header naming what it is.

``state.json`` records the base VAE's fingerprint (models/fingerprint.py); a resume with a model
whose VAE differs is refused unless ``allow_model_change``.

Every file's SHA-256 is recorded in checkpoint.json and checked before a resume (train/integrity.py),
which reads the same file names as `sdxl train`'s. Randomness needs no saved state (data.py, rng.reseed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import fingerprint
from sdxl_trainer.models.loading import part_dir
from sdxl_trainer.models.vae_file import save_vae_file
from sdxl_trainer.train.checkpoint_dir import flatten_state, keep_last, load_state, load_tensors, save_state, save_tensors, write_checkpoint
from sdxl_trainer.train.integrity import refuse_non_finite_tensors

# Changing these between a checkpoint and its resume changes what the run is; --force accepts it.
RESUME_FIXED = ("batch_size", "crop", "latent", "loss", "discriminator")
TRAINED = ("post_quant_conv.", "decoder.")  # the parameter name prefixes the run trains
VAE_FILE = "vae.safetensors"


def model_fingerprint(cfg: Any) -> dict[str, Any]:
    """The fingerprint of the VAE the run finetunes (the only part of --model it reads)."""
    return {"version": fingerprint.VERSION, "parts": {"vae": fingerprint.part_fingerprint(part_dir(cfg.model, "vae"))}}


def decoder_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in vae.named_parameters() if n.startswith(TRAINED)}


@torch.no_grad()
def load_decoder_state(vae: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in vae.named_parameters() if n.startswith(TRAINED)}
    if set(tensors) != set(params):
        raise UserError("the checkpoint's decoder does not fit this VAE", fix="resume with the same --model")
    for name, value in tensors.items():
        params[name].copy_(value)


def refuse_non_finite(cfg: Any, parts: dict[str, Any]) -> None:
    """Never a checkpoint (or 'latest') of NaN: the decoder, EMA shadows and optimiser state are checked."""
    checked = {"trained weights": decoder_state(parts["vae"])}
    if parts["ema"] is not None:
        checked["EMA weights"] = flatten_state(parts["ema"].state_dict())[0]
    checked["optimizer state"] = flatten_state(parts["optimizer"].state_dict())[0]
    if parts.get("adversary") is not None:
        checked.update(parts["adversary"].checked())
    refuse_non_finite_tensors(checked, step=parts["state"].step, out=Path(cfg.out))


def save(cfg: Any, parts: dict[str, Any]) -> Path:
    """One atomic checkpoint folder: the resume state plus the diffusers VAE folder."""
    vae, ema, state = parts["vae"], parts["ema"], parts["state"]
    base_fp = model_fingerprint(cfg)

    def write(folder: Path) -> None:
        save_tensors(folder / "trainable.safetensors", decoder_state(vae))
        save_state(folder, "state", {
            "train": state.state_dict(), "optimizer": parts["optimizer"].state_dict(),
            "schedule": parts["schedule"].state_dict(), "ema": None if ema is None else ema.state_dict(),
            "config": cfg.model_dump(mode="json"), "model_fingerprint": base_fp,
            "discriminator": None if parts.get("adversary") is None else parts["adversary"].state_dict(),
        })  # fmt: skip
        with exported_weights(cfg, parts):
            vae.save_pretrained(folder / "vae", safe_serialization=True)
            save_vae_file(folder / VAE_FILE, vae, metadata={
                "sdxl_trainer.trained": "decoder (post_quant_conv, decoder); encoder and quant_conv are the base's",
                "sdxl_trainer.step": str(state.step), "sdxl_trainer.ema": str(parts["ema"] is not None
                                                                              and cfg.checkpoints.export_ema).lower(),
                "sdxl_trainer.base_vae_fingerprint": base_fp["parts"]["vae"],
            })  # fmt: skip

    folder = write_checkpoint(Path(cfg.out), f"step-{state.step:06d}", write)
    if cfg.checkpoints.keep_last:
        keep_last(Path(cfg.out), cfg.checkpoints.keep_last)
    return folder


def exported_weights(cfg: Any, parts: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The EMA decoder swapped in (and the trained one put back bit for bit after), when it is the export."""
    if parts["ema"] is not None and cfg.checkpoints.export_ema:
        return parts["ema"].swapped_into(parts["vae"])
    return contextlib.nullcontext()


def resume(cfg: Any, parts: dict[str, Any], folder: Path) -> None:
    """Every part's state from ``folder`` (verified by integrity.check_resume before anything was loaded)."""
    state = load_state(folder, "state")
    warning = fingerprint.check(state.get("model_fingerprint"), model_fingerprint(cfg), parts=("vae",),
                                what="the checkpoint", where=str(folder), model=str(cfg.model),
                                allow=cfg.allow_model_change, fix="resume with the checkpoint's --model")  # fmt: skip
    if warning:
        console.info(f"[yellow]warning: {warning}[/]")
    load_decoder_state(parts["vae"], load_tensors(folder / "trainable.safetensors"))
    parts["optimizer"].load_state_dict(state["optimizer"])
    parts["schedule"].load_state_dict(state["schedule"], strict=not cfg.force)
    if (state["ema"] is None) != (parts["ema"] is None):
        raise UserError("EMA was switched on or off since the checkpoint", where="ema.enabled",
                        fix="resume with the checkpoint's EMA setting, or start a new run")  # fmt: skip
    if parts["ema"] is not None:
        parts["ema"].load_state_dict(state["ema"], strict=not cfg.force)
    parts["state"].load_state_dict(state["train"])
    adversary, saved = parts.get("adversary"), state.get("discriminator")
    if adversary is not None and saved is not None:
        adversary.load_state_dict(saved)
    elif adversary is not None:  # switched on since the checkpoint (--force): it starts fresh
        console.info("[yellow]warning: the checkpoint has no discriminator: a new one starts at this step[/]")
