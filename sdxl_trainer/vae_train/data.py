"""The images `sdxl train-vae` learns from: the manifest's kept images, read as the scan validated them
(prep/pixels.py), split into training and held-out images by a hash of their id, cut into crops.

- Images whose short side is below the crop are skipped (and counted): the decoder is trained on
  native pixels, never on upscaled ones.
- The held-out images are the ``holdout_count`` smallest id hashes (train/sampler.py's hash): the
  same images for every seed, run and resume. Each gives one fixed centre crop.
- Training crops are stateless: the ``k``-th sample of the run is image ``perm(seed, epoch)[pos]``
  (``epoch, pos = divmod(k, N)``), its crop offset drawn from a generator seeded by (seed, step), so
  a resume after a kill draws exactly what the uninterrupted run drew, with no data position saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_trainer import console
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.vae_objective import crop_offset
from sdxl_trainer.prep.pixels import PixelSource, read_manifest
from sdxl_trainer.train.sampler import holdout_hash, holdout_mask

MAX_SUBSTITUTES = 100  # unreadable images replaced in one batch before the run stops


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class CropData:
    """Training crops and the fixed held-out crops of WORK's manifest."""

    def __init__(self, work: Path, *, crop: int, holdout_count: int, seed: int):
        rows, self.pixels = read_manifest(work)
        manifest = str(Path(work) / "manifest.parquet")
        usable = [r for r in rows if min(r["width"], r["height"]) >= crop]
        self.crop, self.seed, self.too_small = crop, seed, len(rows) - len(usable)
        if len(usable) < 2:
            largest = max((min(r["width"], r["height"]) for r in rows), default=0)
            raise UserError(f"{len(usable)} of the manifest's {len(rows)} kept images have both sides ≥ crop {crop} px "
                            f"(largest short side: {largest}); training and held-out images need two",
                            where=manifest, fix=f"lower --crop (a multiple of 8, ≤ {largest // 8 * 8}) or scan larger images")  # fmt: skip
        held = holdout_mask(holdout_hash([r["id"] for r in usable]), count=min(holdout_count, len(usable) - 1))
        self.train_rows = [r for r, h in zip(usable, held) if not h]
        self.held_rows = [r for r, h in zip(usable, held) if h]
        self.unreadable: dict[str, str] = {}  # id → reason, reported once each
        self._perm: tuple[int, np.ndarray] | None = None

    def _open(self, row: dict) -> Image.Image | None:
        image, reason = self.pixels.try_open(row)
        if image is not None and min(image.size) < self.crop:  # the manifest's size no longer holds
            image, reason = None, f"now {image.width}×{image.height}, smaller than the crop"
        if image is None and row["id"] not in self.unreadable:
            self.unreadable[row["id"]] = reason or "unreadable"
            console.info(f"[yellow]warning: skipped {row['path']}: {reason}[/]")
        return image

    # ── held out ────────────────────────────────────────────────────────────────────────────────
    def held_out(self) -> tuple[torch.Tensor, list[str]]:
        """The held-out centre crops [M, 3, c, c] in [0, 1] and their paths."""
        crops, paths, c = [], [], self.crop
        for row in self.held_rows:
            image = self._open(row)
            if image is None:
                continue
            left, top = (image.width - c) // 2, (image.height - c) // 2
            crops.append(to_tensor(image.crop((left, top, left + c, top + c))))
            paths.append(row["path"])
        if not crops:
            raise UserError("none of the held-out images can be read any more", where=str(self.held_rows[0]["path"]),
                            fix="re-run `sdxl prep scan` on the data folder")  # fmt: skip
        return torch.stack(crops), paths

    # ── training ────────────────────────────────────────────────────────────────────────────────
    def _image_index(self, k: int) -> int:
        epoch, pos = divmod(k, len(self.train_rows))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train_rows)))
        return int(self._perm[1][pos])

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """The crops [B, 3, c, c] in [0, 1] of update ``step`` and their ids: a function of (seed, step) alone.

        An image that became unreadable since the scan is replaced by a random training image
        (drawn from the same seeded generator, so a resume replaces it alike) and reported once.
        """
        rng = np.random.default_rng([self.seed, step, 7])
        crops, ids, c = [], [], self.crop
        for j in range(batch_size):
            index = self._image_index(step * batch_size + j)
            for _ in range(MAX_SUBSTITUTES):
                image = self._open(self.train_rows[index])
                if image is not None:
                    break
                index = int(rng.integers(len(self.train_rows)))
            else:
                raise UserError(f"{len(self.unreadable)} images became unreadable since the scan",
                                where=str(Path(self.train_rows[index]["path"]).parent),
                                fix="re-run `sdxl prep scan` on the data folder")  # fmt: skip
            top, left = crop_offset(image.height, image.width, c, lambda n: int(rng.integers(n)))
            crops.append(to_tensor(image.crop((left, top, left + c, top + c))))
            ids.append(self.train_rows[index]["id"])
        return torch.stack(crops), ids
