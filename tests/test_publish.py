"""`sdxl publish` and `sdxl train --push_to_hub` (issue #16): the folder, the model card, and the
upload's failures as one line — everything up to the network, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from sdxl_trainer import cli
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.train import loop

runner = CliRunner()


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 1, "logging.tensorboard": False, "data.workers": 1,
            "objective.name": "flow", "objective.flow_shift": 2.5, "checkpoints.dtype": "fp32",
            "samples.prompts": ["red circle"], "samples.every_steps": 1, "samples.steps": 2, "samples.seeds": [0],
            "samples.width": 64, "samples.height": 64}  # fmt: skip
    return load_config(TrainConfig, None, {**base, **overrides})


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tiny_work, tmp_path_factory):
    out = tmp_path_factory.mktemp("publish") / "run"
    loop.run(_cfg(tiny_model_dir, tiny_work, out))
    return out


class FakeApi:
    calls: list = []

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw["repo_id"], sorted(p.name for p in Path(kw["folder_path"]).iterdir())))


def test_publish_assembles_the_folder_and_a_parseable_card(full_run):
    result = runner.invoke(cli.app, ["publish", str(full_run), "--no-upload"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pub = full_run / "publish"
    names = {p.relative_to(pub).as_posix() for p in pub.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "run.safetensors",
            "run.workflow_api.json", "README.md"} <= names  # fmt: skip
    assert any(n.startswith("samples/") and n.endswith(".png") for n in names)
    card = ModelCard.load(pub / "README.md")
    assert card.data.license == "openrail++" and card.data.library_name == "diffusers"
    assert "objective-flow" in card.data.tags and card.data.base_model is None  # a local --model is no repo id
    text = card.text
    assert "rectified flow" in text and "shift 2.5" in text and "ModelSamplingSD3" in text
    assert 'DiffusionPipeline.from_pretrained("REPO_ID"' in text and "| training images | 64 |" in text
    assert "![samples/" in text
    assert os.stat(pub / "run.safetensors").st_mode & 0o044 == 0o044  # readable by others


def test_publish_uploads_through_huggingface_hub(full_run, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = runner.invoke(cli.app, ["publish", str(full_run), "--repo-id", "me/tiny-flow", "--private"])
    assert result.exit_code == 0, result.output
    assert FakeApi.calls[0] == ("create_repo", "me/tiny-flow", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert FakeApi.calls[1][:2] == ("upload_folder", "me/tiny-flow") and "README.md" in FakeApi.calls[1][2]
    assert "tiny-flow.safetensors" in FakeApi.calls[1][2]


def test_a_failed_upload_is_one_line_and_keeps_the_folder(full_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "sdxl_trainer.cli", "publish", str(full_run), "--repo-id",
                           "me/tiny-flow"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    out = " ".join((done.stdout + done.stderr).split())
    assert "upload to me/tiny-flow failed" in out and "run `sdxl publish` again to retry" in out
    assert "Traceback" not in out and (full_run / "publish" / "README.md").is_file()


def test_bad_requests_are_one_line(full_run):
    for args, needle in ((["--repo-id", "not a repo"], "not a Hub repository id"), ([], "no repository given"),
                         (["--no-upload", "--what", "lora"], "no lora export")):  # fmt: skip
        result = runner.invoke(cli.app, ["publish", str(full_run), *args])
        assert result.exit_code == 2 and needle in result.output, result.output


def test_train_pushes_a_lora_at_the_end(tiny_model_dir, tiny_work, tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "lora-run"
    args = ["train", "--model", str(tiny_model_dir), "--work", str(tiny_work), "--out", str(out), "--num-steps", "1",
            "--batch-size", "2", "--device", "cpu", "--lora", "--lora-rank", "2", "--objective", "v_ztsnr",
            "--set", "logging.tensorboard=false", "--push_to_hub", "--hub_model_id", "me/tiny-lora"]  # fmt: skip
    missing = runner.invoke(cli.app, args[:-2])
    assert missing.exit_code == 2 and "hub.model_id" in missing.output
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert [c[0] for c in FakeApi.calls] == ["create_repo", "upload_folder"]
    files = FakeApi.calls[1][2]
    assert "pytorch_lora_weights.safetensors" in files and "tiny-lora_kohya.safetensors" in files
    card = ModelCard.load(out / "publish" / "README.md")
    assert "lora" in card.data.tags and "load_lora_weights" in card.text and "zero terminal SNR" in card.text
