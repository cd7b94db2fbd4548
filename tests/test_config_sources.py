"""A bad value is blamed on where it came from: the flag that gave it, or the config file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import StatsConfig, TrainConfig, load_config
from sdxl_trainer.errors import UserError

runner = CliRunner()
TRAIN = ["train", "--model", "m", "--work", "w", "--num-steps", "1"]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_negative_batch_size_flag_is_blamed_on_the_flag_not_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("batch_size: 4\nobjective:\n  name: flow\n")
    line = one_error_line(runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "o"), "--config", str(run),
                                              "--batch-size", "-1"]))  # fmt: skip
    assert "batch_size" in line and "got -1 from --batch-size" in line
    assert str(run) not in line  # the file holds batch_size: 4, which is fine
    assert not (tmp_path / "o").exists()


def test_negative_batch_size_in_the_file_names_the_file_and_key(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("batch_size: -1\n")
    line = one_error_line(runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "o"), "--config", str(run)]))
    assert f"got -1 from {run}, key batch_size" in line and line.startswith(f"error: {run}:")


def test_set_and_renamed_flags_are_named_as_typed(tmp_path: Path) -> None:
    line = one_error_line(runner.invoke(app, [*TRAIN, "--out", str(tmp_path / "o"), "--set", "loss.gamma=-5",
                                              "--lora-rank", "0", "--sample-every-n-steps", "0"]))  # fmt: skip
    assert "got -5 from --set loss.gamma" in line
    assert "got 0 from --lora-rank" in line and "got 0 from --sample-every-n-steps" in line
    line = one_error_line(runner.invoke(app, ["prep", "scan", str(tmp_path), "--out", str(tmp_path / "w"),
                                              "--fold-buckets-below", "-2"]))  # fmt: skip
    assert "buckets.fold_below" in line and "got -2 from --fold-buckets-below" in line


def test_load_config_without_flag_names_still_separates_file_and_options(tmp_path: Path) -> None:
    y = tmp_path / "stats.yaml"
    y.write_text("work: w\nmodel: m\nbatch_size: 0\n")
    with pytest.raises(UserError, match=r"got 0 from .*stats.yaml, key batch_size"):
        load_config(StatsConfig, y)
    with pytest.raises(UserError, match=r"got -3 from the command-line option for batch_size"):
        load_config(StatsConfig, y, {"batch_size": -3})
    with pytest.raises(UserError, match=r"got -3 from --batch-size"):
        load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, "batch_size": -3},
                    flags={"batch_size": "--batch-size"})
