"""Nothing silent on the data side (issue #13): damaged Parquet, finite garbage in a shard, caches and
statistics from another model, a cache that no longer matches its manifest. Each test does the
damage itself (pyarrow or raw bytes) and checks the outcome: one line naming the file, exit 2 from
the CLI, and nothing lost."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sdxl_trainer.cache_format import Shard, completed_ids, read_meta, verify
from sdxl_trainer.cache_format.checksum import quick_check
from sdxl_trainer.cache_format.layout import list_shard_paths
from sdxl_trainer.cli import app
from sdxl_trainer.config import CacheConfig, TrainConfig, load_config
from sdxl_trainer.demo import demo_cache_config, demo_scan_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.fingerprint import CACHE_PARTS, FLAG, model_fingerprint
from sdxl_trainer.prep import cache, scan
from sdxl_trainer.prep.cache_sync import check_latent_stats
from sdxl_trainer.train.data import scan_cache
from sdxl_trainer.train.provenance import check_inputs

runner = CliRunner()


@pytest.fixture
def work(tiny_work: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny kit's work dir (its manifest still points at the shared data)."""
    return Path(shutil.copytree(tiny_work, tmp_path / "work"))


@pytest.fixture(scope="module")
def other_vae_model(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with one VAE tensor nudged: same architecture, another VAE."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("other") / "model"))
    path = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, path)
    return model


def _one_line_error(result, *names: str) -> str:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    for name in names:
        assert name in text, text
    return text


def _train_args(model: Path, work: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--model", str(model), "--work", str(work), "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--batch-size", "2", "--num-steps", "1", "--set", "checkpoints.single_file=false",
            "--set", "checkpoints.diffusers=false", *extra]  # fmt: skip


def _train_cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 1, "checkpoints.diffusers": False, "checkpoints.single_file": False,
            "data.workers": 1, "logging.tensorboard": False}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


def _first_shard(work: Path) -> Path:
    return list_shard_paths(work / "cache")[0][1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 256] = bytes(b ^ 0xFF for b in data[mid : mid + 256])
    path.write_bytes(bytes(data))


# ── 4. damaged Parquet: one line naming the file and the stage to re-run ──────────────────────────


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_damaged_manifest_is_one_line(work, damage):
    damage(work / "manifest.parquet")
    result = runner.invoke(app, ["-q", "prep", "weights", str(work)])
    _one_line_error(result, "manifest.parquet", "sdxl prep scan")


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_damaged_tag_weights_stop_training_in_one_line(work, tiny_model_dir, tmp_path, damage):
    damage(work / "tag_weights.parquet")
    result = runner.invoke(app, _train_args(tiny_model_dir, work, tmp_path / "run", "--tag-weights"))
    _one_line_error(result, "tag_weights.parquet", "sdxl prep weights")


def test_truncated_shard_stops_training_and_prep_in_one_line(work, tiny_model_dir, tmp_path):
    shard = _first_shard(work)
    _truncate(shard)
    result = runner.invoke(app, _train_args(tiny_model_dir, work, tmp_path / "run"))
    _one_line_error(result, shard.name, "sdxl prep cache")
    result = runner.invoke(app, ["-q", "prep", "cache", str(work), "--model", str(tiny_model_dir), "--device", "cpu", "--flip"])
    _one_line_error(result, shard.name, "delete this shard")
    shard.unlink()  # what the message says: the re-run re-encodes only that shard's rows
    cache.run(demo_cache_config(work, tiny_model_dir), verify_after=True)
    assert completed_ids(work / "cache") == _ok_ids(work)


# ── 1. finite garbage of the right size ─────────────────────────────────────────────────────────


def _overwrite_tensor_bytes(shard: Path) -> None:
    """Plausible finite values over the end of row group 0's latent_mean page: size and footer unchanged."""
    md = pq.read_metadata(shard)
    names = [md.row_group(0).column(j).path_in_schema for j in range(md.num_columns)]
    col = md.row_group(0).column(names.index("latent_mean"))
    end = col.data_page_offset + col.total_compressed_size
    data = bytearray(shard.read_bytes())
    data[end - 64 : end] = np.full(32, 0.25, np.float16).tobytes()
    shard.write_bytes(bytes(data))


def test_finite_garbage_is_caught_by_verify_and_by_the_reader(work, tiny_model_dir):
    shard = _first_shard(work)
    size = shard.stat().st_size
    _overwrite_tensor_bytes(shard)
    assert shard.stat().st_size == size
    report = verify(work / "cache")
    rel = shard.relative_to(work / "cache" / "samples").as_posix()
    assert not report.ok and any(rel in p and "SHA-256" in p for p in report.problems), report.problems
    # the trainer's cheap start-up check cannot see it (size and footer are intact) ...
    assert quick_check(work / "cache", read_meta(work / "cache")) == 0
    # ... but the page CRC stops the read of the damaged rows, naming the shard
    with pytest.raises(UserError, match="CRC") as e:
        Shard(shard).read_rows([0])
    assert str(shard) in str(e.value)
    # `prep cache --verify` re-finalises but keeps the recorded sums: the garbage is not blessed
    result = runner.invoke(app, ["-q", "prep", "cache", str(work), "--model", str(tiny_model_dir), "--device", "cpu", "--flip",
                                 "--verify"])  # fmt: skip
    _one_line_error(result, rel, "SHA-256")


def test_replaced_shard_is_caught_at_training_start_up(work, tiny_model_dir, tmp_path):
    shard = _first_shard(work)
    table = pq.read_table(shard)
    pq.write_table(table, shard, compression="none")  # same rows, rewritten: another footer and size
    result = runner.invoke(app, _train_args(tiny_model_dir, work, tmp_path / "run"))
    _one_line_error(result, shard.name)


def test_cache_without_checksums_warns_and_a_rerun_records_them(work, tiny_model_dir, tmp_path):
    meta_path = work / "cache" / "cache_meta.json"
    meta = json.loads(meta_path.read_text())
    for s in meta["shards"]:
        del s["sha256"], s["footer_sha256"]
    meta.pop("model_fingerprint")
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(work / "cache" / "checksums")
    assert quick_check(work / "cache", read_meta(work / "cache")) == len(meta["shards"])
    index = scan_cache(work / "cache")
    check_inputs(_train_cfg(tiny_model_dir, work, tmp_path / "run"), index.ids)  # warns, does not refuse
    cache.run(demo_cache_config(work, tiny_model_dir), verify_after=True)  # nothing to encode; hashes every shard
    meta = read_meta(work / "cache")
    assert all("sha256" in s for s in meta["shards"]) and "model_fingerprint" in meta


# ── 2. model fingerprints ────────────────────────────────────────────────────────────────────────


def test_fingerprint_follows_weights_not_paths(tiny_model_dir, other_vae_model, tmp_path):
    moved = Path(shutil.copytree(tiny_model_dir, tmp_path / "moved"))
    t0 = time.perf_counter()
    base = model_fingerprint(tiny_model_dir)
    cost = time.perf_counter() - t0
    assert model_fingerprint(moved) == base
    other = model_fingerprint(other_vae_model)
    assert [p for p in base["parts"] if base["parts"][p] != other["parts"][p]] == ["vae"]
    print(f"tiny model fingerprint: {cost * 1e3:.1f} ms")


def test_training_refuses_a_cache_from_another_model(work, other_vae_model, tmp_path):
    result = runner.invoke(app, _train_args(other_vae_model, work, tmp_path / "run"))
    _one_line_error(result, "cache_meta.json", "vae", FLAG)
    index = scan_cache(work / "cache")
    fp = check_inputs(_train_cfg(other_vae_model, work, tmp_path / "run", allow_model_change=True), index.ids)
    assert fp == model_fingerprint(other_vae_model)


def test_latent_stats_from_another_vae_are_refused(work, tiny_model_dir, other_vae_model, tmp_path):
    path = work / "latent_stats.json"
    stats = json.loads(path.read_text())
    stats["model_fingerprint"]["parts"]["vae"] = model_fingerprint(other_vae_model, parts=("vae",))["parts"]["vae"]
    path.write_text(json.dumps(stats))
    current = model_fingerprint(tiny_model_dir, parts=CACHE_PARTS)
    with pytest.raises(UserError, match=FLAG) as e:  # prep cache, before anything is encoded
        check_latent_stats(CacheConfig(work=work, model=tiny_model_dir), current)
    assert "latent_stats.json" in str(e.value) and "vae" in str(e.value)
    check_latent_stats(CacheConfig(work=work, model=tiny_model_dir, allow_model_change=True), current)
    result = runner.invoke(app, _train_args(tiny_model_dir, work, tmp_path / "run", "--latent-norm", "per_channel"))
    _one_line_error(result, "latent_stats.json", FLAG)


def test_resume_with_another_model_is_refused(work, tiny_model_dir, tmp_path):
    # another UNet, same VAE and text encoders: the cache check passes, the checkpoint's must refuse
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "other_unet"))
    path = next((other / "unet").glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, path)
    out = tmp_path / "run"
    lora = ("--lora", "--lora-rank", "2", "--save-checkpoints", "1")
    result = runner.invoke(app, _train_args(tiny_model_dir, work, out, *lora))
    assert result.exit_code == 0, result.output
    state = json.loads((out / "checkpoints" / "step-000001" / "state.json").read_text())
    assert state["model_fingerprint"] == model_fingerprint(tiny_model_dir)
    result = runner.invoke(app, _train_args(other, work, out, *lora, "--resume", "latest"))
    _one_line_error(result, "step-000001", "unet", FLAG)
    result = runner.invoke(app, _train_args(other, work, out, *lora, "--resume", "latest", "--allow-model-change"))
    assert result.exit_code == 0, result.output  # deliberate: a warning, and the run goes on


# ── 3. a cache that no longer matches its manifest ──────────────────────────────────────────────


def _ok_ids(work: Path) -> set[str]:
    t = pq.read_table(work / "manifest.parquet", columns=["id", "status"]).to_pylist()
    return {r["id"] for r in t if r["status"] == "ok"}


def _latents_by_id(cache_dir: Path) -> dict[str, bytes]:
    out = {}
    for _, path in list_shard_paths(cache_dir):
        t = pq.read_table(path, columns=["id", "latent_mean"])
        out.update(zip(t["id"].to_pylist(), t["latent_mean"].to_pylist()))
    return out


def test_rescan_after_images_removed_and_changed(tiny_model_dir, synthetic_data_dir, tmp_path):
    data = Path(shutil.copytree(synthetic_data_dir, tmp_path / "data"))
    work = tmp_path / "work"
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    cache.run(demo_cache_config(work, tiny_model_dir))
    before = _latents_by_id(work / "cache")
    images = sorted(p for p in data.iterdir() if p.suffix == ".png")
    for p in images[:3]:
        p.unlink()
    changed = images[3]
    from PIL import Image

    Image.new("RGB", Image.open(changed).size, (12, 34, 56)).save(changed)
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    ok = _ok_ids(work)
    # training notices before the first update and says what to run
    result = runner.invoke(app, _train_args(tiny_model_dir, work, tmp_path / "run"))
    text = _one_line_error(result, "manifest.parquet", "sdxl prep cache")
    assert "4 cached image(s) are no longer in it, 1 of its images are not cached" in text
    # the cache stage drops the stale rows and encodes only the new image
    summary = cache.run(demo_cache_config(work, tiny_model_dir), verify_after=True)
    assert summary["verify_ok"] and summary["resumed_from_previous_run"] == len(ok) - 1
    after = _latents_by_id(work / "cache")
    assert set(after) == ok and len(after) == summary["cached"]  # no duplicates, nothing stale
    assert all(after[i] == before[i] for i in ok & set(before))  # unchanged rows kept bit for bit
    check_inputs(_train_cfg(tiny_model_dir, work, tmp_path / "run"), scan_cache(work / "cache").ids)


def test_rescan_with_a_changed_caption_re_encodes_that_row(tiny_model_dir, synthetic_data_dir, tmp_path):
    data = Path(shutil.copytree(synthetic_data_dir, tmp_path / "data"))
    work = tmp_path / "work"
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    cache.run(demo_cache_config(work, tiny_model_dir))
    caption = sorted(data.glob("*.txt"))[0]
    caption.write_text("a completely new caption, red square")
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    summary = cache.run(demo_cache_config(work, tiny_model_dir), verify_after=True)
    assert summary["resumed_from_previous_run"] == len(_ok_ids(work)) - 1
    t = pq.read_table(work / "manifest.parquet", columns=["path", "caption", "id"]).to_pylist()
    row = next(r for r in t if Path(r["path"]).stem == caption.stem)
    cached = {}
    for _, path in list_shard_paths(work / "cache"):
        tab = pq.read_table(path, columns=["id", "captions"])
        cached.update(zip(tab["id"].to_pylist(), tab["captions"].to_pylist()))
    assert any("new caption" in c for c in cached[row["id"]])
    assert torch.is_tensor(Shard(_first_shard(work)).read_rows([0])["latent_mean"])
