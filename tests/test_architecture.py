"""The layering in GUIDE.md, held by a test: imports point down, diffusion/ stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sdxl_trainer"

# What each layer may import from our own package (besides itself).
ALLOWED = {
    "diffusion": set(),
    "schema": {"errors"},
    "errors": set(),
    "config": {"errors"},
    "console": set(),
    "dist": {"errors"},
    "locks": {"errors", "console"},
    "disk": {"errors", "console", "locks"},
    "caption_variants": {"errors", "config"},
    "synthetic": {"errors"},
    "cache_format": {"schema", "errors"},
    "models": {"errors", "schema", "config", "console", "synthetic"},
    # the sampling core: below both train (in-training samples) and evaluate (generate, report), so an
    # image rendered while training runs the very code `sdxl generate` runs, without train → evaluate
    "sampling": {"errors", "console", "models", "diffusion"},
    "prep": {"errors", "schema", "config", "console", "models", "diffusion", "cache_format", "dist", "caption_variants",
             "disk"},
    "train": {"errors", "schema", "config", "console", "models", "diffusion", "cache_format", "dist", "caption_variants",
              "sampling"},
    "evaluate": {"errors", "schema", "config", "console", "models", "diffusion", "train", "sampling"},
    # publishing reads training checkpoints and the run config (as evaluate does) and writes the Hub folder
    "publish": {"errors", "schema", "config", "console", "models", "diffusion", "train", "evaluate"},
    # `sdxl train-vae`: reads images as prep does (prep/pixels.py) and trains with train's blocks, so it
    # sits above both, keeping train free of prep
    "vae_train": {"errors", "schema", "config", "console", "models", "dist", "prep", "train"},
}
THIRD_PARTY_FORBIDDEN = {"diffusion": {"diffusers", "transformers", "peft", "pyarrow", "datasets", "PIL"}}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "sdxl_trainer":
                names.update(f"sdxl_trainer.{a.name}" for a in node.names)
    return names


def _files():
    return [p for p in PKG.rglob("*.py") if _layer(p) in ALLOWED]


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    layer = _layer(path)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "sdxl_trainer" and len(parts) > 1 and parts[1] != "__version__":
            target = parts[1]
            if target != layer:
                assert target in ALLOWED[layer], f"{path.relative_to(PKG)} imports {name}: {layer} may not import {target}"
        assert parts[0] not in THIRD_PARTY_FORBIDDEN.get(layer, set()), f"{path} imports {name}"


def test_files_stay_readable() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these by responsibility: {long}"
