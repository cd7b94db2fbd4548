"""Dropping rows from a cache whose manifest changed: shards rewritten without them, atomically.

``prep cache`` run again after a rescan keeps every row whose image is still in the manifest, with
the same bucket and caption variants, and drops the rest here; the missing ids are then encoded as
on any resume. Nothing unchanged is encoded again.

Crash safety: ``cache_meta.json`` is removed first (a half-pruned cache is never "finished"); each
shard is rewritten to a hidden temp file and ``os.replace``d over itself, or deleted when no row
stays. A kill leaves every shard old or new, never half, and the next run prunes what is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdxl_trainer.schema import temp_file
from sdxl_trainer.cache_format import checksum
from sdxl_trainer.cache_format.layout import (
    META_NAME,
    SHARD_RE,
    TMP_SUFFIX,
    Group,
    list_shard_paths,
    parquet_options,
    reading_shard,
)

# (ids, group, captions of each row) → bool mask of the rows to keep
KeepRows = Callable[[list[str], Group, list[list[str]]], np.ndarray]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite(path: Path, pf: pq.ParquetFile, keep: np.ndarray) -> None:
    """Write the kept rows of ``path`` row group by row group to a temp file, then replace ``path``."""
    fd, tmp = temp_file(path, TMP_SUFFIX)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    try:
        with os.fdopen(fd, "wb") as f:
            with pq.ParquetWriter(f, pf.schema_arrow, **parquet_options(pf.schema_arrow)) as writer:
                for i in range(pf.num_row_groups):
                    mask = keep[starts[i] : starts[i + 1]]
                    if mask.any():
                        with reading_shard(path):
                            table = pf.read_row_group(i)
                        writer.write_table(table.filter(pa.array(mask)), row_group_size=len(mask))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def prune(cache_dir: Path, keep_rows: KeepRows) -> dict[str, int]:
    """Remove every row ``keep_rows`` rejects; returns rows removed, shards rewritten and deleted."""
    cache_dir = Path(cache_dir)
    out = {"rows_removed": 0, "shards_rewritten": 0, "shards_deleted": 0}
    for group, path in list_shard_paths(cache_dir):
        with reading_shard(path):
            pf = pq.ParquetFile(path)
            small = pf.read(columns=["id", "captions"])
        keep = np.asarray(keep_rows(small.column("id").to_pylist(), group, small.column("captions").to_pylist()),
                          dtype=bool)  # fmt: skip
        if keep.all():
            continue
        (cache_dir / META_NAME).unlink(missing_ok=True)  # first: the cache is no longer finished
        out["rows_removed"] += int((~keep).sum())
        if not keep.any():
            path.unlink()
            _fsync_dir(path.parent)
            out["shards_deleted"] += 1
            continue
        _rewrite(path, pf, keep)
        checksum.record(cache_dir, int(SHARD_RE.match(path.name)[1]), path)
        out["shards_rewritten"] += 1
    return out
