"""`sdxl train --data-dir DATA --model MODEL --out RUN` (issue #11): every stage in one command, each
prep stage skipped when its artifact is current, killed anywhere and re-run to completion; and the
`--resolution` / `--min-bucket-reso` / `--max-bucket-reso` bucket flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer import cli
from sdxl_trainer.config import BucketConfig, ScanConfig
from sdxl_trainer.prep.buckets import make_buckets
from sdxl_trainer.schema import read_table

runner = CliRunner()
PREP = {"scan": {"min_side": 64}, "stats": {"device": "cpu"}, "cache": {"device": "cpu", "batch_size": 16}}
TRAIN = ["--resolution", "128", "--batch-size", "4", "--device", "cpu", "--precision", "fp32", "--latent-norm",
         "per_channel", "--tag-weights", "--save-checkpoints", "1", "--set", "checkpoints.single_file=false",
         "--set", "checkpoints.diffusers=false", "--set", "logging.tensorboard=false", "--set", "data.workers=1",
         "--set", "checkpoints.keep_last=2"]  # fmt: skip


@pytest.fixture()
def setup(tmp_path, synthetic_data_dir, tiny_model_dir):
    data = Path(shutil.copytree(synthetic_data_dir, tmp_path / "data"))
    for extra in sorted(data.iterdir())[32 * 2 :]:  # 32 images (and their sidecars): quicker stages
        extra.unlink()
    prep = tmp_path / "prep.yaml"
    prep.write_text(yaml.safe_dump(PREP))
    args = ["train", "--data-dir", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
            "--prep-config", str(prep), *TRAIN]  # fmt: skip
    return tmp_path, data, args


def _sdxl(args: list[str]):
    return runner.invoke(cli.app, args, catch_exceptions=False)


def _stage_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.startswith("── ")]


def test_one_command_runs_every_stage_then_skips_what_is_current(setup):
    tmp, data, args = setup
    first = _sdxl([*args, "--num-steps", "3"])
    assert first.exit_code == 0, first.output
    assert [line.split(" →")[0] for line in _stage_lines(first.output)] == [
        "── 1/5 prep scan", "── 2/5 prep stats", "── 3/5 prep cache", "── 4/5 prep weights", "── 5/5 train"]
    run, work = tmp / "run", tmp / "run" / "work"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    manifest, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    assert manifest.num_rows == 32 and meta["config"]["buckets"]["max_area"] == 128 * 128
    for name in ("latent_stats.json", "tag_weights.parquet", "cache/cache_meta.json", "pipeline.json"):
        assert (work / name).is_file(), name

    # the same command again: stats, cache and weights are current; the finished run trains nothing
    again = _sdxl([*args, "--num-steps", "3"])
    assert again.exit_code == 0, again.output
    lines = _stage_lines(again.output)
    assert all(": current" in line for line in lines[1:4]), lines
    assert "had already reached its length (3 updates)" in " ".join(again.output.split())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"

    # a longer run: resumed from the checkpoint, not started over
    longer = _sdxl([*args, "--num-steps", "5"])
    assert longer.exit_code == 0, longer.output
    assert "resumed from" in longer.output and "at step 3" in longer.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 5

    # a new image: the scan sees it and every later stage is stale again
    Image.new("RGB", (96, 80), (200, 30, 40)).save(data / "zz_new.png")
    (data / "zz_new.txt").write_text("red circle, new tag")
    grown = _sdxl([*args, "--num-steps", "6"])
    lines = _stage_lines(grown.output)
    assert not any(": current" in line for line in lines), lines
    # ... and the resume sees its data order changed: refused, naming the flag that accepts it
    assert grown.exit_code == 2 and "data order" in grown.output and "--force" in grown.output
    forced = _sdxl([*args, "--num-steps", "6", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000006"
    manifest, _ = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    assert manifest.num_rows == 33 and "zz_new.png" in manifest.column("path").to_pylist()


def test_one_command_killed_then_rerun_finishes(setup):
    tmp, _, args = setup
    n = 6
    cmd = [sys.executable, "-m", "sdxl_trainer.cli", *args, "--num-steps", str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = tmp / "run" / "checkpoints" / "latest", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-000002":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and latest.read_text().strip() < f"step-{n:06d}", "finished before the kill"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = " ".join((done.stdout + done.stderr).split())
    assert ": current" in printed and "resumed from" in printed
    assert latest.read_text().strip() == f"step-{n:06d}"
    steps = [json.loads(line)["step"] for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == n  # no step logged twice


def test_one_command_refusals_are_one_line(setup, tmp_path):
    _, data, args = setup
    no_data = _sdxl(["train", "--work", "w", "--model", "m", "--out", "o", "--num-steps", "1", "--resolution", "768"])
    assert no_data.exit_code == 2 and "with --data-dir" in no_data.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"scann": {}}))
    result = _sdxl([*args, "--num-steps", "1", "--prep-config", str(bad)])
    assert result.exit_code == 2 and "unknown section(s) scann" in result.output
    bad.write_text(yaml.safe_dump({"scan": {"out": str(tmp_path / "elsewhere")}}))
    result = _sdxl([*args, "--num-steps", "1", "--prep-config", str(bad)])
    assert result.exit_code == 2 and "scan.out" in result.output and "Traceback" not in result.output
    bad.write_text(yaml.safe_dump({"cache": {"batch_sise": 4}}))
    result = _sdxl([*args, "--num-steps", "1", "--prep-config", str(bad)])
    assert result.exit_code == 2 and "section cache" in result.output and "batch_size" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


# ── --resolution ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "value, expected",
    [(1024, (1024 * 1024, 1024, 512, 2048)), ("768", (768 * 768, 768, 384, 1536)), ("512", (512 * 512, 512, 256, 1024)),
     ("832,1216", (832 * 1216, 960, 448, 1920)), ("832x1216", (832 * 1216, 960, 448, 1920))],
)  # fmt: skip
def test_resolution_sets_the_bucket_parameters(value, expected):
    b = BucketConfig(resolution=value)
    assert (b.max_area, b.base, b.min_side, b.max_side) == expected
    if value == 1024:  # exactly SDXL's defaults: the same 33 buckets
        d = BucketConfig()
        assert make_buckets(max_area=b.max_area, step=b.step, min_side=b.min_side, max_side=b.max_side, base=b.base) \
            == make_buckets(max_area=d.max_area, step=d.step, min_side=d.min_side, max_side=d.max_side, base=d.base)


def test_resolution_keys_beside_it_win_and_bad_values_are_refused():
    b = BucketConfig(resolution="1024", min_side=256, max_side=1536)
    assert (b.max_area, b.min_side, b.max_side) == (1024 * 1024, 256, 1536)
    for bad in ("abc", "0", "-512", "32", "1,2,3"):
        with pytest.raises(ValueError):
            BucketConfig(resolution=bad)


def test_scan_cli_resolution_and_kohya_bucket_flags(synthetic_data_dir, tmp_path):
    work = tmp_path / "work"
    result = _sdxl(["prep", "scan", str(synthetic_data_dir), "--out", str(work), "--min-side", "64", "--resolution",
                    "128", "--min-bucket-reso", "64", "--max_bucket_reso", "192"])  # fmt: skip
    assert result.exit_code == 0, result.output
    table, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    cfg = ScanConfig.model_validate(meta["config"])
    assert (cfg.buckets.max_area, cfg.buckets.min_side, cfg.buckets.max_side) == (128 * 128, 64, 192)
    buckets = {tuple(b) for b in meta["buckets"]}
    assert buckets == set(make_buckets(max_area=128 * 128, step=64, min_side=64, max_side=192, base=128))
    ok = table.filter(table["status"].to_numpy(zero_copy_only=False) == "ok").to_pylist()
    assert ok and all((r["bucket_width"], r["bucket_height"]) in buckets for r in ok)


# ── a datasets: list through every stage ───────────────────────────────────────────────────────


def _split_data(tmp: Path, synthetic_data_dir: Path) -> tuple[Path, Path]:
    """Two folders of the synthetic set: 'hero' (8 images, .caption sidecars) and 'style' (16, .txt)."""
    images = sorted(p for p in synthetic_data_dir.iterdir() if p.suffix != ".txt")
    hero, style = tmp / "hero", tmp / "style"
    for folder, chosen, ext in ((hero, images[:8], ".caption"), (style, images[8:24], ".txt")):
        folder.mkdir()
        for img in chosen:
            shutil.copy(img, folder / img.name)
            shutil.copy(img.with_suffix(".txt"), (folder / img.name).with_suffix(ext))
    return hero, style


@pytest.mark.parametrize("layout", ["ours", "kohya"])
def test_one_command_with_a_dataset_config(tmp_path, synthetic_data_dir, tiny_model_dir, layout):
    import pyarrow.parquet as pq

    from sdxl_trainer.cache_format import list_groups

    hero, style = _split_data(tmp_path, synthetic_data_dir)
    if layout == "ours":
        config = tmp_path / "datasets.yaml"
        config.write_text(yaml.safe_dump({"datasets": [
            {"path": str(hero), "num_repeats": 3, "activation_token": "hero token", "caption_extension": ".caption",
             "caption_dropout_rate": 0.25},
            {"path": str(style), "keep_tokens": 2}]}))  # fmt: skip
    else:
        config = tmp_path / "datasets.toml"
        config.write_text(f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\n\n[[datasets.subsets]]\n'
                          f'image_dir = "{hero}"\nnum_repeats = 3\nclass_tokens = "hero token"\n'
                          f'caption_extension = ".caption"\ncaption_dropout_rate = 0.25\n\n'
                          f'[[datasets.subsets]]\nimage_dir = "{style}"\nkeep_tokens = 2\n')  # fmt: skip
    prep = tmp_path / "prep.yaml"
    prep.write_text(yaml.safe_dump({"scan": {"min_side": 64}, "cache": {"device": "cpu", "batch_size": 16}}))
    run = tmp_path / "run"
    result = _sdxl(["train", "--dataset-config", str(config), "--model", str(tiny_model_dir), "--out", str(run),
                    "--prep-config", str(prep), "--resolution", "128", "--batch-size", "4", "--device", "cpu",
                    "--num-epochs", "1", "--set", "checkpoints.single_file=false", "--set",
                    "checkpoints.diffusers=false", "--set", "logging.tensorboard=false"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest, _ = read_table(run / "work" / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    rows = {r["path"]: r for r in manifest.to_pylist() if r["status"] == "ok"}
    assert len(rows) == 24
    by_set = {name: [r for p, r in rows.items() if p.startswith(name + "/")] for name in ("hero", "style")}
    assert len(by_set["hero"]) == 8 and len(by_set["style"]) == 16
    assert all(r["repeats"] == 3 and r["tags"][0] == "hero token" and r["caption_dropout"] == 0.25
               and r["keep_tokens"] == 1 for r in by_set["hero"])  # fmt: skip
    assert all(r["repeats"] == 1 and r["keep_tokens"] == 2 and r["caption_dropout"] is None for r in by_set["style"])
    # one epoch = 8·3 + 16 = 40 samples with repeats; the trainer says so and trains that many batches
    printed = " ".join(result.output.split())
    assert "40 samples with repeats" in printed
    # the cache holds the activation token first in every variant of a hero image
    hero_ids = {r["id"] for r in by_set["hero"]}
    seen = 0
    for infos in list_groups(run / "work" / "cache").values():
        for info in infos:
            table = pq.read_table(info.path, columns=["id", "captions"])
            for row in table.to_pylist():
                if row["id"] in hero_ids:
                    seen += 1
                    assert all(c.startswith("hero token") for c in row["captions"]), row["captions"]
    assert seen == 8
