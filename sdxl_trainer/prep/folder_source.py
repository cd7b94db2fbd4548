"""Finding the images of a folder source: the walk, their caption sidecars and kohya's N_name folders.

Hidden files and folders are ignored, and so is WORK when it lies inside the folder; symlinked files
are followed, symlinked folders are not (no loops). A caption is re-read only when its sidecar changed
(or the entry's caption options did: the rescan then gives no previous caption to reuse).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from sdxl_trainer.config import ScanConfig
from sdxl_trainer.prep import rescan
from sdxl_trainer.prep.captions import read_sidecar
from sdxl_trainer.prep.datasets import Entry, Item, decorate, repeat_folder
from sdxl_trainer.prep.images import IMAGE_EXTENSIONS


def _walk(root: Path, skip: Path | None, unreadable: list[str]) -> Iterator[tuple[os.DirEntry, set[str]]]:
    """Image entries under root (hidden files and folders ignored), with their folder's names."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            unreadable.append(f"{folder}: {e.strerror or e}")
            continue
        names = {e.name for e in entries}
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                if skip is None or Path(e.path) != skip:
                    stack.append(Path(e.path))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                yield e, names


def _stat(entry: os.DirEntry) -> tuple[int | None, int | None, str | None]:
    """(size, mtime_ns, problem): a dangling link or a FIFO is a row with a reason, not a crash."""
    try:
        st = entry.stat()
    except OSError as e:
        return None, None, f"unreadable: {e.strerror or e}"
    if not entry.is_file():
        return None, None, "not_a_file: not a regular file"
    return st.st_size, st.st_mtime_ns, None


def _sidecar(entry: os.DirEntry, names: set[str], extension: str) -> Path | None:
    stem = os.path.splitext(entry.name)[0]
    for name in (stem + extension, stem + extension.upper()):
        if name in names:
            return Path(entry.path).with_name(name)
    return None


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def find_folder(
    entry: Entry, cfg: ScanConfig, previous: dict[str, dict], advance: Callable, not_repeats: list[dict]
) -> tuple[list[Item], list[str]]:
    """Every image of a folder entry as an Item; first-level N_name folders set repeats (and are noted in
    ``not_repeats`` when their name only looks like one)."""
    root = Path(entry.meta["root"])
    unreadable: list[str] = []
    items = []
    out = cfg.out.resolve()
    folders: dict[str, tuple[int | None, str | None]] = {}
    for dirent, names in _walk(root, out if out.is_relative_to(root) else None, unreadable):
        rel = Path(dirent.path).relative_to(root).as_posix()
        top = rel.partition("/")[0] if "/" in rel else None
        if top is not None and entry.folder_repeats and top not in folders:
            n, caption, why = repeat_folder(top)
            folders[top] = (n, caption)
            if why:
                not_repeats.append({"folder": entry.prefixed(top), "why": why})
        repeats, folder_caption = folders.get(top, (None, None)) if top is not None else (None, None)
        path = entry.prefixed(rel)
        size, mtime, problem = _stat(dirent)
        side = _sidecar(dirent, names, entry.caption_extension)
        side_mtime = _mtime(side)
        prev = previous.get(path)
        if prev is not None and prev["caption_mtime_ns"] == side_mtime and "_caption" in prev:
            caption = prev["_caption"]
        else:
            caption = decorate(read_sidecar(side, underscores=entry.underscores), entry, folder_caption)
        item = Item(path, entry.prefixed(rel), caption, mtime, side_mtime, dataset=entry.name,
                    folder=top if repeats else None, repeats=repeats or entry.repeats)  # fmt: skip
        if problem:
            item.probe = {"id": None, "status": "skipped", "reason": problem, "image_flags": []}
        elif rescan.reusable(prev, cfg, size=size, mtime_ns=mtime):
            item.probe = rescan.probe_from_row(prev)
        else:
            item.task = (path, dirent.path, None)
        items.append(item)
        advance()
    return items, unreadable
