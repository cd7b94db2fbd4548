"""`sdxl prep scan` names what it skipped or flagged: the first few in its summary, all in
WORK/scan_report.json (prep/scan_report.py, docs/scan.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.prep import scan_report


def _png(path: Path, w: int, h: int, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _folder(d: Path, n_good: int = 2) -> Path:
    d.mkdir(parents=True)
    for i in range(n_good):
        _png(d / f"good{i}.png", 96, 64, seed=i)
        (d / f"good{i}.txt").write_text("solo, smile")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # corrupt
    _png(d / "tiny.png", 40, 12, seed=9)  # too small for --min-side 32
    (d / "tiny.txt").write_text("small")
    return d


def _scan(data: Path, work: Path):
    return CliRunner().invoke(app, ["prep", "scan", str(data), "--out", str(work), "--workers", "1",
                                    "--min-side", "32"])  # fmt: skip


def test_summary_and_report_name_the_skipped_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = _scan(_folder(tmp_path / "data"), work)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "skipped or flagged files" in said and "broken.jpg" in said and "tiny.png" in said and "too_small" in said
    report = json.loads((work / "scan_report.json").read_text())
    reasons = {e["path"]: e["reason"] for e in report["problems"] if e["status"] == "skipped"}
    assert reasons["tiny.png"].startswith("too_small: 40×12")
    assert reasons["broken.jpg"].split(":")[0] in ("corrupt", "not_an_image", "truncated")
    assert set(reasons) == {"tiny.png", "broken.jpg"}
    assert report["problems_by_reason"]["too_small"] == 1 and report["skipped_by_reason"]["too_small"] == 1
    assert all(set(e) == {"path", "status", "reason"} for e in report["problems"])
    assert not list(work.glob("*.tmp*")) and not list(work.glob(".*tmp*"))  # written atomically


def test_the_summary_shows_the_first_few_and_the_report_has_all(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(scan_report.SHOWN + 3):
        _png(data / f"small{i:02d}.png", 40, 12, seed=i)  # too small, and no caption (flagged as well)
    result = _scan(data, tmp_path / "work")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    n = len(json.loads((tmp_path / "work" / "scan_report.json").read_text())["problems"])
    assert n >= scan_report.SHOWN + 3 and f"first {scan_report.SHOWN} of {n}" in said
    assert "small00.png" in said and "small12.png" not in said
