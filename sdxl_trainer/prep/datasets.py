"""The sources of a scan and what each adds to its rows (docs/datasets.md).

A scan reads one source — DATA_DIR or ``--hf-dataset`` — or a ``datasets:`` list of them. Each becomes
an :class:`Entry`: where its bytes are (the ``source`` description :func:`hf_source.open_source` reads)
and its per-row values: the ``<name>/`` prefix of its rows' paths and sources, ``repeats``,
``keep_tokens``, ``caption_dropout`` and the activation token put first in its captions.

In a folder, a first-level sub-folder named ``N_name`` (kohya's layout, e.g. ``10_hopper``) repeats its
images N times an epoch, replacing the entry's ``num_repeats``, and ``name`` is the caption of its images
that have no sidecar (flag ``caption_from_folder``). Names that only look like it (``2024_photos``,
``01_intro``, ``0_x``) are left alone and reported, since a wrong guess would multiply a folder's weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from sdxl_trainer import console
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import hf_source
from sdxl_trainer.prep.captions import Caption, parse_caption, underscores_to_spaces

MAX_FOLDER_REPEATS = 999
_NUMBERED = re.compile(r"^(\d+)_(.+)$")


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
    dataset: str | None = None
    folder: str | None = None  # the N_name folder that set ``repeats``
    repeats: int = 1


@dataclass(frozen=True)
class Entry:
    """One source of the scan, resolved: where its bytes are and the values its rows carry."""

    name: str | None  # None: the single DATA_DIR / --hf-dataset (paths without a prefix)
    meta: dict[str, Any]  # what open_source needs: {"kind": "folder", "root"} or an HF dataset's meta()
    hf: hf_source.HFSource | None
    repeats: int = 1
    caption_extension: str = ".txt"
    keep_tokens: int | None = None
    token_tags: tuple[str, ...] = ()
    underscores: bool = False
    caption_dropout: float | None = None
    folder_repeats: bool = True

    @property
    def label(self) -> str:
        return self.name or Path(self.meta["root"]).name or str(self.meta["root"])

    @property
    def activation_token(self) -> str | None:
        return ", ".join(self.token_tags) or None

    def prefixed(self, rel: str) -> str:
        """A row's path or source: ``<name>/<rel>`` in a datasets list, ``rel`` for a single source."""
        return f"{self.name}/{rel}" if self.name is not None else rel

    def caption_options(self) -> dict[str, Any]:
        """What a rescan compares before reusing a caption read by the previous scan."""
        return {"caption_extension": self.caption_extension, "underscores_to_spaces": self.underscores,
                "activation_token": self.activation_token, "folder_repeats": self.folder_repeats}  # fmt: skip


def _folder(path: Path, what: str) -> dict[str, Any]:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UserError("is not a folder" if root.exists() else f"{what} not found", where=str(path),
                        fix="give the folder that holds your images as DATA_DIR" if what == "data dir"
                        else "fix the entry's path (a relative path is read from the current folder)")
    return {"kind": "folder", "root": str(root)}


def _token_tags(token: str | None, underscores: bool) -> tuple[str, ...]:
    if token is None:
        return ()
    tags = [" ".join(t.split()) for t in token.split(",")]
    return tuple(dict.fromkeys(underscores_to_spaces(t) if underscores else t for t in tags if t))


def resolve(cfg: ScanConfig) -> list[Entry]:
    """The scan's sources: a folder or dataset is checked (and a dataset's columns found) before any work."""
    if cfg.data_dir is not None:
        return [Entry(None, _folder(cfg.data_dir, "data dir"), None, underscores=cfg.underscores_to_spaces,
                      folder_repeats=cfg.folder_repeats)]  # fmt: skip
    if cfg.hf_dataset is not None:
        src = hf_source.open_hf_dataset(cfg.hf_dataset, split=cfg.hf_split, image_column=cfg.image_column,
                                        caption_column=cfg.caption_column, allow_outside_paths=cfg.allow_outside_paths)
        return [Entry(None, src.meta(), src, underscores=cfg.underscores_to_spaces, folder_repeats=False)]
    entries = []
    for d in cfg.datasets:
        underscores = cfg.underscores_to_spaces if d.underscores_to_spaces is None else d.underscores_to_spaces
        tokens = _token_tags(d.activation_token, underscores)
        keep = d.keep_tokens if d.keep_tokens is not None else (len(tokens) or None)
        entry = Entry(d.name, {}, None, d.num_repeats, d.caption_extension, keep, tokens, underscores,
                      d.caption_dropout_rate, cfg.folder_repeats if d.folder_repeats is None else d.folder_repeats)
        if d.path is not None:
            entry = replace(entry, meta=_folder(d.path, f"folder of dataset {d.name!r}"))
        else:
            src = hf_source.open_hf_dataset(d.hf_dataset, split=d.hf_split, image_column=d.image_column,
                                            caption_column=d.caption_column,
                                            allow_outside_paths=cfg.allow_outside_paths)
            entry = replace(entry, meta=src.meta(), hf=src, folder_repeats=False)
        entries.append(entry)
    return entries


def source_meta(entries: list[Entry]) -> dict[str, Any]:
    """The manifest's ``source`` metadata: one source as before, or every entry of a datasets list."""
    if len(entries) == 1 and entries[0].name is None:
        return entries[0].meta
    return {"kind": "datasets", "datasets": [{"name": e.name, **e.meta} for e in entries]}


# ── N_name folders and captions ──────────────────────────────────────────────────────────────


def repeat_folder(name: str) -> tuple[int | None, str | None, str | None]:
    """``(repeats, caption, None)`` for kohya's ``10_hopper``; ``(None, None, why not)`` for a name that only
    looks like one (``2024_photos``); ``(None, None, None)`` for any other name."""
    m = _NUMBERED.match(name)
    if m is None:
        return None, None, None
    digits, rest = m.groups()
    if digits.startswith("0"):
        return None, None, "a number starting with 0 reads as an ordering prefix, not repeats"
    if int(digits) > MAX_FOLDER_REPEATS:
        return None, None, f"{digits} > {MAX_FOLDER_REPEATS} reads as a year or an id, not repeats"
    return int(digits), rest, None


def decorate(caption: Caption, entry: Entry, folder_caption: str | None = None) -> Caption:
    """The entry's changes to a parsed caption: the N_name folder's caption for an image without a sidecar,
    then the activation token first (moved there, never doubled, when the caption already holds it)."""
    if caption.text is None and folder_caption is not None:
        own = parse_caption(folder_caption, underscores=entry.underscores)
        flags = [f for f in caption.flags if f != "caption_missing"] + own.flags + ["caption_from_folder"]
        caption = Caption(own.text, own.tags, own.kind, flags)
    tokens = list(entry.token_tags)
    if not tokens:
        return caption
    if caption.kind == "caption":
        text, lead = caption.text or "", ", ".join(tokens)
        if text == lead or (text.startswith(lead) and not text[len(lead)].isalnum()):
            return caption
        return Caption(f"{lead}, {text}", [], "caption", list(caption.flags))
    tags = tokens + [t for t in caption.tags if t not in tokens]
    return Caption(", ".join(tags), tags, "tags", list(caption.flags))


# ── the summary per entry and N_name folder ──────────────────────────────────────────────────


def per_dataset(items: Iterable[Item], rows: Iterable[dict], entries: list[Entry]) -> list[dict[str, Any]]:
    """One record per entry (images outside N_name folders) and per N_name folder: its numbers for an epoch."""
    by_name = {e.name: (i, e) for i, e in enumerate(entries)}
    groups: dict[tuple, dict[str, Any]] = {}
    for item, row in zip(items, rows):
        index, e = by_name[item.dataset]
        g = groups.setdefault((index, item.folder or ""), {
            "name": "/".join(x for x in (e.name, item.folder) if x) or e.label, "dataset": e.name,
            "folder": item.folder, "files_found": 0, "ok": 0, "repeats": item.repeats, "samples_per_epoch": 0,
            "keep_tokens": e.keep_tokens, "activation_token": e.activation_token,
            "caption_dropout": e.caption_dropout})  # fmt: skip
        g["files_found"] += 1
        if row["status"] == "ok":
            g["ok"] += 1
            g["samples_per_epoch"] += item.repeats
    return [groups[k] for k in sorted(groups)]


def print_datasets(summary: dict[str, Any]) -> None:
    """The per-dataset table, when there is more to it than one source seen once an epoch."""
    groups = summary.get("datasets") or []
    plain = len(groups) == 1 and groups[0]["repeats"] == 1 and groups[0]["keep_tokens"] is None \
        and groups[0]["activation_token"] is None and groups[0]["caption_dropout"] is None  # fmt: skip
    for f in summary.get("folders_not_repeats") or []:
        console.info(f"[yellow]folder {escape(f['folder'])} is not an N_name repeat folder: {f['why']}[/]")
    if not groups or plain:
        return

    def shown(v: Any) -> Any:
        return "–" if v is None else v

    table = [(g["name"], g["ok"], g["repeats"], g["samples_per_epoch"], shown(g["keep_tokens"]),
              shown(g["activation_token"]), shown(g["caption_dropout"])) for g in groups]  # fmt: skip
    table.append(("total", summary["ok"], "", summary["samples_per_epoch"], "", "", ""))
    console.table("datasets (samples per epoch = ok × repeats)", table,
                  columns=("dataset", "ok", "repeats", "per epoch", "keep", "token", "dropout"))
