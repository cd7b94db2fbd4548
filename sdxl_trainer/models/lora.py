"""LoRA on the SDXL UNet (via peft) and its two file formats.

A LoRA layer adds ΔW = (alpha/r)·B·A to a frozen weight W (Hu et al. 2021, eq. 3), with A (r × in)
and B (out × r); peft names them ``lora_A``/``lora_B``, kohya ``lora_down``/``lora_up``.

* :func:`save_lora_diffusers`: the diffusers/PEFT file ``pipe.load_lora_weights(folder)`` reads,
  with the LoRA config (rank, alpha, targets) in its header so alpha ≠ rank survives.
* :func:`save_lora_kohya`: the kohya-ss key layout ComfyUI and A1111/Forge read, named after the
  original (ldm) UNet modules: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight``,
  ``….lora_up.weight`` and ``….alpha``.

docs/checkpoint-formats.md has both layouts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sdxl_trainer.schema import normal_permissions, temp_file
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export import unwrap_model
from sdxl_trainer.models.export_ldm import map_keys, unet_module_table
from sdxl_trainer.models.fp8 import fp8_layers
from sdxl_trainer.models.loading import DType, quiet_hf, resolve_dtype

ADAPTER = "default"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of every transformer block
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_config(*, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] = DEFAULT_TARGETS):
    """A peft ``LoraConfig`` after checking the values a user sets in the run config."""
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}", where="lora.rank")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}", where="lora.alpha")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}", where="lora.dropout")
    if isinstance(target_modules, str) or not target_modules:
        raise UserError("LoRA target_modules must be a non-empty list of module names", where="lora.target_modules")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: training starts from the base model exactly
    )


def add_lora(unet, *, rank: int, alpha: float, dropout: float = 0.0, target_modules: Sequence[str] = DEFAULT_TARGETS):
    """Add a trainable LoRA adapter to ``unet`` in place (base weights frozen); returns ``unet``."""
    config = lora_config(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    if ADAPTER in getattr(unet, "peft_config", {}):
        raise ValueError("the UNet already has a LoRA adapter")
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"cannot add LoRA: {str(e).splitlines()[0]}", where="lora.target_modules") from e
    return unet


def _peft_config(unet):
    config = getattr(unet, "peft_config", {}).get(ADAPTER)
    if config is None:
        raise ValueError("the UNet has no LoRA adapter (add one with add_lora)")
    if config.use_rslora or config.use_dora or config.rank_pattern or config.alpha_pattern:
        raise ValueError("only plain LoRA with one rank and alpha is exported (no rsLoRA, DoRA or per-module patterns)")
    return config


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft names (``<module>.lora_A.weight`` / ``.lora_B.weight``)."""
    from peft.utils import get_peft_model_state_dict

    unet = unwrap_model(unet)
    _peft_config(unet)
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER)


def load_lora_state_dict(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Put tensors from :func:`lora_state_dict` back into a UNet that has the same adapter (resume)."""
    from peft.utils import set_peft_model_state_dict

    unet = unwrap_model(unet)
    _peft_config(unet)
    result = set_peft_model_state_dict(unet, state_dict, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        unexpected = result.unexpected_keys[:3]
        raise ValueError(f"LoRA state does not fit this adapter: missing {missing[:3]}, unexpected {unexpected}")


def _lora_layers(unet):
    """(module path, peft LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def merged_unet(unet):
    """A plain UNet (no peft layers) whose weights are W + (alpha/r)·B·A: the LoRA baked in.

    Built on the meta device and filled from the merged state, so memory grows by one UNet's weights.
    """
    unet = unwrap_model(unet)
    _peft_config(unet)
    if fp8_layers(unet):  # merging into the fp8-rounded copy would bake that rounding into the model
        raise ValueError("the UNet's base is stored in fp8 (lora.fp8_base): merge the adapter into the model "
                         "folder's own weights instead (load_unet, add_lora, load_lora_state_dict, merged_unet)")
    state = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    for name, layer in _lora_layers(unet):
        delta = layer.get_delta_weight(ADAPTER)
        state[f"{name}.weight"] = state[f"{name}.weight"] + delta.to(state[f"{name}.weight"].dtype)
    with torch.device("meta"):
        plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, assign=True, strict=True)
    return plain.eval()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    if path.exists():
        raise FileExistsError(f"{path} already exists; pick a new path (checkpoints are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        normal_permissions(tmp)  # safetensors writes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_lora_diffusers(out_dir: Path | str, unet, *, dtype: DType | None = None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in the diffusers/PEFT format; returns the file.

    ``StableDiffusionXLPipeline.load_lora_weights(out_dir)`` loads it. The adapter's LoraConfig is stored
    in the header (diffusers' ``lora_adapter_metadata``): without it a loader would assume alpha = rank.
    """
    from diffusers import StableDiffusionXLPipeline

    unet = unwrap_model(unet)
    config = _peft_config(unet)
    # peft's key names (lora_A / lora_B), as diffusers' loaders and its current training scripts write
    # them; convert_state_dict_to_diffusers would turn them into the legacy lora.down / lora.up
    layers = lora_state_dict(unet)
    if dtype is not None:
        layers = {k: v.to(resolve_dtype(dtype)) for k, v in layers.items()}
    out_dir = Path(out_dir)
    target = out_dir / DIFFUSERS_WEIGHT_NAME
    if target.exists():
        raise FileExistsError(f"{target} already exists; pick a new folder (checkpoints are never overwritten)")
    # The loader rebuilds the LoraConfig from this header. Dropout is a training setting, and the
    # Dropout modules the loader adds start in train mode inside an eval pipeline: inference would
    # drop activations at random. So the file says dropout 0.
    metadata = config.to_dict() | {"lora_dropout": 0.0}
    # diffusers writes the file in place; a temporary name beside it, renamed, keeps a kill from leaving half a file
    tmp_name = f".{DIFFUSERS_WEIGHT_NAME}.tmp"
    with quiet_hf():
        StableDiffusionXLPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=metadata,
            weight_name=tmp_name,
            safe_serialization=True,
        )
    normal_permissions(out_dir / tmp_name)  # safetensors writes owner-only files
    os.replace(out_dir / tmp_name, target)
    return target


def kohya_names(unet) -> dict[str, str]:
    """peft module path → kohya LoRA name (``lora_unet_`` + the ldm module path with ``_`` for ``.``)."""
    unet = unwrap_model(unet)
    modules = [name for name, _ in _lora_layers(unet)]
    ldm = map_keys([f"{m}.weight" for m in modules], unet_module_table(unet.config), prefix="", what="LoRA")
    return {m: "lora_unet_" + ldm[f"{m}.weight"].removesuffix(".weight").replace(".", "_") for m in modules}


def kohya_state_dict(unet, *, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors; ``alpha`` other than the trained one rescales ``lora_up`` so ΔW is unchanged."""
    unet = unwrap_model(unet)
    config = _peft_config(unet)
    trained = float(config.lora_alpha)
    alpha = trained if alpha is None else float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    layers = dict(_lora_layers(unet))
    out = {}
    for module, name in kohya_names(unet).items():
        layer = layers[module]
        down = layer.lora_A[ADAPTER].weight.detach()
        up = layer.lora_B[ADAPTER].weight.detach()
        # ΔW = (alpha/r)·up·down for any alpha as long as up carries trained/alpha
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up if alpha == trained else up * (trained / alpha)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_lora_kohya(path: Path | str, unet, *, alpha: float | None = None, dtype: DType | None = None) -> Path:
    """Write the adapter as one kohya-format ``.safetensors`` (ComfyUI, A1111/Forge); returns ``path``.

    ``alpha`` None keeps the trained alpha. ``dtype`` casts the up/down weights (alpha stays fp32).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA files end in .safetensors, got {path.name}")
    unet = unwrap_model(unet)
    config = _peft_config(unet)
    tensors = kohya_state_dict(unet, alpha=alpha)
    cast = resolve_dtype(dtype) if dtype is not None else None
    tensors = {
        k: (v if cast is None or k.endswith(".alpha") else v.to(cast)).to("cpu").contiguous()
        for k, v in tensors.items()
    }
    alpha_value = float(config.lora_alpha) if alpha is None else float(alpha)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": f"{alpha_value:g}",
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    }
    _atomic_save(tensors, path, metadata)
    return path

