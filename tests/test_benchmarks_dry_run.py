"""The prepared GPU check runs its every code path on the CPU (`gpu_check.sh --dry-run`), so the
script a lent GPU will run has not rotted since it was written (issue: one short run must answer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["failed"] == []
    for part in ("environment", "attention", "bf16_vs_fp32", "lora_peak_memory", "full_savers_peak_memory",
                 "full_finetune_throughput"):  # fmt: skip
        assert part in doc and "error" not in doc[part], part
    assert set(doc["lora_peak_memory"]) == {"lora-r16-bf16", "lora-r16-fp8"}
    saver = doc["full_savers_peak_memory"]["full-adafactor-fused-bf16sr"]
    assert saver["skipped"] == 0 and saver["loss"] == saver["loss"]  # two updates taken, finite loss
    runs = doc["full_finetune_throughput"]["runs"]
    assert runs and all(r["samples_per_s"] > 0 for r in runs)


def test_gpu_check_without_a_gpu_says_so_and_exits_2():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh")], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr
