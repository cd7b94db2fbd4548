"""A synthetic tagged dataset for the demo and the tests: solid colours and simple shapes.

Deterministic by seed (same seed → byte-identical files). Images have sides 64–384 px and aspect
ratios from 1:2 to 2:1, saved as a mix of PNG and JPEG, each with a ``<stem>.txt`` sidecar of
comma-separated tags that describe it, for example::

    solid color, black background, no humans
    red circle, blue background, simple shapes, no humans
    yellow stripes, vertical stripes, purple background, simple shapes, no humans

Solid black and solid white are each a fixed 20% of the set (the demo's zero-terminal-SNR check asks
the trained model for a solid black image, so the model must see many); other solid colours another
20%; shapes (circle, square, triangle, stripes) on coloured backgrounds the remaining 40%. Shape
backgrounds never use black or white, so "black background" always means a solid black image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdxl_trainer.errors import UserError

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (225, 30, 30),
    "green": (40, 170, 60),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 35),
    "orange": (245, 140, 25),
    "purple": (130, 45, 185),
    "pink": (245, 135, 190),
    "cyan": (35, 205, 215),
    "gray": (128, 128, 128),
    "brown": (125, 80, 40),
}
COLOURS = tuple(c for c in PALETTE if c not in ("black", "white"))
SHAPES = ("circle", "square", "triangle", "stripes")
MIN_SIDE, MAX_SIDE = 64, 384
KIND_SHARES = {"black": 0.2, "white": 0.2, "solid": 0.2}  # the rest are shapes


@dataclass(frozen=True)
class SyntheticItem:
    """One image's recipe: everything needed to draw it and the tags that describe it."""

    stem: str
    width: int
    height: int
    ext: str  # "png" | "jpg"
    background: str
    shape: str | None = None  # None for a solid colour
    foreground: str | None = None
    vertical: bool = False  # stripes only
    scale: float = 0.6  # shape size as a fraction of the short side

    @property
    def tags(self) -> list[str]:
        if self.shape is None:
            return ["solid color", f"{self.background} background", "no humans"]
        tags = [f"{self.foreground} {self.shape}"]
        if self.shape == "stripes":
            tags.append("vertical stripes" if self.vertical else "horizontal stripes")
        return tags + [f"{self.background} background", "simple shapes", "no humans"]

    @property
    def caption(self) -> str:
        return ", ".join(self.tags)

    @property
    def filename(self) -> str:
        return f"{self.stem}.{self.ext}"


def _kinds(n: int, rng: np.random.Generator) -> list[str]:
    counts = {k: round(share * n) for k, share in KIND_SHARES.items()}
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds += ["shape"] * (n - len(kinds))
    return [kinds[i] for i in rng.permutation(n)]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """A size with sides in [64, 384] and aspect ratio in [1:2, 2:1], log-uniform in both."""
    while True:
        side = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
        if MIN_SIDE <= min(w, h) and max(w, h) <= MAX_SIDE and 0.5 <= w / h <= 2.0:
            return w, h


def synthetic_items(n: int = 300, *, seed: int = 0) -> list[SyntheticItem]:
    """The recipes of ``build_synthetic_dataset(n=n, seed=seed)``, without drawing anything."""
    if n < 1:
        raise UserError(f"n={n}: a synthetic dataset needs at least one image")
    rng = np.random.default_rng(seed)
    items = []
    for i, kind in enumerate(_kinds(n, rng)):
        w, h = _size(rng)
        ext = "png" if rng.random() < 0.5 else "jpg"
        stem = f"synth_{i:05d}"
        if kind in ("black", "white"):
            items.append(SyntheticItem(stem, w, h, ext, background=kind))
        elif kind == "solid":
            items.append(SyntheticItem(stem, w, h, ext, background=COLOURS[rng.integers(len(COLOURS))]))
        else:
            bg, fg = rng.choice(len(COLOURS), size=2, replace=False)
            items.append(
                SyntheticItem(
                    stem, w, h, ext,
                    background=COLOURS[bg],
                    shape=SHAPES[rng.integers(len(SHAPES))],
                    foreground=COLOURS[fg],
                    vertical=bool(rng.random() < 0.5),
                    scale=float(rng.uniform(0.45, 0.75)),
                )
            )  # fmt: skip
    return items


def render(item: SyntheticItem) -> Image.Image:
    """Draw one item as an RGB image; circles, squares and triangles are centred on the centre pixel."""
    w, h = item.width, item.height
    img = Image.new("RGB", (w, h), PALETTE[item.background])
    if item.shape is None:
        return img
    draw = ImageDraw.Draw(img)
    fg = PALETTE[item.foreground]
    cx, cy, r = w / 2, h / 2, item.scale * min(w, h) / 2
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif item.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif item.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fg)
    else:  # stripes: 3–5 periods across the image, foreground band first, then background
        length = w if item.vertical else h
        k = 3 + min(2, int((item.scale - 0.45) / 0.1))
        for i in range(k):
            a, b = round(i * length / k), round((i + 0.5) * length / k) - 1
            draw.rectangle([a, 0, b, h] if item.vertical else [0, a, w, b], fill=fg)
    return img


def build_synthetic_dataset(out_dir: Path, *, n: int = 300, seed: int = 0) -> Path:
    """Write ``n`` images with ``<stem>.txt`` tag sidecars into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in synthetic_items(n, seed=seed):
        img = render(item)
        if item.ext == "png":
            img.save(out_dir / item.filename, format="PNG", optimize=False)
        else:
            img.save(out_dir / item.filename, format="JPEG", quality=95, subsampling=0)
        (out_dir / f"{item.stem}.txt").write_text(item.caption + "\n", encoding="utf-8")
    return out_dir
