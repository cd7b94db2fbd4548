"""`sdxl train --data-dir … --finetune-vae`: train-vae into RUN/vae/ after the scan, then the UNet as
before; the same command again skips the finished VAE run, a longer --vae-steps resumes it; the flags
outside the one-command path are one-line refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sdxl_trainer import cli
from sdxl_trainer.models.loading import load_vae

PREP = {"scan": {"min_side": 64}, "cache": {"device": "cpu", "batch_size": 16},
        "vae": {"crop": 32, "batch_size": 4, "latent": "mean", "eval": {"holdout_count": 4, "grid_images": 2}}}
TRAIN = ["--resolution", "128", "--batch-size", "4", "--device", "cpu", "--precision", "fp32",
         "--set", "checkpoints.single_file=false", "--set", "checkpoints.diffusers=false",
         "--set", "logging.tensorboard=false", "--set", "data.workers=1", "--num-steps", "2"]  # fmt: skip


@pytest.fixture()
def setup(tmp_path, synthetic_data_dir, tiny_model_dir):
    data = Path(shutil.copytree(synthetic_data_dir, tmp_path / "data"))
    for extra in sorted(data.iterdir())[24 * 2 :]:  # 24 images (and their sidecars): quicker stages
        extra.unlink()
    prep = tmp_path / "prep.yaml"
    prep.write_text(yaml.safe_dump(PREP))
    args = ["train", "--data-dir", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
            "--prep-config", str(prep), *TRAIN]  # fmt: skip
    return tmp_path, args


def _sdxl(args: list[str]):
    return CliRunner().invoke(cli.app, args, catch_exceptions=False)


def _stages(output: str) -> list[str]:
    return [line.strip().split(" →")[0] for line in output.splitlines() if line.startswith("── ")]


def test_finetune_vae_runs_after_the_scan_then_is_skipped_or_resumed(setup, tiny_model_dir):
    tmp, args = setup
    first = _sdxl([*args, "--finetune-vae", "--vae-steps", "2", "--vae_learning_rate", "2e-4"])
    assert first.exit_code == 0, first.output
    assert _stages(first.output) == ["── 1/4 prep scan", "── 2/4 train-vae", "── 3/4 prep cache", "── 4/4 train"]
    run, vae_run = tmp / "run", tmp / "run" / "vae"
    assert (vae_run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"  # the UNet trained as before
    vae_cfg = yaml.safe_load((vae_run / "config.yaml").read_text())
    assert (vae_cfg["optimizer"]["learning_rate"], vae_cfg["num_steps"], vae_cfg["crop"]) == (2e-4, 2, 32)
    # from the train flags: device, precision, logging; WORK is the one-command WORK
    assert (vae_cfg["device"], vae_cfg["precision"], vae_cfg["logging"]["tensorboard"]) == ("cpu", "fp32", False)
    assert Path(vae_cfg["work"]) == run / "work"
    assert [r.split(",")[0] for r in (vae_run / "vae_eval.csv").read_text().splitlines()] == ["step", "0", "2"]
    folder = vae_run / "checkpoints" / "step-000002" / "vae"
    printed = "".join(first.output.split())  # the console wraps long paths anywhere
    assert "".join(f"finetuned VAE (decoder; pairs with this run's UNet): {folder}".split()) in printed
    # the encoder is the base model's: the cache (and the UNet's latents) are what they were without it
    from diffusers import AutoencoderKL

    ours, base = AutoencoderKL.from_pretrained(folder).state_dict(), load_vae(tiny_model_dir).state_dict()
    assert all(torch.equal(ours[k], base[k]) for k in ours if k.startswith(("encoder.", "quant_conv.")))

    again = _sdxl([*args, "--finetune-vae", "--vae-steps", "2", "--vae_learning_rate", "2e-4"])
    assert again.exit_code == 0, again.output
    lines = _stages(again.output)
    assert lines[1].startswith("── 2/4 train-vae: finished, skipped") and "prep cache: current, skipped" in lines[2]
    assert "".join(f"train-vae: finished, skipped ({folder})".split()) in "".join(again.output.split())
    assert (vae_run / "checkpoints" / "latest").read_text().strip() == "step-000002"

    longer = _sdxl([*args, "--finetune-vae", "--vae-steps", "3", "--vae_learning_rate", "2e-4"])
    assert longer.exit_code == 0, longer.output
    assert "resumed from" in longer.output and "at step 2" in longer.output
    assert (vae_run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    steps = [int(r.split(",")[0]) for r in (vae_run / "vae_eval.csv").read_text().splitlines()[1:]]
    assert steps == [0, 2, 3]


def test_vae_flags_outside_the_one_command_path_are_refused(setup):
    _, args = setup
    staged = _sdxl(["train", "--work", "w", "--model", "m", "--out", "o", "--finetune-vae"])
    assert staged.exit_code == 2 and "--finetune-vae is a stage of the one-command path" in staged.output
    assert len(staged.output.strip().splitlines()) == 1
    alone = _sdxl([*args, "--vae-steps", "5"])
    assert alone.exit_code == 2 and "add --finetune-vae" in alone.output
