"""Incremental rescans: which rows of the previous manifest a new scan may trust instead of re-reading.

A file's check is reused when its path, size and ``mtime_ns`` are unchanged (a dataset row: when its
bytes hash to the stored id), the probe options are the same and its source (the entry's folder or
dataset) is the one scanned before. A caption is reused when its sidecar's mtime and the entry's
caption options (extension, underscores, activation token, N_name folders) are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from sdxl_trainer import console
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep.captions import Caption, caption_flags
from sdxl_trainer.prep.datasets import Entry
from sdxl_trainer.prep.images import content_id, probe_flags
from sdxl_trainer.schema import read_table

PRODUCED_BY = "sdxl prep scan"
# Fields a rescan may copy from the previous manifest instead of opening the file again.
PROBE_FIELDS = ("id", "status", "reason", "format", "mode", "conversion", "width", "height",
                "exif_orientation", "n_frames", "file_size", "checked")
PROBE_OPTIONS = ("max_pixels", "min_side", "alpha_background")


def _old_sources(source: dict) -> dict[str | None, dict]:
    if source.get("kind") == "datasets":
        return {d.get("name"): d for d in source.get("datasets", [])}
    return {None: source}


def load_previous(cfg: ScanConfig, entries: list[Entry]) -> dict[str, dict]:
    """Rows of the previous manifest that a rescan may trust, by path (empty when none may)."""
    path = cfg.out / "manifest.parquet"
    if not path.is_file():
        return {}
    try:
        table, meta = read_table(path, artifact="manifest", produced_by=PRODUCED_BY)
    except (UserError, OSError, pa.ArrowException) as e:  # foreign, out of date or damaged: start over
        console.info(f"[yellow]previous manifest not reused ({getattr(e, 'what', e)}); reading every file[/]")
        return {}
    old = meta.get("config", {})
    changed = [k for k in PROBE_OPTIONS if old.get(k) != getattr(cfg, k)]
    if changed:
        console.info(f"[yellow]{', '.join(changed)} changed since the last scan; reading every file[/]")
        return {}
    old_sources, old_captions = _old_sources(meta.get("source", {})), meta.get("caption_options") or {}
    trusted, same_captions = set(), set()
    for e in entries:
        before = old_sources.get(e.name)
        if before is not None and (before.get("kind"), before.get("root")) == (e.meta["kind"], e.meta["root"]):
            trusted.add(e.name)
        elif before is not None or e.name is None:
            console.info(f"[yellow]{'data source' if e.name is None else 'dataset ' + e.name} changed since "
                         f"the last scan; reading {'every file' if e.name is None else 'its files'}[/]")
        if old_captions.get(e.name or "") == e.caption_options():
            same_captions.add(e.name)
    same_tokens = meta.get("tokenizer") == tokenizer_key(cfg) and old.get("max_chunks") == cfg.max_chunks
    rows = {}
    for row in table.to_pylist():
        dataset = row.get("dataset")
        if dataset not in trusted:
            continue
        if not same_tokens:
            row["n_chunks"] = None
        if dataset in same_captions:
            row["_caption"] = Caption(row["caption"], row["tags"] or [], row["caption_kind"],
                                      caption_flags(row["flags"] or []))
        rows[row["path"]] = row
    return rows


def tokenizer_key(cfg: ScanConfig) -> str | None:
    return str(Path(cfg.model).expanduser().resolve()) if cfg.model is not None else None


def reusable(prev: dict | None, cfg: ScanConfig, *, size=None, mtime_ns=None, content=None) -> bool:
    if prev is None or prev["id"] is None:
        return False
    if not cfg.fast and prev["checked"] != "decoded":
        return False  # a header-only check is not the full decode asked for now
    if content is not None:
        return prev["id"] == content_id(content)
    return prev["file_size"] == size and prev["mtime_ns"] == mtime_ns


def probe_from_row(row: dict) -> dict:
    probe = {k: row[k] for k in PROBE_FIELDS}
    probe["image_flags"] = probe_flags(row["flags"] or [])
    if probe["status"] == "duplicate":  # duplicates are decided afresh on every scan
        probe.update(status="ok", reason=None)
    probe["reused"] = True
    return probe
