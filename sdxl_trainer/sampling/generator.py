"""The :class:`Generator`: everything needed to turn prompts into images, however it was obtained.

`sdxl generate` fills one from a checkpoint on disk (evaluate/checkpoint.py: ``load_generator``);
the trainer fills one with the UNet it is training, text embeddings encoded once at start-up (the
encoders are then freed) and a VAE loaded only while it samples (train/samples.py). Either way the
objective comes from the export info (:func:`objective_from_info`) and the latent normalisation from
:func:`latent_affine`, so both paths sample with the same σ_max, shift and normalisation.
:func:`encode_text` and :func:`decode_latents` are the two ends every sampler run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sdxl_trainer.diffusion import Objective, build_objective
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.text import count_chunks, encode_prompts

GUIDANCE_SPACE = {"eps": "eps", "v": "v", "flow": "flow"}  # objective.prediction → CFG-rescale space


@dataclass
class Generator:
    """Everything needed to turn prompts into images with the diffusion core's samplers.

    ``text_encoder`` None: the prompts were encoded ahead of time into ``text_cache``, keyed by
    (prompt, negative, max_chunks) (see :func:`encode_text`); ``vae`` None: no decoding until one is set.
    """

    unet: Any
    vae: Any
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any
    objective: Objective  # its table ends at the trained σ_max (flow: t = 1)
    info: dict  # the export info: objective, sigma_max, flow_shift, latent_normalization, origin
    latent_shift: torch.Tensor  # (C,): z_raw = z/scale + shift
    latent_scale: torch.Tensor  # (C,)
    base_resolution: int  # the side the UNet was built for (sample_size × VAE factor)
    side_multiple: int  # image sides must be multiples of this (VAE factor × UNet downsampling)
    vae_factor: int  # pixels per latent position along a side (SDXL: 8)
    device: torch.device
    dtype: torch.dtype
    source: dict = field(default_factory=dict)
    text_cache: dict = field(default_factory=dict)

    @property
    def flow_shift(self) -> float | None:
        """The shift the flow model was trained with (None for the σ-space objectives)."""
        return self.info.get("flow_shift") if self.objective.prediction == "flow" else None

    @property
    def guidance_space(self) -> str:
        return GUIDANCE_SPACE[self.objective.prediction]


def objective_from_info(info: dict) -> Objective:
    """The :class:`Objective` of an export info, with the σ_max (and table form) the model was trained on."""
    name = info["objective"]
    trained = ((info.get("config") or {}).get("objective")) or {}
    if name == "flow":
        return build_objective("flow")
    if name == "v_ztsnr":
        return build_objective(name, sigma_max=info.get("sigma_max"), ztsnr_rescale=trained.get("ztsnr_rescale", True))
    return build_objective(name, sigma_max=trained.get("sigma_max"))


def latent_affine(norm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with z = (z_raw − shift)·scale: per-channel (mean, 1/std) or (0, scaling_factor)."""
    if norm["kind"] == "per_channel":
        return torch.tensor(norm["mean"], dtype=torch.float32), 1.0 / torch.tensor(norm["std"], dtype=torch.float32)
    if norm["kind"] == "scaling_factor":
        return torch.zeros(4), torch.full((4,), float(norm["scaling_factor"]))
    raise UserError(f"unknown latent normalisation {norm['kind']!r}", fix="re-export the checkpoint")


def geometry(*, unet_config: dict, vae_config: dict) -> dict[str, int]:
    """base_resolution, side_multiple and vae_factor of a UNet/VAE pair, from their configs."""
    # diffusers' FrozenDict is a dict, so a module's .config and a config.json read as a dict both index
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return {"base_resolution": int(unet_config["sample_size"]) * vae_factor, "side_multiple": vae_factor * unet_factor,
            "vae_factor": vae_factor}  # fmt: skip


@torch.no_grad()
def encode_pairs(tokenizers: tuple, encoders: tuple, prompts: list[str], negatives: list[str], *, max_chunks: int,
                 device: torch.device, dtype: torch.dtype):  # fmt: skip
    """(cond, uncond) as (hidden, pooled) pairs for each prompt/negative pair, all at one chunk count."""
    tok1, tok2 = tokenizers
    n = max(count_chunks(tok1, t, max_chunks=max_chunks) for t in [*prompts, *negatives])
    out = []
    for texts in (prompts, negatives):
        hidden, pooled = encode_prompts(tok1, tok2, *encoders, texts, max_chunks=max_chunks, n_chunks=n,
                                        device=device)  # fmt: skip
        out.append((hidden.to(dtype), pooled.to(dtype)))
    return out[0], out[1]


def encode_text(generator: Generator, prompts: list[str], negatives: list[str], *, max_chunks: int = 3):
    """(cond, uncond) UNet kwargs for each prompt/negative pair, both at the same chunk count.

    The negative is encoded like any prompt (the empty prompt by default), as the trainer's
    unconditional dropout feeds the encoded empty prompt, not zeros. A generator without text
    encoders answers a single pair from its ``text_cache`` (filled by :func:`fill_text_cache`).
    """
    g = generator
    if g.text_encoder is not None:
        return encode_pairs((g.tokenizer, g.tokenizer_2), (g.text_encoder, g.text_encoder_2), prompts, negatives,
                            max_chunks=max_chunks, device=g.device, dtype=g.dtype)  # fmt: skip
    key = (prompts[0], negatives[0], max_chunks) if len(prompts) == len(negatives) == 1 else None
    if key not in g.text_cache:
        raise ValueError(f"prompt {prompts!r} / negative {negatives!r} was not encoded ahead of time")
    return g.text_cache[key]


def fill_text_cache(generator: Generator, tokenizers: tuple, encoders: tuple, pairs: list[tuple[str, str]], *,
                    max_chunks: int) -> None:  # fmt: skip
    """Encode each (prompt, negative) pair exactly as :func:`encode_text` would, one pair at a time."""
    for prompt, negative in dict.fromkeys(pairs):
        generator.text_cache[(prompt, negative, max_chunks)] = encode_pairs(
            tokenizers, encoders, [prompt], [negative], max_chunks=max_chunks, device=generator.device,
            dtype=generator.dtype)  # fmt: skip


def unet_kwargs(hidden: torch.Tensor, pooled: torch.Tensor, *, height: int, width: int) -> dict:
    """SDXL's conditioning: text states, pooled text and time ids (h, w, 0, 0, h, w) — an uncropped image.

    The time ids stay fp32, as in training: the UNet embeds them in fp32, and bf16 cannot hold e.g. 1017.
    """
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=hidden.device)
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(hidden.shape[0], -1)},
    }


@torch.no_grad()
def decode_latents(generator: Generator, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents → RGB in [0, 1] (B, 3, H, W), fp32: z_raw = z/scale + shift, then the VAE."""
    g = generator
    if g.vae is None:
        raise ValueError("this generator has no VAE loaded")
    view = (1, -1, 1, 1)
    raw = z.float().to(g.device) / g.latent_scale.view(view) + g.latent_shift.view(view)
    pixels = g.vae.decode(raw.to(next(g.vae.parameters()).dtype)).sample.float()
    return ((pixels + 1) / 2).clamp(0, 1)
