"""diffusers → original SDXL (Stability "sgm"/ldm) key layout, driven by each part's config.

ComfyUI, A1111/Forge and the Stability reference code read one ``.safetensors`` holding all four
parts under these prefixes (docs/checkpoint-formats.md has the full table):

=================================================  ==================================================
prefix                                             part, and how its names differ from diffusers'
=================================================  ==================================================
``model.diffusion_model.``                         UNet: flat ``input_blocks.N`` / ``middle_block.N`` /
                                                   ``output_blocks.N`` lists instead of nested
                                                   down/mid/up blocks; resnet sub-layer renames
``first_stage_model.``                             VAE: ``encoder.down.N.block.M``, decoder levels
                                                   numbered bottom-up; attention as 1×1 convs
``conditioner.embedders.0.transformer.text_model.``  CLIP ViT-L: the transformers layout, unchanged
``conditioner.embedders.1.model.``                 OpenCLIP bigG: fused q/k/v ``in_proj``, its own
                                                   names, ``text_projection`` stored transposed
=================================================  ==================================================

The UNet and VAE maps are built from the config (block count, layers per block, which blocks have
attention), so the same code converts the tiny demo model and SDXL base. Each map is checked to be
one-to-one and to cover every tensor: an architecture it does not know raises instead of writing a
file some tensors are missing from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

# ResnetBlock2D sub-layers: diffusers name → ldm name inside the block.
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # → has attention
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}

ModuleTable = dict[str, tuple[str, Mapping[str, str]]]  # diffusers module → (ldm module, sub-layer renames)


def _per_block(value: Any, n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"UNet config: {name} has {len(values)} entries for {n} blocks")
    return values


def _check_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse UNet variants whose ldm layout this map does not describe (SD1/2/XL-shaped UNets only)."""
    unknown = [t for t in config["down_block_types"] if t not in _DOWN_TYPES]
    unknown += [t for t in config["up_block_types"] if t not in _UP_TYPES]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in (None, "UNetMidBlock2DCrossAttn"):
        unknown.append(config["mid_block_type"])
    if config.get("class_embed_type") is not None:
        unknown.append(f"class_embed_type={config['class_embed_type']}")
    if config.get("addition_embed_type") not in (None, "text_time"):
        unknown.append(f"addition_embed_type={config['addition_embed_type']}")
    if unknown:
        raise ValueError(f"no ldm key layout for a UNet with {', '.join(map(str, unknown))}")


def unet_module_table(config: Mapping[str, Any]) -> ModuleTable:
    """diffusers UNet module paths → ldm ones (SGM ``UNetModel``), from the config alone."""
    _check_unet_config(config)
    n = len(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], n, "layers_per_block")
    table: ModuleTable = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    # ldm numbers every (resnet[, attention]) layer and every downsampler in one flat list; block 0
    # of input_blocks is conv_in. Attention sub-names (transformer_blocks.K.attn1.to_q …) agree.
    index = 1
    for b, kind in enumerate(config["down_block_types"]):
        for layer in range(layers[b]):
            table[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET)
            if _DOWN_TYPES[kind]:
                table[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if b < n - 1:  # every level but the lowest halves the resolution
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    # The decoder side has one layer more per level (it also consumes the downsampler's skip), and
    # its upsampler sits inside the level's last output block, after the attention when there is one.
    index = 0
    for b, (kind, count) in enumerate(zip(config["up_block_types"], reversed(layers), strict=True)):
        attention = _UP_TYPES[kind]
        for layer in range(count + 1):
            table[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET)
            if attention:
                table[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            if b < n - 1 and layer == count:
                table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index}.{2 if attention else 1}.conv", {})
            index += 1
    return table


def vae_module_table(config: Mapping[str, Any]) -> ModuleTable:
    """diffusers AutoencoderKL module paths → ldm ``AutoencoderKL`` ones, from the config alone."""
    n, layers = len(config["block_out_channels"]), int(config["layers_per_block"])
    table: ModuleTable = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", {})
        table[f"{side}.conv_out"] = (f"{side}.conv_out", {})
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", {})
        table[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET)
        table[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
        table[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET)
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        # ldm numbers decoder levels by resolution (up.0 is the full-size one); diffusers by order of use.
        level = n - 1 - i
        for j in range(layers + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return table


def _map_key(key: str, table: ModuleTable) -> str | None:
    """Rename ``key`` through the longest module path of ``table`` it lies under (None if none)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        ldm_module, renames = entry
        rest = ".".join(parts[cut:])
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        return f"{ldm_module}.{rest}"
    return None


def map_keys(keys: Iterable[str], table: ModuleTable, *, prefix: str, what: str) -> dict[str, str]:
    """diffusers key → ldm key for every key; raises when one has no place or two collide."""
    out: dict[str, str] = {}
    for key in keys:
        mapped = _map_key(key, table)
        if mapped is None:
            raise ValueError(f"{what}: no ldm name for {key!r} — an architecture this exporter does not know")
        out[key] = prefix + mapped
    if len(set(out.values())) != len(out):
        raise ValueError(f"{what}: two tensors map to the same ldm name")
    return out


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the ldm layout (``model.diffusion_model.*``); tensors unchanged."""
    names = map_keys(state_dict, unet_module_table(config), prefix=UNET_PREFIX, what="UNet")
    return {names[k]: v for k, v in state_dict.items()}


def _is_vae_attention_matrix(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith(".weight") and "group_norm" not in key


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the ldm layout (``first_stage_model.*``)."""
    names = map_keys(state_dict, vae_module_table(config), prefix=VAE_PREFIX, what="VAE")
    out = {}
    for key, value in state_dict.items():
        # ldm's mid-block attention uses 1×1 convolutions where diffusers uses Linear layers.
        if _is_vae_attention_matrix(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[names[key]] = value
    return out


def clip_l_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (``CLIPTextModel``) under ``conditioner.embedders.0.transformer.text_model.``."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer, rebuilt by every loader (older files carry it)
            continue
        inner = key.removeprefix("text_model.")  # transformers ≥ 5.6 dropped the text_model wrapper
        if not inner.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            raise ValueError(f"text_encoder: unexpected tensor {key!r} — SDXL's first encoder is a CLIPTextModel")
        out[f"{CLIP_L_PREFIX}text_model.{inner}"] = value
    return out


_CLIP_G_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}  # fmt: skip
_CLIP_G_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def clip_g_to_ldm(state_dict: Mapping[str, torch.Tensor], *, num_layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG (from ``CLIPTextModelWithProjection``) under ``conditioner.embedders.1.model.``.

    OpenCLIP's ``nn.MultiheadAttention`` keeps q, k, v as one ``in_proj`` (rows in that order), and
    its ``text_projection`` is a bare matrix applied as ``x @ P``, the transpose of a Linear weight.
    """
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out = {CLIP_G_PREFIX + new: sd.pop(old) for old, new in _CLIP_G_TOP.items() if old in sd}
    if "text_projection.weight" not in sd:
        raise ValueError("text_encoder_2: no text_projection — SDXL's second is a CLIPTextModelWithProjection")
    out[CLIP_G_PREFIX + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for i in range(num_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{CLIP_G_PREFIX}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for old, new in _CLIP_G_LAYER.items():
                out[f"{dst}{new}.{kind}"] = sd.pop(f"{src}{old}.{kind}")
    if sd:
        raise ValueError(f"text_encoder_2: {len(sd)} tensors have no ldm name, e.g. {next(iter(sd))!r}")
    return out
