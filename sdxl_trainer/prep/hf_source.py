"""Images from a Hugging Face ``datasets`` dataset on local disk, read with pyarrow directly.

Two layouts are understood, without importing ``datasets`` (which would write an Arrow cache for
Parquet input): a ``save_to_disk`` folder (``dataset_dict.json`` with one folder per split, or a
single split with ``state.json`` + ``data-*.arrow``) and Parquet files (one file, or a folder tree;
the split comes from hub-style names such as ``train-00000-of-00002.parquet`` or a ``train/``
folder, else it is ``train``).

Each image row is addressed by a *source* string, ``<file relative to the split root>#<row in that
file>``; :func:`open_source` turns a manifest's source metadata and a row's source back into bytes,
for the stages after the scan.

An image cell may hold a file path instead of bytes. Such a path is resolved against the split's
folder and must stay inside it (``../x.jpg``, an absolute path or a symlink out are refused) unless
the user opts in with ``allow_outside_paths``: a dataset someone else built should not make the
scan read arbitrary files of this machine into a training set.
"""

from __future__ import annotations

import difflib
import functools
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import reading_parquet

_DAMAGED = "this dataset file is damaged: download or copy it again, then re-run `sdxl prep scan`"

KNOWN_SPLITS = ("train", "validation", "valid", "test", "dev", "eval")
IMAGE_NAMES = ("image", "img", "images", "jpg", "jpeg", "png", "webp", "picture")
CAPTION_NAMES = ("text", "caption", "captions", "prompt", "tags", "tag_string", "description", "sentence")


@dataclass(frozen=True)
class HFSource:
    """One split of a local dataset, its files and the two columns the scan reads."""

    root: Path  # the split's folder (save_to_disk) or the dataset folder (Parquet)
    kind: str  # "arrow" | "parquet"
    split: str
    files: tuple[str, ...]  # relative to root
    image_column: str
    caption_column: str | None
    n_rows: int
    allow_outside_paths: bool = False

    def meta(self) -> dict[str, Any]:
        """What a later stage needs to find the pixels again (stored in the manifest metadata)."""
        return {"kind": "hf_dataset", "format": self.kind, "root": str(self.root), "split": self.split,
                "image_column": self.image_column, "caption_column": self.caption_column,
                "allow_outside_paths": self.allow_outside_paths}


def _split_of(rel: Path) -> str:
    m = re.match(r"^(.+?)-\d+-of-\d+$", rel.stem)
    if m:
        return m.group(1)
    for part in (rel.stem, *reversed(rel.parts[:-1])):
        if part in KNOWN_SPLITS:
            return part
    return "train"


def _pick_split(splits: dict[str, Any], wanted: str | None, where: Path) -> str:
    if wanted is not None:
        if wanted not in splits:
            raise UserError(f"no split {wanted!r}; the dataset has {sorted(splits)}", where=str(where),
                            fix="pass one of them with --hf-split")
        return wanted
    if len(splits) == 1:
        return next(iter(splits))
    if "train" in splits:
        return "train"
    raise UserError(f"the dataset has several splits {sorted(splits)} and none is 'train'", where=str(where),
                    fix="choose one with --hf-split")


def _arrow_split(path: Path, split: str | None) -> tuple[Path, str, list[str], dict]:
    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        chosen = _pick_split({n: None for n in names}, split, path)
        path = path / chosen
    else:
        chosen = None
    state = json.loads((path / "state.json").read_text())
    files = [f["filename"] for f in state.get("_data_files", [])]
    info_file = path / "dataset_info.json"
    features = json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {}
    chosen = chosen or state.get("_split") or "train"
    if split is not None and split != chosen:
        raise UserError(f"this save_to_disk folder holds only the split {chosen!r}", where=str(path),
                        fix="drop --hf-split or point at the folder of the split you want")
    return path, chosen, files, features


def _parquet_split(path: Path, split: str | None) -> tuple[Path, str, list[str], dict]:
    root = path.parent if path.is_file() else path
    all_files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not all_files:
        raise UserError("not a Hugging Face dataset: no dataset_dict.json, state.json or .parquet files",
                        where=str(path), fix="point --hf-dataset at a save_to_disk folder or Parquet files")
    by_split: dict[str, list[str]] = {}
    for f in all_files:
        rel = f.relative_to(root)
        by_split.setdefault(_split_of(rel), []).append(rel.as_posix())
    chosen = _pick_split(by_split, split, path)
    with reading_parquet(root / by_split[chosen][0], fix=_DAMAGED):
        meta = pq.read_schema(root / by_split[chosen][0]).metadata or {}
    features = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {}) if b"huggingface" in meta else {}
    return root, chosen, by_split[chosen], features


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(t.field(i).name == "bytes" for i in range(t.num_fields))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _choose(kind: str, candidates: list[str], names: tuple[str, ...], columns: list[str], where: Path) -> str | None:
    if len(candidates) == 1:
        return candidates[0]
    for name in names:
        for c in candidates:
            if c.lower() == name:
                return c
    if not candidates:
        return None
    raise UserError(f"cannot tell which column holds the {kind}: candidates {candidates}", where=str(where),
                    fix=f"name it with --{kind}-column (columns: {columns})")


def _check_named(kind: str, name: str, schema: pa.Schema, ok: Any, where: Path) -> str:
    if name not in schema.names:
        close = difflib.get_close_matches(name, schema.names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"no column {name!r}{hint} (columns: {schema.names})", where=str(where),
                        fix=f"fix --{kind}-column")
    if not ok(schema.field(name).type):
        raise UserError(f"column {name!r} is {schema.field(name).type}, not usable as the {kind}", where=str(where),
                        fix=f"pick another --{kind}-column (columns: {schema.names})")
    return name


def _columns(schema: pa.Schema, features: dict, image: str | None, caption: str | None, where: Path):
    if image is not None:
        image = _check_named("image", image, schema, _is_image_type, where)
    else:
        tagged = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
        by_type = [f.name for f in schema if _is_image_type(f.type)]
        image = _choose("image", tagged or by_type, IMAGE_NAMES, schema.names, where)
        if image is None:
            raise UserError(f"no image column found (columns: {schema.names})", where=str(where),
                            fix="name it with --image-column; it must hold image bytes or a datasets Image")
    if caption is not None:
        caption = _check_named("caption", caption, schema, _is_text_type, where)
    else:
        texts = [f.name for f in schema if _is_text_type(f.type) and f.name != image]
        caption = _choose("caption", texts, CAPTION_NAMES, schema.names, where)
    return image, caption


def open_hf_dataset(
    path: Path, *, split: str | None = None, image_column: str | None = None, caption_column: str | None = None,
    allow_outside_paths: bool = False,
) -> HFSource:
    """Locate the split, its files and its image/caption columns (auto-detected unless named)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise UserError("dataset not found", where=str(path), fix="check the --hf-dataset path")
    is_arrow = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    root, chosen, files, features = (_arrow_split if is_arrow else _parquet_split)(path, split)
    if not files:
        raise UserError(f"split {chosen!r} lists no data files", where=str(root), fix="re-save the dataset")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise UserError(f"data file missing: {missing[0]}", where=str(root), fix="copy the whole dataset folder")
    schema = _read_schema(root / files[0], arrow=is_arrow)
    image, caption = _columns(schema, features, image_column, caption_column, root)
    n_rows = sum(_n_rows(root / f, arrow=is_arrow) for f in files)
    return HFSource(root, "arrow" if is_arrow else "parquet", chosen, tuple(files), image, caption, n_rows,
                    allow_outside_paths)


def _read_schema(path: Path, *, arrow: bool) -> pa.Schema:
    if arrow:
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).schema
    with reading_parquet(path, fix=_DAMAGED):
        return pq.read_schema(path)


def _n_rows(path: Path, *, arrow: bool) -> int:
    if arrow:
        return _arrow_table(str(path)).num_rows
    with reading_parquet(path, fix=_DAMAGED):
        return pq.ParquetFile(path).metadata.num_rows


@functools.lru_cache(maxsize=4)
def _arrow_table(path: str) -> pa.Table:
    # Memory-mapped: the table's buffers point into the file, nothing is copied.
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _batches(path: Path, columns: list[str], *, arrow: bool, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if arrow:
        yield from _arrow_table(str(path)).select(columns).to_batches(max_chunksize=batch_rows)
    else:
        with reading_parquet(path, fix=_DAMAGED):
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


class OutsideDataset(ValueError):
    """An image cell's path leads out of the dataset folder and the user did not allow that."""


def image_value(value: Any, root: Path, *, allow_outside: bool = False) -> tuple[bytes | None, str | None]:
    """A cell of the image column → (bytes, None) or (None, a file path to read) or (None, None).

    Raises OutsideDataset for a path outside ``root`` (after resolving ``..`` and symlinks) unless
    ``allow_outside``.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], None
        p = value.get("path")
        if p:
            candidate = Path(p) if Path(p).is_absolute() else root / p
            if not allow_outside and not candidate.resolve().is_relative_to(root.resolve()):
                raise OutsideDataset(f"{p} is outside the dataset folder {root}")
            return None, str(candidate)
        return None, None
    return (value or None), None


def iter_rows(src: HFSource, *, batch_rows: int = 256) -> Iterator[tuple[str, str, Any, Any]]:
    """``(path, source, image cell, caption cell)`` for every row, in order, streaming."""
    columns = [src.image_column] + ([src.caption_column] if src.caption_column else [])
    index = 0
    for rel in src.files:
        row_in_file = 0
        for batch in _batches(src.root / rel, columns, arrow=src.kind == "arrow", batch_rows=batch_rows):
            images = batch.column(0).to_pylist()
            captions = batch.column(1).to_pylist() if src.caption_column else [None] * len(images)
            for image, caption in zip(images, captions):
                yield f"{src.split}/{index}", f"{rel}#{row_in_file}", image, caption
                index += 1
                row_in_file += 1


def _parquet_cell(path: Path, row: int, column: str) -> Any:
    with reading_parquet(path, fix=_DAMAGED):
        return _parquet_cell_unchecked(path, row, column)


def _parquet_cell_unchecked(path: Path, row: int, column: str) -> Any:
    pf = _parquet_file(str(path))
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < start + n:
            return _row_group(str(path), g, column).column(0)[row - start].as_py()
        start += n
    raise IndexError(row)


@functools.lru_cache(maxsize=4)
def _parquet_file(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(path)


@functools.lru_cache(maxsize=2)
def _row_group(path: str, group: int, column: str) -> pa.Table:
    return _parquet_file(path).read_row_group(group, columns=[column])


def open_source(source_meta: dict[str, Any], source: str) -> BinaryIO:
    """The encoded image of one manifest row, given the manifest's ``source`` metadata.

    A ``datasets`` source lists its entries; a row's source is ``<entry name>/<source within it>``.
    """
    if source_meta["kind"] == "datasets":
        name, _, inner = source.partition("/")
        entry = next((d for d in source_meta["datasets"] if d["name"] == name), None)
        if entry is None:
            raise UserError(f"the manifest lists no dataset {name!r}", where=source, fix="re-run `sdxl prep scan`")
        return open_source(entry, inner)
    root = Path(source_meta["root"])
    if source_meta["kind"] == "folder":
        return io.BytesIO((root / source).read_bytes())
    rel, _, row = source.rpartition("#")
    path, column = root / rel, source_meta["image_column"]
    if source_meta["format"] == "arrow":
        cell = _arrow_table(str(path)).column(column)[int(row)].as_py()
    else:
        cell = _parquet_cell(path, int(row), column)
    try:
        data, file = image_value(cell, root, allow_outside=bool(source_meta.get("allow_outside_paths")))
    except OutsideDataset as e:
        raise UserError(str(e), where=f"{root}/{source}", fix="re-run `sdxl prep scan` (it skips such rows), "
                        "or scan with --allow-outside-paths if you trust the dataset") from None
    if data is None and file is not None:
        data = Path(file).read_bytes()
    if data is None:
        raise UserError("this dataset row holds no image", where=f"{root}/{source}", fix="re-run `sdxl prep scan`")
    return io.BytesIO(data)
