"""Starting a cache run again: refuse a different config, drop unfinished shards, skip what is done.

What a prep stage does before its ranks write (rank 0, then a barrier)::

    check_config(cache, config=cfg, dims=dims, overwrite=args.overwrite)
    clean_partial(cache)
    todo = [i for i in ids if i not in completed_ids(cache)]

Every id in a visible shard is complete (shards appear atomically), so running this again after
Ctrl-C or kill -9 encodes each remaining id once and none twice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sdxl_trainer.cache_format.checksum import CHECKSUM_DIR
from sdxl_trainer.cache_format.layout import (
    META_ARTIFACT,
    META_NAME,
    PRODUCED_BY,
    UNCOND_NAME,
    CacheDims,
    list_shard_paths,
    list_temp_paths,
    read_shard_meta,
    reading_shard,
    samples_dir,
)
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import artifact_meta, read_json


def normalise_config(config: Any) -> Any:
    """The JSON form a config is stored in (pydantic models dumped, paths as strings)."""
    return json.loads(json.dumps(artifact_meta("config", config)["config"], default=str))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(config)"]


def _stored_records(cache_dir: Path) -> list[tuple[str, Any, Any]]:
    """(where, config, dims) of cache_meta.json and of every shard."""
    records = []
    meta_path = Path(cache_dir) / META_NAME
    if meta_path.exists():
        meta = read_json(meta_path, artifact=META_ARTIFACT, produced_by=PRODUCED_BY)
        records.append((str(meta_path), meta.get("config"), meta.get("dims")))
    for _, path in list_shard_paths(cache_dir):
        meta = read_shard_meta(path)
        records.append((str(path), meta.get("config"), meta.get("dims")))
    return records


def check_config(cache_dir: Path, *, config: Any, dims: CacheDims, overwrite: bool = False) -> bool:
    """Refuse to add to a cache built with another config or dims; with ``overwrite``, empty it.

    Returns True when an existing cache was removed. Pass only the settings that change what is
    encoded (model, resolution, variants, flip, …), not ones like batch size or worker count.
    """
    new = {"config": normalise_config(config), "dims": dims.to_dict()}
    for where, old_config, old_dims in _stored_records(cache_dir):
        diff = _differences({"config": old_config, "dims": old_dims}, new)
        if not diff:
            continue
        if overwrite:
            remove_cache(cache_dir)
            return True
        raise UserError(
            f"the cache was built with different settings ({', '.join(diff[:5])}{', …' if len(diff) > 5 else ''})",
            where=where,
            fix="re-run with the cache's settings, pass --overwrite to delete it and start again, "
            "or use another WORK folder",
        )
    return False


def remove_cache(cache_dir: Path) -> None:
    """Delete what the cache stage writes (meta first, so a half-removed cache is never 'finalised')."""
    cache_dir = Path(cache_dir)
    (cache_dir / META_NAME).unlink(missing_ok=True)
    if samples_dir(cache_dir).exists():
        shutil.rmtree(samples_dir(cache_dir))
    (cache_dir / UNCOND_NAME).unlink(missing_ok=True)
    shutil.rmtree(cache_dir / CHECKSUM_DIR, ignore_errors=True)


def clean_partial(cache_dir: Path, *, rank: int | None = None) -> list[Path]:
    """Remove shards a killed writer left unfinished: every rank's (before any rank starts), or one's."""
    removed = list_temp_paths(cache_dir, rank=rank)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def completed_ids(cache_dir: Path) -> set[str]:
    """Ids already in the cache, read from the id column alone (no tensor bytes are touched)."""
    done: set[str] = set()
    for _, path in list_shard_paths(cache_dir):
        with reading_shard(path):  # a damaged file: atomic writes make this a disk or user problem
            ids = pq.ParquetFile(path).read(columns=["id"]).column("id").to_pylist()
        done.update(ids)
    return done
