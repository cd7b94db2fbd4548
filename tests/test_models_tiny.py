"""The offline demo kit: a tiny SDXL-architecture pipeline that diffusers loads and runs on CPU."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from sdxl_trainer.models import tokenizer_kit
from sdxl_trainer.models.loading import load_tokenizers
from sdxl_trainer.models.tiny import DEMO_BUCKETS, TINY_RESOLUTION, build_tiny_model

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def test_layout_is_a_diffusers_sdxl_folder(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in PARTS:
        assert (tiny_model_dir / part).is_dir(), part
        assert part in index
    for tok in ("tokenizer", "tokenizer_2"):
        assert (tiny_model_dir / tok / "vocab.json").is_file()
        assert (tiny_model_dir / tok / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_stable_diffusion_xl_pipeline_loads_and_generates_on_cpu(tiny_model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "solid color, black background",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    img = out.images
    assert img.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(img).all()
    assert img.std() > 0  # something was decoded, not a constant fill


def test_architecture_is_sdxl_shaped(tiny_model_dir):
    unet = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    te1 = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    te2 = json.loads((tiny_model_dir / "text_encoder_2" / "config.json").read_text())
    sched = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())

    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert "CrossAttnDownBlock2D" in unet["down_block_types"] and unet["down_block_types"][0] == "DownBlock2D"
    assert unet["sample_size"] * 8 == TINY_RESOLUTION
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == 4  # three 2× downsamples = 8×
    assert vae["scaling_factor"] == 0.13025
    assert te1["max_position_embeddings"] == te2["max_position_embeddings"] == 77
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    expected = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading")  # fmt: skip
    assert {k: sched[k] for k in expected} == expected


def test_unet_is_small_but_real(tiny_model_dir):
    weights = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    n = sum(t.numel() for t in weights.values())
    assert 1_000_000 <= n <= 3_000_000
    assert any("attn2.to_k" in k for k in weights)  # cross-attention exists in the low-res block


def test_seeded_weights_leave_the_global_rng_alone(tmp_path, tiny_model_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_model(tmp_path / "again", seed=0, fit_vae=False)
    assert torch.equal(torch.rand(3), expected)
    other = build_tiny_model(tmp_path / "other", seed=1, fit_vae=False)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        a = load_file(tiny_model_dir / part / f"{name}.safetensors")
        b = load_file(again / part / f"{name}.safetensors")
        c = load_file(other / part / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_tokenizers_pad_like_sdxl(tiny_model_dir):
    tok1, tok2 = load_tokenizers(tiny_model_dir)
    assert tok1.pad_token == tokenizer_kit.EOS and tok2.pad_token == "!"
    assert tok2.pad_token_id == 0  # "!" is the first byte of CLIP's alphabet
    assert tok1.model_max_length == tok2.model_max_length == 77
    ids = tok2("red circle", padding="max_length", max_length=77)["input_ids"]
    assert ids[0] == tok2.bos_token_id and ids[3] == tok2.eos_token_id and set(ids[4:]) == {0}


def test_every_demo_word_is_one_token_and_other_words_still_tokenize(tiny_model_dir):
    tok1, _ = load_tokenizers(tiny_model_dir)
    for word in tokenizer_kit.DEMO_WORDS:
        assert len(tok1(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok1("zebra", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok1.unk_token_id not in ids
    assert tok1.decode(ids) == "zebra"


def test_vocabulary_has_clips_layout():
    vocab, merges = tokenizer_kit.build_vocab()
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[tokenizer_kit.BOS] == len(vocab) - 2 and vocab[tokenizer_kit.EOS] == len(vocab) - 1
    assert all(a + b in vocab for a, b in merges)


def test_demo_buckets_fit_the_tiny_resolution():
    from sdxl_trainer.config import BucketConfig

    buckets = BucketConfig(**DEMO_BUCKETS)
    assert buckets.base == TINY_RESOLUTION and buckets.max_area == TINY_RESOLUTION**2

