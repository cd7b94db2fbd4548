"""Reading the cache for training: groups and shards, and random rows of one shard as a batch.

Only the row groups holding the requested rows are read (shards are written with small row
groups, a few MB each), and tensors come back as float16 views of the Arrow buffers. The trainer's
sampler decides which rows make a batch; it keeps batches inside one group so shapes match.
Open a :class:`Shard` per process (DataLoader workers open their own after fork).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdxl_trainer.cache_format.finalise import read_meta
from sdxl_trainer.cache_format.layout import (
    META_NAME,
    UNCOND_NAME,
    CacheDims,
    Group,
    binary_to_tensor,
    list_shard_paths,
    reading_shard,
    samples_dir,
    shard_meta,
    text_columns,
)
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import load_safetensors

MICRO_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
_BASE_COLUMNS = ["id", "path", *MICRO_COLUMNS, "crop_left_flip", "captions", "tag_weight"]
_LATENTS = {0: ["latent_mean", "latent_std"], 1: ["latent_mean_flip", "latent_std_flip"]}


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    rows: int


def list_groups(cache_dir: Path) -> dict[Group, list[ShardInfo]]:
    """Every (bucket_width, bucket_height, n_chunks) group and its shards with row counts.

    Row counts come from cache_meta.json when it lists the shard, else from the shard's footer.
    """
    known: dict[str, int] = {}
    if (Path(cache_dir) / META_NAME).exists():
        known = {s["path"]: s["rows"] for s in read_meta(cache_dir)["shards"]}
    groups: dict[Group, list[ShardInfo]] = {}
    for group, path in list_shard_paths(cache_dir):
        rel = path.relative_to(samples_dir(cache_dir)).as_posix()
        if rel not in known:
            with reading_shard(path):
                known[rel] = pq.read_metadata(path).num_rows
        rows = known[rel]
        groups.setdefault(group, []).append(ShardInfo(path, rows))
    return groups


def load_uncond(cache_dir: Path) -> dict[str, torch.Tensor]:
    """The empty prompt's ``text_hidden`` ((k·77)×D) and ``text_pooled`` (P), float16."""
    path = Path(cache_dir) / UNCOND_NAME
    if not path.is_file():
        raise UserError("the cache has no unconditional embedding", where=str(path), fix="re-run `sdxl prep cache`")
    return load_safetensors(path, fix="re-run `sdxl prep cache` (it rewrites the unconditional embedding)")


class Shard:
    """One open shard for repeated random-access reads (memory-mapped: shards never change in place)."""

    def __init__(self, path: Path, *, use_threads: bool = True, memory_map: bool = True):
        self.path = Path(path)
        self.use_threads = use_threads
        with reading_shard(self.path):
            # page checksums (written since cache checksums exist) are verified on every read: a
            # damaged data page stops training with the shard's name instead of feeding it garbage
            self._file = pq.ParquetFile(self.path, memory_map=memory_map, page_checksum_verification=True)
        meta = shard_meta(self._file.schema_arrow, self.path)
        self.dims = CacheDims.from_dict(meta["dims"])
        self.group = Group(**meta["group"])
        md = self._file.metadata
        self.num_rows = md.num_rows
        self._starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])

    def row_groups_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    def gather(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """``columns`` of ``rows`` (in that order), reading only the row groups that hold them."""
        rg = self.row_groups_of(rows)
        needed, first_seen = np.unique(rg, return_index=True)
        needed = needed[np.argsort(first_seen)]  # read in request order: often no take needed after
        with reading_shard(self.path):
            table = self._file.read_row_groups(needed.tolist(), columns=columns, use_threads=self.use_threads)
        sizes = self._starts[needed + 1] - self._starts[needed]
        offset = np.zeros(self._starts.size, dtype=np.int64)
        offset[needed] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        local = offset[rg] + (rows - self._starts[rg])
        if np.array_equal(local, np.arange(len(table))):
            return table
        return table.take(pa.array(local, type=pa.int64()))

    def read_rows(
        self,
        rows: Sequence[int],
        *,
        variant: Sequence[int] | None = None,
        flip: Sequence[bool] | None = None,
    ) -> dict[str, Any]:
        """Rows ``rows`` (in that order, repeats allowed) as a batch; see :func:`decode_batch`.

        Reads the small columns, then for each row only the latents (plain or flipped) and the text
        variant it uses, so neither unused variants nor unused flip copies are read.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"row indices must be in [0, {self.num_rows}) for {self.path}")
        return decode_batch(self, idx, variant=variant, flip=flip)


def read_rows(
    shard: Path | Shard,
    rows: Sequence[int],
    *,
    variant: Sequence[int] | None = None,
    flip: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Read rows of one shard (a path opens it; pass a :class:`Shard` to reuse an open one)."""
    shard = shard if isinstance(shard, Shard) else Shard(shard)
    return shard.read_rows(rows, variant=variant, flip=flip)


def _per_row(name: str, values: Sequence[Any] | None, n: int, dtype: type) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=dtype).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} entries for {n} rows")
    return arr


def _select(
    shard: Shard,
    rows: np.ndarray,
    which: np.ndarray,
    columns_of: Callable[[int], list[str]],
    shapes: list[tuple[int, ...]],
    *,
    base: pa.Table,
) -> list[torch.Tensor]:
    """For each row i read ``columns_of(which[i])``; one float16 (B, *shape) tensor per column slot.

    With a single choice the tensors are views of the Arrow buffers (taken from ``base`` when it
    already holds those columns); otherwise one copy assembles them.
    """
    choices = np.unique(which)
    if choices.size == 1:
        names = columns_of(choices[0])
        table = base.select(names) if set(names) <= set(base.column_names) else shard.gather(rows, names)
        return [binary_to_tensor(table.column(j), shape) for j, shape in enumerate(shapes)]
    out = [torch.empty((rows.size, *shape), dtype=torch.float16) for shape in shapes]
    for choice in choices:
        pos = np.flatnonzero(which == choice)
        table = shard.gather(rows[pos], columns_of(choice))
        for j, shape in enumerate(shapes):
            out[j][torch.from_numpy(pos)] = binary_to_tensor(table.column(j), shape)
    return out


def _stored_variant(captions: list[list[str]], chosen: np.ndarray) -> np.ndarray:
    """Variant k's text is stored at the first index of the row holding the same caption."""
    return np.array([c.index(c[k % len(c)]) for c, k in zip(captions, chosen.tolist())], dtype=np.int64)


def decode_batch(
    shard: Shard,
    rows: np.ndarray,
    *,
    variant: Sequence[int] | None = None,
    flip: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Rows of one shard → tensors. float16 tensors may be read-only views of Arrow memory.

    Keys: ``id``, ``path``, ``captions`` (per row: all V variants, or the chosen one),
    ``latent_mean``/``latent_std`` (B,C,h,w; the flip copy where ``flip`` is true),
    ``text_hidden`` (B,V,L,D, or B,L,D with ``variant``: variant k of a row is k mod V),
    ``text_pooled`` (B,V,P or B,P), ``micro_conditioning`` (B,6 int64 in SDXL's add_time_ids
    order, crop_left measured in the mirrored image where flipped), ``flipped`` (B bool),
    ``tag_weight`` (B float32, NaN where unset; None when no row has one) and ``group``.
    """
    n, dims, group = rows.size, shard.dims, shard.group
    mask = _per_row("flip", flip, n, bool)
    mask = np.zeros(n, dtype=bool) if mask is None else mask
    chosen = _per_row("variant", variant, n, np.int64)
    # Fetch in the same read what every row needs anyway: fewer passes over the row groups.
    extra = _LATENTS[int(mask[0])] if n and (mask.all() or not mask.any()) else []
    extra += _text_cols(0) if dims.variants == 1 else []
    base = shard.gather(rows, _BASE_COLUMNS + extra)
    ids = base.column("id").to_pylist()
    micro = np.stack([base.column(c).to_numpy() for c in MICRO_COLUMNS], axis=1).astype(np.int64)
    if mask.any():
        has_flip = np.asarray(base.column("crop_left_flip").is_valid())
        if not has_flip[mask].all():
            raise ValueError(f"row {ids[int(np.flatnonzero(mask & ~has_flip)[0])]} was cached without a flip copy")
        micro[mask, 3] = base.column("crop_left_flip").to_numpy(zero_copy_only=False)[mask]
    latent = dims.latent_shape(group.bucket_width, group.bucket_height)
    mean, std = _select(shard, rows, mask.astype(np.int64), lambda f: _LATENTS[int(f)], [latent, latent], base=base)
    captions = base.column("captions").to_pylist()
    shapes = [dims.text_shape(group.n_chunks), dims.pooled_shape()]
    if chosen is None:  # every variant: (B, V, ...)
        per_k = [
            _select(shard, rows, _stored_variant(captions, np.full(n, k)), _text_cols, shapes, base=base)
            for k in range(dims.variants)
        ]
        hidden, pooled = (torch.stack([t[j] for t in per_k], dim=1) for j in range(2))
    else:
        hidden, pooled = _select(shard, rows, _stored_variant(captions, chosen), _text_cols, shapes, base=base)
        captions = [c[k % len(c)] for c, k in zip(captions, chosen.tolist())]
    weights = base.column("tag_weight")
    return {
        "id": ids,
        "path": base.column("path").to_pylist(),
        "captions": captions,
        "latent_mean": mean,
        "latent_std": std,
        "text_hidden": hidden,
        "text_pooled": pooled,
        "micro_conditioning": torch.from_numpy(micro),
        "flipped": torch.from_numpy(mask.copy()),
        "tag_weight": None
        if weights.null_count == n
        else torch.from_numpy(weights.to_numpy(zero_copy_only=False).astype(np.float32)),
        "group": group,
    }


def _text_cols(k: int) -> list[str]:
    return list(text_columns(int(k)))
