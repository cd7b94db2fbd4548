"""EMA export: a checkpoint's exported model is the EMA shadow; the training state keeps the raw weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.loading import load_unet
from sdxl_trainer.train import loop
from sdxl_trainer.train.checkpoint_dir import load_state


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 4, "optimizer.learning_rate": 1e-3, "logging.every_steps": 4,
            "checkpoints.diffusers": True, "checkpoints.single_file": True, "checkpoints.dtype": "fp32",
            "checkpoints.every_steps": 2, "data.workers": 1, "logging.tensorboard": False, "ema.enabled": True,
            "ema.decay": 0.5, "ema.warmup": "none"}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


def _shadow(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_state(ckpt, "state")["ema"]["shadow"]


def test_export_is_the_ema_and_resume_stays_bitwise(tiny_model_dir, tiny_work, tmp_path):
    full = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "a"))
    ckpt = Path(full["checkpoint"])
    raw, shadow = load_file(ckpt / "trainable.safetensors"), _shadow(ckpt)
    assert raw.keys() == shadow.keys()
    assert any(not torch.equal(raw[k], shadow[k]) for k in raw)  # decay 0.5: the EMA lags the weights
    exported = dict(load_unet(ckpt / "diffusers").named_parameters())
    assert all(torch.equal(exported[k], shadow[k]) for k in shadow)  # diffusers folder: the EMA
    single = load_file(ckpt / "model.safetensors")
    ldm = export_ldm.unet_to_ldm({k: v.contiguous() for k, v in shadow.items()}, load_unet(ckpt / "diffusers").config)
    assert all(torch.equal(single[k], v) for k, v in ldm.items())  # single file: the EMA
    # the export put the raw weights back: resuming from the middle checkpoint ends bitwise equal
    mid = tmp_path / "a" / "checkpoints" / "step-000002"
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "b", resume=str(mid)))
    other = tmp_path / "b" / "checkpoints" / "step-000004"
    raw_b, shadow_b = load_file(other / "trainable.safetensors"), _shadow(other)
    assert all(torch.equal(raw[k], raw_b[k]) for k in raw) and all(torch.equal(shadow[k], shadow_b[k]) for k in shadow)


def test_export_ema_off_exports_the_raw_weights(tiny_model_dir, tiny_work, tmp_path):
    summary = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "a", num_steps=2, **{
        "checkpoints.export_ema": False, "checkpoints.single_file": False}))  # fmt: skip
    ckpt = Path(summary["checkpoint"])
    raw = load_file(ckpt / "trainable.safetensors")
    exported = dict(load_unet(ckpt / "diffusers").named_parameters())
    assert all(torch.equal(exported[k], raw[k]) for k in raw)
    assert any(not torch.equal(exported[k], v) for k, v in _shadow(ckpt).items())


def test_lora_export_is_the_ema_adapter(tiny_model_dir, tiny_work, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / "a", num_steps=2, **{"lora.enabled": True, "lora.rank": 2})
    ckpt = Path(loop.run(cfg)["checkpoint"])
    raw, shadow = load_file(ckpt / "trainable.safetensors"), _shadow(ckpt)
    lora_files = sorted((ckpt / "lora").glob("*.safetensors"))
    assert lora_files
    adapter = load_file(lora_files[0])
    # the saved adapter's tensors are the shadow's values, not the raw ones (matched by value: names differ)
    values = list(adapter.values())

    def saved(t: torch.Tensor) -> bool:
        return any(v.shape == t.shape and torch.equal(v.float(), t) for v in values)

    shadow_b = [v for k, v in shadow.items() if "lora_B" in k]
    raw_b = [v for k, v in raw.items() if "lora_B" in k]
    assert shadow_b and len(shadow_b) == len(raw_b)
    assert all(saved(s) for s in shadow_b)
    assert not all(saved(r) for r in raw_b)
