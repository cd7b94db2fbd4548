"""Shard checksums: a full SHA-256 (``prep cache --verify``) and a cheap footer hash (train start-up).

A shard is hashed right after it is written (the bytes are still in the page cache) and the sums are
appended to ``cache/checksums/r<rank>.jsonl``; ``finalise`` copies them into ``cache_meta.json``.
A shard whose log line is missing (a kill between the rename and the append) or stale (the footer
hash differs: the shard was rewritten, e.g. pruned) is hashed again by ``finalise``, so the log can
only save work, never record a wrong sum.

- ``sha256``: every byte of the file. Garbage that keeps the file's size and stays finite (what
  no other check sees) changes it. Costs one full read (~1.7 GB/s hashing on one core here).
- ``footer_sha256``: the Parquet footer (row-group offsets, sizes, our metadata) and its 8-byte
  trailer. The trainer checks this and the size of every shard at start-up: a shard replaced,
  truncated, swapped or rewritten is caught for the price of reading the footer, which the
  start-up scan reads anyway. Damage inside data pages is caught later, when the page is read,
  by Parquet's page CRCs (written since checksums exist) — or at once by ``--verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sdxl_trainer.cache_format.layout import META_NAME, SHARD_FIX, samples_dir
from sdxl_trainer.errors import UserError

CHECKSUM_DIR = "checksums"
READ_BLOCK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def footer_sha256(path: Path) -> str:
    """SHA-256 of the Parquet footer plus its trailer (footer length, ``PAR1``)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 12:
            raise UserError(f"cache shard is truncated ({size} bytes)", where=str(path), fix=SHARD_FIX)
        f.seek(size - 8)
        trailer = f.read(8)
        length = int.from_bytes(trailer[:4], "little")
        if trailer[4:] != b"PAR1" or length + 12 > size:
            raise UserError("cache shard is truncated or damaged (no Parquet footer at its end)",
                            where=str(path), fix=SHARD_FIX)  # fmt: skip
        f.seek(size - 8 - length)
        return hashlib.sha256(f.read(length) + trailer).hexdigest()


def shard_sums(path: Path) -> dict[str, Any]:
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path), "footer_sha256": footer_sha256(path)}


def log_path(cache_dir: Path, rank: int) -> Path:
    return Path(cache_dir) / CHECKSUM_DIR / f"r{rank:03d}.jsonl"


def record(cache_dir: Path, rank: int, path: Path) -> dict[str, Any]:
    """Hash a just-written shard and append its sums to this rank's log (fsynced)."""
    sums = shard_sums(path)
    line = {"path": Path(path).relative_to(samples_dir(cache_dir)).as_posix(), **sums}
    log = log_path(cache_dir, rank)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return sums


def logged_sums(cache_dir: Path) -> dict[tuple[str, int, str], str]:
    """(path, bytes, footer_sha256) → sha256 from the current cache_meta.json and every rank's log (a
    line cut by a kill is ignored). Re-finalising then keeps the sums recorded when each shard was
    written, so it cannot bless bytes damaged since (only a shard with no record at all is hashed)."""
    out: dict[tuple[str, int, str], str] = {}
    try:
        for s in json.loads((Path(cache_dir) / META_NAME).read_text())["shards"]:
            out[(s["path"], int(s["bytes"]), s["footer_sha256"])] = s["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no meta yet, or one from before checksums: the logs (or hashing) provide them
    folder = Path(cache_dir) / CHECKSUM_DIR
    for log in sorted(folder.glob("r*.jsonl")) if folder.is_dir() else []:
        for text in log.read_text().splitlines():
            try:
                d = json.loads(text)
                out[(d["path"], int(d["bytes"]), d["footer_sha256"])] = d["sha256"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def sums_for_finalise(cache_dir: Path, path: Path, logged: dict[tuple[str, int, str], str]) -> dict[str, Any]:
    """A shard's sums: from the log when its size and footer still match, else hashed now."""
    rel = Path(path).relative_to(samples_dir(cache_dir)).as_posix()
    size, footer = Path(path).stat().st_size, footer_sha256(path)
    sha = logged.get((rel, size, footer))
    return {"bytes": size, "sha256": sha or file_sha256(path), "footer_sha256": footer}


def quick_check(cache_dir: Path, meta: dict[str, Any]) -> int:
    """Start-up check of every listed shard: size and footer hash against cache_meta.json.

    Returns the number of shards without recorded sums (a cache written before checksums).
    """
    unchecked = 0
    for s in meta["shards"]:
        path = samples_dir(cache_dir) / s["path"]
        if "footer_sha256" not in s:
            unchecked += 1
            continue
        size = path.stat().st_size if path.is_file() else None
        if size != s["bytes"] or footer_sha256(path) != s["footer_sha256"]:
            what = "is missing" if size is None else (
                f"has {size} bytes, cache_meta.json recorded {s['bytes']}" if size != s["bytes"]
                else "changed since it was written (its footer hash differs from cache_meta.json)")  # fmt: skip
            raise UserError(f"cache shard {what}", where=str(path), fix=SHARD_FIX)
    return unchecked
