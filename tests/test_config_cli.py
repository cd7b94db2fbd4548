"""The config layer (files, overrides, unknown keys) and the CLI contract (one-line errors, demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sdxl_trainer import __version__
from sdxl_trainer.cli import app
from sdxl_trainer.config import ScanConfig, StatsConfig, load_config
from sdxl_trainer.errors import UserError

runner = CliRunner()


def test_yaml_and_toml_files_with_overrides(tmp_path):
    y = tmp_path / "scan.yaml"
    y.write_text("data_dir: /data\nout: /work\nmin_side: 128\nbuckets:\n  step: 32\n  min_side: 64\n")
    cfg = load_config(ScanConfig, y, {"min_side": 300, "buckets.fold_below": 5})
    assert cfg.min_side == 300 and cfg.buckets.step == 32 and cfg.buckets.fold_below == 5
    t = tmp_path / "scan.toml"
    t.write_text('data_dir = "/data"\nout = "/work"\n[buckets]\nbase = 512\n')
    assert load_config(ScanConfig, t).buckets.base == 512


def test_unknown_key_suggests_the_right_one(tmp_path):
    y = tmp_path / "stats.yaml"
    y.write_text("work: w\nmodel: m\nbatch_sise: 4\n")
    with pytest.raises(UserError, match=r"unknown key 'batch_sise' — did you mean 'batch_size'\?"):
        load_config(StatsConfig, y)
    with pytest.raises(UserError, match=r"did you mean 'buckets.min_side'"):
        load_config(ScanConfig, None, {"data_dir": "d", "out": "o", "buckets.min_sid": 3})


def test_invalid_values_name_the_key():
    with pytest.raises(UserError, match="min_side"):
        load_config(ScanConfig, None, {"data_dir": "d", "out": "o", "min_side": -1})
    with pytest.raises(UserError, match="multiple of step"):
        load_config(ScanConfig, None, {"data_dir": "d", "out": "o", "buckets.base": 1000})


def test_cli_version_and_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"sdxl-trainer {__version__}"
    out = runner.invoke(app, ["prep", "--help"]).output
    for cmd in ("scan", "stats", "cache", "weights"):
        assert cmd in out


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["prep", "stats", str(tmp_path), "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    bad = tmp_path / "c.yaml"
    bad.write_text("work: w\nmodle: m\n")
    result = runner.invoke(app, ["prep", "stats", str(tmp_path), "--config", str(bad)])
    assert result.exit_code == 2 and "did you mean 'model'" in result.output


def test_cli_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "prep", "stats", str(tmp_path), "--model", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    result = runner.invoke(app, ["--quiet", "demo", "--out", str(tmp_path), "--images", "40", "--train-steps", "3",
                                 "--quick", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    manifest = pq.read_table(work / "manifest.parquet")
    assert manifest.num_rows == 40
    stats = json.loads((work / "latent_stats.json").read_text())
    assert stats["artifact"] == "latent_stats" and stats["package_version"] == __version__
    meta = json.loads((work / "cache" / "cache_meta.json").read_text())
    ok = sum(s == "ok" for s in manifest["status"].to_pylist())
    assert meta["rows"] == ok > 30
    assert pq.read_table(work / "tag_weights.parquet").num_rows == ok
    for objective in ("eps", "v_ztsnr", "flow"):
        run = tmp_path / "runs" / objective
        assert (run / "checkpoints" / "latest").is_file() and (run / "metrics.jsonl").is_file()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["objective"] == "v_ztsnr" and "black" in metrics and (tmp_path / "report" / "report.md").is_file()


def test_cli_train_with_seed_script_flags(tiny_model_dir, tiny_work, tmp_path):
    import yaml

    out = tmp_path / "run"
    args = ["--quiet", "train", "--model", str(tiny_model_dir), "--work", str(tiny_work), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--objective", "flow", "--learning_rate", "2e-4",
            "--batch_size", "2", "--gradient_accumulation_steps", "2", "--num_steps", "2", "--use_adafactor",
            "--save_checkpoints", "1", "--tag-weights", "--lora", "--lora-rank", "4",
            "--set", "logging.every_steps=1", "--set", "checkpoints.single_file=false"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["name"] == "flow" and saved["optimizer"]["name"] == "adafactor"
    assert saved["optimizer"]["learning_rate"] == 2e-4 and saved["batch_size"] == 2
    assert saved["gradient_accumulation_steps"] == 2 and saved["checkpoints"]["every_steps"] == 1
    assert saved["lora"] == {**saved["lora"], "enabled": True, "rank": 4, "alpha": 4.0}
    assert saved["loss"]["tag_weights"] is True
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert (out / "checkpoints" / "step-000001").is_dir() and (out / "checkpoints" / "step-000002").is_dir()


def test_cli_train_rejects_bad_set(tmp_path):
    result = runner.invoke(app, ["train", "--set", "objective.nmae=flow", "--model", "m", "--work", "w", "--out", "o",
                                 "--num-steps", "1"])  # fmt: skip
    assert result.exit_code == 2 and "did you mean 'objective.name'" in result.output


def test_config_docs_are_current_and_templates_load(tmp_path):
    import yaml

    from sdxl_trainer.config.docs import STAGES, page

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert doc == page(), "regenerate: python -m sdxl_trainer.config.docs > docs/configuration.md"
    required = {"out": "o", "work": "w", "model": "m", "checkpoint": "c", "data_dir": "d", "prompt": ["p"],
                "num_steps": 1}  # fmt: skip
    for stage, (cls, _) in STAGES.items():
        result = runner.invoke(app, ["config", stage])
        assert result.exit_code == 0, result.output
        data = yaml.safe_load(result.output)
        data.update({k: v for k, v in required.items() if k in cls.model_fields and data.get(k) is None})
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert load_config(cls, path) == cls.model_validate(data)
    assert runner.invoke(app, ["config", "nope"]).exit_code == 2
