"""Images on disk and side by side: PNGs carrying their generation parameters, thumbnails, labelled grids.

A PNG written here has two text chunks: ``parameters`` in the A1111 form (which A1111, ComfyUI-Manager
and civitai read) and ``sdxl_trainer`` (every parameter as JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

LABEL_HEIGHT = 14
PAD = 4


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] → an RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def a1111_parameters(params: dict[str, Any]) -> str:
    """The "parameters" text A1111, ComfyUI-Manager and civitai read from a PNG."""
    fields = [f"Steps: {params['steps']}", f"Sampler: {params['sampler']}", f"Schedule type: {params['schedule']}",
              f"CFG scale: {params['cfg_scale']:g}", f"CFG rescale: {params['cfg_rescale']:g}",
              f"Seed: {params['seed']}",
              f"Size: {params['width']}x{params['height']}", f"Sigma max: {params['start_sigma']:g}",
              f"Objective: {params['objective']}", f"Model: {params['checkpoint']}"]  # fmt: skip
    if params.get("pag_scale"):
        fields.append(f"PAG scale: {params['pag_scale']:g}, PAG layers: {' '.join(params['pag_layers'])}")
    if params.get("flow_shift"):
        fields.append(f"Shift: {params['flow_shift']:g}")
    return f"{params['prompt']}\nNegative prompt: {params['negative']}\n" + ", ".join(fields)


def save_png(image: torch.Tensor, path: Path, params: dict[str, Any]) -> Path:
    """Write ``image`` as a PNG with ``parameters`` (A1111 form) and ``sdxl_trainer`` (JSON) text chunks."""
    meta = PngInfo()
    meta.add_text("parameters", a1111_parameters(params))
    meta.add_text("sdxl_trainer", json.dumps(params, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path, pnginfo=meta)
    return path


def thumbnail(image: torch.Tensor, size: int) -> Image.Image:
    """(3, H, W) in [0, 1] → an RGB image whose longer side is ``size`` (aspect kept)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array, mode="RGB")
    h, w = array.shape[:2]
    scale = size / max(h, w)
    return pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """Split ``text`` at spaces into lines no wider than ``width`` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(cells: Sequence[Sequence[Image.Image | None]], *, row_labels: Sequence[str],
               col_labels: Sequence[str], cell: int) -> Image.Image:  # fmt: skip
    """A grid of thumbnails (None = empty cell), column labels on top (wrapped), a label above each row."""
    rows, cols = len(cells), max(len(r) for r in cells)
    step_x, step_y = cell + PAD, cell + PAD + LABEL_HEIGHT
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, cell) for label in col_labels]
    top = LABEL_HEIGHT * max((len(w) for w in wrapped), default=1) + PAD
    grid = Image.new("RGB", (cols * step_x + PAD, top + rows * step_y + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((PAD + c * step_x, 1 + k * LABEL_HEIGHT), line, fill="black")
    for r, row in enumerate(cells):
        y = top + r * step_y
        draw.text((PAD, y), row_labels[r], fill="black")
        for c, img in enumerate(row):
            if img is not None:
                grid.paste(img, (PAD + c * step_x, y + LABEL_HEIGHT))
    return grid
