"""Files we write are readable by other users (issue #16): 0666/0777 less the umask, not mkstemp's
owner-only 0600/0700 — a ComfyUI or a teammate running as another user loads our checkpoints."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdxl_trainer.models.export import save_diffusers_pipeline, save_single_file
from sdxl_trainer.models.lora import add_lora, save_lora_diffusers, save_lora_kohya
from sdxl_trainer.schema import write_json


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask_022():
    before = os.umask(0o022)
    from sdxl_trainer import schema

    schema._umask.cache_clear()
    yield
    os.umask(before)
    schema._umask.cache_clear()


def test_artifacts_and_exports_get_normal_permissions(parts, tmp_path, tiny_work, umask_022):
    modules = dict(unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    single = save_single_file(tmp_path / "model.safetensors", **modules, dtype="fp32")
    folder = save_diffusers_pipeline(tmp_path / "pipe", **modules, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, objective="eps")  # fmt: skip
    write_json({"x": 1}, tmp_path / "a.json", artifact="test", config={})
    assert _mode(single) == 0o644 and _mode(tmp_path / "a.json") == 0o644
    assert _mode(Path(folder)) == 0o755
    assert all(_mode(p) == (0o755 if p.is_dir() else 0o644) for p in Path(folder).rglob("*")), \
        {str(p): oct(_mode(p)) for p in Path(folder).rglob("*")}  # fmt: skip
    # the stages' artifacts (the session's WORK, written by scan, stats, cache and weights)
    for name in ("manifest.parquet", "latent_stats.json", "tag_weights.parquet", "cache/cache_meta.json"):
        assert _mode(tiny_work / name) & 0o044 == 0o044, name  # group and others may read
    shards = list((tiny_work / "cache").rglob("*.parquet"))
    assert shards and all(_mode(p) & 0o044 == 0o044 for p in shards)


def test_lora_files_get_normal_permissions(tiny_model_dir, tmp_path, umask_022):
    from sdxl_trainer.models.loading import load_unet

    unet = add_lora(load_unet(tiny_model_dir), rank=2, alpha=2.0)
    kohya = save_lora_kohya(tmp_path / "lora.safetensors", unet)
    folder = save_lora_diffusers(tmp_path / "lora", unet)
    assert _mode(kohya) == 0o644
    assert all(_mode(p) == 0o644 for p in Path(folder).rglob("*") if p.is_file())


def test_the_umask_is_respected(tmp_path):
    from sdxl_trainer import schema

    before = os.umask(0o077)
    schema._umask.cache_clear()
    try:
        write_json({"x": 1}, tmp_path / "private.json", artifact="test", config={})
        assert _mode(tmp_path / "private.json") == 0o600
    finally:
        os.umask(before)
        schema._umask.cache_clear()


def test_checkpoint_folders_get_normal_permissions(tmp_path, umask_022):
    import torch

    from sdxl_trainer.train.checkpoint_dir import save_tensors, write_checkpoint

    def writer(folder: Path) -> None:
        save_tensors(folder / "trainable.safetensors", {"w": torch.ones(3)})  # safetensors alone writes 0600
        (folder / "sub").mkdir(mode=0o700)

    final = write_checkpoint(tmp_path / "run", "step-000001", writer)
    assert _mode(final) == 0o755 and _mode(final / "sub") == 0o755
    assert _mode(final / "trainable.safetensors") == 0o644 and _mode(final / "checkpoint.json") == 0o644
