"""The tiny SDXL-architecture demo model: real diffusers/transformers classes at small widths.

Nothing here downloads anything. :func:`build_tiny_model` writes a complete diffusers folder that
``StableDiffusionXLPipeline.from_pretrained`` loads, with weights seeded by ``seed``:

==============  ==========================================  ===========================================
part            tiny                                        SDXL base 1.0
==============  ==========================================  ===========================================
unet            2 levels (32, 64), attention at 8×8,        3 levels (320, 640, 1280), attention at
                ≈1.5 M params                               the two lower levels, 2.57 G params
cross-attn dim  32 + 64 = 96                                768 + 1280 = 2048
text_time       64 pooled + 6·8 time ids = 112              1280 pooled + 6·256 time ids = 2816
vae             4 levels (8× down), 4 latent channels,      the same layout at (128, 256, 512, 512)
                scaling_factor 0.13025, fitted to the
                synthetic renders (vae_fit.py)
text encoders   CLIP, 2 layers, hidden 32 and 64            CLIP ViT-L (768) and OpenCLIP bigG (1280)
tokenizers      CLIP BPE, a few hundred tokens              CLIP BPE, 49,408 tokens
scheduler       EulerDiscreteScheduler, SDXL's config       the same
==============  ==========================================  ===========================================

At :data:`TINY_RESOLUTION` (128 px, 16×16 latents) a UNet training step at batch 8 takes ≈0.08 s
on 2 CPU cores. The UNet and text encoders are random; the VAE is fitted at build time (unless
``fit_vae=False``) so that decoded pixels mean something, e.g. in the black-image test.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console
from sdxl_trainer.models import tokenizer_kit, vae_fit
from sdxl_trainer.synthetic import render, synthetic_items

TINY_RESOLUTION = 128
# A bucket set for the demo at TINY_RESOLUTION (the keys of sdxl_trainer.config.BucketConfig).
DEMO_BUCKETS: dict[str, int] = {"max_area": 128 * 128, "step": 32, "min_side": 64, "max_side": 256, "base": 128}

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION, TIME_EMBED_DIM = 32, 64, 64, 8


def unet_config() -> dict[str, Any]:
    """SDXL's UNet layout (DownBlock2D first, cross-attention below, text_time conditioning), tiny."""
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4),  # diffusers' name for the head count (SDXL: 5, 10, 20): 16 channels a head
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * TIME_EMBED_DIM,
    )


def vae_config() -> dict[str, Any]:
    """An AutoencoderKL with SDXL's layout: 4 levels (three 2× downsamples = 8×), 4 latent channels.

    One departure from SDXL's VAE, so that :func:`fit_tiny_vae` converges in under a minute: 4
    GroupNorm groups (8–16 channels a group; 32 groups at these widths is one or two channels a
    group, which erases flat colours). The mid-block attention stays, so exports carry SDXL's keys.
    """
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,
        force_upcast=True,
    )


# Seeds derive from the kit's seed as seed·16 + part (see _seeded): the VAE's fit gets its own.
_VAE_FIT_PART = 5
VAE_FIT_IMAGES = 200  # synthetic renders drawn for the fit, before thinning solid black and white


def vae_fit_images(*, seed: int, n: int = VAE_FIT_IMAGES):
    """The synthetic renders the demo VAE is fitted on (PIL images), solid black and white thinned to 1 in 4.

    Black and white are 40% of the synthetic set but are learned in the first few dozen steps; the
    fit's steps go further on colours and edges when they are rarer.
    """
    items = synthetic_items(n, seed=seed)
    bw = [i for i, it in enumerate(items) if it.shape is None and it.background in ("black", "white")]
    drop = set(bw) - set(bw[::4])
    return [render(it) for i, it in enumerate(items) if i not in drop]


def fit_tiny_vae(vae, *, seed: int = 0, settings: vae_fit.FitSettings = vae_fit.FitSettings()) -> list[float]:
    """Train the kit's VAE on synthetic renders (see :mod:`sdxl_trainer.models.vae_fit`); returns the losses.

    Deterministic for ``seed`` and ``settings`` on a given machine; the caller's global RNG is untouched.
    Shows a progress bar with the loss (and, when stdout is not a terminal, a plain line every tenth
    of the steps or 30 s): on a busy machine the fit can take many times its minute.
    """
    part_seed = seed * 16 + _VAE_FIT_PART
    pool = vae_fit.pixel_pool(vae_fit_images(seed=part_seed), seed=part_seed, area=TINY_RESOLUTION**2)
    with torch.random.fork_rng(devices=[]), console.step_progress("fit demo VAE", settings.steps) as advance:
        return vae_fit.fit_vae(vae, pool, seed=part_seed, settings=settings,
                               on_step=lambda step, loss: advance(f"loss {loss:.4f}"))  # fmt: skip


def text_encoder_configs(vocab_size: int, bos_id: int, eos_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIP text configs: (ViT-L-like, quick_gelu) and (bigG-like with projection, gelu), 77 positions."""
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=1,
        layer_norm_eps=1e-5,
    )
    te1 = dict(common, hidden_size=TE1_HIDDEN, intermediate_size=4 * TE1_HIDDEN, hidden_act="quick_gelu")
    te1["projection_dim"] = TE1_HIDDEN
    te2 = dict(common, hidden_size=TE2_HIDDEN, intermediate_size=4 * TE2_HIDDEN, hidden_act="gelu")
    te2["projection_dim"] = TE2_PROJECTION
    return te1, te2


def _seeded(seed: int, part: int, build):
    """Build one part under its own seed (``seed``, ``part``), leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 16 + part)
        return build()


def build_tiny_model(out_dir: Path | str, *, seed: int = 0, fit_vae: bool = True, fit_threads: int = 2) -> Path:
    """Write the tiny SDXL pipeline (diffusers layout) to ``out_dir``; returns ``out_dir``.

    ``fit_vae`` trains the VAE on synthetic renders so it reconstructs them (about a minute on 2
    cores) with ``fit_threads`` intra-op threads (the fit is bitwise reproducible for a given count);
    without it every part is random and the build takes seconds.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_trainer.models.loading import load_clip_tokenizer, quiet_hf, read_part_config

    with quiet_hf(warnings=True):
        from diffusers import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        tok1, tok2 = (
            load_clip_tokenizer(tokenizer_kit.write_tokenizer_folder(Path(tmp) / name, pad_token=pad))
            for name, pad in (("tokenizer", tokenizer_kit.EOS), ("tokenizer_2", "!"))
        )
    vocab_size = len(tok1)
    te1_cfg, te2_cfg = text_encoder_configs(vocab_size, tok1.bos_token_id, tok1.eos_token_id)
    vae = _seeded(seed, 1, lambda: AutoencoderKL(**vae_config()))
    if fit_vae:
        fit_tiny_vae(vae, seed=seed, settings=vae_fit.FitSettings(num_threads=fit_threads))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_seeded(seed, 2, lambda: CLIPTextModel(CLIPTextConfig(**te1_cfg))),
        text_encoder_2=_seeded(seed, 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))),
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=_seeded(seed, 0, lambda: UNet2DConditionModel(**unet_config())),
        scheduler=EulerDiscreteScheduler.from_config(read_part_config("scheduler")),  # SDXL's own
        force_zeros_for_empty_prompt=True,
    )
    with quiet_hf():
        pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        # Recent transformers save only tokenizer.json: keep CLIP's own files too (older readers need
        # them), and drop the loading options transformers copies into the saved config.
        tokenizer_kit.write_tokenizer_files(out_dir / name)
        config_path = out_dir / name / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("is_local", "local_files_only"):
            config.pop(key, None)
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
