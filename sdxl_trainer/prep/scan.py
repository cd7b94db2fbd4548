"""`sdxl prep scan`: find every image, validate it, read its caption, bucket it → WORK/manifest.parquet.

Order of work: find the files (a folder walk or a local HF dataset) → decide from the previous
manifest which need reading (path + size + mtime_ns, or the content hash for a dataset) → check
those in a process pool (:mod:`.images`) → mark exact duplicates → assign buckets and fold small
ones → count caption chunks when a tokenizer is given → write manifest, tag counts and report.
Every image file found becomes exactly one row: ok + skipped + duplicate = files found.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from sdxl_trainer import console
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import buckets as bk
from sdxl_trainer.prep import hf_source, scan_report
from sdxl_trainer.prep.captions import (
    Caption,
    caption_flags,
    count_caption_chunks,
    parse_caption,
    parse_tag_list,
    read_sidecar,
)
from sdxl_trainer.prep.images import IMAGE_EXTENSIONS, content_id, probe_flags
from sdxl_trainer.prep.pool import WorkersUnavailable, probe_all, worker_count
from sdxl_trainer.schema import MANIFEST_SCHEMA, TAGS_SCHEMA, read_table, write_json, write_table

PRODUCED_BY = "sdxl prep scan"
# Fields a rescan may copy from the previous manifest instead of opening the file again.
PROBE_FIELDS = ("id", "status", "reason", "format", "mode", "conversion", "width", "height",
                "exif_orientation", "n_frames", "file_size", "checked")
PROBE_OPTIONS = ("max_pixels", "min_side", "alpha_background")


@dataclass(slots=True)
class Item:
    """One image file found (or one dataset row) and what is known about it before probing."""

    path: str
    source: str
    caption: Caption
    mtime_ns: int | None = None
    caption_mtime_ns: int | None = None
    probe: dict[str, Any] | None = None  # filled from the previous manifest or the workers
    task: tuple[str, str | None, bytes | None] | None = field(default=None, repr=False)


# ── finding the files ────────────────────────────────────────────────────────────────────────


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


def _sidecar(entry: os.DirEntry, names: set[str]) -> Path | None:
    stem = os.path.splitext(entry.name)[0]
    for name in (stem + ".txt", stem + ".TXT"):
        if name in names:
            return Path(entry.path).with_name(name)
    return None


def find_folder(
    root: Path, cfg: ScanConfig, previous: dict[str, dict], advance: Callable
) -> tuple[list[Item], list[str]]:
    """Every image under ``root`` as an Item; captions re-read only when the sidecar changed."""
    unreadable: list[str] = []
    items = []
    out = cfg.out.resolve()
    for entry, names in _walk(root, out if out.is_relative_to(root) else None, unreadable):
        rel = Path(entry.path).relative_to(root).as_posix()
        size, mtime, problem = _stat(entry)
        side = _sidecar(entry, names)
        side_mtime = _mtime(side)
        prev = previous.get(rel)
        if prev is not None and prev["caption_mtime_ns"] == side_mtime and "_caption" in prev:
            caption = prev["_caption"]
        else:
            caption = read_sidecar(side, underscores=cfg.underscores_to_spaces)
        item = Item(rel, rel, caption, mtime, side_mtime)
        if problem:
            item.probe = {"id": None, "status": "skipped", "reason": problem, "image_flags": []}
        elif _reusable(prev, cfg, size=size, mtime_ns=mtime):
            item.probe = _probe_from_row(prev)
        else:
            item.task = (rel, entry.path, None)
        items.append(item)
        advance()
    return items, unreadable


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _hf_caption(value: Any, cfg: ScanConfig) -> Caption:
    if isinstance(value, list):
        return parse_tag_list(value, underscores=cfg.underscores_to_spaces)
    return parse_caption(value, underscores=cfg.underscores_to_spaces)


def find_hf(
    src: hf_source.HFSource, cfg: ScanConfig, previous: dict[str, dict], items: dict[str, Item], advance: Callable
) -> Iterator[tuple]:
    """Stream a dataset's rows into ``items``, yielding a probe task for each row not reusable.

    A dataset has no mtimes: a row is reused when its bytes hash to the id the previous scan stored.
    """
    for path, source, cell, caption in hf_source.iter_rows(src):
        item = Item(path, source, _hf_caption(caption, cfg))
        reason = "no_image: the row has no image data"
        try:
            data, file = hf_source.image_value(cell, src.root, allow_outside=cfg.allow_outside_paths)
        except hf_source.OutsideDataset as e:  # a bad row, like an unreadable image: skipped, counted
            data, file, reason = None, None, f"outside_dataset: {e} (--allow-outside-paths reads it)"
        prev = previous.get(path)
        if data is None and file is None:
            item.probe = {"id": None, "status": "skipped", "reason": reason, "image_flags": []}
        elif data is not None and _reusable(prev, cfg, content=data):
            item.probe = _probe_from_row(prev)
        else:
            item.task = (path, file, data)
        items[path] = item
        if item.task is None:
            advance()
        else:
            yield item.task
            item.task = None  # the bytes go to a worker; don't keep them alive here


# ── incremental rescans ──────────────────────────────────────────────────────────────────────


def load_previous(cfg: ScanConfig, source_meta: dict) -> dict[str, dict]:
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
    if meta.get("source", {}).get("root") != source_meta["root"]:
        changed.append("data source")
    if changed:
        console.info(f"[yellow]{', '.join(changed)} changed since the last scan; reading every file[/]")
        return {}
    same_captions = old.get("underscores_to_spaces") == cfg.underscores_to_spaces
    same_tokens = meta.get("tokenizer") == _tokenizer_key(cfg) and old.get("max_chunks") == cfg.max_chunks
    rows = {}
    for row in table.to_pylist():
        if not same_tokens:
            row["n_chunks"] = None
        if same_captions:
            row["_caption"] = Caption(row["caption"], row["tags"] or [], row["caption_kind"],
                                      caption_flags(row["flags"] or []))
        rows[row["path"]] = row
    return rows


def _tokenizer_key(cfg: ScanConfig) -> str | None:
    return str(Path(cfg.model).expanduser().resolve()) if cfg.model is not None else None


def _reusable(prev: dict | None, cfg: ScanConfig, *, size=None, mtime_ns=None, content=None) -> bool:
    if prev is None or prev["id"] is None:
        return False
    if not cfg.fast and prev["checked"] != "decoded":
        return False  # a header-only check is not the full decode asked for now
    if content is not None:
        return prev["id"] == content_id(content)
    return prev["file_size"] == size and prev["mtime_ns"] == mtime_ns


def _probe_from_row(row: dict) -> dict:
    probe = {k: row[k] for k in PROBE_FIELDS}
    probe["image_flags"] = probe_flags(row["flags"] or [])
    if probe["status"] == "duplicate":  # duplicates are decided afresh on every scan
        probe.update(status="ok", reason=None)
    probe["reused"] = True
    return probe


# ── rows, duplicates, buckets, chunks ────────────────────────────────────────────────────────


def _row(item: Item, checked: str) -> dict[str, Any]:
    p = item.probe or {}
    row = {name: None for name in MANIFEST_SCHEMA.names}
    row.update({k: p.get(k) for k in PROBE_FIELDS if k in p})
    row.update(path=item.path, source=item.source, mtime_ns=item.mtime_ns, caption_mtime_ns=item.caption_mtime_ns,
               tags=item.caption.tags, caption=item.caption.text, caption_kind=item.caption.kind,
               flags=list(item.caption.flags) + list(p.get("image_flags", [])), repeats=1)
    if not p.get("reused"):
        row["checked"] = checked if p.get("id") else None
    return row


def mark_duplicates(rows: list[dict]) -> None:
    """Same bytes under several paths: the first path (sorted) stays ok, the others point to it."""
    first: dict[str, dict] = {}
    for row in rows:  # rows are sorted by path
        if row["status"] != "ok":
            continue
        kept = first.setdefault(row["id"], row)
        if kept is not row:
            row.update(status="duplicate", duplicate_of=kept["id"], reason=f"duplicate: same bytes as {kept['path']}")


def _chunk_counts(rows: list[dict], cfg: ScanConfig, previous: dict[str, dict]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    known = {}  # captions the previous scan counted with the same tokenizer and max_chunks
    for r in ok:
        prev = previous.get(r["path"])
        if prev is not None and prev["n_chunks"] is not None and prev["caption"] == r["caption"]:
            known[r["caption"] or ""] = (prev["n_chunks"], "chunks_truncated" in (prev["flags"] or []))
    with console.progress("counting caption tokens", len(ok), "caption") as advance:
        counts = count_caption_chunks([r["caption"] for r in ok], model=cfg.model, max_chunks=cfg.max_chunks,
                                      known=known, advance=advance)
    for r, (n, truncated) in zip(ok, counts):
        r["n_chunks"] = n
        if truncated:
            r["flags"].append("chunks_truncated")


# ── the stage ────────────────────────────────────────────────────────────────────────────────


def _source(cfg: ScanConfig) -> tuple[dict, hf_source.HFSource | None]:
    if cfg.data_dir is None:
        src = hf_source.open_hf_dataset(cfg.hf_dataset, split=cfg.hf_split, image_column=cfg.image_column,
                                        caption_column=cfg.caption_column,
                                        allow_outside_paths=cfg.allow_outside_paths)
        return src.meta(), src
    root = Path(cfg.data_dir).expanduser().resolve()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "data dir not found"
        raise UserError(what, where=str(cfg.data_dir), fix="give the folder that holds your images as DATA_DIR")
    return {"kind": "folder", "root": str(root)}, None


def _find_and_probe(cfg: ScanConfig, src, source_meta: dict, previous: dict) -> tuple[list[Item], dict]:
    stats: dict[str, Any] = {"unreadable_dirs": [], "read": 0, "probe_seconds": 0.0}
    items: dict[str, Item] = {}

    def on_done(results: list[dict]) -> None:
        for r in results:
            items[r.pop("key")].probe = r
        stats["read"] += len(results)
        advance(len(results))

    if src is None:
        with console.progress("finding images", None, "file") as found:
            listed, stats["unreadable_dirs"] = find_folder(Path(source_meta["root"]), cfg, previous, found)
        if not listed:
            raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found", where=source_meta["root"],
                            fix="check DATA_DIR (hidden files and folders are not scanned)")
        items = {i.path: i for i in listed}
        tasks: Iterable[tuple] = [i.task for i in listed if i.task is not None]
        total, n_tasks = len(items), len(tasks)
        chunk = max(1, min(64, -(-n_tasks // (4 * worker_count(cfg.workers)))))
    else:
        if src.n_rows == 0:
            raise UserError(f"split {src.split!r} has no rows", where=str(src.root), fix="check --hf-dataset")
        total, n_tasks, chunk = src.n_rows, src.n_rows, 16  # rows carry their bytes: keep chunks small
        tasks = find_hf(src, cfg, previous, items, lambda n=1: advance(n))
    # No more processes than chunks: one changed file on a rescan is checked right here.
    stats["workers"] = max(1, min(worker_count(cfg.workers), -(-n_tasks // chunk)))
    with console.progress("checking images" if not cfg.fast else "reading headers", total, "img") as advance:
        if src is None:
            advance(total - len(tasks))  # reused from the previous manifest
        t0 = time.perf_counter()
        options = {"full": not cfg.fast, "max_pixels": cfg.max_pixels, "min_side": cfg.min_side,
                   "alpha_background": cfg.alpha_background}
        try:
            probe_all(tasks, options=options, workers=stats["workers"], chunk=chunk, on_done=on_done)
        except WorkersUnavailable as e:  # nothing was taken from tasks yet: check them here instead
            console.info(f"[yellow]worker processes could not start ({e}); checking images in this process[/]")
            stats["workers"] = 1
            probe_all(tasks, options=options, workers=1, chunk=chunk, on_done=on_done)
        stats["probe_seconds"] = time.perf_counter() - t0
    stats["reused"] = sum(1 for i in items.values() if i.probe and i.probe.get("reused"))
    return sorted(items.values(), key=lambda i: i.path), stats


def _summary(rows: list[dict], stats: dict, hist: Counter, folds: dict, seconds: float) -> dict[str, Any]:
    status = Counter(r["status"] for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    read = stats["read"]
    return {
        "files_found": len(rows), "ok": status["ok"], "skipped": status["skipped"], "duplicate": status["duplicate"],
        "read": read, "reused": stats["reused"], "workers": stats["workers"],
        "seconds": round(seconds, 3), "probe_seconds": round(stats["probe_seconds"], 3),
        "images_per_second": round(read / stats["probe_seconds"], 1) if read and stats["probe_seconds"] else None,
        "skipped_by_reason": dict(Counter(r["reason"].split(":")[0] for r in rows if r["status"] == "skipped")),
        "flags": dict(Counter(f for r in rows for f in r["flags"])),
        "modes": dict(Counter(r["mode"] for r in ok)),
        "caption_kinds": dict(Counter(r["caption_kind"] for r in ok)),
        "n_chunks": dict(Counter(str(r["n_chunks"]) for r in ok if r["n_chunks"] is not None)),
        "buckets": {bk.bucket_label(b): n for b, n in sorted(hist.items(), key=lambda kv: kv[0][0] / kv[0][1])},
        "folded": folds,
        "unreadable_dirs": stats["unreadable_dirs"],
        **scan_report.listing(rows),  # every skipped or flagged file with its reason (scan_report.py)
    }


def _write(cfg: ScanConfig, rows: list[dict], summary: dict, extra: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    write_table(table, cfg.out / "manifest.parquet", artifact="manifest", config=cfg, extra=extra)
    tags = Counter(t for r in rows if r["status"] == "ok" for t in r["tags"])
    ranked = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))
    tag_table = pa.table({"tag": [t for t, _ in ranked], "count": [n for _, n in ranked]}, schema=TAGS_SCHEMA)
    write_table(tag_table, cfg.out / "tags.parquet", artifact="tags", config=cfg)
    write_json(summary, cfg.out / "scan_report.json", artifact="scan_report", config=cfg)


def _print(summary: dict, out: Path) -> None:
    s = summary
    rate = f"{s['images_per_second']:,.1f} images/s on {s['workers']} worker(s)" if s["images_per_second"] else "–"
    rows = [("files found", s["files_found"]), ("ok", s["ok"]), ("skipped", s["skipped"]),
            ("duplicate", s["duplicate"]),
            ("ok + skipped + duplicate",
             f"{s['ok']} + {s['skipped']} + {s['duplicate']} = {s['files_found']} files found"),
            ("read / reused", f"{s['read']} / {s['reused']}"), ("check rate", rate)]
    rows += [(f"  skipped: {k}", n) for k, n in sorted(s["skipped_by_reason"].items())]
    rows += [(f"  flag: {k}", n) for k, n in sorted(s["flags"].items())]
    rows += [("  unreadable folder", d) for d in s["unreadable_dirs"]]
    console.table(f"prep scan → {out}", rows)
    scan_report.print_problems(s, out)
    if s["buckets"]:
        top = max(s["buckets"].values())
        bars = [(b, n, "█" * max(1, round(30 * n / top))) for b, n in s["buckets"].items()]
        console.table("buckets (ok images)", bars, columns=("bucket", "images", ""))


def run(cfg: ScanConfig) -> dict[str, Any]:
    """Scan DATA_DIR (or a HF dataset) into WORK; returns the summary numbers (also in scan_report.json)."""
    start = time.perf_counter()
    b = cfg.buckets
    buckets = bk.make_buckets(max_area=b.max_area, step=b.step, min_side=b.min_side, max_side=b.max_side, base=b.base)
    if cfg.model is not None and not Path(cfg.model).exists():
        raise UserError("model not found", where=str(cfg.model), fix="give an SDXL folder with --model, or drop it")
    source_meta, src = _source(cfg)
    previous = load_previous(cfg, source_meta)
    items, stats = _find_and_probe(cfg, src, source_meta, previous)
    rows = [_row(i, "header" if cfg.fast else "decoded") for i in items]
    mark_duplicates(rows)
    hist, folds = bk.bucket_rows(rows, buckets=buckets, fold_below=b.fold_below)
    if cfg.model is not None:
        _chunk_counts(rows, cfg, previous)
    summary = _summary(rows, stats, hist, folds, time.perf_counter() - start)
    extra = {"source": source_meta, "buckets": [list(x) for x in buckets], "tokenizer": _tokenizer_key(cfg)}
    _write(cfg, rows, summary, extra)
    _print(summary, cfg.out)
    return summary
