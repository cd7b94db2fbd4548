"""LoRA on the UNet: both file formats load into the diffusers pipeline and act as W + (alpha/r)·up·down."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export import save_diffusers_pipeline, save_single_file
from sdxl_trainer.models.loading import build_sdxl_part, load_pipeline_parts, load_unet, quiet_hf
from sdxl_trainer.models.lora import (
    add_lora,
    kohya_names,
    load_lora_state_dict,
    lora_state_dict,
    merged_unet,
    save_lora_diffusers,
    save_lora_kohya,
)

RANK, ALPHA = 4, 2.0  # alpha ≠ rank, so a loader that drops alpha gets a different answer



def _randomise(unet, seed=1):
    """Non-zero A and B (the gaussian init leaves B = 0, which would make every format look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """(base UNet, the same UNet with a random rank-4 LoRA on the attention projections)."""
    base = load_unet(tiny_model_dir)
    unet = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA, dropout=0.1)
    _randomise(unet)
    return base, unet.eval()


def _hand_merged(base, unet):
    """W + (alpha/r)·B·A for every adapted module, from the adapter's own A and B."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    sd = lora_state_dict(unet)
    with torch.no_grad():
        for key, down in sd.items():
            if key.endswith("lora_A.weight"):
                up = sd[key.replace("lora_A", "lora_B")]
                modules[key.removesuffix(".lora_A.weight")].weight += (ALPHA / RANK) * up @ down
    return ref


def _forward(unet):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)  # original size, crop, target size
    added = {"text_embeds": torch.randn(2, 64, generator=g), "time_ids": time_ids}
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 600]), context, added_cond_kwargs=added).sample


def _pipeline_with(tiny_model_dir, source):
    from diffusers import StableDiffusionXLPipeline

    with quiet_hf(warnings=True):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipe.load_lora_weights(str(source))
    return pipe


def test_add_lora_trains_only_the_adapter(trained):
    _, unet = trained
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    # tiny UNet: 6 transformer blocks × 2 attentions × 4 projections × (A, B)
    assert len(trainable) == 96 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert unet.peft_config["default"].lora_alpha == ALPHA and unet.peft_config["default"].r == RANK


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "kohya_alpha_rank"])
def test_formats_load_into_the_pipeline_as_the_merged_weights(trained, tiny_model_dir, tmp_path, fmt):
    base, unet = trained
    if fmt == "diffusers":
        source = save_lora_diffusers(tmp_path / "lora", unet).parent
        with safe_open(str(source / "pytorch_lora_weights.safetensors"), "pt") as f:
            keys = list(f.keys())
        # peft's current names, under diffusers' unet. prefix; not the legacy lora.down / lora.up
        assert len(keys) == 96 and all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or
                                       k.endswith(".lora_B.weight")) for k in keys), keys[:4]  # fmt: skip
    else:  # kohya_alpha_rank re-expresses the same ΔW with alpha = rank (up weights rescaled)
        source = save_lora_kohya(tmp_path / "lora.safetensors", unet, alpha=RANK if fmt == "kohya_alpha_rank" else None)
    reference, plain = _forward(_hand_merged(base, unet)), _forward(base)
    assert (reference - plain).abs().max() > 1e-2  # the adapter changes the output
    loaded = _forward(_pipeline_with(tiny_model_dir, source).unet)
    assert torch.allclose(loaded, reference, atol=2e-5), (loaded - reference).abs().max()


def test_kohya_keys_follow_the_ldm_layout(trained, tmp_path):
    _, unet = trained
    path = save_lora_kohya(tmp_path / "lora.safetensors", unet, dtype="fp16")
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # down block 1 (first with attention), layer 0
    assert tensors[f"{name}.lora_down.weight"].shape == (RANK, 64)
    assert tensors[f"{name}.lora_up.weight"].shape == (64, RANK)
    assert tensors[f"{name}.lora_down.weight"].dtype == torch.float16
    assert tensors[f"{name}.alpha"].dtype == torch.float32 and float(tensors[f"{name}.alpha"]) == ALPHA
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.alpha" in tensors
    assert "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v.lora_up.weight" in tensors
    assert all(k.startswith("lora_unet_") for k in tensors) and len(tensors) == 48 * 3
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == "2"


def test_kohya_names_on_full_sdxl():
    unet = add_lora(build_sdxl_part("unet"), rank=16, alpha=16)
    names = set(kohya_names(unet).values())
    # 70 transformer blocks (down 2·2 + 2·10, mid 10, up 3·10 + 3·2) × 2 attentions × 4 projections
    assert len(names) == 560
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k" in names
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0" in names


def test_merged_unet_and_exports(trained, tiny_model_dir, tmp_path):
    base, unet = trained
    merged = merged_unet(unet)
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert torch.allclose(_forward(merged), _forward(_hand_merged(base, unet)), atol=2e-5)
    parts = load_pipeline_parts(tiny_model_dir)
    with pytest.raises(ValueError, match="LoRA adapter"):
        save_single_file(tmp_path / "x.safetensors", unet=unet, vae=parts.vae, text_encoder=parts.text_encoder,
                         text_encoder_2=parts.text_encoder_2)  # fmt: skip
    folder = save_diffusers_pipeline(
        tmp_path / "merged", unet=merged, vae=parts.vae, text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, objective="eps",
    )  # fmt: skip
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_state_round_trip_for_resume(trained):
    base, unet = trained
    fresh = add_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA).eval()
    assert not torch.allclose(_forward(fresh), _forward(unet), atol=1e-3)
    load_lora_state_dict(fresh, lora_state_dict(unet))
    assert torch.equal(_forward(fresh), _forward(unet))


def test_bad_settings_are_user_errors(tiny_model_dir, tmp_path):
    unet = load_unet(tiny_model_dir)
    with pytest.raises(UserError, match="rank"):
        add_lora(unet, rank=0, alpha=1.0)
    with pytest.raises(UserError, match="alpha"):
        add_lora(unet, rank=4, alpha=-1.0)
    with pytest.raises(UserError, match="dropout"):
        add_lora(unet, rank=4, alpha=4.0, dropout=1.0)
    with pytest.raises(UserError, match="target_modules"):
        add_lora(unet, rank=4, alpha=4.0, target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora_kohya(tmp_path / "x.safetensors", load_unet(tiny_model_dir))
