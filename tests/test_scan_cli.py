"""`sdxl prep scan` through Typer's test runner, and caption chunk counts with the tiny model's tokenizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.prep import scan
from sdxl_trainer.schema import read_table


def make_folder(d: Path, captions: dict[str, str]) -> Path:
    d.mkdir(parents=True)
    for i, (stem, caption) in enumerate(captions.items()):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(d / f"{stem}.png")
        (d / f"{stem}.txt").write_text(caption)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return d


def rows(work: Path) -> dict[str, dict]:
    table, _ = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    return {r["path"]: r for r in table.to_pylist()}


def test_cli_scan_writes_the_manifest_and_prints_the_summary(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"a": "solo, smile", "b": "long hair"})
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["prep", "scan", str(data), "--out", str(work), "--workers", "1",
                                      "--min-side", "32", "--underscores-to-spaces"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 + 1 + 0 = 3 files found" in result.output
    assert "bucket" in result.output
    assert {p: r["status"] for p, r in rows(work).items()} == {"a.png": "ok", "b.png": "ok", "broken.jpg": "skipped"}
    assert (work / "tags.parquet").is_file() and (work / "scan_report.json").is_file()


def test_cli_quiet_prints_nothing(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", {"a": "solo"})
    result = CliRunner().invoke(app, ["--quiet", "prep", "scan", str(data), "--out", str(tmp_path / "w"),
                                      "--workers", "1", "--min-side", "32"])  # fmt: skip
    assert result.exit_code == 0 and result.output.strip() == ""


def test_cli_bad_path_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prep", "scan", str(tmp_path / "missing"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "data dir not found" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "w" / "manifest.parquet").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one input"),
        (["{data}", "--hf-dataset", "{data}"], "give exactly one input"),
        (["{data}", "--min-side", "0"], "min_side"),
        (["{data}", "--hf-dataset"], None),  # Typer's own usage error
    ],
)
def test_cli_option_errors(tmp_path: Path, args: list[str], message: str | None) -> None:
    data = make_folder(tmp_path / "data", {"a": "solo"})
    argv = ["prep", "scan", *[a.format(data=data) for a in args], "--out", str(tmp_path / "w")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    if message:
        assert message in result.output


def test_cli_bad_hf_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["prep", "scan", "--hf-dataset", str(tmp_path / "empty"), "--out",
                                      str(tmp_path / "w")])  # fmt: skip
    assert result.exit_code == 2 and "not a Hugging Face dataset" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_n_chunks_counts_75_token_chunks(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Every demo word is one token of the tiny tokenizer: 80 words need 2 chunks, 300 need 4 (> 3).
    data = make_folder(tmp_path / "data", {"short": "red circle, blue background", "long": " ".join(["red"] * 80),
                                           "huge": " ".join(["blue"] * 300), "none": ""})  # fmt: skip
    work = tmp_path / "work"
    summary = scan.run(ScanConfig(data_dir=data, out=work, model=tiny_model_dir, workers=1, min_side=32))
    r = rows(work)
    assert (r["short.png"]["n_chunks"], r["long.png"]["n_chunks"], r["huge.png"]["n_chunks"]) == (1, 2, 3)
    assert r["none.png"]["n_chunks"] == 1  # the empty prompt is one chunk
    assert "chunks_truncated" in r["huge.png"]["flags"] and "chunks_truncated" not in r["long.png"]["flags"]
    assert r["broken.jpg"]["n_chunks"] is None
    assert summary["n_chunks"] == {"1": 2, "2": 1, "3": 1}
    _, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    assert meta["tokenizer"] == str(tiny_model_dir.resolve())
    # a rescan keeps the counts (and the flag) without changing them
    scan.run(ScanConfig(data_dir=data, out=work, model=tiny_model_dir, workers=1, min_side=32))
    again = rows(work)
    assert again["huge.png"]["n_chunks"] == 3 and again["huge.png"]["flags"].count("chunks_truncated") == 1
    # without --model the counts are dropped, not kept stale
    scan.run(ScanConfig(data_dir=data, out=work, workers=1, min_side=32))
    assert rows(work)["long.png"]["n_chunks"] is None
