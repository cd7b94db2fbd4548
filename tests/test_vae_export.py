"""The finetuned VAE leaving `sdxl train-vae`: the original-layout ``vae.safetensors`` (diffusers' own
single-file loader reads it back), ``--vae`` on `sdxl generate` / `sdxl evaluate`, and the model
fingerprint a resume is checked against."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import GenerateConfig, VaeTrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate import generate
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.models.export import save_diffusers_pipeline, save_single_file
from sdxl_trainer.models.loading import load_vae, quiet_hf
from sdxl_trainer.models.vae_file import load_vae_any, same_encoder, vae_state_from_file
from sdxl_trainer.sampling.generator import decode_latents
from sdxl_trainer.vae_train import loop

BASE = {"device": "cpu", "precision": "fp32", "crop": 32, "batch_size": 8, "latent": "mean",
        "optimizer.learning_rate": 3e-4, "logging.tensorboard": False}  # fmt: skip
SIDE = 32


@pytest.fixture(scope="module")
def vae_work(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> Path:
    from sdxl_trainer.demo import demo_scan_config
    from sdxl_trainer.prep import scan

    root = tmp_path_factory.mktemp("vae_work")
    data = Path(shutil.copytree(synthetic_data_dir, root / "data"))
    scan.run(demo_scan_config(data, root / "work", tiny_model_dir))
    return root / "work"


def _cfg(model: Path, work: Path, out: Path, **kw) -> VaeTrainConfig:
    return load_config(VaeTrainConfig, None, {"model": str(model), "work": str(work), "out": str(out), **BASE, **kw})


@pytest.fixture(scope="module")
def run(tiny_model_dir, vae_work, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_run") / "run"
    summary = loop.run(_cfg(tiny_model_dir, vae_work, out, num_steps=6, **{"checkpoints.every_steps": 3}))
    return out, Path(summary["checkpoint"])


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def test_vae_file_is_the_original_layout_and_loads_in_diffusers(run, tiny_model_dir):
    from diffusers import AutoencoderKL

    _, ckpt = run
    path = ckpt / "vae.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert "encoder.down.0.block.0.norm1.weight" in keys and "decoder.mid.attn_1.q.weight" in keys
    assert meta["sdxl_trainer.kind"] == "vae" and meta["sdxl_trainer.step"] == "6"
    assert meta["sdxl_trainer.trained"].startswith("decoder") and len(meta["sdxl_trainer.base_vae_fingerprint"]) == 32
    with quiet_hf(warnings=True):  # offline: the architecture from the tiny model's vae/config.json
        loaded = AutoencoderKL.from_single_file(str(path), config=str(tiny_model_dir), subfolder="vae",
                                                local_files_only=True).eval()  # fmt: skip
    folder = AutoencoderKL.from_pretrained(ckpt / "vae").eval()
    ours, base = loaded.state_dict(), load_vae(tiny_model_dir).state_dict()
    assert ours.keys() == folder.state_dict().keys()
    assert all(torch.equal(ours[k], folder.state_dict()[k]) for k in ours)  # the diffusers folder, bitwise
    encoder = [k for k in ours if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(ours[k], base[k]) for k in encoder)  # the base's encoder
    assert not all(torch.equal(ours[k], base[k]) for k in ours if k.startswith("decoder."))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_decode(loaded, z), _decode(folder, z))
    # our own reader gives the same VAE
    mine = load_vae_any(path, like=load_vae(tiny_model_dir))
    assert torch.equal(_decode(mine, z), _decode(folder, z)) and same_encoder(mine, folder)
    weights = load_vae_any(ckpt / "vae" / "diffusion_pytorch_model.safetensors", like=load_vae(tiny_model_dir))
    assert torch.equal(_decode(weights, z), _decode(folder, z))  # a diffusers-layout file is read as it is


def test_foreign_files_and_paths_are_refused(run, parts, tiny_model_dir, tmp_path):
    like = load_vae(tiny_model_dir)
    save_file({"model.diffusion_model.x": torch.zeros(2)}, tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match="no VAE tensors"):
        load_vae_any(tmp_path / "unet.safetensors", like=like)
    (tmp_path / "junk.safetensors").write_bytes(b"0123456789abcdef")
    with pytest.raises(UserError, match="cannot read the safetensors file"):
        load_vae_any(tmp_path / "junk.safetensors", like=like)
    with pytest.raises(UserError, match="VAE not found"):
        load_vae_any(tmp_path / "nowhere", like=like)
    # a file missing one tensor
    with safe_open(str(run[1] / "vae.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "decoder.conv_out.bias"}
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(UserError, match="tensors missing, e.g. decoder.conv_out.bias"):
        load_vae_any(tmp_path / "cut.safetensors", like=like)
    # a whole-model single file: its VAE (first_stage_model.*)
    whole = save_single_file(tmp_path / "model.safetensors", unet=parts.unet, vae=parts.vae,
                             text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2, dtype="fp32")  # fmt: skip
    state = vae_state_from_file(whole, like)
    assert all(torch.equal(state[k], v) for k, v in parts.vae.state_dict().items())


@pytest.fixture(scope="module")
def model_ckpt(parts, tmp_path_factory):
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    return save_diffusers_pipeline(tmp_path_factory.mktemp("ckpt") / "eps", objective="eps",
                                   **{n: getattr(parts, n) for n in names})  # fmt: skip


@pytest.mark.parametrize("form", ["folder", "file", "run"])
def test_generate_with_vae_decodes_with_that_vae(run, model_ckpt, tmp_path, form):
    out, ckpt = run
    vae_path = {"folder": ckpt / "vae", "file": ckpt / "vae.safetensors", "run": out}[form]
    base = load_generator(model_ckpt, device="cpu", dtype="fp32")
    tuned = load_generator(model_ckpt, device="cpu", dtype="fp32", vae=vae_path)
    assert tuned.source["vae"] == str(vae_path)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = decode_latents(base, z), decode_latents(tuned, z)
    assert (a - b).abs().max() > 1e-3  # another decoder
    from diffusers import AutoencoderKL

    with torch.no_grad():
        expected = decode_latents(dataclasses.replace(base, vae=AutoencoderKL.from_pretrained(ckpt / "vae")), z)
    assert torch.equal(b, expected)  # exactly the finetuned decoder's decode of the same latents
    # the whole command: same seed, different pixels; the PNG equals the base run's latents decoded by the new VAE
    cfg = dict(checkpoint=model_ckpt, prompt=["red circle"], steps=2, width=SIDE, height=SIDE, seed=3, device="cpu",
               dtype="fp32")  # fmt: skip
    [plain] = generate.run(GenerateConfig(**cfg, out=tmp_path / "plain"))
    [new] = generate.run(GenerateConfig(**cfg, out=tmp_path / "new", vae=vae_path))
    pa, pb = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, new))
    assert np.abs(pa - pb).max() > 2


def test_generate_png_equals_the_base_latents_decoded_by_the_new_vae(run, model_ckpt, tmp_path):
    from sdxl_trainer.sampling.sample import SamplingOptions, sample_latents

    _, ckpt = run
    base = load_generator(model_ckpt, device="cpu", dtype="fp32")
    tuned = load_generator(model_ckpt, device="cpu", dtype="fp32", vae=ckpt / "vae.safetensors")
    options = SamplingOptions(steps=2, cfg_scale=5.0)
    za = sample_latents(base, prompt="red circle", seed=3, width=SIDE, height=SIDE, options=options)
    zb = sample_latents(tuned, prompt="red circle", seed=3, width=SIDE, height=SIDE, options=options)
    assert torch.equal(za, zb)  # the VAE changes decoding only
    [png] = generate.run(GenerateConfig(checkpoint=model_ckpt, prompt=["red circle"], steps=2, width=SIDE, height=SIDE,
                                        seed=3, device="cpu", dtype="fp32", out=tmp_path / "o",
                                        vae=ckpt / "vae.safetensors"))  # fmt: skip
    with torch.no_grad():
        pixels = decode_latents(tuned, za)[0]
    expected = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(png).convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_vae_flag_evaluate_and_one_line_errors(run, model_ckpt, tmp_path):
    _, ckpt = run
    report = tmp_path / "report"
    r = _cli("evaluate", str(model_ckpt), "--out", str(report), "--check", "black", "--steps", "2", "--seed", "0",
             "--vae", str(ckpt / "vae.safetensors"), "--device", "cpu", "--base-resolution", str(SIDE))
    assert r.exit_code == 0, r.output
    assert (report / "metrics.json").is_file() and "black" in json.loads((report / "metrics.json").read_text())
    for bad, message in ((tmp_path / "missing", "VAE not found"), (model_ckpt / "model_index.json", "not a VAE file")):
        r = _cli("generate", str(model_ckpt), "-p", "x", "--steps", "1", "--width", str(SIDE), "--height", str(SIDE),
                 "--device", "cpu", "--vae", str(bad), "--out", str(tmp_path / "g"))
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    r = _cli("generate", str(model_ckpt), "-p", "x", "--vae", str(tmp_path / "bad.safetensors"), "--device", "cpu",
             "--out", str(tmp_path / "g"))
    assert r.exit_code == 2 and "not a VAE of this model's architecture" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "g").exists()


def test_resume_with_another_model_vae_is_refused(run, tiny_model_dir, vae_work, tmp_path):
    from sdxl_trainer.train.checkpoint_dir import load_state

    out, ckpt = run
    recorded = load_state(ckpt, "state")["model_fingerprint"]
    assert recorded["version"] == 1 and set(recorded["parts"]) == {"vae"}
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other"))
    vae = load_vae(other)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    shutil.rmtree(other / "vae")
    vae.save_pretrained(other / "vae", safe_serialization=True)
    run_copy = Path(shutil.copytree(out, tmp_path / "run"))
    with pytest.raises(UserError, match="the checkpoint was made with another vae than"):
        loop.run(_cfg(other, vae_work, run_copy, num_steps=7, resume="latest", **{"checkpoints.every_steps": 3}))
    summary = loop.run(_cfg(other, vae_work, run_copy, num_steps=7, resume="latest", allow_model_change=True,
                            **{"checkpoints.every_steps": 3}))  # fmt: skip
    assert summary["steps"] == 7
