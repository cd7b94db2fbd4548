"""Closing a cache run: the unconditional embedding and ``cache_meta.json`` (counts, bytes, config).

``finalise`` runs on rank 0 once every rank has finished writing. ``cache_meta.json`` is written
last; a trainer takes its presence as "this cache is complete" (:func:`read_meta`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from sdxl_trainer.cache_format.checksum import logged_sums, sums_for_finalise
from sdxl_trainer.cache_format.layout import (
    META_ARTIFACT,
    META_NAME,
    PRODUCED_BY,
    SAMPLES_DIR,
    UNCOND_NAME,
    CacheDims,
    Group,
    list_shard_paths,
    list_temp_paths,
    reading_shard,
    samples_dir,
    text_columns,
)
from sdxl_trainer.cache_format.resume import check_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import SCHEMA_VERSION, normal_permissions, read_json, temp_file, write_json

# Footer column paths → the parts a user weighs when the disk is the question.
_PARTS = {
    "latent_mean": "latents",
    "latent_std": "latents",
    "latent_mean_flip": "latents_flip",
    "latent_std_flip": "latents_flip",
}


def _part(column: str) -> str:
    if column.startswith(("text_hidden_", "text_pooled_")):
        return column.rsplit("_", 1)[0]
    return _PARTS.get(column, "other")


def shard_footer(path: Path) -> dict[str, Any]:
    """Rows, file bytes and bytes per part of one shard, from its footer alone."""
    with reading_shard(path):
        md = pq.read_metadata(path)
    parts: dict[str, int] = collections.Counter()
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            parts[_part(col.path_in_schema)] += col.total_compressed_size
    return {"rows": md.num_rows, "bytes": path.stat().st_size, "parts": dict(parts)}


def _save_uncond(uncond: Mapping[str, Any], dims: CacheDims, path: Path) -> None:
    hidden, pooled = uncond.get("text_hidden"), uncond.get("text_pooled")
    if hidden is None or pooled is None or set(uncond) != {"text_hidden", "text_pooled"}:
        raise ValueError("uncond needs exactly 'text_hidden' ((k·77)×D) and 'text_pooled' (P)")
    hidden = torch.as_tensor(hidden).detach().to("cpu", torch.float16).contiguous()
    pooled = torch.as_tensor(pooled).detach().to("cpu", torch.float16).contiguous()
    ok_hidden = hidden.ndim == 2 and hidden.shape[0] % dims.tokens_per_chunk == 0 and hidden.shape[1] == dims.text_dim
    if not ok_hidden or tuple(pooled.shape) != dims.pooled_shape():
        raise ValueError(f"uncond shapes {tuple(hidden.shape)}, {tuple(pooled.shape)} do not match {dims}")
    if not (torch.isfinite(hidden).all() and torch.isfinite(pooled).all()):
        raise UserError("the empty prompt's embedding is not finite in float16", where=str(path))
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        save_file({"text_hidden": hidden, "text_pooled": pooled}, tmp, metadata={"schema_version": str(SCHEMA_VERSION)})
        normal_permissions(tmp)  # safetensors writes owner-only files
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _scan_ids(paths: list[Path], dims: CacheDims) -> tuple[int, dict[int, int]]:
    """(flipped rows, rows per number of stored text variants) over all shards; raises on a duplicate id."""
    seen: dict[str, Path] = {}
    flipped, variants = 0, collections.Counter()
    pooled = [text_columns(k)[1] for k in range(dims.variants)]
    for path in paths:
        with reading_shard(path):
            t = pq.ParquetFile(path).read(columns=["id", "crop_left_flip", *pooled])
        for i in t.column("id").to_pylist():
            if i in seen:
                raise UserError(
                    f"id {i} is in the cache twice (also in {seen[i]})",
                    where=str(path),
                    fix="two runs or ranks encoded the same image: rebuild with --overwrite, or delete one shard",
                )
            seen[i] = path
        flipped += len(t) - t.column("crop_left_flip").null_count
        stored = sum(np.asarray(t.column(c).is_valid(), dtype=np.int64) for c in pooled)
        variants.update(np.asarray(stored).tolist())
    return flipped, dict(variants)


def finalise(cache_dir: Path, *, config: Any, dims: CacheDims, uncond: Mapping[str, Any] | None,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write uncond.safetensors and cache_meta.json (rank 0, after all ranks are done).

    ``uncond`` holds the empty prompt's ``text_hidden`` ((k·77)×D) and ``text_pooled`` (P).
    ``extra`` adds top-level keys (the cache stage's model fingerprint and manifest record).
    Returns the metadata document, which also carries the bytes per sample and the total.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if temps := list_temp_paths(cache_dir):
        raise UserError(
            f"{len(temps)} shard(s) still being written (or left by a killed run)",
            where=str(temps[0]),
            fix="finalise only after every rank has finished; a killed run's leftovers are removed by "
            "clean_partial(cache) (all ranks), which the cache stage should call on rank 0 before writing",
        )
    check_config(cache_dir, config=config, dims=dims)
    listed = list_shard_paths(cache_dir)
    shards, groups = [], collections.defaultdict(lambda: {"rows": 0, "bytes": 0, "shards": 0})
    parts: dict[str, int] = collections.Counter()
    logged = logged_sums(cache_dir)
    for group, path in listed:
        info = shard_footer(path)
        rel = path.relative_to(samples_dir(cache_dir)).as_posix()
        shards.append({"path": rel, "rows": info["rows"], **sums_for_finalise(cache_dir, path, logged)})
        g = groups[group]
        g["rows"], g["bytes"], g["shards"] = g["rows"] + info["rows"], g["bytes"] + info["bytes"], g["shards"] + 1
        parts.update(info["parts"])
    flipped, variants = _scan_ids([p for _, p in listed], dims)  # raises on a duplicate id
    if uncond is not None:
        _save_uncond(uncond, dims, cache_dir / UNCOND_NAME)
    rows = sum(s["rows"] for s in shards)
    total = sum(s["bytes"] for s in shards)
    doc = {
        "dims": dims.to_dict(),
        "layout": f"{SAMPLES_DIR}/bucket=<W>x<H>/chunks=<n>/r<rank>-<seq>.parquet",
        "tensor_dtype": "float16",
        "rows": rows,
        "flipped_rows": flipped,
        "variants": dims.variants,
        "rows_by_stored_variants": {str(k): v for k, v in sorted(variants.items())},  # distinct captions
        "bytes_total": total,
        "bytes_per_sample": total / rows if rows else 0.0,
        "bytes_per_sample_by_part": {k: v / rows for k, v in sorted(parts.items())} if rows else {},
        "groups": [{**g._asdict(), **v} for g, v in sorted(groups.items())],
        "uncond": UNCOND_NAME if uncond is not None else None,
        "checksums": "sha256",  # every shard's bytes, sha256 and footer_sha256 (cache_format/checksum.py)
        **dict(extra or {}),
        "shards": shards,
    }
    write_json(doc, cache_dir / META_NAME, artifact=META_ARTIFACT, config=config)
    return read_json(cache_dir / META_NAME, artifact=META_ARTIFACT, produced_by=PRODUCED_BY)


def read_meta(cache_dir: Path) -> dict[str, Any]:
    """cache_meta.json of a finished cache; a clear error while it is missing (run not finalised)."""
    return read_json(Path(cache_dir) / META_NAME, artifact=META_ARTIFACT, produced_by=PRODUCED_BY)


def groups_in_meta(meta: dict[str, Any]) -> dict[Group, dict[str, int]]:
    return {Group(g["bucket_width"], g["bucket_height"], g["n_chunks"]): g for g in meta["groups"]}
