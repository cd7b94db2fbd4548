"""`sdxl prep scan`: find every image, validate it, read its caption, bucket it → WORK/manifest.parquet.

Order of work: resolve the sources (DATA_DIR, a local HF dataset or a ``datasets:`` list of them:
:mod:`.datasets`) → find the files (:mod:`.folder_source`, or a dataset's rows) → decide from the
previous manifest which need reading (:mod:`.rescan`) → check those in a process pool
(:mod:`.images`) → mark exact duplicates → assign buckets and fold small ones → count caption chunks
when a tokenizer is given → write manifest, tag counts and report.
Every image file found becomes exactly one row: ok + skipped + duplicate = files found.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from sdxl_trainer import console
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import buckets as bk
from sdxl_trainer.prep import datasets, hf_source, rescan, scan_report
from sdxl_trainer.prep.captions import Caption, count_caption_chunks, parse_caption, parse_tag_list
from sdxl_trainer.prep.datasets import Entry, Item
from sdxl_trainer.prep.folder_source import find_folder
from sdxl_trainer.prep.images import IMAGE_EXTENSIONS
from sdxl_trainer.prep.pool import WorkersUnavailable, probe_all, worker_count
from sdxl_trainer.prep.rescan import PROBE_FIELDS, PRODUCED_BY
from sdxl_trainer.schema import MANIFEST_SCHEMA, TAGS_SCHEMA, write_json, write_table

__all__ = ["PRODUCED_BY", "run"]


def _hf_caption(value: Any, entry: Entry) -> Caption:
    if isinstance(value, list):
        return parse_tag_list(value, underscores=entry.underscores)
    return parse_caption(value, underscores=entry.underscores)


def find_hf(
    entry: Entry, cfg: ScanConfig, previous: dict[str, dict], items: dict[str, Item], advance: Callable
) -> Iterator[tuple]:
    """Stream a dataset's rows into ``items``, yielding a probe task for each row not reusable.

    A dataset has no mtimes: a row is reused when its bytes hash to the id the previous scan stored.
    """
    src = entry.hf
    assert src is not None
    for rel, source, cell, caption in hf_source.iter_rows(src):
        path = entry.prefixed(rel)
        item = Item(path, entry.prefixed(source), datasets.decorate(_hf_caption(caption, entry), entry),
                    dataset=entry.name, repeats=entry.repeats)  # fmt: skip
        reason = "no_image: the row has no image data"
        try:
            data, file = hf_source.image_value(cell, src.root, allow_outside=cfg.allow_outside_paths)
        except hf_source.OutsideDataset as e:  # a bad row, like an unreadable image: skipped, counted
            data, file, reason = None, None, f"outside_dataset: {e} (--allow-outside-paths reads it)"
        prev = previous.get(path)
        if data is None and file is None:
            item.probe = {"id": None, "status": "skipped", "reason": reason, "image_flags": []}
        elif data is not None and rescan.reusable(prev, cfg, content=data):
            item.probe = rescan.probe_from_row(prev)
        else:
            item.task = (path, file, data)
        items[path] = item
        if item.task is None:
            advance()
        else:
            yield item.task
            item.task = None  # the bytes go to a worker; don't keep them alive here


# ── rows, duplicates, buckets, chunks ────────────────────────────────────────────────────────


def _row(item: Item, checked: str, entry: Entry) -> dict[str, Any]:
    p = item.probe or {}
    row = {name: None for name in MANIFEST_SCHEMA.names}
    row.update({k: p.get(k) for k in PROBE_FIELDS if k in p})
    row.update(path=item.path, source=item.source, mtime_ns=item.mtime_ns, caption_mtime_ns=item.caption_mtime_ns,
               tags=item.caption.tags, caption=item.caption.text, caption_kind=item.caption.kind,
               flags=list(item.caption.flags) + list(p.get("image_flags", [])), dataset=item.dataset,
               repeats=item.repeats, keep_tokens=entry.keep_tokens, caption_dropout=entry.caption_dropout)
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


def _find_folders(cfg: ScanConfig, entries: list[Entry], previous: dict, stats: dict) -> list[Item]:
    listed: list[Item] = []
    with console.progress("finding images", None, "file") as found:
        for e in entries:
            got, unreadable = find_folder(e, cfg, previous, found, stats["folders_not_repeats"])
            stats["unreadable_dirs"] += unreadable
            if not got:
                raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found",
                                where=e.meta["root"], fix="check DATA_DIR or the datasets entry's path "
                                "(hidden files and folders are not scanned)")  # fmt: skip
            listed += got
    return listed


def _find_and_probe(cfg: ScanConfig, entries: list[Entry], previous: dict) -> tuple[list[Item], dict]:
    stats: dict[str, Any] = {"unreadable_dirs": [], "folders_not_repeats": [], "read": 0, "probe_seconds": 0.0}
    items: dict[str, Item] = {}

    def on_done(results: list[dict]) -> None:
        for r in results:
            items[r.pop("key")].probe = r
        stats["read"] += len(results)
        advance(len(results))

    listed = _find_folders(cfg, [e for e in entries if e.hf is None], previous, stats)
    items.update((i.path, i) for i in listed)
    folder_tasks = [i.task for i in listed if i.task is not None]
    hf_entries = [e for e in entries if e.hf is not None]
    for e in hf_entries:
        if e.hf.n_rows == 0:
            raise UserError(f"split {e.hf.split!r} has no rows", where=str(e.hf.root), fix="check --hf-dataset")
    hf_rows = sum(e.hf.n_rows for e in hf_entries)
    total, n_tasks = len(listed) + hf_rows, len(folder_tasks) + hf_rows
    # Dataset rows carry their bytes: keep chunks small.
    chunk = 16 if hf_entries else max(1, min(64, -(-n_tasks // (4 * worker_count(cfg.workers)))))
    tasks: Iterable[tuple] = itertools.chain(folder_tasks, *(find_hf(e, cfg, previous, items, lambda n=1: advance(n))
                                                             for e in hf_entries))  # fmt: skip
    # No more processes than chunks: one changed file on a rescan is checked right here.
    stats["workers"] = max(1, min(worker_count(cfg.workers), -(-n_tasks // chunk)))
    with console.progress("checking images" if not cfg.fast else "reading headers", total, "img") as advance:
        advance(len(listed) - len(folder_tasks))  # reused from the previous manifest
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
        "samples_per_epoch": sum(r["repeats"] for r in ok),
        "datasets": stats["datasets"], "folders_not_repeats": stats["folders_not_repeats"],
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
            ("samples per epoch", s["samples_per_epoch"]),
            ("read / reused", f"{s['read']} / {s['reused']}"), ("check rate", rate)]
    rows += [(f"  skipped: {k}", n) for k, n in sorted(s["skipped_by_reason"].items())]
    rows += [(f"  flag: {k}", n) for k, n in sorted(s["flags"].items())]
    if s["flags"].get("upscale_needed"):  # the policy for them, where the count is read (docs/scan.md)
        rows.append(("  smaller than their bucket", f"{s['flags']['upscale_needed']}: upscaled when cached; "
                     "--min-side skips them"))  # fmt: skip
    rows += [("  unreadable folder", d) for d in s["unreadable_dirs"]]
    console.table(f"prep scan → {out}", rows)
    datasets.print_datasets(s)
    scan_report.print_problems(s, out)
    if s["buckets"]:
        top = max(s["buckets"].values())
        bars = [(b, n, "█" * max(1, round(30 * n / top))) for b, n in s["buckets"].items()]
        console.table("buckets (ok images)", bars, columns=("bucket", "images", ""))


def run(cfg: ScanConfig) -> dict[str, Any]:
    """Scan DATA_DIR, a HF dataset or a datasets: list into WORK; returns the summary (also in scan_report.json)."""
    start = time.perf_counter()
    b = cfg.buckets
    buckets = bk.make_buckets(max_area=b.max_area, step=b.step, min_side=b.min_side, max_side=b.max_side, base=b.base)
    if cfg.model is not None and not Path(cfg.model).exists():
        raise UserError("model not found", where=str(cfg.model), fix="give an SDXL folder with --model, or drop it")
    entries = datasets.resolve(cfg)
    previous = rescan.load_previous(cfg, entries)
    items, stats = _find_and_probe(cfg, entries, previous)
    by_name = {e.name: e for e in entries}
    rows = [_row(i, "header" if cfg.fast else "decoded", by_name[i.dataset]) for i in items]
    mark_duplicates(rows)
    stats["datasets"] = datasets.per_dataset(items, rows, entries)
    hist, folds = bk.bucket_rows(rows, buckets=buckets, fold_below=b.fold_below)
    if cfg.model is not None:
        _chunk_counts(rows, cfg, previous)
    summary = _summary(rows, stats, hist, folds, time.perf_counter() - start)
    extra = {"source": datasets.source_meta(entries), "buckets": [list(x) for x in buckets],
             "tokenizer": rescan.tokenizer_key(cfg),
             "caption_options": {e.name or "": e.caption_options() for e in entries}}  # fmt: skip
    _write(cfg, rows, summary, extra)
    _print(summary, cfg.out)
    return summary
