"""`prep stats` and `prep cache` on the demo kit: numbers, artifacts, resume after kill -9, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from sdxl_trainer.cache_format import completed_ids, list_groups, read_meta, verify
from sdxl_trainer.config import CacheConfig, StatsConfig
from sdxl_trainer.demo import demo_scan_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import cache, scan, stats
from sdxl_trainer.prep.stats import ChannelMoments

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> Path:
    """A work dir scanned from a private copy of the synthetic data (tests may damage the copy)."""
    root = tmp_path_factory.mktemp("scanned")
    data = Path(shutil.copytree(synthetic_data_dir, root / "data"))
    work = root / "work"
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    return work


def _ok_ids(work: Path) -> set[str]:
    t = pq.read_table(work / "manifest.parquet", columns=["id", "status"]).to_pylist()
    return {r["id"] for r in t if r["status"] == "ok"}


def _cache_cfg(work: Path, model: Path, **kw) -> CacheConfig:
    return CacheConfig(work=work, model=model, device="cpu", batch_size=8, **kw)


def test_channel_moments_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=[3, -1, 0.5, 7], scale=[2, 0.1, 5, 1], size=(b, 8, 8, 4)) for b in (1, 5, 3)]
    m = ChannelMoments(channels=4)
    for b in batches:
        m.update(torch.from_numpy(b).permute(0, 3, 1, 2))
    flat = np.concatenate([b.reshape(-1, 4) for b in batches])
    np.testing.assert_allclose(m.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, flat.std(0), rtol=1e-12)
    assert m.count == flat.shape[0]


def test_stats_writes_json_with_provenance(scanned, tiny_model_dir):
    result = stats.run(StatsConfig(work=scanned, model=tiny_model_dir, device="cpu", max_images=20))
    doc = json.loads((scanned / "latent_stats.json").read_text())
    assert doc["artifact"] == "latent_stats" and doc["schema_version"] >= 1
    assert doc["count"] == 20 == result["count"]
    assert len(doc["mean"]) == 4 and len(doc["std"]) == 4
    assert all(np.isfinite(doc["mean"])) and all(s > 0 for s in doc["std"])
    assert doc["config"]["max_images"] == 20 and len(doc["vae_fingerprint"]) == 32


def test_stats_refuses_missing_manifest(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="manifest not found"):
        stats.run(StatsConfig(work=tmp_path, model=tiny_model_dir, device="cpu"))


def test_cache_complete_readable_and_resumable(scanned, tiny_model_dir, tmp_path):
    work = Path(shutil.copytree(scanned, tmp_path / "work"))
    summary = cache.run(_cache_cfg(work, tiny_model_dir, flip=True), verify_after=True)
    ids = _ok_ids(work)
    assert summary["cached"] == len(ids) and summary["skipped"] == 0 and summary["verify_ok"]
    assert completed_ids(work / "cache") == ids
    # The two readers the issue names see every row, partitioned by bucket and chunk count.
    ds = pads.dataset(work / "cache" / "samples", format="parquet", partitioning="hive")
    assert ds.count_rows() == len(ids)
    assert {"bucket", "chunks"} <= set(ds.schema.names)
    import datasets

    files = sorted(str(p) for p in (work / "cache" / "samples").rglob("*.parquet"))
    hf = datasets.load_dataset("parquet", data_files=files, split="train")
    assert sorted(hf["id"]) == sorted(ids)
    # Running again finds everything done and writes nothing new.
    again = cache.run(_cache_cfg(work, tiny_model_dir, flip=True))
    assert again["resumed_from_previous_run"] == len(ids) and again["cached"] == len(ids)
    # A different setting is refused rather than mixed into the same cache.
    with pytest.raises(UserError, match="overwrite"):
        cache.run(_cache_cfg(work, tiny_model_dir, flip=False))


def test_cache_skips_image_changed_since_scan(scanned, tiny_model_dir, tmp_path):
    root = Path(shutil.copytree(scanned.parent, tmp_path / "root"))
    work, data = root / "work", root / "data"
    # Point the manifest's source at the copied data, then break two images after the scan.
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    victims = sorted(data.glob("*.png"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(b"not an image any more")
    summary = cache.run(_cache_cfg(work, tiny_model_dir))
    assert summary["skipped"] == 2 and summary["cached"] == len(_ok_ids(work)) - 2
    logged = [json.loads(line) for line in (work / "cache" / "skipped" / "r000.jsonl").read_text().splitlines()]
    assert {Path(r["path"]).name for r in logged} == {v.name for v in victims}
    assert all(r["reason"] for r in logged)


def _cli_cache(work: Path, model: Path, *extra: str) -> list[str]:
    return ["-m", "sdxl_trainer.cli", "-q", "prep", "cache", str(work), "--model", str(model), "--device", "cpu",
            "--batch-size", "4", "--shard-max-mb", "1", *extra]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _tensors_by_id(cache_dir: Path) -> dict[str, tuple]:
    t = pads.dataset(cache_dir / "samples", format="parquet", partitioning="hive").to_table(
        columns=["id", "latent_mean", "text_hidden_0"]
    )
    return {
        i: (np.frombuffer(m, np.float16), np.frombuffer(h, np.float16))
        for i, m, h in zip(t["id"].to_pylist(), t["latent_mean"].to_pylist(), t["text_hidden_0"].to_pylist())
    }


def test_cache_resumes_after_sigkill(scanned, tiny_model_dir, tmp_path):
    reference = Path(shutil.copytree(scanned, tmp_path / "ref"))
    cache.run(_cache_cfg(reference, tiny_model_dir, shard_max_mb=1))
    work = Path(shutil.copytree(scanned, tmp_path / "work"))
    proc = subprocess.Popen([sys.executable, *_cli_cache(work, tiny_model_dir)], env=_env())
    samples = work / "cache" / "samples"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(samples.rglob("*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make shards smaller"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = completed_ids(work / "cache")
    assert 0 < len(partial) < len(_ok_ids(work))
    subprocess.run([sys.executable, *_cli_cache(work, tiny_model_dir)], env=_env(), check=True)
    assert verify(work / "cache").ok
    got, want = _tensors_by_id(work / "cache"), _tensors_by_id(reference / "cache")
    assert sorted(got) == sorted(want) == sorted(_ok_ids(work))  # every id exactly once
    for i in want:
        np.testing.assert_allclose(got[i][0], want[i][0], atol=2e-3)
        np.testing.assert_allclose(got[i][1], want[i][1], atol=2e-3)


def test_cache_under_torchrun_matches_single_process(scanned, tiny_model_dir, tmp_path):
    single = Path(shutil.copytree(scanned, tmp_path / "single"))
    cache.run(_cache_cfg(single, tiny_model_dir))
    work = Path(shutil.copytree(scanned, tmp_path / "ddp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *_cli_cache(work, tiny_model_dir)]  # fmt: skip
    subprocess.run(cmd, env=_env(), check=True, timeout=300)
    meta = read_meta(work / "cache")
    assert meta["rows"] == len(_ok_ids(work))
    ranks = {p.name[:4] for g in list_groups(work / "cache").values() for p in (s.path for s in g)}
    assert ranks == {"r000", "r001"}, "both ranks should have written shards"
    got, want = _tensors_by_id(work / "cache"), _tensors_by_id(single / "cache")
    assert sorted(got) == sorted(want)
    for i in want:
        np.testing.assert_allclose(got[i][0], want[i][0], atol=2e-3)
        np.testing.assert_allclose(got[i][1], want[i][1], atol=2e-3)


def test_cache_size_estimate_matches_and_disk_check(scanned, tiny_model_dir, tmp_path, monkeypatch):
    work = Path(shutil.copytree(scanned, tmp_path / "work"))
    cfg = _cache_cfg(work, tiny_model_dir)
    rows, _ = cache.read_manifest(work)
    enc = cache.Encoder(cfg, torch.device("cpu"), torch.float32, torch.float32)
    estimate = cache.estimate_bytes(enc, rows)
    summary = cache.run(cfg)
    # The scan counted chunks with the same tokenizer, so the estimate is the stored tensor size
    # up to caption variants that repeat (stored once) and Parquet's own bytes (ids, captions).
    assert 0.5 * estimate < summary["bytes_total"] < 1.1 * estimate
    Usage = type("Usage", (), {"free": estimate // 2})
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: Usage)
    with pytest.raises(UserError, match=r"needs about [\d.]+ [kMG]?B but only [\d.]+ [kMG]?B is free"):  # not "0.0 GB"
        cache.run(_cache_cfg(Path(shutil.copytree(scanned, tmp_path / "w2")), tiny_model_dir))
