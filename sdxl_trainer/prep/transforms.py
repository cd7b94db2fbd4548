"""Pixels → VAE input: resize to cover the bucket, crop, flip, scale to [−1, 1].

Shared by `prep stats` and `prep cache`, so the statistics describe exactly the latents training sees.
The crop's top-left corner and the original size are returned for SDXL's micro-conditioning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Crop:
    """Where the bucket-sized window sits in the resized image (SDXL's crop_top/crop_left)."""

    top: int
    left: int
    resized_width: int
    resized_height: int


def plan_crop(
    *, width: int, height: int, bucket_width: int, bucket_height: int, mode: str = "center", rng: random.Random | None = None
) -> Crop:
    """Scale (width, height) to cover the bucket, then choose the crop window (center or random)."""
    scale = max(bucket_width / width, bucket_height / height)
    # Round up so the resized image never falls a pixel short of the bucket.
    rw, rh = max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale))
    spare_w, spare_h = rw - bucket_width, rh - bucket_height
    if mode == "center":
        top, left = spare_h // 2, spare_w // 2
    elif mode == "random":
        if rng is None:
            raise ValueError("random crops need an rng (so they are reproducible and recorded)")
        top, left = rng.randint(0, spare_h), rng.randint(0, spare_w)
    else:
        raise ValueError(f"unknown crop mode {mode!r}: use 'center' or 'random'")
    return Crop(top=top, left=left, resized_width=rw, resized_height=rh)


def apply_crop(image: Image.Image, crop: Crop, *, bucket_width: int, bucket_height: int) -> Image.Image:
    """Resize with a high-quality filter (Lanczos down, bicubic up) and cut the bucket window."""
    down = crop.resized_width < image.width
    resized = image.resize(
        (crop.resized_width, crop.resized_height),
        Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC,
        reducing_gap=3.0 if down else None,
    )
    return resized.crop((crop.left, crop.top, crop.left + bucket_width, crop.top + bucket_height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor [3, H, W] in [−1, 1], the VAE's input range."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    arr = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div_(127.5).sub_(1.0)


def flipped_crop_left(crop: Crop, *, bucket_width: int) -> int:
    """crop_left of the mirrored image: the same window measured from the other edge."""
    return crop.resized_width - bucket_width - crop.left
