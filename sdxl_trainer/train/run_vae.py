"""`sdxl train --vae PATH`: the VAE a UNet run exports and samples with, when it is not --model's.

A finetuned decoder (`sdxl train-vae`) belongs in the user's final checkpoint. Only the decoder may
differ: the cache's latents were made by --model's VAE (the cache's model fingerprint says so, checked
in provenance.py), so --vae's encoder and quant_conv must equal that VAE's bit for bit, or the UNet
would learn latents one encoder made and be sampled through a decoder trained for another. A VAE
that differs there is refused at start-up (a warning with ``allow_model_change``). The latent
normalisation stays --model's (its ``scaling_factor``, or latent_stats.json): --vae may not change it.

PATH is what ``--vae`` takes everywhere (models/vae_file.py): a diffusers AutoencoderKL folder, a
`sdxl train-vae` run (its latest checkpoint) or checkpoint folder, or a VAE ``.safetensors``.
"""

from __future__ import annotations

from typing import Any

import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.fingerprint import FLAG
from sdxl_trainer.models.loading import DType, load_vae
from sdxl_trainer.models.vae_file import load_vae_any, same_encoder
from sdxl_trainer.train.checkpoint_dir import latest_checkpoint


def load_run_vae(cfg: Any, *, dtype: DType = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The VAE the run exports and decodes samples with: ``cfg.vae`` when set, else --model's."""
    base = load_vae(cfg.model, dtype=dtype, device=device)
    if getattr(cfg, "vae", None) is None:
        return base
    return load_vae_any(latest_checkpoint(cfg.vae), like=base, dtype=dtype).to(device).eval()


def check_run_vae(cfg: Any) -> str | None:
    """Refuse a --vae whose encoder side is not --model's (the cache's) or whose scaling factor differs;
    returns a warning line when ``allow_model_change`` let a different encoder through."""
    if getattr(cfg, "vae", None) is None:
        return None
    base = load_vae(cfg.model)
    vae = load_vae_any(latest_checkpoint(cfg.vae), like=base)
    if vae.config.get("scaling_factor") != base.config.get("scaling_factor"):
        raise UserError(f"--vae has scaling_factor {vae.config.get('scaling_factor')}, --model's VAE "
                        f"{base.config.get('scaling_factor')}: the cache's latents are scaled for the latter",
                        where=str(cfg.vae), fix="pass a VAE finetuned from --model's (sdxl train-vae)")  # fmt: skip
    if same_encoder(vae, base):
        return None
    message = "--vae has another encoder (encoder, quant_conv) than --model's VAE, which made the cache's latents"
    if cfg.allow_model_change:
        return f"{cfg.vae}: {message}; continuing because of {FLAG}"
    raise UserError(message, where=str(cfg.vae),
                    fix=f"pass a VAE finetuned from --model's (sdxl train-vae trains the decoder only), or {FLAG}")  # fmt: skip
