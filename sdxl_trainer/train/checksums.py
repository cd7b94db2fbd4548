"""Checksums of a checkpoint's files: written into ``checkpoint.json``, checked before a resume.

A file damaged in place (a bad disk block, a copy that went wrong, NaN written over part of the
tensor data) keeps its size, so the size check of :func:`checkpoint_dir.verify_checkpoint` cannot
see it, and safetensors loads it without complaint. SHA-256 can: ~1.5 GB/s a core where the CPU has
SHA instructions (x86 SHA-NI, ARMv8), faster here than BLAKE2b (~0.8 GB/s, measured in
docs/reliability.md), and ``sha256sum`` checks it by hand. Files are read in 8 MiB chunks, one
thread per file (hashlib releases the GIL), so a checkpoint of many files uses several cores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ALGORITHM = "sha256"
_CHUNK = 8 << 20
_THREADS = 4  # a checkpoint's big files are few (trainable, state, the exports): more threads gain nothing


def file_digest(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (memory stays ~8 MiB for a 30 GB optimiser state)."""
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    """``{relative name: hex digest}`` of the files ``names`` under ``root``."""
    names = sorted(names)
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda rel: file_digest(Path(root) / rel), names)))


def mismatches(root: Path, recorded: Mapping[str, str]) -> list[str]:
    """The files under ``root`` whose digest differs from ``recorded`` (a missing file counts)."""
    present = {rel for rel in recorded if (Path(root) / rel).is_file()}
    now = digests(root, present)
    return sorted(rel for rel in recorded if now.get(rel) != recorded[rel])
