"""Atomic checkpoint folders, `latest`, pruning, resume resolution, and the state-file format."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.train import checkpoint_dir as ckd

REPO = Path(__file__).resolve().parents[1]


def _writer(value: float):
    def write(folder: Path) -> None:
        ckd.save_state(folder, "state", {"value": torch.full((64,), value), "step": int(value)})

    return write


def _value(folder: Path) -> float:
    return float(ckd.load_state(folder, "state")["value"][0])


def test_write_publishes_and_points_latest(tmp_path) -> None:
    path = ckd.write_checkpoint(tmp_path, "step-1", _writer(1))
    assert path == tmp_path / "checkpoints" / "step-1"
    assert ckd.read_latest(tmp_path) == "step-1"
    marker = ckd.verify_checkpoint(path)
    assert set(marker["files"]) == {"state.safetensors", "state.json"} and marker["serial"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert _value(ckd.resolve_resume(tmp_path, "latest")) == 1


def test_a_failing_writer_leaves_the_previous_checkpoint(tmp_path) -> None:
    ckd.write_checkpoint(tmp_path, "step-1", _writer(1))

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckd.write_checkpoint(tmp_path, "step-2", broken)
    assert ckd.read_latest(tmp_path) == "step-1"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-1"]


def test_reusing_a_name_replaces_the_checkpoint(tmp_path) -> None:
    ckd.write_checkpoint(tmp_path, "step-2", _writer(2))
    ckd.write_checkpoint(tmp_path, "step-3", _writer(3))
    ckd.write_checkpoint(tmp_path, "step-2", _writer(20))  # resumed from an older one, reached step 2 again
    assert ckd.read_latest(tmp_path) == "step-2" and _value(tmp_path / "checkpoints" / "step-2") == 20
    assert [p.name for p in ckd.list_checkpoints(tmp_path)] == ["step-3", "step-2"]  # write order


def test_keep_last_prunes_in_write_order_and_never_latest(tmp_path) -> None:
    for name in ("b", "a", "d", "c"):  # names that do not sort in write order
        ckd.write_checkpoint(tmp_path, name, _writer(1))
    assert [p.name for p in ckd.keep_last(tmp_path, 2)] == ["b", "a"]
    assert [p.name for p in ckd.list_checkpoints(tmp_path)] == ["d", "c"]
    (tmp_path / "checkpoints" / "latest").write_text("d\n")  # e.g. resumed from d
    ckd.write_checkpoint(tmp_path, "e", _writer(1))
    (tmp_path / "checkpoints" / "latest").write_text("d\n")
    assert [p.name for p in ckd.keep_last(tmp_path, 1)] == ["c"]  # keeps the newest, and latest besides
    assert [p.name for p in ckd.list_checkpoints(tmp_path)] == ["d", "e"]
    with pytest.raises(UserError, match="keep"):
        ckd.keep_last(tmp_path, 0)


def test_prepare_restores_a_moved_aside_namesake_and_removes_temporaries(tmp_path) -> None:
    ckd.write_checkpoint(tmp_path, "step-1", _writer(1))
    root = tmp_path / "checkpoints"
    os.rename(root / "step-1", root / ".old-step-1-abcd1234")  # killed between the two renames
    (root / ".tmp-step-1-ffff0000").mkdir()
    (root / ".tmp-latest-0000ffff").write_text("x")
    with pytest.raises(UserError, match="not found"):
        ckd.resolve_resume(tmp_path, "latest")
    done = ckd.prepare_checkpoints(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert _value(ckd.resolve_resume(tmp_path, "latest")) == 1
    ckd.write_checkpoint(tmp_path, "step-2", _writer(2))
    (root / ".old-step-2-00000000").mkdir()  # killed after the new one took the name: stale
    ckd.prepare_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1", "step-2"]


def test_resolve_resume_accepts_latest_a_run_folder_or_a_checkpoint(tmp_path) -> None:
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        ckd.resolve_resume(tmp_path, "latest")
    ckd.write_checkpoint(tmp_path, "step-1", _writer(1))
    ckd.write_checkpoint(tmp_path, "step-2", _writer(2))
    assert ckd.resolve_resume(tmp_path, "latest").name == "step-2"
    assert ckd.resolve_resume(tmp_path / "elsewhere", tmp_path).name == "step-2"
    assert ckd.resolve_resume(tmp_path, tmp_path / "checkpoints" / "step-1").name == "step-1"
    with pytest.raises(UserError, match="not found"):
        ckd.resolve_resume(tmp_path, tmp_path / "nope")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckd.resolve_resume(tmp_path, tmp_path / "checkpoints")
    state = tmp_path / "checkpoints" / "step-1" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(UserError, match="missing or truncated"):
        ckd.resolve_resume(tmp_path, tmp_path / "checkpoints" / "step-1")


@pytest.mark.parametrize("name", ["", "latest", ".hidden", "a/b", ".."])
def test_bad_names(tmp_path, name) -> None:
    with pytest.raises(ValueError):
        ckd.write_checkpoint(tmp_path, name, _writer(1))


def test_state_files_round_trip_nested_values(tmp_path) -> None:
    w = torch.arange(6.0).reshape(2, 3)
    state = {
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}, 1: {"step": 4, "RMS": 0.5}},
                "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "fused": None, "name": "unet/decay"}]},
        "tied": {"a": w, "b": w, "view": w.t()},
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "flags": [True, False, math.inf, -0.0, 1e-300, 2**70],
        "empty": {},
    }
    ckd.save_state(tmp_path, "s", state)
    back = ckd.load_state(tmp_path, "s")
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]  # tuple and int keys survive
    assert list(back["opt"]["state"]) == [0, 1] and back["opt"]["state"][1] == {"step": 4, "RMS": 0.5}
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], torch.ones(2))
    assert torch.equal(back["tied"]["view"], w.t()) and torch.equal(back["tied"]["b"], w)
    assert back["bf16"].dtype == torch.bfloat16
    assert back["flags"] == state["flags"] and math.copysign(1, back["flags"][3]) == -1
    assert back["empty"] == {}
    assert "__tensor__" in (tmp_path / "s.json").read_text()


@pytest.mark.parametrize(
    "bad",
    [{"x": object()}, {("a", 1): 1}, {"__tensor__": 1}, {"a": {"__tuple__": [1]}}, {"__int_keys__": {}},
     {"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}],
)  # fmt: skip
def test_state_files_refuse_what_they_cannot_represent(tmp_path, bad) -> None:
    with pytest.raises((TypeError, ValueError)):
        ckd.save_state(tmp_path, "s", bad)


def test_state_files_keep_other_dunder_keys(tmp_path) -> None:
    """bitsandbytes' 8-bit optimisers nest their quantisation state under a dunder key."""
    state = {"optimizer": {"state": {0: {"step": 3, "__bnb_optimizer_quant_state__": {
        "state1": torch.arange(6, dtype=torch.uint8), "qmap1": torch.linspace(-1, 1, 5)}}}}}  # fmt: skip
    ckd.save_state(tmp_path, "s", state)
    back = ckd.load_state(tmp_path, "s")["optimizer"]["state"][0]
    assert back["step"] == 3 and set(back["__bnb_optimizer_quant_state__"]) == {"state1", "qmap1"}
    quant = back["__bnb_optimizer_quant_state__"]
    assert quant["state1"].dtype == torch.uint8 and torch.equal(quant["state1"], torch.arange(6, dtype=torch.uint8))
    assert torch.equal(quant["qmap1"], torch.linspace(-1, 1, 5))


def test_load_state_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        ckd.load_state(tmp_path, "missing")
    (tmp_path / "s.json").write_text("{broken")
    with pytest.raises(UserError, match="JSON"):
        ckd.load_state(tmp_path, "s")


# ── a real process killed with SIGKILL while it writes ─────────────────────────────────────
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from sdxl_trainer.train import checkpoint_dir as ckd

    run, mode, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def block():
        ready.write_text("ready")
        time.sleep(600)

    def writer(value, stop=False):
        def write(folder):
            ckd.save_state(folder, "state", {"value": torch.full((4096,), float(value)), "step": value})
            if stop:
                (folder / "more.bin").write_bytes(b"x" * 1000)
                block()
        return write

    ckd.write_checkpoint(run, "step-1", writer(1))
    if mode == "writing":
        ckd.write_checkpoint(run, "step-2", writer(2, stop=True))
    elif mode == "before_latest":
        ckd._write_latest = lambda root, name: block()
        ckd.write_checkpoint(run, "step-2", writer(2))
    elif mode == "replacing":
        class BlockingOs:
            def __getattr__(self, name):
                return getattr(os, name)
            def rename(self, src, dst):
                os.rename(src, dst)
                if Path(dst).name.startswith(".old-"):
                    block()
        ckd.os = BlockingOs()
        ckd.write_checkpoint(run, "step-1", writer(3))
    """
)


def _run_and_kill(tmp_path: Path, mode: str) -> Path:
    script, ready, run = tmp_path / "child.py", tmp_path / "ready", tmp_path / "run"
    script.write_text(CHILD)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(run), mode, str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"child exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "child never reached the blocking point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return run


@pytest.mark.parametrize("mode", ["writing", "before_latest", "replacing"])
def test_sigkill_mid_checkpoint_leaves_latest_valid(tmp_path, mode) -> None:
    run = _run_and_kill(tmp_path, mode)
    root = run / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    if mode == "writing":
        assert any(n.startswith(".tmp-step-2-") for n in leftovers)
        assert ckd.read_latest(run) == "step-1"
    elif mode == "before_latest":
        assert ckd.read_latest(run) == "step-1"
        ckd.verify_checkpoint(root / "step-2")  # published, complete, just not yet `latest`
    else:
        assert any(n.startswith(".old-step-1-") for n in leftovers) and not (root / "step-1").exists()
    ckd.prepare_checkpoints(run)
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    resumed = ckd.resolve_resume(run, "latest")
    assert resumed.name == "step-1" and _value(resumed) == 1
    assert json.loads((resumed / "checkpoint.json").read_text())["name"] == "step-1"
