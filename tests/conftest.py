"""Shared fixtures: the tiny demo model and the synthetic dataset, built once per test session.

Both folders are shared by every test that asks for them: treat them as read-only (copy one with
``shutil.copytree`` into ``tmp_path`` before changing it).
"""

from __future__ import annotations

import os

# One intra-op thread, set before torch is imported so subprocesses (torchrun, SIGKILL tests) inherit
# it too and compute bitwise like this process: the tiny models gain nothing from more, and on a
# shared 2-core machine two OpenMP threads per process thrash. `make test` sets the same.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from sdxl_trainer.models.loading import load_pipeline_parts  # noqa: E402
from sdxl_trainer.models.tiny import build_tiny_model  # noqa: E402
from sdxl_trainer.synthetic import build_synthetic_dataset  # noqa: E402

SYNTHETIC_N = 64  # images in the shared dataset (20% solid black, 20% solid white; seed 0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers SDXL folder of the tiny demo model (seed 0): StableDiffusionXLPipeline loads it.

    Its VAE is left random (``fit_vae=False``): the fit takes about a minute and no test here needs
    a VAE that reconstructs; tests/test_vae_fit.py covers the fit, the slow demo test the real kit.
    """
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, fit_vae=False)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of SYNTHETIC_N synthetic images with ``<stem>.txt`` tag sidecars (seed 0)."""
    return build_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", n=SYNTHETIC_N, seed=0)


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_data_dir: Path) -> Path:
    """scan → stats → cache → weights of the synthetic set for the tiny model (read-only: copy to change)."""
    import shutil

    from sdxl_trainer.config import StatsConfig, WeightsConfig
    from sdxl_trainer.demo import demo_cache_config, demo_scan_config
    from sdxl_trainer.prep import cache, scan, stats, weights

    root = tmp_path_factory.mktemp("tiny_work")
    data = Path(shutil.copytree(synthetic_data_dir, root / "data"))
    work = root / "work"
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    stats.run(StatsConfig(work=work, model=tiny_model_dir, device="cpu", max_images=16))
    cache.run(demo_cache_config(work, tiny_model_dir))
    weights.run(WeightsConfig(work=work, min_count=2))
    return work


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path):
    """Every part of the tiny model, loaded fresh for each test module (modules may change them)."""
    return load_pipeline_parts(tiny_model_dir)


@pytest.fixture(autouse=True)
def _console_not_quiet():
    """`sdxl --quiet …` through the CLI runner sets the console's module-wide quiet flag; without a
    reset it leaks into every later test that reads the console's output."""
    from sdxl_trainer import console

    yield
    console.set_quiet(False)
