"""Issue #13, training side: each fault done to a real run or cache, and what the trainer does about it.

Damaged checkpoints (same size: checksums), non-finite weights (never checkpointed), truncated
safetensors (one line, not a traceback), metrics.jsonl after a resume (each step once), a refused
start (writes nothing) and a shard of NaN (skipped updates counted, named, and an exit 2).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdxl_trainer.cache_format.checksum import shard_sums
from sdxl_trainer.cache_format.layout import UNCOND_NAME, list_shard_paths, samples_dir
from sdxl_trainer.cli import app
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.train import integrity, loop
from sdxl_trainer.train.checkpoint_dir import load_tensors
from sdxl_trainer.train.sinks import truncate_log
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.train.step import TrainStep

runner = CliRunner()


def _args(model: Path, work: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--quiet", "train", "--model", str(model), "--work", str(work), "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--batch-size", "2", "--num-steps", str(steps), "--lr", "1e-4",
            "--save-checkpoints", "2", "--set", "checkpoints.diffusers=false", "--set", "checkpoints.single_file=false",
            "--set", "data.workers=1", "--set", "logging.tensorboard=false", "--set", "logging.every_steps=1",
            *extra]  # fmt: skip


def _train(*args: str):
    return runner.invoke(app, list(args))


def _one_error_line(result) -> str:
    """The CLI's refusal: exit 2, exactly one `error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_dir, tiny_work) -> Path:
    """Four updates with checkpoints at steps 2 and 4 (read-only: copy it to damage it)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    result = _train(*_args(tiny_model_dir, tiny_work, out))
    assert result.exit_code == 0, result.output
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _overwrite_tensor_bytes(path: Path, payload: bytes, *, at: int = 16) -> None:
    """Write ``payload`` over the tensor data of a safetensors file (past its header), size unchanged."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len + at)
        f.write(payload)
    assert path.stat().st_size == size


# ── 1. same-size damage: checksums ───────────────────────────────────────────────────────────
def test_every_file_has_a_checksum_matching_its_bytes(base_run):
    ckpt = base_run / "checkpoints" / "step-000004"
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    assert marker["checksums"]["algorithm"] == "sha256"
    recorded = marker["checksums"]["files"]
    assert set(recorded) == set(marker["files"]) and {"trainable.safetensors", "state.safetensors"} <= set(recorded)
    for rel, digest in recorded.items():
        assert hashlib.sha256((ckpt / rel).read_bytes()).hexdigest() == digest, rel


@pytest.mark.parametrize("name", ["trainable.safetensors", "state.safetensors"])
def test_same_size_damage_is_refused_naming_the_last_intact_checkpoint(base_run, tiny_model_dir, tiny_work,
                                                                       tmp_path, name):  # fmt: skip
    run = _copy(base_run, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    damaged = run / "checkpoints" / "step-000004" / name
    _overwrite_tensor_bytes(damaged, np.full(16, np.nan, dtype=np.float32).tobytes())
    before[damaged] = damaged.read_bytes()
    line = _one_error_line(_train(*_args(tiny_model_dir, tiny_work, run, "--resume", "latest")))
    assert "checksum mismatch" in line and str(damaged) in line
    assert f"--resume {run / 'checkpoints' / 'step-000002'}" in line
    # nothing written: no new checkpoint, 'latest' unmoved, metrics and config as they were
    assert _ckpts(run) == ["latest", "step-000002", "step-000004"] and _latest(run) == "step-000004"
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_damage_with_no_intact_checkpoint_left_says_so(base_run, tiny_model_dir, tiny_work, tmp_path):
    run = _copy(base_run, tmp_path)
    for step in ("step-000002", "step-000004"):
        _overwrite_tensor_bytes(run / "checkpoints" / step / "trainable.safetensors", b"\x00garbage\xff" * 4)
    line = _one_error_line(_train(*_args(tiny_model_dir, tiny_work, run, "--resume", "latest")))
    assert "trainable.safetensors" in line and "no intact checkpoint is left" in line


def test_a_checkpoint_without_checksums_resumes_with_a_warning(base_run, tiny_model_dir, tiny_work, tmp_path):
    run = _copy(base_run, tmp_path)
    mid = run / "checkpoints" / "step-000002"
    marker = json.loads((mid / "checkpoint.json").read_text())
    del marker["checksums"]  # as written before this change
    (mid / "checkpoint.json").write_text(json.dumps(marker))
    result = _train(*_args(tiny_model_dir, tiny_work, run, "--resume", str(mid))[1:])  # [1:]: not --quiet
    assert result.exit_code == 0, result.output
    assert "written before checkpoints recorded checksums" in " ".join(result.output.split())
    assert _latest(run) == "step-000004"
    assert "checksums" in json.loads((run / "checkpoints" / "step-000004" / "checkpoint.json").read_text())


# ── 2. non-finite weights are never checkpointed ─────────────────────────────────────────────
def test_non_finite_weights_stop_the_run_before_a_checkpoint(tiny_model_dir, tiny_work, tmp_path, monkeypatch):
    real = TrainStep.update

    def update(self, model, micro, *, state, **kw):
        result = real(self, model, micro, state=state, **kw)
        if state.step == 3:  # an update that was taken but left a NaN in the weights (an overflow in the step)
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(TrainStep, "update", update)
    run = tmp_path / "run"
    line = _one_error_line(_train(*_args(tiny_model_dir, tiny_work, run, "--ema")))
    assert "non-finite values in the trained weights" in line and "step 4" in line
    assert f"--resume {run / 'checkpoints' / 'step-000002'}" in line
    assert _ckpts(run) == ["latest", "step-000002"] and _latest(run) == "step-000002"
    kept = load_file(run / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(t.isfinite().all() for t in kept.values())


def test_all_finite_sees_nan_and_inf_in_any_dtype():
    ok = [torch.randn(7), torch.randn(3, 3).bfloat16(), torch.tensor([3.0e38]), torch.zeros(0), torch.arange(4)]
    assert integrity.all_finite(ok)
    for bad in (torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")]).bfloat16()):
        assert not integrity.all_finite([*ok, bad])


# ── 3. truncated or garbled safetensors: one line naming the file ────────────────────────────
def test_truncated_uncond_embedding_is_one_line(tiny_model_dir, tiny_work, tmp_path):
    work = Path(shutil.copytree(tiny_work, tmp_path / "work"))
    uncond = work / "cache" / UNCOND_NAME
    uncond.write_bytes(uncond.read_bytes()[:40])
    result = _train(*_args(tiny_model_dir, work, tmp_path / "run", "--set", "data.p_uncond=0.1"))
    line = _one_error_line(result)
    assert str(uncond) in line and "truncated" in line and "sdxl prep cache" in line


def test_garbled_header_of_an_unchecksummed_checkpoint_is_one_line(base_run, tiny_model_dir, tiny_work, tmp_path):
    run = _copy(base_run, tmp_path)
    ckpt = run / "checkpoints" / "step-000004"
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    del marker["checksums"]
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))
    path = ckpt / "trainable.safetensors"
    with open(path, "r+b") as f:  # a header length far past the end of the file, size unchanged
        f.write(struct.pack("<Q", 1 << 40))
    line = _one_error_line(_train(*_args(tiny_model_dir, tiny_work, run, "--resume", "latest")))
    assert str(path) in line and "damaged or truncated safetensors file" in line


def test_load_tensors_of_a_truncated_file_raises_user_error(base_run, tmp_path):
    path = tmp_path / "trainable.safetensors"
    path.write_bytes((base_run / "checkpoints" / "step-000002" / "trainable.safetensors").read_bytes()[:6])
    with pytest.raises(UserError) as e:
        load_tensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# ── 4. metrics.jsonl after a resume: each step once ──────────────────────────────────────────
def test_resume_in_the_same_run_logs_each_step_once(base_run, tiny_model_dir, tiny_work, tmp_path):
    run = _copy(base_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss"')  # a torn last line: killed mid-write
    mid = run / "checkpoints" / "step-000002"
    result = _train(*_args(tiny_model_dir, tiny_work, run, "--resume", str(mid)))
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # was [1, 2, 3, 4, 3, 4] (and a torn line) before resumes truncated the log


def test_truncate_log_keeps_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 4)) + '{"step": 5')
    assert truncate_log(log, after_step=2) == 4
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob(".*tmp")) and truncate_log(tmp_path / "none.jsonl", after_step=0) == 0


# ── 5. a refused start writes nothing ────────────────────────────────────────────────────────
def test_resume_latest_of_a_missing_run_writes_nothing(tiny_model_dir, tiny_work, tmp_path):
    run = tmp_path / "nope"
    line = _one_error_line(_train(*_args(tiny_model_dir, tiny_work, run, "--resume", "latest")))
    assert "no checkpoint to resume from" in line
    assert not run.exists()


def test_a_refused_resume_leaves_the_run_as_it_was(base_run, tiny_model_dir, tiny_work, tmp_path):
    run = _copy(base_run, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    args = _args(tiny_model_dir, tiny_work, run, "--resume", "latest")
    args[args.index("--batch-size") + 1] = "1"
    assert "batch_size" in _one_error_line(_train(*args))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


# ── 6. a shard of NaN: skipped updates counted, their samples named, exit 2 ──────────────────
def _nan_shard(work: Path) -> set[str]:
    """Overwrite every latent of the first shard with NaN (Arrow rewrite, metadata kept); its ids."""
    _, path = list_shard_paths(work / "cache")[0]
    table = pq.read_table(path)
    for name in ("latent_mean", "latent_mean_flip"):
        column = table.column(name).combine_chunks()
        nan = [None if v is None else np.full(len(v) // 2, np.nan, np.float16).tobytes() for v in column.to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(nan, pa.binary()))
    pq.write_table(table, path, row_group_size=4)
    # as if the encoder had written NaN: the cache's own record of the shard matches the new bytes
    meta_path = work / "cache" / "cache_meta.json"
    meta = json.loads(meta_path.read_text())
    for entry in meta["shards"]:
        if (samples_dir(work / "cache") / entry["path"]).resolve() == Path(path).resolve():
            entry.update(shard_sums(Path(path)))
    meta_path.write_text(json.dumps(meta))
    return set(table.column("id").to_pylist())


def test_a_nan_shard_ends_the_run_with_the_skipped_ids(tiny_model_dir, tiny_work, tmp_path):
    work = Path(shutil.copytree(tiny_work, tmp_path / "work"))
    bad_ids = _nan_shard(work)
    run = tmp_path / "run"
    line = _one_error_line(_train(*_args(tiny_model_dir, work, run, "--set", "max_consecutive_skips=1000", steps=8)))
    skips = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert skips and f"{len(skips)} of 8 updates" in line and "max_skipped_fraction 0.01" in line
    assert str(run / "skipped.jsonl") in line
    assert all(s["ids"] and set(s["ids"]) & bad_ids for s in skips)
    state = json.loads((run / "checkpoints" / "step-000008" / "state.json").read_text())
    assert state["train"]["skipped"] == len(skips) and _latest(run) == "step-000008"  # nothing lost
    # a looser limit accepts the same run
    cfg = load_config(TrainConfig, run / "config.yaml", {"max_skipped_fraction": 1.0})
    integrity.check_skipped_fraction(cfg, TrainState(step=8, skipped=len(skips)))


def test_skipped_fraction_limit_is_inclusive(tiny_model_dir, tiny_work, tmp_path):
    cfg = load_config(TrainConfig, None, {"model": str(tiny_model_dir), "work": str(tiny_work),
                                          "out": str(tmp_path), "num_steps": 100})  # fmt: skip
    integrity.check_skipped_fraction(cfg, TrainState(step=100, skipped=1))
    with pytest.raises(UserError, match="2 of 100 updates"):
        integrity.check_skipped_fraction(cfg, TrainState(step=100, skipped=2))
