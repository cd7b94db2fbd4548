"""The two memory savers through `loop.run`, the config and the CLI: exact resume, unchanged files, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import _cfg
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.train import loop
from sdxl_trainer.train.checkpoint import check_resume_config, load_trainable_state
from sdxl_trainer.train.fused_backward import FusedBackwardOptimizer

FUSED = {"optimizer.fused_backward_pass": True}
BF16 = {"optimizer.bf16_weights": True, "precision": "bf16"}
BOTH = {**FUSED, **BF16, "optimizer.name": "adafactor"}


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _tensors(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{stem}.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("saver", [FUSED, BF16, BOTH], ids=["fused", "bf16", "fused+bf16+adafactor"])
def test_resume_continues_bitwise(tiny_model_dir, tiny_work, tmp_path, saver):
    kw = {"checkpoints.every_steps": 2, "ema.enabled": True, "ema.decay": 0.9, **saver}
    full = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "a", **kw))
    mid = _ckpt(tmp_path / "a", 2)
    resumed = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "b", resume=str(mid), **kw))
    assert full["steps"] == resumed["steps"] == 4 and full["skipped"] == 0
    a, b = _ckpt(tmp_path / "a", 4), _ckpt(tmp_path / "b", 4)
    assert _same(_tensors(a, "trainable"), _tensors(b, "trainable"))
    assert _same(_tensors(a, "state"), _tensors(b, "state"))  # optimiser moments, EMA shadows
    weights = _tensors(a, "trainable")
    assert not torch.equal(weights["conv_in.weight"], _tensors(mid, "trainable")["conv_in.weight"])
    dtype = torch.bfloat16 if saver.get("optimizer.bf16_weights") else torch.float32
    assert {v.dtype for v in weights.values()} == {dtype}
    moments = [v for k, v in _tensors(a, "state").items() if k.startswith("optimizer.state.") and "step" not in k]
    assert moments and {v.dtype for v in moments} == {torch.float32}  # fp32 state whatever the weights


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fused_run_equals_the_plain_run_without_clipping(tiny_model_dir, tiny_work, tmp_path, name):
    """The loop, schedule and checkpoint see one optimiser object: with clipping off the fused run is the
    plain run bit for bit (weights and optimiser state; Adafactor's unused RMS aside)."""
    runs = {}
    for label, extra in (("fused", FUSED), ("plain", {})):
        cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / label, num_steps=3, **{"optimizer.name": name, **extra,
                                                                                "schedule.warmup_samples": 4})  # fmt: skip
        cfg.optimizer.max_grad_norm = None
        runs[label] = loop.run(cfg)
    fused, plain = _ckpt(tmp_path / "fused", 3), _ckpt(tmp_path / "plain", 3)
    assert _same(_tensors(fused, "trainable"), _tensors(plain, "trainable"))
    state = {k: v for k, v in _tensors(plain, "state").items() if not k.endswith(".RMS")}
    assert _same(_tensors(fused, "state"), state)
    assert runs["fused"]["last"]["loss"] == runs["plain"]["last"]["loss"]
    assert runs["fused"]["last"]["lr"] == runs["plain"]["last"]["lr"]  # the schedule drove the same rates


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "checkpoint.json")


def test_checkpoint_and_export_files_are_unchanged(tiny_model_dir, tiny_work, tmp_path):
    exports = {"num_steps": 1, "checkpoints.diffusers": True, "checkpoints.single_file": True, "precision": "bf16"}
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "plain", **exports))
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "saved", **{**exports, **BOTH}))
    plain, saved = _ckpt(tmp_path / "plain", 1), _ckpt(tmp_path / "saved", 1)
    assert _files(saved) == _files(plain) and "model.safetensors" in _files(saved)
    for folder in (plain, saved):  # the export dtype (checkpoints.dtype, fp16) whatever the trained one
        assert {v.dtype for v in load_file(folder / "model.safetensors").values()} == {torch.float16}
        unet_file = next((folder / "diffusers" / "unet").glob("*.safetensors"))
        assert {v.dtype for v in load_file(unet_file).values()} == {torch.float16}
    trained = _tensors(saved, "trainable")
    exported = load_file(next((saved / "diffusers" / "unet").glob("*.safetensors")))
    assert torch.equal(exported["conv_in.weight"], trained["conv_in.weight"].half())  # exported what was trained


def test_a_bf16_checkpoint_does_not_silently_resume_into_fp32(tiny_model_dir, tiny_work, tmp_path):
    out = tmp_path / "run"
    loop.run(_cfg(tiny_model_dir, tiny_work, out, num_steps=1, **BF16))
    with pytest.raises(UserError, match="optimizer.bf16_weights"):
        loop.run(_cfg(tiny_model_dir, tiny_work, out, num_steps=2, precision="bf16", resume="latest"))
    forced = _cfg(tiny_model_dir, tiny_work, out, num_steps=2, precision="bf16", resume="latest", force=True)
    assert loop.run(forced)["steps"] == 2  # --force converts deliberately: bf16 → fp32 is exact
    saved = _tensors(_ckpt(out, 1), "trainable")
    unet = loop.build_unet(forced, torch.device("cpu"))
    load_trainable_state(unet, forced, saved)
    assert all(torch.equal(p, saved[n].float()) for n, p in unet.named_parameters())
    with pytest.raises(UserError, match="pass --force to convert"):  # the weights' own check, config aside
        load_trainable_state(unet, forced.model_copy(update={"force": False}), saved)


def test_resume_check_names_the_savers_and_accepts_checkpoints_from_before_them():
    def cfg(**kw):
        return load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 2, **kw})

    saved = cfg().model_dump(mode="json")
    with pytest.raises(UserError, match="optimizer.fused_backward_pass: False → True"):
        check_resume_config(saved, cfg(**FUSED))
    del saved["optimizer"]["fused_backward_pass"], saved["optimizer"]["bf16_weights"]  # an older checkpoint
    check_resume_config(saved, cfg())
    with pytest.raises(UserError, match="optimizer.bf16_weights"):
        check_resume_config(saved, cfg(**BF16))


@pytest.mark.parametrize(("settings", "match"), [
    ({**FUSED, "lora.enabled": True}, "for full finetunes"),
    ({**BF16, "lora.enabled": True}, "for full finetunes"),
    ({**FUSED, "gradient_accumulation_steps": 2}, "cannot accumulate"),
    ({**FUSED, "precision": "fp16"}, "GradScaler"),
    ({"optimizer.bf16_weights": True, "precision": "fp32"}, "needs precision: bf16"),
    ({**FUSED, "optimizer.name": "adamw8bit"}, "not adamw8bit"),
    ({**BF16, "text.mode": "on_the_fly", "text.train_encoders": True, "optimizer.text_encoder_lr": 1e-6},
     "train_encoders is not supported yet"),
])  # fmt: skip
def test_config_refusals(settings, match):
    with pytest.raises(UserError, match=match):
        load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 2, **settings})


def test_entry_points_alone_apply_the_savers(tiny_model_dir, tiny_work, tmp_path):
    """What a benchmark calls: build_unet (bf16 weights), build_optimizer with the config's keys (the fused
    optimiser) and make_step (the fused step) — nothing set up inside loop.run only."""
    from sdxl_trainer import dist

    cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / "run", **BOTH)
    device, info = torch.device("cpu"), dist.DistInfo()
    unet = loop.build_unet(cfg, device)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in unet.parameters())
    o = cfg.optimizer
    groups = loop.param_groups(unet=unet, lr=o.learning_rate, weight_decay=o.weight_decay)
    optimizer = loop.build_optimizer(groups, name=o.name, lr=o.learning_rate, weight_decay=o.weight_decay,
                                     betas=o.betas, eps=o.eps, fused_backward_pass=o.fused_backward_pass,
                                     bf16_weights=o.bf16_weights, seed=cfg.seed)  # fmt: skip
    step = loop.make_step(cfg, device, info)
    assert isinstance(optimizer, FusedBackwardOptimizer) and step.fused_backward
    with pytest.raises(UserError, match="DDP"):
        loop.make_step(cfg, device, dist.DistInfo(rank=0, world_size=2))


def test_cli_flags(tiny_model_dir, tiny_work, tmp_path):
    out = tmp_path / "run"
    args = ["--quiet", "train", "--model", str(tiny_model_dir), "--work", str(tiny_work), "--out", str(out),
            "--device", "cpu", "--precision", "bf16", "--use_adafactor", "--batch_size", "2", "--num_steps", "1",
            "--fused_backward_pass", "--bf16-weights", "--set", "checkpoints.diffusers=false",
            "--set", "checkpoints.single_file=false", "--set", "logging.tensorboard=false"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = load_config(TrainConfig, out / "config.yaml").optimizer
    assert saved.fused_backward_pass is True and saved.bf16_weights is True
    alias = CliRunner().invoke(app, [*args[:-6], "--fused-backward-pass", "--lora"])
    assert alias.exit_code == 2 and "for full finetunes" in alias.output
