"""The SDXL base 1.0 configs shipped as package data build the full-size architecture."""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import build_sdxl_part, read_part_config, sdxl_config_dir

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's weights.
PARAMS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


@pytest.mark.parametrize("part", list(PARAMS))
def test_full_size_parameter_counts_on_meta(part):
    model = build_sdxl_part(part, device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) == PARAMS[part]


def test_the_folder_is_a_complete_config_tree():
    root = sdxl_config_dir()
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json"):  # fmt: skip
        assert (root / rel).is_file(), rel
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_configs_agree_with_each_other():
    unet, te1, te2 = (read_part_config(p) for p in ("unet", "text_encoder", "text_encoder_2"))
    vae, sched = read_part_config("vae"), read_part_config("scheduler")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"] == 2816
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == vae["sample_size"] == 1024
    assert vae["scaling_factor"] == 0.13025
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")


def test_scheduler_config_matches_the_reference_schedule():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(read_part_config("scheduler"))
    acp = sched.alphas_cumprod.double()
    sigma = ((1 - acp) / acp).sqrt()
    assert acp[999].item() == pytest.approx(0.004660095, abs=1e-8)
    assert sigma[999].item() == pytest.approx(14.6146412, rel=1e-5)


def test_small_random_build_runs(tmp_path):
    # A real (allocated) module built from the same config path, shrunk: the builder works off meta too.
    cfg = read_part_config("vae")
    cfg.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    vae = build_sdxl_part("vae", config_dir=tmp_path, device="cpu")
    out = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert out.shape == (1, 4, 8, 8)


def test_unknown_part_is_an_error():
    with pytest.raises(UserError, match="unknown SDXL part"):
        build_sdxl_part("controlnet")
