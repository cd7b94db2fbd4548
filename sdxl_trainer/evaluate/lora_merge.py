"""Merge a LoRA file into a plain UNet's weights for sampling: W ← W + s·(alpha/r)·up·down.

No peft, no pipeline: the two formats `sdxl train` writes (docs/checkpoint-formats.md) are read with
safetensors and added into the weights in place, in fp32, then cast back.

* diffusers/PEFT (``pytorch_lora_weights.safetensors``, or its folder): keys
  ``unet.<module>.lora.down.weight``/``lora.up.weight`` (or peft's ``lora_A``/``lora_B``); rank and
  alpha from the ``lora_adapter_metadata`` header (without it alpha = rank, as diffusers assumes).
* kohya (``lora_unet_<ldm module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``): module names
  are mapped back through the same ldm table the exporter uses.

Text-encoder adapters are refused (our trainer does not write them; merging only the UNet half of a
file would quietly change the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export_ldm import map_keys, unet_module_table
from sdxl_trainer.models.lora import DIFFUSERS_WEIGHT_NAME

_PEFT_SUFFIXES = {
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
}  # fmt: skip
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def lora_file(path: Path | str) -> Path:
    """The weights file of a LoRA path: the file itself, or ``folder/pytorch_lora_weights.safetensors``."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file() or path.suffix != ".safetensors":
        raise UserError("LoRA file not found", where=str(path),
                        fix=f"give a .safetensors LoRA or a folder holding {DIFFUSERS_WEIGHT_NAME}")  # fmt: skip
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error types
        raise UserError(f"cannot read the LoRA file ({e})", where=str(path)) from e


def _split(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, role in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _group(tensors: dict[str, torch.Tensor], suffixes: dict[str, str], path: Path) -> dict[str, dict]:
    """module → {"down", "up"[, "alpha"]} tensors; anything else in the file is an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        split = _split(key, suffixes)
        if split is None:
            raise UserError(f"unexpected tensor {key!r} in a LoRA file", where=str(path),
                            fix="only plain LoRA (down/up, optional alpha) on the UNet is supported")  # fmt: skip
        groups.setdefault(split[0], {})[split[1]] = value
    incomplete = [m for m, g in groups.items() if not {"down", "up"} <= set(g)]
    if incomplete:
        raise UserError(f"LoRA module {incomplete[0]!r} lacks its down or up weight", where=str(path))
    return groups


def _peft_alpha(meta: dict[str, str], path: Path) -> tuple[float | None, int | None]:
    """(alpha, rank) from diffusers' adapter metadata; (None, None) when absent."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, None
    doc = {k.removeprefix("unet."): v for k, v in json.loads(raw).items()}
    if doc.get("rank_pattern") or doc.get("alpha_pattern") or doc.get("use_dora") or doc.get("use_rslora"):
        raise UserError("LoRA with per-module ranks, DoRA or rsLoRA is not supported here", where=str(path))
    return float(doc["lora_alpha"]), int(doc["r"])


def _peft_updates(tensors, meta, path: Path, unet) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    if any(k.startswith(("text_encoder", "te_")) for k in tensors):
        raise UserError("this LoRA also adapts the text encoders, which is not supported here", where=str(path))
    stripped = {k.removeprefix("unet."): v for k, v in tensors.items()}
    alpha, rank = _peft_alpha(meta, path)
    out = []
    for module, g in _group(stripped, _PEFT_SUFFIXES, path).items():
        r = g["down"].shape[0]
        if rank is not None and r != rank:
            raise UserError(f"LoRA module {module!r} has rank {r}, the header says {rank}", where=str(path))
        out.append((module, g["down"], g["up"], (alpha if alpha is not None else r) / r))
    return out


def kohya_module_names(unet) -> dict[str, str]:
    """kohya LoRA name → diffusers module path, for every weight-carrying module of ``unet``."""
    weights = [k for k in unet.state_dict() if k.endswith(".weight")]
    ldm = map_keys(weights, unet_module_table(unet.config), prefix="", what="LoRA")
    return {"lora_unet_" + ldm[k].removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight") for k in weights}


def _kohya_updates(tensors, path: Path, unet) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    if any(k.startswith("lora_te") for k in tensors):
        raise UserError("this LoRA also adapts the text encoders, which is not supported here", where=str(path))
    names = kohya_module_names(unet)
    out = []
    for name, g in _group(tensors, _KOHYA_SUFFIXES, path).items():
        if name not in names:
            raise UserError(f"LoRA module {name!r} has no place in this UNet", where=str(path),
                            fix="is the adapter for another architecture?")  # fmt: skip
        r = g["down"].shape[0]
        alpha = float(g["alpha"]) if "alpha" in g else float(r)
        out.append((names[name], g["down"], g["up"], alpha / r))
    return out


def _delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up·down in the weight's shape (linear, or a 1×1 convolution stored 4-D)."""
    d, u = down.float().flatten(1), up.float().flatten(1)
    if d.shape[1] * u.shape[0] != shape.numel():
        raise ValueError(f"LoRA factors {tuple(up.shape)}·{tuple(down.shape)} do not fit a weight {tuple(shape)}")
    return (u @ d).reshape(shape)


@torch.no_grad()
def merge_lora(unet, path: Path | str, *, scale: float = 1.0) -> int:
    """Add ``scale``·ΔW of the LoRA at ``path`` into ``unet``'s weights in place; returns modules changed."""
    file = lora_file(path)
    tensors, meta = _read(file)
    is_kohya = any(k.startswith("lora_unet_") for k in tensors)
    updates = _kohya_updates(tensors, file, unet) if is_kohya else _peft_updates(tensors, meta, file, unet)
    modules = dict(unet.named_modules())
    for module, down, up, factor in updates:
        layer = modules.get(module)
        if layer is None or not hasattr(layer, "weight"):
            raise UserError(f"LoRA module {module!r} has no place in this UNet", where=str(file),
                            fix="is the adapter for another architecture?")  # fmt: skip
        try:
            delta = _delta(down, up, layer.weight.shape)
        except ValueError as e:
            raise UserError(f"{module}: {e}", where=str(file)) from None
        merged = layer.weight.float() + (scale * factor) * delta.to(layer.weight.device)
        layer.weight.copy_(merged.to(layer.weight.dtype))
    return len(updates)
