"""Loading SDXL parts from local folders: the tiny kit, and broken copies of it."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models import loading


@pytest.fixture
def kit_copy(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_loads_every_part(tiny_model_dir):
    parts = loading.load_pipeline_parts(tiny_model_dir, dtype="fp32")
    assert parts.tokenizer.pad_token != parts.tokenizer_2.pad_token == "!"
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.unet.config.addition_embed_type == "text_time"
    assert parts.vae.config.latent_channels == 4
    assert parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    for module in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
        assert not module.training
        assert next(module.parameters()).dtype == torch.float32


def test_dtype_is_applied(tiny_model_dir):
    te1, te2 = loading.load_text_encoders(tiny_model_dir, dtype="bf16")
    unet = loading.load_unet(tiny_model_dir, dtype=torch.bfloat16)
    vae = loading.load_vae(tiny_model_dir, dtype="fp16")
    assert {next(m.parameters()).dtype for m in (te1, te2, unet)} == {torch.bfloat16}
    assert next(vae.parameters()).dtype == torch.float16


def test_loaded_weights_are_the_saved_ones(tiny_model_dir):
    from safetensors.torch import load_file

    unet = loading.load_unet(tiny_model_dir)
    saved = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("name", ["fp32", "float32", "fp16", "half", "bf16", "bfloat16"])
def test_resolve_dtype_names(name):
    assert isinstance(loading.resolve_dtype(name), torch.dtype)


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(UserError, match="unknown dtype"):
        loading.resolve_dtype("fp8")


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        loading.load_unet(tmp_path / "nope")


def test_hub_id_is_refused_with_the_download_command():
    with pytest.raises(UserError, match="huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0"):
        loading.load_tokenizers("stabilityai/stable-diffusion-xl-base-1.0")


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        loading.load_unet(f)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        loading.load_vae(tmp_path)


def test_non_sdxl_pipeline_is_refused(kit_copy):
    _edit_json(kit_copy / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(UserError, match="'StableDiffusionPipeline', not an SDXL pipeline"):
        loading.load_text_encoders(kit_copy)


def test_missing_part_names_it(kit_copy):
    shutil.rmtree(kit_copy / "text_encoder_2")
    with pytest.raises(UserError, match=r"no text_encoder_2/ in .* is this an SDXL diffusers folder\?"):
        loading.load_text_encoders(kit_copy)
    with pytest.raises(UserError, match="no text_encoder_2/"):
        loading.load_pipeline_parts(kit_copy)
    loading.load_unet(kit_copy)  # the parts that are there still load


def test_missing_part_config(kit_copy):
    (kit_copy / "unet" / "config.json").unlink()
    with pytest.raises(UserError, match="no unet/config.json"):
        loading.load_unet(kit_copy)


def test_unet_without_text_time_is_not_sdxl(kit_copy):
    _edit_json(kit_copy / "unet" / "config.json", addition_embed_type=None)
    with pytest.raises(UserError, match="not 'text_time'"):
        loading.load_unet(kit_copy)


def test_missing_weights(kit_copy):
    (kit_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights in"):
        loading.load_vae(kit_copy)


def test_corrupt_weights(kit_copy):
    (kit_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load UNet"):
        loading.load_unet(kit_copy)


def test_fp16_variant_only_folder_loads(kit_copy, tiny_model_dir):
    for part, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (kit_copy / part / f"{stem}.safetensors").rename(kit_copy / part / f"{stem}.fp16.safetensors")
    unet = loading.load_unet(kit_copy)
    te1, _ = loading.load_text_encoders(kit_copy)
    ref = loading.load_unet(tiny_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), ref.parameters()))
    assert te1 is not None


def test_wrong_text_encoder_weights_are_refused(kit_copy):
    # text_encoder_2 holding ViT-L-sized weights without a projection: transformers would only warn.
    shutil.rmtree(kit_copy / "text_encoder_2")
    shutil.copytree(kit_copy / "text_encoder", kit_copy / "text_encoder_2")
    with pytest.raises(UserError, match="text_encoder_2 weights do not fit CLIPTextModelWithProjection"):
        loading.load_text_encoders(kit_copy)


def test_separate_vae_folder(tmp_path, tiny_model_dir):
    vae_dir = Path(shutil.copytree(tiny_model_dir / "vae", tmp_path / "my-vae"))
    _edit_json(vae_dir / "config.json", scaling_factor=0.5)
    assert loading.load_vae(tiny_model_dir, vae=vae_dir).config.scaling_factor == 0.5
    # a whole pipeline folder passed as --vae: its vae/ is taken
    assert loading.load_vae(tiny_model_dir, vae=tiny_model_dir).config.scaling_factor == 0.13025


def test_separate_vae_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="VAE folder not found"):
        loading.load_vae(tiny_model_dir, vae=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL folder"):
        loading.load_vae(tiny_model_dir, vae=tmp_path / "empty")
    vae_dir = Path(shutil.copytree(tiny_model_dir / "vae", tmp_path / "flux-vae"))
    _edit_json(vae_dir / "config.json", latent_channels=16)
    with pytest.raises(UserError, match="16 latent channels is not an SDXL VAE"):
        loading.load_vae(tiny_model_dir, vae=vae_dir)


def test_broken_tokenizer_folder(kit_copy):
    shutil.rmtree(kit_copy / "tokenizer_2")
    (kit_copy / "tokenizer_2").mkdir()
    with pytest.raises(UserError, match="no tokenizer files"):
        loading.load_tokenizers(kit_copy)


def _uses_from_pretrained(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.Attribute) and n.attr == "from_pretrained" for n in ast.walk(tree))


def test_from_pretrained_is_used_only_in_loading():
    pkg = Path(loading.__file__).resolve().parents[1]
    users = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if _uses_from_pretrained(p))
    assert users == ["models/loading.py"]
