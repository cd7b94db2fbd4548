"""`sdxl train` with ``vae``: the exported pipeline and single file carry that VAE (a `train-vae`
decoder), and a VAE whose encoder is not the one that made the cache is refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.loading import load_vae
from sdxl_trainer.models.vae_file import save_vae_file
from sdxl_trainer.train import loop


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 1, "optimizer.learning_rate": 1e-3, "checkpoints.diffusers": True,
            "checkpoints.single_file": True, "checkpoints.dtype": "fp32", "data.workers": 1,
            "logging.tensorboard": False}  # fmt: skip
    return load_config(TrainConfig, None, {**base, **overrides})


def _variant(model: Path, folder: Path, side: str) -> torch.nn.Module:
    """--model's VAE with one ``side`` ("decoder" or "encoder") changed, saved as a folder and a file."""
    vae = load_vae(model)
    with torch.no_grad():
        getattr(vae, side).conv_out.bias.add_(0.25)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    save_vae_file(folder / "vae.safetensors", vae)
    return vae


@pytest.mark.parametrize("form", ["vae.safetensors", "vae"])
def test_export_carries_the_given_decoder(tiny_model_dir, tiny_work, tmp_path, form):
    tuned = _variant(tiny_model_dir, tmp_path / "tuned", "decoder")
    summary = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "run", vae=str(tmp_path / "tuned" / form)))
    ckpt = Path(summary["checkpoint"])
    want = tuned.state_dict()
    got = load_vae(ckpt / "diffusers").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # the pipeline's vae/: the finetuned VAE
    single = load_file(ckpt / "model.safetensors")
    ldm = export_ldm.vae_to_ldm(want, tuned.config)
    assert all(torch.equal(single[k], v) for k, v in ldm.items())  # and the single file's first_stage_model
    base = load_vae(tiny_model_dir).state_dict()
    assert not torch.equal(got["decoder.conv_out.bias"], base["decoder.conv_out.bias"])


def test_another_encoder_is_refused_before_training(tiny_model_dir, tiny_work, tmp_path):
    _variant(tiny_model_dir, tmp_path / "other", "encoder")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"--vae has another encoder \(encoder, quant_conv\) than --model's VAE") as e:
        loop.run(_cfg(tiny_model_dir, tiny_work, out, vae=str(tmp_path / "other" / "vae.safetensors")))
    assert "\n" not in str(e.value) and not (out / "checkpoints").exists()
    with pytest.raises(UserError, match="VAE not found"):
        loop.run(_cfg(tiny_model_dir, tiny_work, out, vae=str(tmp_path / "missing")))
