"""A HF dataset whose image cells are file paths: contained to the dataset folder unless allowed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep.hf_source import open_source
from sdxl_trainer.schema import read_table


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dataset_with_paths(tmp_path: Path) -> Path:
    """Rows: bytes, a path inside the dataset, ../outside.png, an absolute path outside."""
    ds_dir = tmp_path / "ds"
    (tmp_path / "outside.png").write_bytes(png(1))
    (tmp_path / "abs").mkdir()
    (tmp_path / "abs" / "a.png").write_bytes(png(2))
    ds_dir.mkdir()
    (ds_dir / "inside.png").write_bytes(png(3))
    table = {"image": [{"bytes": png(0), "path": None}, {"bytes": None, "path": "inside.png"},
                       {"bytes": None, "path": "../outside.png"}, {"bytes": None, "path": str(tmp_path / "abs/a.png")}],
             "text": ["a", "b", "c", "d"]}  # fmt: skip
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # a datasets Image column
    pq.write_table(pa.table({"image": pa.array(table["image"], image_type), "text": table["text"]}),
                   ds_dir / "train-00000-of-00001.parquet")
    return ds_dir


def scan(ds: Path, work: Path, *extra: str):
    return CliRunner().invoke(app, ["--quiet", "prep", "scan", "--hf-dataset", str(ds), "--out", str(work),
                                    "--workers", "1", "--min-side", "16", *extra])  # fmt: skip


def manifest(work: Path) -> tuple[dict[str, dict], dict]:
    table, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    return {r["path"]: r for r in table.to_pylist()}, meta


def test_paths_outside_the_dataset_are_skipped_with_a_counted_reason(tmp_path: Path) -> None:
    ds, work = dataset_with_paths(tmp_path), tmp_path / "work"
    result = scan(ds, work)
    assert result.exit_code == 0, result.output
    rows, meta = manifest(work)
    assert [rows[f"train/{i}"]["status"] for i in range(4)] == ["ok", "ok", "skipped", "skipped"]
    assert rows["train/2"]["reason"].startswith("outside_dataset: ../outside.png is outside the dataset folder")
    assert "--allow-outside-paths" in rows["train/2"]["reason"]
    assert rows["train/3"]["reason"].startswith(f"outside_dataset: {tmp_path / 'abs/a.png'}")
    report = (work / "scan_report.json").read_text()
    assert '"outside_dataset": 2' in report
    # a later stage reading such a row (a manifest edited by hand, say) is refused in one line too
    with pytest.raises(UserError, match="outside the dataset folder"):
        open_source(meta["source"], rows["train/2"]["source"])


def test_allow_outside_paths_reads_them(tmp_path: Path) -> None:
    ds, work = dataset_with_paths(tmp_path), tmp_path / "work"
    result = scan(ds, work, "--allow-outside-paths")
    assert result.exit_code == 0, result.output
    rows, meta = manifest(work)
    assert [rows[f"train/{i}"]["status"] for i in range(4)] == ["ok"] * 4
    assert meta["source"]["allow_outside_paths"] is True and meta["config"]["allow_outside_paths"] is True
    assert open_source(meta["source"], rows["train/2"]["source"]).read() == png(1)
