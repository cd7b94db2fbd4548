"""``prep cache --verify``: re-read every shard and check it against cache_meta.json.

Checks every shard's size and SHA-256 against the sums recorded when it was written (finite garbage
of the right size is caught only here), row counts (per shard, per group, in total), that every id
appears once, that every tensor has the byte size its group and the dims imply, that every value is
finite, and that variants and flip copies are consistent. Reads one row group at a time, so memory
stays small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.torch import load_file

from sdxl_trainer.cache_format.checksum import file_sha256
from sdxl_trainer.cache_format.finalise import groups_in_meta, read_meta
from sdxl_trainer.cache_format.layout import (
    LATENT_COLUMNS,
    SMALL_COLUMNS,
    UNCOND_NAME,
    CacheDims,
    Group,
    binary_sizes,
    binary_to_tensor,
    cache_schema,
    finite_rows,
    list_shard_paths,
    list_temp_paths,
    samples_dir,
    shard_meta,
    single_chunk,
    text_columns,
)

MAX_PROBLEMS = 200
_OPTIONAL = ("crop_left_flip", "latent_mean_flip", "latent_std_flip", "tag_weight")
_REQUIRED = [name for name in (*SMALL_COLUMNS, *LATENT_COLUMNS) if name not in _OPTIONAL]


@dataclass
class VerifyReport:
    rows: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    omitted: int = 0  # problems found beyond MAX_PROBLEMS
    warnings: list[str] = field(default_factory=list)  # not wrong, but unchecked (a cache without checksums)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.omitted

    def add(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self.omitted += 1


def _check_tensors(
    values: pa.Array, owners: list[str], shape: tuple[int, ...], what: str, report: VerifyReport
) -> None:
    """Byte size and finiteness of every non-null value; ``owners[i]`` names value i's row."""
    values = single_chunk(values)
    keep = np.flatnonzero(np.asarray(values.is_valid(), dtype=bool))
    if keep.size < len(values):
        values = values.take(pa.array(keep, type=pa.int64()))
    sizes, item = binary_sizes(values), 2 * math.prod(shape)
    for i in np.flatnonzero(sizes != item)[:5]:
        report.add(f"{what}: id {owners[keep[i]]} has {sizes[i]} bytes, expected {item} (float16 {shape})")
    good = np.flatnonzero(sizes == item)
    if good.size:
        if good.size < len(values):
            values = values.take(pa.array(good, type=pa.int64()))
        tensor = binary_to_tensor(values, shape)
        finite = finite_rows(tensor.numpy().reshape(good.size, -1))
        for i in good[~finite][:5]:
            report.add(f"{what}: id {owners[keep[i]]} has non-finite values")


def _check_row_group(
    t: pa.Table, group: Group, dims: CacheDims, where: str, seen: dict[str, str], report: VerifyReport
) -> None:
    ids = t.column("id").to_pylist()
    for i in ids:
        if i in seen:
            report.add(f"{where}: id {i} also in {seen[i]}")
        seen.setdefault(i, where)
    for name in _REQUIRED:
        if t.column(name).null_count:
            report.add(f"{where}: {t.column(name).null_count} null value(s) in required column {name}")
    for name, want in zip(("bucket_width", "bucket_height", "n_chunks"), group):
        wrong = np.flatnonzero(t.column(name).to_numpy(zero_copy_only=False) != want)
        if wrong.size:
            report.add(f"{where}: id {ids[wrong[0]]} has {name} ≠ {want} (its folder's group)")
    flip_nulls = [np.asarray(t.column(c).is_null()) for c in ("latent_mean_flip", "latent_std_flip", "crop_left_flip")]
    uneven = np.flatnonzero((flip_nulls[0] != flip_nulls[1]) | (flip_nulls[0] != flip_nulls[2]))
    if uneven.size:
        report.add(f"{where}: id {ids[uneven[0]]} has only part of a flip copy")
    captions = t.column("captions").to_pylist()
    wrong = [i for i, c in zip(ids, captions) if c is None or len(c) != dims.variants]
    if wrong:
        report.add(f"{where}: id {wrong[0]} does not have {dims.variants} caption variants")
    latent = dims.latent_shape(group.bucket_width, group.bucket_height)
    for name in LATENT_COLUMNS:
        _check_tensors(t.column(name), ids, latent, f"{where} {name}", report)
    for k in range(dims.variants):
        # variant k is stored unless its caption repeats an earlier one of the row
        stored = np.array([c is not None and len(c) > k and c.index(c[k]) == k for c in captions], dtype=bool)
        for name, shape in zip(text_columns(k), (dims.text_shape(group.n_chunks), dims.pooled_shape())):
            mismatch = np.flatnonzero(np.asarray(t.column(name).is_valid()) != stored)
            if mismatch.size:
                report.add(f"{where}: id {ids[mismatch[0]]} {name} is null where it should be stored, or the reverse")
            _check_tensors(t.column(name), ids, shape, f"{where} {name}", report)


def _check_shard(
    path: Path, group: Group, dims: CacheDims, where: str, seen: dict[str, str], report: VerifyReport
) -> int:
    try:
        pf = pq.ParquetFile(path)
        meta = shard_meta(pf.schema_arrow, path)
    except Exception as e:  # report every broken shard, not just the first
        report.add(f"{where}: unreadable ({e})")
        return 0
    if not pf.schema_arrow.remove_metadata().equals(cache_schema(dims.variants)):
        report.add(f"{where}: columns differ from the cache schema")
        return pf.metadata.num_rows
    if CacheDims.from_dict(meta["dims"]) != dims or Group(**meta["group"]) != group:
        report.add(f"{where}: dims or group in the shard's metadata differ from cache_meta.json / its folder")
    for i in range(pf.num_row_groups):
        _check_row_group(pf.read_row_group(i), group, dims, where, seen, report)
    return pf.metadata.num_rows


def _check_uncond(cache_dir: Path, dims: CacheDims, report: VerifyReport) -> None:
    try:
        uncond = load_file(Path(cache_dir) / UNCOND_NAME)
    except Exception as e:
        report.add(f"{UNCOND_NAME}: unreadable ({e})")
        return
    hidden, pooled = uncond.get("text_hidden"), uncond.get("text_pooled")
    if hidden is None or pooled is None or hidden.ndim != 2 or hidden.shape[1] != dims.text_dim:
        report.add(f"{UNCOND_NAME}: expected text_hidden (k·{dims.tokens_per_chunk})×{dims.text_dim} and text_pooled")
    elif tuple(pooled.shape) != dims.pooled_shape() or not (hidden.isfinite().all() and pooled.isfinite().all()):
        report.add(f"{UNCOND_NAME}: text_pooled has the wrong shape or a value is not finite")


def _check_sums(path: Path, recorded: dict, where: str, report: VerifyReport) -> None:
    size = path.stat().st_size
    if size != recorded["bytes"]:
        report.add(f"{where}: {size} bytes, cache_meta.json recorded {recorded['bytes']} (the file changed after it was written)")
    elif file_sha256(path) != recorded["sha256"]:
        report.add(f"{where}: SHA-256 differs from the one recorded when it was written (its bytes changed: "
                   f"a disk or copy error, or an edit)")  # fmt: skip


def verify(cache_dir: Path) -> VerifyReport:
    """Re-check a finalised cache; ``report.ok`` is True when nothing is wrong."""
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    dims = CacheDims.from_dict(meta["dims"])
    report = VerifyReport()
    for tmp in list_temp_paths(cache_dir):
        report.add(f"{tmp}: unfinished shard (a run is still writing, or was killed)")
    in_meta = {s["path"]: s["rows"] for s in meta["shards"]}
    sums = {s["path"]: s for s in meta["shards"] if "sha256" in s}
    if len(sums) < len(in_meta):
        report.warnings.append(f"{len(in_meta) - len(sums)} shard(s) have no recorded checksum (written before "
                               "checksums existed): their bytes cannot be compared with what was written")  # fmt: skip
    on_disk = {p.relative_to(samples_dir(cache_dir)).as_posix(): (g, p) for g, p in list_shard_paths(cache_dir)}
    for rel in sorted(set(in_meta) - set(on_disk)):
        report.add(f"{rel}: listed in cache_meta.json but missing")
    seen: dict[str, str] = {}
    rows_by_group: dict[Group, int] = {}
    for rel, (group, path) in on_disk.items():
        if rel in sums:
            _check_sums(path, sums[rel], rel, report)
        rows = _check_shard(path, group, dims, rel, seen, report)
        if rel not in in_meta:
            report.add(f"{rel}: not in cache_meta.json (written after finalise?)")
        elif rows != in_meta[rel]:
            report.add(f"{rel}: {rows} rows, cache_meta.json says {in_meta[rel]}")
        rows_by_group[group] = rows_by_group.get(group, 0) + rows
        report.rows += rows
        report.shards += 1
    for group, info in groups_in_meta(meta).items():
        if rows_by_group.get(group, 0) != info["rows"]:
            report.add(f"{group.dirname()}: {rows_by_group.get(group, 0)} rows, cache_meta.json says {info['rows']}")
    if report.rows != meta["rows"]:
        report.add(f"{report.rows} rows in total, cache_meta.json says {meta['rows']}")
    if meta.get("uncond"):
        _check_uncond(cache_dir, dims, report)
    return report
