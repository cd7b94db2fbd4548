"""The single-file export: original SDXL key layout, read back by diffusers' own single-file loaders."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.export import ldm_state_dict, save_single_file
from sdxl_trainer.models.loading import build_sdxl_part, quiet_hf

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")




@pytest.fixture(scope="module")
def sdxl_meta():
    """Full-size SDXL base parts on the meta device: the architecture, no weights."""
    return {part: build_sdxl_part(part) for part in PARTS}


def _modules(parts):
    return {name: getattr(parts, name) for name in PARTS}


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _same(a, b, cast=None):
    """Same keys, and every tensor bitwise equal (after casting ``a`` to ``cast``)."""
    assert set(a) == set(b)
    bad = [k for k in a if not torch.equal(a[k] if cast is None else a[k].to(cast), b[k])]
    assert not bad, bad[:5]


def test_fp32_file_loads_back_bitwise_in_diffusers(parts, tiny_model_dir, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    path = save_single_file(tmp_path / "model.safetensors", **_modules(parts), dtype="fp32")
    offline = {"config": str(tiny_model_dir), "local_files_only": True}
    with quiet_hf(warnings=True):
        unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **offline)
        vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **offline)
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), **offline)
    _same(parts.unet.state_dict(), unet.state_dict())
    _same(parts.vae.state_dict(), vae.state_dict())
    for name in PARTS:
        _same(getattr(parts, name).state_dict(), getattr(pipe, name).state_dict())


def test_fp16_file_holds_the_cast_weights(parts, tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    path = save_single_file(tmp_path / "model.safetensors", **_modules(parts))  # fp16 is the default
    tensors, meta = _read(path)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and "v_pred" not in tensors
    with quiet_hf(warnings=True):
        unet = UNet2DConditionModel.from_single_file(
            str(path), config=str(tiny_model_dir), subfolder="unet", local_files_only=True, torch_dtype=torch.float16
        )
    _same(parts.unet.state_dict(), unet.state_dict(), cast=torch.float16)


@pytest.mark.parametrize(("objective", "markers", "prediction"), [
    ("eps", set(), "epsilon"), ("v", {"v_pred"}, "v"), ("v_ztsnr", {"v_pred", "ztsnr"}, "v"), ("flow", set(), None),
])  # fmt: skip
def test_objective_markers_comfyui_reads(parts, tmp_path, objective, markers, prediction):
    extra = {"ss_note": "x"}
    path = save_single_file(tmp_path / "m.safetensors", **_modules(parts), objective=objective, metadata=extra)
    tensors, meta = _read(path)
    top_level = {k for k in tensors if "." not in k}
    assert top_level == markers
    assert all(tensors[k].numel() == 0 for k in markers)
    assert meta.get("modelspec.prediction_type") == prediction
    assert meta["sdxl_trainer.objective"] == objective and meta["ss_note"] == "x"


def test_text_encoder_layouts(parts):
    sd = ldm_state_dict(**_modules(parts))
    te1, te2 = parts.text_encoder.state_dict(), parts.text_encoder_2.state_dict()
    l_prefix, g_prefix = export_ldm.CLIP_L_PREFIX, export_ldm.CLIP_G_PREFIX
    # CLIP-L keeps the transformers names under text_model.
    final_norm = next(v for k, v in te1.items() if k.endswith("final_layer_norm.weight"))  # text_model. or not
    assert torch.equal(sd[l_prefix + "text_model.final_layer_norm.weight"], final_norm)
    assert sum(k.startswith(l_prefix) for k in sd) == len([k for k in te1 if not k.endswith("position_ids")])
    # OpenCLIP: q, k, v stacked in that order; the projection applied as x @ P.
    attn = parts.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = sd[g_prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    x = torch.randn(3, parts.text_encoder_2.config.hidden_size)
    assert torch.allclose(x @ sd[g_prefix + "text_projection"], parts.text_encoder_2.text_projection(x), atol=1e-6)
    assert torch.equal(sd[g_prefix + "positional_embedding"], te2["text_model.embeddings.position_embedding.weight"])
    # VAE mid-block attention as 1×1 convolutions.
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1)


def test_sdxl_unet_map_is_a_bijection_with_the_known_layout(sdxl_meta):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sdxl_meta["unet"]
    sd = unet.state_dict()
    table = export_ldm.unet_module_table(unet.config)
    names = export_ldm.map_keys(sd, table, prefix=export_ldm.UNET_PREFIX, what="UNet")
    assert len(sd) == len(set(names.values())) == 1680  # sd_xl_base_1.0: 1680 model.diffusion_model.* tensors
    ldm = export_ldm.unet_to_ldm(sd, unet.config)
    assert all(ldm[names[k]].shape == v.shape for k, v in sd.items())
    known = {  # names and shapes as in Stability's sd_xl_base_1.0.safetensors
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
        "label_emb.0.0.weight": (1280, 2816),
        "time_embed.2.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in known.items():
        assert tuple(ldm[export_ldm.UNET_PREFIX + key].shape) == shape, key
    assert not any(k.startswith(export_ldm.UNET_PREFIX + "output_blocks.9") for k in ldm)
    # diffusers' own ldm → diffusers converter takes every tensor back to where it came from.
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)


def test_sdxl_vae_and_text_encoder_maps(sdxl_meta):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = sdxl_meta["vae"]
    sd = vae.state_dict()
    ldm = export_ldm.vae_to_ldm(sd, vae.config)
    assert len(ldm) == len(sd) == 248
    assert ldm["first_stage_model.decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ldm["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(sd) and all(back[k].shape == sd[k].shape for k in sd)
    clip_l = export_ldm.clip_l_to_ldm(sdxl_meta["text_encoder"].state_dict())
    clip_g = export_ldm.clip_g_to_ldm(sdxl_meta["text_encoder_2"].state_dict(), num_layers=32)
    assert len(clip_l) == 196  # the file's 197th, position_ids, is a buffer loaders rebuild
    assert len(clip_g) == 32 * 12 + 5  # the file's logit_scale (CLIP's contrastive temperature) is not a text weight
    assert clip_g[export_ldm.CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert clip_g[export_ldm.CLIP_G_PREFIX + "text_projection"].shape == (1280, 1280)


def test_unknown_architectures_and_bad_paths_are_refused(parts, tmp_path):
    config = dict(parts.unet.config, down_block_types=("DownBlock2D", "AttnDownBlock2D"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        export_ldm.unet_module_table(config)
    with pytest.raises(ValueError, match="no ldm name"):
        export_ldm.unet_to_ldm({"extra_head.weight": torch.zeros(1)}, parts.unet.config)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        export_ldm.clip_g_to_ldm(parts.text_encoder.state_dict(), num_layers=2)
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(tmp_path / "model.ckpt", **_modules(parts))
    (tmp_path / "taken.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError):
        save_single_file(tmp_path / "taken.safetensors", **_modules(parts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
