"""`sdxl demo --out DIR`: the whole pipeline on synthetic data and a tiny SDXL model, offline, on CPU.

It builds DIR/model (tiny SDXL-architecture diffusers folder, seeded random weights) and DIR/data
(synthetic tagged images), then runs every stage that exists, in order, through the same `run`
functions the CLI calls — so the demo exercises the real code paths, not a mock of them:
scan → stats → cache → weights.
"""

from __future__ import annotations

import time
from pathlib import Path

from sdxl_trainer import console
from sdxl_trainer.config import CacheConfig, ScanConfig, StatsConfig, WeightsConfig
from sdxl_trainer.models.tiny import DEMO_BUCKETS, build_tiny_model
from sdxl_trainer.prep import cache, scan, stats, weights
from sdxl_trainer.prep.synthetic import build_synthetic_dataset

DEMO_IMAGES = 300


def demo_scan_config(data: Path, work: Path, model: Path | None = None) -> ScanConfig:
    """Scan settings for the tiny model: 128-px buckets, small images allowed."""
    return ScanConfig(data_dir=data, out=work, model=model, min_side=64, buckets=DEMO_BUCKETS)


def demo_cache_config(work: Path, model: Path) -> CacheConfig:
    return CacheConfig(work=work, model=model, device="cpu", batch_size=16, flip=True)


def run(out: Path, *, n_images: int = DEMO_IMAGES, seed: int = 0) -> dict:
    """Build the kit (reusing it when present) and run every stage; returns seconds per stage."""
    out = Path(out)
    model, data, work = out / "model", out / "data", out / "work"
    timings: dict[str, float] = {}

    def stage(name: str, fn) -> None:
        console.info(f"[bold cyan]── {name}[/]")
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0

    if not (model / "model_index.json").is_file():
        stage("build tiny model", lambda: build_tiny_model(model, seed=seed))
    if not data.is_dir():
        stage("build synthetic data", lambda: build_synthetic_dataset(data, n=n_images, seed=seed))
    stage("prep scan", lambda: scan.run(demo_scan_config(data, work, model)))
    stage("prep stats", lambda: stats.run(StatsConfig(work=work, model=model, device="cpu")))
    stage("prep cache", lambda: cache.run(demo_cache_config(work, model), verify_after=True))
    stage("prep weights", lambda: weights.run(WeightsConfig(work=work, min_count=2)))
    console.table("sdxl demo", [(k, f"{v:.1f} s") for k, v in timings.items()], ("stage", "time"))
    return timings
