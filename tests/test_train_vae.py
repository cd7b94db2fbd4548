"""`sdxl train-vae`: decoder-only updates, a short run that improves the held-out metrics, an exact
resume after SIGKILL, the exported diffusers folder, and one-line refusals of bad inputs.

The tiny kit's VAE is random here (conftest: fit_vae=False): fine for the mechanics, and a random
decoder has much to learn, so a 40-update run on 32 px crops improves held-out L1 and PSNR clearly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import VaeTrainConfig, load_config
from sdxl_trainer.models.loading import load_vae
from sdxl_trainer.vae_train import loop
from sdxl_trainer.vae_train.quality import MS_SSIM_MIN_SIDE, make_loss

# the settings every run here shares: mean latents (a random encoder's posterior std is ≈1: sampled
# latents are mostly noise), a rate a random decoder learns from in 40 updates
BASE = {"device": "cpu", "precision": "fp32", "crop": 32, "batch_size": 8, "latent": "mean",
        "optimizer.learning_rate": 3e-4, "logging.tensorboard": False}  # fmt: skip


@pytest.fixture(scope="module")
def vae_work(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> Path:
    """WORK with only a manifest: `train-vae` reads images, not the cache."""
    from sdxl_trainer.demo import demo_scan_config
    from sdxl_trainer.prep import scan

    root = tmp_path_factory.mktemp("vae_work")
    data = Path(shutil.copytree(synthetic_data_dir, root / "data"))
    scan.run(demo_scan_config(data, root / "work", tiny_model_dir))
    return root / "work"


def _cfg(model: Path, work: Path, out: Path, **kw) -> VaeTrainConfig:
    return load_config(VaeTrainConfig, None, {"model": str(model), "work": str(work), "out": str(out), **BASE, **kw})


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_update_moves_the_decoder_only(tiny_model_dir, vae_work, tmp_path):
    from sdxl_trainer.train.state import TrainState

    cfg = _cfg(tiny_model_dir, vae_work, tmp_path / "run", latent="sample")
    vae = loop.build_vae(cfg, torch.device("cpu"))
    before = _params(vae)
    trained = [p for p in vae.parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, p in vae.named_parameters() if p.requires_grad} == {"decoder", "post_quant_conv"}
    assert not vae.encoder.training and not vae.quant_conv.training and vae.decoder.training
    parts = {"state": TrainState(), "optimizer": torch.optim.AdamW(trained, lr=1e-3), "ema": None}
    loss_fn, _ = make_loss(crop=32, l1_weight=1.0, ssim_weight=0.2)
    crops = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        result = loop.update(vae, crops, loss_fn=loss_fn, parts=parts, cfg=cfg, params=trained,
                             generator=torch.Generator().manual_seed(1), autocast=None)  # fmt: skip
    after = _params(vae)
    assert not result["skipped"] and parts["state"].updates == 2 and 0 < result["loss"] < 2
    frozen = [n for n in before if n.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # bitwise unchanged
    moved = [n for n in before if n.startswith(("decoder.", "post_quant_conv.")) and not torch.equal(before[n], after[n])]
    assert len(moved) > 0.9 * sum(n.startswith(("decoder.", "post_quant_conv.")) for n in before)


def test_loss_names_ssim_or_ms_ssim():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small, name = make_loss(crop=32, l1_weight=1.0, ssim_weight=0.5)
    assert "single-scale SSIM" in name and small(x, x).item() == pytest.approx(0.0, abs=1e-6)
    big, name = make_loss(crop=MS_SSIM_MIN_SIDE + 7, l1_weight=1.0, ssim_weight=0.5)
    assert "MS-SSIM" in name and "single" not in name
    y = torch.rand(1, 3, 168, 168, generator=torch.Generator().manual_seed(1))
    assert big(y, y).item() == pytest.approx(0.0, abs=1e-5) and big(y, 1 - y).item() > 0.3


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, vae_work, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_run") / "run"
    summary = loop.run(_cfg(tiny_model_dir, vae_work, out, num_steps=40, **{"checkpoints.every_steps": 20}))
    return out, summary


def test_short_run_improves_held_out_metrics(short_run):
    out, summary = short_run
    rows = (out / "vae_eval.csv").read_text().splitlines()
    assert rows[0] == "step,l1,psnr,ssim" and [int(r.split(",")[0]) for r in rows[1:]] == [0, 20, 40]
    before, after = summary["before"], summary["after"]
    assert before["step"] == 0 and after["step"] == 40 and summary["held_out"] == 16
    # measured: L1 0.375 → 0.274, PSNR 8.2 → 9.9 dB (docs/vae.md)
    assert after["l1"] < before["l1"] - 0.05 and after["psnr"] > before["psnr"] + 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["eval_l1"] == pytest.approx(before["l1"])
    assert records[-1]["step"] == 40 and records[-1]["eval_psnr"] == pytest.approx(after["psnr"])
    assert all(r["loss"] > 0 for r in records[1:]) and records[-1]["lr"] == {"decoder/decay": 3e-4, "decoder/no_decay": 3e-4}
    grid = Image.open(out / "vae_grid.png")
    assert grid.size == (8 * 34 - 2, 3 * 34 - 2)  # 8 crops of 32 px, original / before / after, 2 px gaps


def test_export_loads_in_diffusers_and_decodes_like_the_trainer(short_run, tiny_model_dir):
    from diffusers import AutoencoderKL

    out, summary = short_run
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step-000040" and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step-000020", "step-000040"]  # fmt: skip
    exported = AutoencoderKL.from_pretrained(ckpt / "vae").eval()
    base = load_vae(tiny_model_dir)
    ours, theirs = _params(exported), _params(base)
    assert ours.keys() == theirs.keys()
    encoder = [n for n in ours if n.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(ours[n], theirs[n]) for n in encoder)  # bitwise the base encoder
    # the trainer's decoder: the base VAE with the checkpoint's trained tensors put in
    trained = load_file(ckpt / "trainable.safetensors")
    assert set(trained) == {n for n in ours if n.startswith(("decoder.", "post_quant_conv."))}
    assert not all(torch.equal(trained[n], theirs[n]) for n in trained)
    base.load_state_dict(trained, strict=False)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(exported.decode(z).sample, base.decode(z).sample)


RUNNER = """
import json, sys
from sdxl_trainer.config import VaeTrainConfig, load_config
from sdxl_trainer.vae_train import loop
loop.run(load_config(VaeTrainConfig, None, json.loads(sys.argv[1])))
"""


# with the discriminator on (vae_train/discriminator.py) from update 4: killed after it has trained,
# its weights and Adam state (in state.safetensors) must come back exact too
GAN = {"loss.gan_weight": 0.5, "loss.gan_start_step": 3, "discriminator.channels": 16}


@pytest.mark.parametrize(("extra", "kill_after"), [({}, 4), (GAN, 6)], ids=["pixel-loss", "gan"])
def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, vae_work, tmp_path, extra, kill_after):
    n = 12
    settings = {"model": str(tiny_model_dir), "work": str(vae_work), **BASE, "latent": "sample", "num_steps": n,
                "checkpoints.every_steps": 1, "checkpoints.keep_last": 2, "ema.enabled": True, "ema.decay": 0.9,
                "schedule.kind": "cosine", "schedule.warmup_samples": 16, "eval.every_steps": 5, **extra}  # fmt: skip
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), json.dumps({**settings, "out": str(killed)})], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= f"step-{kill_after:06d}":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = latest.read_text().strip()
    assert proc.returncode == -signal.SIGKILL and at_kill < f"step-{n:06d}", "the run finished before the kill"

    for where in ({"out": str(killed), "resume": "latest"}, {"out": str(tmp_path / "straight")}):
        subprocess.run([sys.executable, str(script), json.dumps({**settings, **where})], check=True, timeout=300,
                       env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    final = [d / "checkpoints" / f"step-{n:06d}" for d in (tmp_path / "straight", killed)]
    for name in ("trainable.safetensors", "state.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(final[0] / name), load_file(final[1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    saved_d = [k for k in load_file(final[1] / "state.safetensors") if k.startswith("discriminator.")]
    assert bool(saved_d) == bool(extra)  # the discriminator's weights and Adam moments, with gan on
    # each step logged once, and the held-out rows the same as the uninterrupted run's
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == n
    assert (killed / "vae_eval.csv").read_text() == (tmp_path / "straight" / "vae_eval.csv").read_text()


def _cli(*args: str):
    return CliRunner().invoke(app, ["train-vae", *args, "--device", "cpu", "--set", "logging.tensorboard=false"])


def test_bad_inputs_are_one_line_errors(tiny_model_dir, vae_work, tmp_path):
    out = tmp_path / "run"
    # crop larger than every image
    r = _cli(str(vae_work), "--model", str(tiny_model_dir), "--out", str(out), "--crop", "512")
    assert r.exit_code == 2 and "have both sides ≥ crop 512 px (largest short side: 346)" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    # a crop the VAE cannot take
    r = _cli(str(vae_work), "--model", str(tiny_model_dir), "--out", str(out), "--crop", "36")
    assert r.exit_code == 2 and "crop=36 must be a multiple of 8" in r.output
    # a model without vae/
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    shutil.rmtree(model / "vae")
    r = _cli(str(vae_work), "--model", str(model), "--out", str(out), "--crop", "32")
    assert r.exit_code == 2 and "no vae/" in r.output and len(r.output.strip().splitlines()) == 1
    # no kept image in the manifest
    data = tmp_path / "broken"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    assert CliRunner().invoke(app, ["-q", "prep", "scan", str(data), "--out", str(tmp_path / "w")]).exit_code == 0
    r = _cli(str(tmp_path / "w"), "--model", str(tiny_model_dir), "--out", str(out))
    assert r.exit_code == 2 and "no usable (status ok) images" in r.output and len(r.output.strip().splitlines()) == 1
