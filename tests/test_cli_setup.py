"""Set-up the way trainers' users expect (issue #11): defaults that follow the base model, caption
dropout, config keys answered with the key (and flag) meant, and --help that reads at 80 columns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdxl_trainer import cli, cli_options, console
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.config.base import _key_paths
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.base_objective import base_objective, objective_from_single_file
from sdxl_trainer.train import defaults
from sdxl_trainer.train.checkpoint import check_resume_config

runner = CliRunner()
SCHEDULERS = {
    "eps": {"prediction_type": "epsilon"},
    "v": {"prediction_type": "v_prediction"},
    "v_ztsnr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
}


def _model_with_scheduler(tiny: Path, root: Path, scheduler: dict) -> Path:
    """The tiny model (parts linked, not copied) with its scheduler config rewritten."""
    model = root / "model"
    model.mkdir(parents=True)
    for part in tiny.iterdir():
        if part.name != "scheduler":
            (model / part.name).symlink_to(part)
    (model / "scheduler").mkdir()
    base = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**base, **scheduler}))
    return model


def _cfg(model: Path, **overrides) -> TrainConfig:
    return load_config(TrainConfig, None, {"model": str(model), "work": "w", "out": "o", "num_steps": 1, **overrides})


# ── 1. defaults that follow the base model ──────────────────────────────────────────────────────


@pytest.mark.parametrize("expected", list(SCHEDULERS))
def test_objective_follows_the_base_scheduler(tiny_model_dir, tmp_path, expected):
    model = _model_with_scheduler(tiny_model_dir, tmp_path, SCHEDULERS[expected])
    assert base_objective(model).name == expected
    cfg = _cfg(model)
    assert cfg.objective.name == "auto" and cfg.precision == "auto"
    with console.console.capture() as printed:
        resolved = defaults.resolve_defaults(cfg, torch.device("cpu"))
    assert resolved.objective.name == expected and resolved.precision == "fp32"
    out = printed.get()
    assert f"objective {expected}: the base model's" in out and "precision fp32: auto" in out


def test_the_shipped_sdxl_scheduler_is_eps(tiny_model_dir):
    assert base_objective(tiny_model_dir).name == "eps"  # SDXL base 1.0's own config


@pytest.mark.parametrize(
    "keys, meta, expected",
    [({}, {}, "eps"), ({"v_pred"}, {}, "v"), ({"v_pred", "ztsnr"}, {}, "v_ztsnr"),
     ({}, {"modelspec.prediction_type": "v"}, "v"), ({}, {"sdxl_trainer.objective": "flow"}, "flow")],
)  # fmt: skip
def test_objective_from_single_file_markers(tmp_path, keys, meta, expected):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2), **{k: torch.empty(0) for k in keys}}, str(path), metadata=meta)
    assert objective_from_single_file(path)[0] == expected
    assert base_objective(path).name == expected


def test_unknown_prediction_type_asks_for_the_objective(tiny_model_dir, tmp_path):
    model = _model_with_scheduler(tiny_model_dir, tmp_path, {"prediction_type": "sample"})
    with pytest.raises(UserError, match="objective auto: .*'sample'.*--objective"):
        defaults.resolve_defaults(_cfg(model), torch.device("cpu"))


@pytest.mark.parametrize("base, chosen, lora, words", [
    ("eps", "v_ztsnr", False, "long full finetune"),
    ("v_ztsnr", "eps", True, "LoRA trained in another parameterisation"),
    ("v", "v_ztsnr", False, "terminal step"),
])  # fmt: skip
def test_explicit_objective_that_differs_warns(tiny_model_dir, tmp_path, base, chosen, lora, words):
    model = _model_with_scheduler(tiny_model_dir, tmp_path, SCHEDULERS[base])
    cfg = _cfg(model, **{"objective.name": chosen, "lora.enabled": lora})
    with console.console.capture() as printed:
        assert defaults.resolve_defaults(cfg, torch.device("cpu")).objective.name == chosen
    assert "warning:" in printed.get() and words in " ".join(printed.get().split())
    with console.console.capture() as printed:
        defaults.resolve_defaults(_cfg(model, **{"objective.name": base}), torch.device("cpu"))
    assert "warning" not in printed.get()  # the base's own objective: nothing to say


def test_precision_auto(monkeypatch, tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    assert defaults.auto_precision(cfg, torch.device("cpu"))[0] == "fp32"
    assert defaults.auto_precision(_cfg(tiny_model_dir, **{"optimizer.bf16_weights": True}), torch.device("cpu"))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert defaults.auto_precision(cfg, torch.device("cuda"))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert defaults.auto_precision(cfg, torch.device("cuda"))[0] == "fp16"
    fused = _cfg(tiny_model_dir, **{"optimizer.fused_backward_pass": True})
    assert defaults.auto_precision(fused, torch.device("cuda"))[0] == "fp32"  # fused backward cannot scale fp16


def test_explicit_precision_is_kept(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, precision="bf16", **{"objective.name": "v"})
    assert defaults.resolve_defaults(cfg, torch.device("cpu"), announce=False) is cfg


def test_cli_train_records_the_resolved_values_and_caption_dropout(tiny_model_dir, tiny_work, tmp_path):
    model = _model_with_scheduler(tiny_model_dir, tmp_path, SCHEDULERS["v_ztsnr"])
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--work", str(tiny_work), "--out", str(out), "--device", "cpu",
            "--num-steps", "1", "--batch-size", "2", "--caption_dropout_rate", "0.25", "--set", "data.workers=1",
            "--set", "checkpoints.single_file=false", "--set", "checkpoints.diffusers=false",
            "--set", "logging.tensorboard=false"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "objective v_ztsnr: the base model's" in result.output and "precision fp32" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["name"] == "v_ztsnr" and saved["precision"] == "fp32"
    assert saved["data"]["p_uncond"] == 0.25
    # a resume with the same (auto) command line compares the resolved values: no objective change
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    again = defaults.resolve_defaults(_cfg(model, **{"data.p_uncond": 0.25}), torch.device("cpu"), announce=False)
    check_resume_config(state["config"], again.model_copy(update={"batch_size": 2}))


def test_resume_without_objective_keeps_the_checkpoints(tiny_model_dir, tiny_work, tmp_path):
    """A run trained as v_ztsnr on an eps base, resumed with no --objective: auto is the checkpoint's
    objective (not the base's, which would refuse the resume as a changed objective)."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--work", str(tiny_work), "--out", str(out), "--device", "cpu",
            "--batch-size", "2", "--set", "data.workers=1", "--set", "checkpoints.single_file=false",
            "--set", "checkpoints.diffusers=false", "--set", "logging.tensorboard=false"]  # fmt: skip
    args += ["--num-steps", "2", "--set", "checkpoints.every_steps=1"]
    first = runner.invoke(cli.app, [*args, "--objective", "v_ztsnr"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli.app, [*args, "--resume", str(out / "checkpoints" / "step-000001")])
    assert again.exit_code == 0, again.output
    assert "objective v_ztsnr: the resumed checkpoint's" in again.output
    assert yaml.safe_load((out / "config.yaml").read_text())["objective"]["name"] == "v_ztsnr"


def test_cli_warns_on_a_mismatched_objective_before_anything_slow(tiny_model_dir, tmp_path):
    args = ["train", "--model", str(tiny_model_dir), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--num-steps", "1", "--objective", "v_ztsnr", "--lora"]  # fmt: skip
    result = runner.invoke(cli.app, args)
    assert "warning: training v_ztsnr on a base model trained with eps-prediction" in result.output
    assert "--objective eps" in result.output


def test_caption_dropout_rate_is_checked_and_blamed_on_the_flag(tmp_path):
    result = runner.invoke(cli.app, ["train", "--model", "m", "--work", "w", "--out", str(tmp_path / "o"),
                                     "--num-steps", "1", "--caption-dropout-rate", "1.5"])  # fmt: skip
    assert result.exit_code == 2 and "data.p_uncond" in result.output and "--caption-dropout-rate" in result.output


def test_config_train_explains_caption_dropout_and_variants():
    out = runner.invoke(cli.app, ["config", "train"]).output
    line = next(x for x in out.splitlines() if x.strip().startswith("p_uncond:"))
    assert "--caption-dropout-rate" in line and "caption variant" in line and "variants.max_dropout" in line


# ── 3. config keys: the key meant, in whichever section, with its flag ──────────────────────────


def test_top_level_key_of_another_section_names_the_section_and_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nwork: w\nout: o\nnum_steps: 1\nlearning_rate: 1.0e-4\n")
    result = runner.invoke(cli.app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "did you mean 'optimizer.learning_rate' (flag --learning-rate)?" in result.output
    result = runner.invoke(cli.app, ["train", "--model", "m", "--work", "w", "--out", "o", "--num-steps", "1",
                                     "--set", "learning_rate=1e-4"])  # fmt: skip
    assert "did you mean 'optimizer.learning_rate' (flag --learning-rate)?" in result.output
    assert "--set learning_rate" in result.output


def test_every_sections_keys_are_found_from_the_wrong_place():
    top = set(TrainConfig.model_fields)
    for path in _key_paths(TrainConfig):
        section, _, name = path.rpartition(".")
        if not section or name in top or sum(p.rpartition(".")[2] == name for p in _key_paths(TrainConfig)) > 1:
            continue  # a top-level key, or a name several sections share (listed together, tested below)
        with pytest.raises(UserError, match=re.escape(f"did you mean '{path}'")):
            load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, name: 1})
    with pytest.raises(UserError, match="'checkpoints.every_steps' or 'validation.every_steps'"):
        load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, "every_steps": 1})


@pytest.mark.parametrize("key, meant", [("learning_rat", "optimizer.learning_rate"), ("lora_rank", "lora.rank"),
                                        ("optimizer.learnin_rate", "optimizer.learning_rate"),
                                        ("ema.decya", "ema.decay"), ("batch_sise", "batch_size")])  # fmt: skip
def test_typos_anywhere(key, meant):
    with pytest.raises(UserError, match=re.escape(f"did you mean '{meant}'")):
        load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, key: 1})


def test_flag_names_and_config_keys_agree():
    keys = set(_key_paths(TrainConfig))
    flags = cli_options.option_flags(cli.train)
    assert flags["optimizer.learning_rate"] == "--learning-rate" and flags["data.p_uncond"] == "--caption-dropout-rate"
    assert flags["objective.name"] == "--objective" and flags["precision"] == "--precision"
    assert set(flags) <= keys, set(flags) - keys  # every flag sets a key that exists


# ── 4. help that reads well at 80 columns ───────────────────────────────────────────────────────


def test_train_help_at_80_columns():
    out = runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert max(map(len, out.splitlines())) <= 80
    assert "<bool>" not in out and "<list[" not in out and "…" not in out
    import inspect

    for param in inspect.signature(cli.train).parameters.values():  # every alias written in full
        for decl in getattr(param.default, "param_decls", None) or ():
            for name in decl.split("/"):
                assert name in out, name
    flat = " ".join(out.split())
    for option, default in [("--precision", "auto"), ("--objective", "auto"), ("--learning-rate", "1e-05"),
                            ("--lora / --full", "full"), ("--ema / --no-ema", "off"), ("--caption-dropout-rate", "0.0")]:  # fmt: skip
        assert re.search(re.escape(option) + r"[^\[]*\[default: " + re.escape(default) + r"\]", flat), option


def test_usage_lines_write_arguments_in_capitals():
    for args, usage in [(["prep", "stats"], "sdxl prep stats [OPTIONS] WORK"),
                        (["prep", "scan"], "sdxl prep scan [OPTIONS] [DATA_DIR]"),
                        (["generate"], "sdxl generate [OPTIONS] CHECKPOINT")]:  # fmt: skip
        out = runner.invoke(cli.app, [*args, "--help"], env={"COLUMNS": "80"}).output
        assert f"Usage: {usage}" in out, out
        assert "{" not in out.splitlines()[0]
