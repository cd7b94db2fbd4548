"""One writer per WORK stage and per RUN (sdxl_trainer/locks.py), through the CLI test runner.

The holder is a real second process: refused while it lives, taken over after kill -9 (the kernel
drops its flock; its record stays behind in the lock file).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer import locks
from sdxl_trainer.cli import app
from sdxl_trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from sdxl_trainer import locks
with locks.hold(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(folder: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), stage], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def images(d: Path) -> Path:
    d.mkdir(parents=True)
    for i in range(2):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("solo, smile")
    return d


def scan_args(data: Path, work: Path, *extra: str) -> list[str]:
    return ["prep", "scan", str(data), "--out", str(work), "--workers", "1", "--min-side", "32", *extra]


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_second_scan_is_refused_naming_the_holder_then_takes_over_after_kill9(tmp_path: Path) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "work"
    holder = start_holder(work, "prep scan")
    try:
        line = one_error_line(CliRunner().invoke(app, scan_args(data, work)))
        assert f"pid {holder.pid}" in line and f"host {socket.gethostname()}" in line and "since" in line
        assert str(work) in line and "in use by another `sdxl prep scan`" in line
        assert not (work / "manifest.parquet").exists()
        # --force-unlock cannot take a lock the OS says a live process holds
        assert "wait for it to finish" in one_error_line(CliRunner().invoke(app, scan_args(data, work, "--force-unlock")))
    finally:
        kill9(holder)
    record = json.loads((work / ".sdxl-lock-scan").read_text())  # kill -9 left its record behind
    assert record["pid"] == holder.pid
    result = CliRunner().invoke(app, scan_args(data, work))
    assert result.exit_code == 0, result.output
    assert "taking over a stale lock" in result.output and str(holder.pid) in result.output
    assert (work / "manifest.parquet").is_file()
    assert not (work / ".sdxl-lock-scan").exists()  # released: nothing left behind


def test_stages_lock_separately_and_train_locks_run(tmp_path: Path) -> None:
    work, run = tmp_path / "work", tmp_path / "run"
    holder = start_holder(run, "train")
    try:
        line = one_error_line(CliRunner().invoke(app, ["train", "--model", "m", "--work", str(work), "--out", str(run),
                                                       "--num-steps", "1"]))  # fmt: skip
        assert f"pid {holder.pid}" in line and "in use by another `sdxl train`" in line
        assert sorted(p.name for p in run.iterdir()) == [".sdxl-lock-train"]  # nothing else written
        with locks.hold(run, "prep cache"):  # another stage's lock on the same folder is independent
            pass
    finally:
        kill9(holder)


def test_record_from_another_host_needs_force_unlock(tmp_path: Path) -> None:
    data, work = images(tmp_path / "data"), tmp_path / "work"
    work.mkdir()
    record = {"pid": 4242, "host": "node-17", "since": "2024-01-01T00:00:00+00:00", "command": "sdxl prep scan"}
    (work / ".sdxl-lock-scan").write_text(json.dumps(record))
    line = one_error_line(CliRunner().invoke(app, scan_args(data, work)))
    assert "pid 4242 on host node-17" in line and "--force-unlock" in line
    result = CliRunner().invoke(app, scan_args(data, work, "--force-unlock"))
    assert result.exit_code == 0, result.output
    assert "taking over the lock of pid 4242 on host node-17" in result.output


def test_without_flock_the_record_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without flock (NFS mounted nolock answers ENOLCK): same host, pid alive → refused; dead → stale."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    lock = tmp_path / ".sdxl-lock-cache"
    alive = {"pid": os.getppid(), "host": socket.gethostname(), "since": "x", "command": "sdxl prep cache"}
    lock.write_text(json.dumps(alive))
    with pytest.raises(UserError, match=f"pid {os.getppid()}"):
        with locks.hold(tmp_path, "prep cache"):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**alive, "pid": dead.pid}))
    with locks.hold(tmp_path, "prep cache") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_only_rank_0_locks_and_a_fresh_folder_is_removed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    with locks.hold(tmp_path / "run", "train") as path:
        assert path is None and not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError):
        with locks.hold(tmp_path / "a" / "run", "train"):
            raise RuntimeError("the stage refused to start")
    assert not (tmp_path / "a").exists()  # a refused start leaves no folder behind
