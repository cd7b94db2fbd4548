"""Disk full, read-only and permission errors: one line naming the file, exit 2, nothing half-written.

The faults are injected where the OS would raise them (the Parquet / safetensors writes, ``os.open``
with O_CREAT) with the errno and message shape the real libraries use: pyarrow's OSError names no
file, safetensors raises its own type with "(os error 28)" in the text.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer import console, disk, schema
from sdxl_trainer.cli import app

runner = CliRunner()


def images(d: Path, n: int = 3, size=(160, 128)) -> Path:
    d.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("solo, smile, red")
    return d


def scan(data: Path, work: Path, *extra: str):
    return runner.invoke(app, ["--quiet", "prep", "scan", str(data), "--out", str(work), "--workers", "1", "--min-side", "32",
                               *extra])  # fmt: skip


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary or lock files anywhere under ``folder``: what a failed write must not leave."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith((".", "tmp")) or ".tmp" in p.name)


def full_disk_writer():
    """pq.write_table that writes a little of the file, then fails as pyarrow does on a full disk."""

    def write_table(table, where, **kw):
        with open(where, "wb") if isinstance(where, str) else open(os.devnull, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    return write_table


def read_only_under(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating or writing any file under ``folder`` fails with EROFS, as on a read-only mount."""
    real_open = os.open

    def ro_open(path, flags, *args, **kw):
        if str(path).startswith(str(folder)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    real_mkdir = Path.mkdir

    def ro_mkdir(self, *a, **kw):
        if str(self).startswith(str(folder)) and not self.exists():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(Path, "mkdir", ro_mkdir)


def test_format_bytes_is_readable_at_every_size() -> None:
    got = [console.format_bytes(n) for n in (0, 812, 12_345, 12_300_000, 1.2e9, 3.4e12)]
    assert got == ["0 B", "812 B", "12.3 kB", "12.3 MB", "1.2 GB", "3.40 TB"]


def test_scan_disk_full_is_one_line_and_keeps_the_previous_manifest(tmp_path, monkeypatch) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "work"
    assert scan(data, work).exit_code == 0
    before = (work / "manifest.parquet").read_bytes()
    (data / "3.png").write_bytes((data / "0.png").read_bytes())  # something to rescan
    monkeypatch.setattr(schema.pq, "write_table", full_disk_writer())
    line = one_error_line(scan(data, work))
    assert "disk full" in line and str(work / "manifest.parquet") in line and "free there" in line
    assert "run the command again" in line
    assert (work / "manifest.parquet").read_bytes() == before  # the old one intact, no half of a new one
    assert leftovers(work) == []


def test_scan_into_a_read_only_folder(tmp_path, monkeypatch) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "ro" / "work"
    read_only_under(tmp_path / "ro", monkeypatch)
    line = one_error_line(scan(data, work))
    assert "read-only filesystem" in line and str(tmp_path / "ro") in line and "--out" in line
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_scan_and_weights_into_a_chmod_555_folder(tmp_path) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "work"
    assert scan(data, work).exit_code == 0
    work.chmod(0o555)
    try:
        for result in (scan(data, work), runner.invoke(app, ["--quiet", "prep", "weights", str(work)])):
            line = one_error_line(result)
            assert "permission denied" in line and str(work) in line
    finally:
        work.chmod(0o755)


def test_weights_disk_full_and_read_only(tmp_path, monkeypatch) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "work"
    assert scan(data, work).exit_code == 0
    with monkeypatch.context() as m:
        m.setattr(schema.pq, "write_table", full_disk_writer())
        line = one_error_line(runner.invoke(app, ["--quiet", "prep", "weights", str(work), "--min-count", "1"]))
    assert "disk full" in line and str(work / "tag_weights.parquet") in line
    assert not (work / "tag_weights.parquet").exists() and leftovers(work) == []
    read_only_under(work, monkeypatch)
    line = one_error_line(runner.invoke(app, ["--quiet", "prep", "weights", str(work), "--min-count", "1"]))
    assert "read-only" in line and f"{work}: " in line  # the folder, not the lock file inside it


def test_train_into_a_read_only_run_folder(tmp_path, monkeypatch) -> None:
    read_only_under(tmp_path / "ro", monkeypatch)
    args = ["--quiet", "train", "--model", "m", "--work", "w", "--out", str(tmp_path / "ro" / "run"), "--num-steps", "1"]
    line = one_error_line(runner.invoke(app, args))
    assert "read-only filesystem" in line and str(tmp_path / "ro") in line


def test_cache_disk_full_says_what_the_cache_needs(tmp_path, monkeypatch, tiny_model_dir) -> None:
    from sdxl_trainer.cache_format import writer
    from sdxl_trainer.demo import demo_scan_config
    from sdxl_trainer.prep import scan as scan_stage

    work = tmp_path / "work"
    scan_stage.run(demo_scan_config(images(tmp_path / "data", n=4), work, tiny_model_dir))
    monkeypatch.setattr(writer.pq, "write_table", full_disk_writer())
    result = runner.invoke(app, ["--quiet", "prep", "cache", str(work), "--model", str(tiny_model_dir), "--device", "cpu"])
    line = one_error_line(result)
    assert "disk full" in line and "this stage needs about" in line and f"{work / 'cache'}:" in line
    assert " B in all" in line or "kB in all" in line or "MB in all" in line  # a small cache in sensible units
    shards = [p for p in (work / "cache").rglob("*.parquet")]
    assert shards == [] and [p for p in leftovers(work) if "skipped" not in p] == []


def test_checkpoint_disk_full_leaves_no_checkpoint(tmp_path, monkeypatch, tiny_model_dir, tiny_work) -> None:
    from safetensors import SafetensorError

    from sdxl_trainer.train import checkpoint_dir

    def full(tensors, path, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')

    monkeypatch.setattr(checkpoint_dir, "save_file", full)
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--work", str(shutil.copytree(tiny_work, tmp_path / "w")),
            "--out", str(run), "--device", "cpu", "--precision", "fp32", "--batch-size", "2", "--num-steps", "1",
            "--lora", "--lora-rank", "2", "--save-checkpoints", "1"]  # fmt: skip
    line = one_error_line(runner.invoke(app, ["--quiet", *args]))
    assert "disk full" in line and str(run / "checkpoints") in line
    ckpts = run / "checkpoints"
    assert not ckpts.exists() or sorted(p.name for p in ckpts.iterdir()) == []
    assert not (run / ".sdxl-lock-train").exists()


def test_explain_ignores_other_errors_and_finds_a_wrapped_cause() -> None:
    assert disk.explain(ValueError("bad")) is None
    assert disk.explain(OSError(errno.ENOENT, "No such file", "x")) is None
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/q/file")
        except OSError as e:
            raise RuntimeError("while writing a shard") from e
    except RuntimeError as wrapped:
        err = disk.explain(wrapped)
    assert err is not None and "disk quota exceeded" in str(err) and "/q/file" in str(err)
