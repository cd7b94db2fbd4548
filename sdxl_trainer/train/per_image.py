"""Per-image training settings from the manifest: repeats and caption dropout, joined by id at start-up.

The scan fills ``repeats`` (kohya's ``num_repeats``, an ``N_name`` folder) and ``caption_dropout``
per dataset entry; the trainer reads just those columns of WORK/manifest.parquet once and keeps two
small arrays parallel to the cache's rows (:func:`join_per_image`). A manifest written before the
columns existed, or no manifest at all, means every image once and the run's ``data.p_uncond``.

- ``repeats`` — the batch sampler lists each training row that many times per epoch
  (``BucketBatchSampler(repeats=…)``); an epoch is the repeated set (kohya's definition), so
  ``num_epochs`` counts passes over it. Validation hold-out rows are never repeated.
- ``caption_dropout`` — the chance that a sample of this image trains on the empty prompt, instead of
  ``data.p_uncond`` (``CacheDataset.load``).

docs/data-loading.md ("Per-image repeats and caption dropout").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import reading_parquet, read_table, rerun
from sdxl_trainer.train.provenance import UPDATE_CACHE, check_manifest

MANIFEST_PRODUCER = "sdxl prep scan"
COLUMNS = ("repeats", "caption_dropout")
FIX_SCAN = "fix the dataset's num_repeats / caption_dropout and re-run `sdxl prep scan`"


@dataclass
class PerImage:
    """Per cached row (in the order of the ids given to :func:`join_per_image`)."""

    repeats: np.ndarray  # int32, ≥ 1
    caption_dropout: np.ndarray | None  # float32 in [0, 1], NaN = the run's p_uncond; None: no row has one

    @classmethod
    def default(cls, n: int) -> "PerImage":
        return cls(np.ones(n, dtype=np.int32), None)


def manifest_columns(path: Path) -> list[str]:
    """The column names of a Parquet file (its footer only)."""
    with reading_parquet(path, fix=rerun(MANIFEST_PRODUCER)):
        return pq.read_schema(path).names


def join_per_image(path: Path | None, ids: pa.ChunkedArray, *, cache_meta: dict | None = None) -> PerImage:
    """``repeats`` and ``caption_dropout`` of every id in ``ids`` from the manifest's ok rows.

    Every id must be an ok row of the manifest (else the cache is from another scan: the start-up
    check's line, which counts removed and new images, says what to run); repeats must be ≥ 1 and a
    dropout in [0, 1]. A null repeats reads as 1.
    """
    n = len(ids)
    if path is None or not Path(path).is_file():  # train/provenance.py warns about a missing manifest
        return PerImage.default(n)
    path = Path(path)
    wanted = [c for c in COLUMNS if c in manifest_columns(path)]
    if not wanted:  # a manifest written before per-image settings
        return PerImage.default(n)
    table, _ = read_table(path, artifact="manifest", produced_by=MANIFEST_PRODUCER, columns=["id", "status", *wanted])
    ok = table.filter(pc.equal(table["status"], "ok"))
    where = pc.index_in(ids, value_set=ok.column("id").combine_chunks())
    if where.null_count:
        if cache_meta is not None:
            check_manifest(path, cache_meta, ids)  # raises, naming removed and new images
        first = ids.filter(pc.is_null(where))[0].as_py()
        raise UserError(f"{where.null_count:,} cached image(s) are not in the manifest (first: id {first}), so "
                        "their repeats and caption dropout are unknown", where=str(path), fix=UPDATE_CACHE)  # fmt: skip
    out = PerImage.default(n)
    if "repeats" in wanted:
        reps = ok.column("repeats").take(where).fill_null(1).to_numpy().astype(np.int32)
        if (reps < 1).any():
            i = int(np.flatnonzero(reps < 1)[0])
            raise UserError(f"repeats must be ≥ 1 (image {ids[i].as_py()} has {reps[i]})", where=str(path),
                            fix=FIX_SCAN)  # fmt: skip
        out.repeats = reps
    if "caption_dropout" in wanted:
        col = ok.column("caption_dropout").take(where)
        if col.null_count < n:
            p = col.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls → NaN
            bad = ~np.isnan(p) & ~((p >= 0) & (p <= 1))
            bad |= pc.is_valid(col).to_numpy(zero_copy_only=False) & np.isnan(p)  # a stored NaN is not "unset"
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(f"caption_dropout must be in [0, 1] (image {ids[i].as_py()} has {p[i]})",
                                where=str(path), fix=FIX_SCAN)  # fmt: skip
            out.caption_dropout = p
    return out


def uncond_chance(own: np.ndarray | None, p_uncond: float) -> np.ndarray | float:
    """Each row's chance of the empty prompt: its own caption_dropout, else the run's ``p_uncond``."""
    if own is None:
        return p_uncond  # a scalar: exactly the comparison made before per-image values existed
    return np.where(np.isnan(own), p_uncond, own.astype(np.float64))


def epoch_line(*, images: int, samples: int, batches: int, batch: int) -> str:
    """The start-up line that says what an epoch is."""
    rep = f", {samples:,} samples with repeats" if samples != images else ""
    return f"epoch = {images:,} training images{rep}: {batches:,} batches of {batch}"
