"""Extending a finished run: --resume latest with a larger --num-steps continues, the LR schedule
re-planned over the new length and said so in one line (train/extend.py, docs/training-blocks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdxl_trainer import cli

runner = CliRunner()


def _args(model: Path, work: Path, out: Path, steps: int, kind: str) -> list[str]:
    return ["train", "--model", str(model), "--work", str(work), "--out", str(out), "--device", "cpu",
            "--batch-size", "2", "--num-steps", str(steps), "--set", "data.workers=1",
            "--set", "checkpoints.single_file=false", "--set", "checkpoints.diffusers=false",
            "--set", "logging.tensorboard=false", "--set", "logging.every_steps=1",
            "--set", f"schedule.kind={kind}", "--set", "schedule.warmup_samples=2"]  # fmt: skip


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def _lrs(out: Path) -> dict[int, dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("lr")} for r in records}


def _bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _extend(tiny_model_dir, tiny_work, out, kind):
    first = runner.invoke(cli.app, _args(tiny_model_dir, tiny_work, out, 2, kind))
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli.app, [*_args(tiny_model_dir, tiny_work, out, 4, kind), "--resume", "latest"])
    assert again.exit_code == 0, again.output
    return " ".join(again.output.split())  # the console wraps at 80 columns


def test_constant_extension_equals_a_straight_run_bitwise(tiny_model_dir, tiny_work, tmp_path):
    output = _extend(tiny_model_dir, tiny_work, tmp_path / "ext", "constant")
    assert output.count("extending the run") == 1
    assert "extending the run from 2 to 4 updates: the LR schedule is re-planned over 4 updates (constant" in output
    straight = runner.invoke(cli.app, _args(tiny_model_dir, tiny_work, tmp_path / "straight", 4, "constant"))
    assert straight.exit_code == 0, straight.output
    # the data order, noise and rates do not depend on the length: the extension is the straight run
    assert _bitwise(_weights(tmp_path / "ext", 4), _weights(tmp_path / "straight", 4))
    assert _lrs(tmp_path / "ext") == _lrs(tmp_path / "straight")


def test_cosine_extension_follows_the_longer_curve_after_the_checkpoint(tiny_model_dir, tiny_work, tmp_path):
    output = _extend(tiny_model_dir, tiny_work, tmp_path / "ext", "cosine")
    assert "cosine: the rate now follows the longer curve" in output
    straight = runner.invoke(cli.app, _args(tiny_model_dir, tiny_work, tmp_path / "straight", 4, "cosine"))
    assert straight.exit_code == 0, straight.output
    ext, ref = _lrs(tmp_path / "ext"), _lrs(tmp_path / "straight")
    # what differs: update 2 ran at the 2-update curve's end (min_factor 0), not the 4-update curve's
    assert ext[1] == ref[1] and ext[2] != ref[2]
    assert ext[3] == ref[3] and ext[4] == ref[4]  # after the checkpoint: the longer curve's rates
    assert not _bitwise(_weights(tmp_path / "ext", 4), _weights(tmp_path / "straight", 4))


def test_a_changed_schedule_kind_still_needs_force(tiny_model_dir, tiny_work, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(cli.app, _args(tiny_model_dir, tiny_work, out, 2, "cosine")).exit_code == 0
    refused = runner.invoke(cli.app, [*_args(tiny_model_dir, tiny_work, out, 4, "linear"), "--resume", "latest"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--force" in said and "schedule" in said, said
    forced = runner.invoke(cli.app, [*_args(tiny_model_dir, tiny_work, out, 4, "linear"), "--resume", "latest",
                                     "--force"])  # fmt: skip
    assert forced.exit_code == 0, forced.output
