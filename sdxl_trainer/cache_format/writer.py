"""Writing the cache: rows buffered per (bucket, chunk-count) group, each shard written atomically.

A shard appears under its final name only once it is complete and fsynced (temp file in the same
folder, then ``os.replace``), so a run killed at any moment leaves whole shards and, at worst, a
hidden temp file. Rows still in memory are lost and simply encoded again on the next run: the ids
in visible shards are the ones that are done (:func:`sdxl_trainer.cache_format.completed_ids`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdxl_trainer.cache_format import checksum
from sdxl_trainer.cache_format.layout import (
    LATENT_COLUMNS,
    SHARD_ARTIFACT,
    SHARD_RE,
    TMP_SUFFIX,
    CacheDims,
    Group,
    binary_array,
    cache_schema,
    finite_rows,
    list_shard_paths,
    parquet_options,
    samples_dir,
    shard_name,
    text_columns,
    to_fp16_array,
)
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import META_KEY, artifact_meta, temp_file

MiB = 1 << 20
_INT_COLUMNS = (
    "bucket_width", "bucket_height", "n_chunks", "original_height", "original_width",
    "crop_top", "crop_left", "target_height", "target_width", "crop_left_flip",
)  # fmt: skip


@dataclass
class CacheRow:
    """One image's cached encoding. Tensors may be any float dtype/device; they are stored as fp16.

    Shapes: latents C×(H/8)×(W/8); each text variant (n_chunks·77)×D and pooled P (see CacheDims);
    ``captions``, ``text_hidden`` and ``text_pooled`` hold ``dims.variants`` entries each.
    """

    id: str
    path: str
    bucket_width: int
    bucket_height: int
    n_chunks: int
    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    target_height: int
    target_width: int
    latent_mean: Any
    latent_std: Any
    text_hidden: Sequence[Any]
    text_pooled: Sequence[Any]
    captions: Sequence[str]
    latent_mean_flip: Any = None
    latent_std_flip: Any = None
    crop_left_flip: int | None = None
    tag_weight: float | None = None

    @property
    def group(self) -> Group:
        return Group(int(self.bucket_width), int(self.bucket_height), int(self.n_chunks))


def _encode(row: CacheRow, name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} of {row.id} has shape {tuple(value.shape)}; expected {tuple(shape)}")
    arr = to_fp16_array(value)
    if not finite_rows(arr.reshape(1, -1))[0]:
        raise UserError(
            f"{name} has non-finite values once stored as float16",
            where=f"{row.path} (id {row.id})",
            fix="encode in fp32 or bf16 (not fp16), or use a fixed VAE such as madebyollin/sdxl-vae-fp16-fix; "
            "values beyond ±65504 overflow float16",
        )
    return arr


def encode_row(row: CacheRow, dims: CacheDims) -> dict[str, Any]:
    """Check a row's shapes and finiteness and turn it into column values (fp16 numpy arrays).

    A caption that repeats an earlier one of the row has its embedding stored once, at the first
    index (caption-mode variants are often all the same string).
    """
    g = row.group
    if g.bucket_width % dims.vae_factor or g.bucket_height % dims.vae_factor or g.n_chunks < 1:
        raise ValueError(f"row {row.id}: bucket {g.bucket_width}x{g.bucket_height}, {g.n_chunks} chunks is invalid")
    counts = {len(row.text_hidden), len(row.text_pooled), len(row.captions)}
    if counts != {dims.variants}:
        raise ValueError(
            f"row {row.id}: {len(row.text_hidden)} text_hidden, {len(row.text_pooled)} text_pooled and "
            f"{len(row.captions)} captions; the cache holds {dims.variants} variants of each"
        )
    flips = (row.latent_mean_flip is not None, row.latent_std_flip is not None, row.crop_left_flip is not None)
    if len(set(flips)) != 1:
        raise ValueError(f"row {row.id}: give latent_mean_flip, latent_std_flip and crop_left_flip together")
    latent = dims.latent_shape(g.bucket_width, g.bucket_height)
    out: dict[str, Any] = {"id": str(row.id), "path": str(row.path), "tag_weight": row.tag_weight}
    out.update({c: None if getattr(row, c) is None else int(getattr(row, c)) for c in _INT_COLUMNS})
    for name in LATENT_COLUMNS:
        value = getattr(row, name)
        out[name] = None if value is None else _encode(row, name, value, latent)
    out["captions"] = [str(c) for c in row.captions]
    first = {}
    for k, caption in enumerate(out["captions"]):
        hidden, pooled = text_columns(k)
        stored = first.setdefault(caption, k) == k
        out[hidden] = _encode(row, hidden, row.text_hidden[k], dims.text_shape(g.n_chunks)) if stored else None
        out[pooled] = _encode(row, pooled, row.text_pooled[k], dims.pooled_shape()) if stored else None
    return out


def _encoded_nbytes(enc: dict[str, Any]) -> int:
    tensors = sum(v.nbytes for v in enc.values() if isinstance(v, np.ndarray))
    return tensors + sum(len(c) for c in enc["captions"]) + 64


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Encoded rows → an Arrow table (tensor columns built with one concatenation each)."""
    arrays = []
    for f in schema:
        values = [r[f.name] for r in rows]
        arrays.append(binary_array(values) if f.type == pa.binary() else pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard_atomic(table: pa.Table, path: Path, *, row_group_size: int) -> None:
    """Write a shard so that it is either absent or complete under ``path``: temp, fsync, replace."""
    fd, tmp = temp_file(path, TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size, **parquet_options(table.schema))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


@dataclass
class _Buffer:
    rows: list[dict[str, Any]] = field(default_factory=list)
    nbytes: int = 0


class CacheWriter:
    """Buffers rows per group and writes a group to a new shard when it reaches a bound.

    Shards are named ``r{rank:03d}-{seq:06d}.parquet``; ``seq`` continues after this rank's
    highest existing shard, so ranks and resumed runs never collide. Memory stays below
    ``buffer_max_bytes`` by writing the largest group early. Use as a context manager: leaving it
    (also on Ctrl-C) writes every buffered row, so encoded work is kept.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        dims: CacheDims,
        config: Any,
        rank: int = 0,
        world_size: int = 1,
        shard_max_bytes: int = 256 * MiB,
        shard_max_rows: int = 100_000,
        row_group_max_bytes: int = 1 * MiB,
        row_group_max_rows: int = 256,
        buffer_max_bytes: int = 1024 * MiB,
        provenance: dict[str, Any] | None = None,
    ):
        if not 0 <= rank < world_size or rank > 999:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size}) or above 999")
        if not 0 < shard_max_bytes <= 1024 * MiB or shard_max_rows < 1:
            raise ValueError("shard_max_bytes must be in (0, 1 GiB] and shard_max_rows ≥ 1")
        if row_group_max_bytes < 1 or row_group_max_rows < 1 or buffer_max_bytes < 1:
            raise ValueError("row_group_max_bytes, row_group_max_rows and buffer_max_bytes must be ≥ 1")
        self.cache_dir, self.dims, self.rank, self.world_size = Path(cache_dir), dims, rank, world_size
        self.shard_max_bytes, self.shard_max_rows = shard_max_bytes, shard_max_rows
        self.row_group_max_bytes, self.row_group_max_rows = row_group_max_bytes, row_group_max_rows
        self.buffer_max_bytes = buffer_max_bytes
        self._schema = cache_schema(dims.variants)
        self._meta = artifact_meta(SHARD_ARTIFACT, config)
        self._meta.update(dims=dims.to_dict(), rank=rank, world_size=world_size)
        self._meta.update(provenance or {})  # e.g. the model fingerprint (models/fingerprint.py)
        self._buffers: dict[Group, _Buffer] = {}
        self._buffered = 0
        self._ids: set[str] = set()
        self._seq = self._last_seq()
        self._broken = False
        self.rows_written = 0
        self.shards_written: list[Path] = []

    def _last_seq(self) -> int:
        matches = [SHARD_RE.match(p.name) for _, p in list_shard_paths(self.cache_dir)]
        return max((int(m[2]) for m in matches if m and int(m[1]) == self.rank), default=0)

    def add(self, row: CacheRow) -> None:
        """Validate, encode and buffer one row; may write a shard."""
        if row.id in self._ids:
            raise ValueError(f"id {row.id} was already added to this writer")
        enc = encode_row(row, self.dims)
        self._ids.add(row.id)
        buf = self._buffers.setdefault(row.group, _Buffer())
        size = _encoded_nbytes(enc)
        buf.rows.append(enc)
        buf.nbytes += size
        self._buffered += size
        if buf.nbytes >= self.shard_max_bytes or len(buf.rows) >= self.shard_max_rows:
            self._write(row.group)
        while self._buffered > self.buffer_max_bytes:
            self._write(max(self._buffers, key=lambda g: self._buffers[g].nbytes))

    def _write(self, group: Group) -> None:
        buf = self._buffers.pop(group)
        self._buffered -= buf.nbytes
        if not buf.rows:
            return
        self._seq += 1
        path = samples_dir(self.cache_dir) / group.dirname() / shard_name(self.rank, self._seq)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = rows_to_table(buf.rows, self._schema)
        meta = dict(self._meta, group=group._asdict())
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        per_group = max(1, min(self.row_group_max_rows, self.row_group_max_bytes * len(buf.rows) // buf.nbytes))
        try:
            write_shard_atomic(table, path, row_group_size=per_group)
            checksum.record(self.cache_dir, self.rank, path)  # hashed while its bytes are in the page cache
        except BaseException:
            self._broken = True
            raise
        self.rows_written += len(buf.rows)
        self.shards_written.append(path)

    def flush(self) -> None:
        """Write every buffered group now (shards smaller than the bound)."""
        for group in sorted(self._buffers):
            self._write(group)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        # Rows already encoded are valid whatever stopped the loop; keep them unless writing
        # itself is what failed (then trying again would only raise again and hide the cause).
        if not self._broken:
            self.close()
