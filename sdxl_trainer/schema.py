"""The one definition of every artifact a stage writes, and how it is written and checked.

Every Parquet file carries, in its schema metadata under ``sdxl_trainer``, a JSON document with
``artifact`` (its kind), ``schema_version``, ``package_version``, ``created`` and ``config`` (the
config of the stage that wrote it). JSON artifacts carry the same keys at top level. A later stage
calls :func:`read_table` / :func:`read_json` with the kind it expects and gets a clear error for a
missing, foreign or out-of-date artifact instead of training on garbage.

Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdxl_trainer import __version__
from sdxl_trainer.errors import UserError

SCHEMA_VERSION = 1
META_KEY = b"sdxl_trainer"

# ── manifest.parquet (prep scan): one row per image file found, kept or not ─────────────────
# Its metadata (``extra``) holds ``source`` — {"kind": "folder", "root"} or {"kind": "hf_dataset",
# "format": "arrow"|"parquet", "root", "split", "image_column", "caption_column"}, or for a
# ``datasets:`` list {"kind": "datasets", "datasets": [{"name", <one of those>}, ...]} with row paths
# and sources prefixed "<name>/" — what ``prep.hf_source.open_source(source, row["source"])`` needs
# to read a row's bytes — plus ``buckets`` (the [w, h] list rows were assigned from), ``tokenizer``
# (the --model, or null) and ``caption_options`` (per entry, for rescans).
# ``id`` is unique among ok rows; ``path`` is unique among all rows.
MANIFEST_STATUSES = ("ok", "skipped", "duplicate")
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # content hash (blake2b-128 of the file bytes, hex); null if unreadable
        ("path", pa.string()),  # relative to the data dir (POSIX), or "<split>/<row>" for a HF dataset
        ("source", pa.string()),  # where the bytes are: the relative path, or "<data file>#<row in it>"
        ("status", pa.string()),  # ok | skipped | duplicate
        ("reason", pa.string()),  # "<code>: <detail>" (codes in docs/scan.md); null when ok
        ("duplicate_of", pa.string()),  # id of the kept copy, for status == duplicate
        ("format", pa.string()),  # PIL format name (JPEG, PNG, ...)
        ("mode", pa.string()),  # PIL mode as stored in the file (RGB, RGBA, P, CMYK, I;16, ...)
        ("conversion", pa.string()),  # how it becomes RGB at cache time, e.g. "alpha over white→RGB"
        ("width", pa.int32()),  # as displayed, after EXIF orientation
        ("height", pa.int32()),
        ("exif_orientation", pa.int8()),  # 1..8; 1 = none
        ("n_frames", pa.int32()),  # >1 for animated GIF/WebP (first frame used)
        ("bucket_width", pa.int32()),
        ("bucket_height", pa.int32()),
        ("tags", pa.list_(pa.string())),
        ("caption", pa.string()),  # the sidecar text (whitespace-normalised; tags re-joined with ", ")
        ("caption_kind", pa.string()),  # tags | caption | none
        ("flags", pa.list_(pa.string())),  # caption_missing, caption_empty, caption_non_utf8, upscale_needed, ...
        ("n_chunks", pa.int32()),  # 75-token chunks the caption is encoded with (≤ max_chunks; null without --model)
        ("file_size", pa.int64()),
        ("mtime_ns", pa.int64()),  # with file_size: decides whether a rescan re-reads the file
        ("caption_mtime_ns", pa.int64()),
        ("checked", pa.string()),  # decoded (full decode) | header (--fast); null when never read
        # per dataset entry (docs/datasets.md); a manifest written before these columns reads as 1 / null
        ("dataset", pa.string()),  # name of the `datasets:` entry the row came from (null: a single source)
        ("repeats", pa.int32()),  # times an epoch shows the image (kohya num_repeats / an N_name folder); ≥ 1
        ("keep_tokens", pa.int32()),  # first K tags never shuffled or dropped (null: the cache's keep_first)
        ("caption_dropout", pa.float32()),  # chance of the empty prompt at training time (null: data.p_uncond)
    ]
)

TAGS_SCHEMA = pa.schema([("tag", pa.string()), ("count", pa.int64())])


def artifact_meta(artifact: str, config: Any) -> dict[str, Any]:
    """The provenance record stored with every artifact."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {
        "artifact": artifact,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
    }


@functools.cache
def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask sets it too, and
    threads may be creating files meanwhile); elsewhere set and restored once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``path``, but with a normal file's permissions (0666 less the umask,
    usually 0644) instead of mkstemp's owner-only 0600: what we write is renamed into place, and a
    ComfyUI or a teammate running as another user must be able to read it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def temp_dir(path: Path, suffix: str = ".tmp") -> Path:
    """``tempfile.mkdtemp`` beside ``path`` with a normal folder's permissions (0777 less the umask)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def normal_permissions(path: Path | str) -> None:
    """Give ``path`` (a file, or a folder and everything in it) a normal file's / folder's permissions,
    0666 / 0777 less the umask. safetensors ≥ 0.8 writes its files owner-only (0600) and mkstemp /
    mkdtemp do the same; an export must be readable by a ComfyUI running as another user."""
    path = Path(path)
    mask = _umask()
    if not path.is_dir():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            Path(root, name).chmod(0o777 & ~mask)
        for name in files:
            Path(root, name).chmod(0o666 & ~mask)


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return temp_file(path)


def _replace(tmp: str, path: Path) -> None:
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _name_file(e: BaseException, path: Path) -> None:
    """pyarrow's OSErrors (disk full, …) name no file: name the artifact, for the one-line error."""
    if isinstance(e, OSError) and e.filename is None:
        e.filename = str(path)


def write_table(table: pa.Table, path: Path, *, artifact: str, config: Any, extra: dict | None = None) -> None:
    """Write ``table`` to ``path`` atomically with the provenance record in its metadata."""
    meta = artifact_meta(artifact, config)
    if extra:
        meta.update(extra)
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = json.dumps(meta).encode()
    table = table.replace_schema_metadata(existing)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _name_file(e, path)
        raise


def write_json(obj: dict, path: Path, *, artifact: str, config: Any) -> None:
    """Write a JSON artifact atomically; provenance keys sit beside the payload."""
    doc = artifact_meta(artifact, config)
    doc.update(obj)
    fd, tmp = _atomic_target(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _name_file(e, path)
        raise


def _check_meta(meta: dict, path: Path, artifact: str, produced_by: str) -> None:
    if meta.get("artifact") != artifact:
        raise UserError(
            f"expected a {artifact} artifact, found {meta.get('artifact')!r}",
            where=str(path),
            fix=f"point at the output of `{produced_by}`",
        )
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"schema version {meta.get('schema_version')} does not match this sdxl-trainer's {SCHEMA_VERSION}",
            where=str(path),
            fix=f"re-run `{produced_by}` with this version",
        )


@contextmanager
def reading_parquet(path: Path, *, fix: str) -> Iterator[None]:
    """Every Parquet read of user data goes through this: a damaged file (truncated, bytes flipped,
    a failed page checksum) or an OS error becomes one line naming the file and what to do.

    pyarrow raises ``ArrowInvalid`` ("Parquet magic bytes not found"), ``OSError`` ("Corrupt snappy
    compressed data", "CRC checksum verification failed") and others without the file's name.
    """
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read this Parquet file, it is damaged or unreadable ({detail})",
                        where=str(path), fix=fix) from e  # fmt: skip


def rerun(produced_by: str) -> str:
    """The fix line of a damaged artifact: write it again."""
    return f"re-run `{produced_by}` to write it again"


def read_table(path: Path, *, artifact: str, produced_by: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """Read a Parquet artifact and its provenance record, refusing a missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{artifact} not found", where=str(path), fix=f"run `{produced_by}` first")
    with reading_parquet(path, fix=rerun(produced_by)):
        table = pq.read_table(path, columns=columns)
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise UserError(
            "this Parquet file was not written by sdxl-trainer", where=str(path), fix=f"run `{produced_by}`"
        )
    meta = json.loads(raw)
    _check_meta(meta, path, artifact, produced_by)
    return table, meta


def read_json(path: Path, *, artifact: str, produced_by: str) -> dict:
    """Read a JSON artifact, refusing a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{artifact} not found", where=str(path), fix=f"run `{produced_by}` first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e})", where=str(path), fix=f"re-run `{produced_by}`") from e
    _check_meta(doc, path, artifact, produced_by)
    return doc



def load_safetensors(path: Path, *, fix: str, device: str = "cpu") -> dict[str, Any]:
    """Every tensor of a safetensors file; a missing, truncated or garbled one is a one-line UserError.

    The one place the trainer reads safetensors from a RUN or WORK folder (checkpoints, the cache's
    unconditional embedding): safetensors raises its own ``SafetensorError`` (a traceback for a user)
    for a short or damaged header, which becomes the file's name and ``fix`` here.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", where=str(path), fix=fix)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        reason = " ".join(str(e).split())  # one line
        raise UserError(f"damaged or truncated safetensors file ({reason})", where=str(path), fix=fix) from e


def read_json_file(path: Path, *, fix: str) -> Any:
    """A JSON file of a RUN or WORK folder; missing, unreadable, not UTF-8 or not JSON: a one-line UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError("file not found", where=str(path), fix=fix) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split())
        raise UserError(f"damaged JSON file ({reason})", where=str(path), fix=fix) from e

# ── tag_weights.parquet and tag_stats.parquet (prep weights): tag-frequency loss weights ──────
# docs/tag-weights.md gives the formula. tag_weights holds one row per ok manifest image; the
# weights' mean over all rows is 1, so a trainer multiplying per-sample losses by them keeps the
# loss scale and learning rate meaning the same thing.
TAG_WEIGHTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # manifest id (status == ok)
        ("weight", pa.float64()),  # per-sample loss multiplier; float64 so the mean is 1 to rounding
        ("n_counted", pa.int32()),  # how many of the image's tags entered its weight (0 → weight is neutral)
    ]
)
# Why a tag did or did not enter the weights: counted, ignored (on the ignore list or prefix),
# rare (fewer images than min_count, too few to estimate a frequency from).
TAG_ROLES = ("counted", "ignored", "rare")
TAG_STATS_SCHEMA = pa.schema(
    [
        ("tag", pa.string()),
        ("count", pa.int64()),  # ok images carrying the tag (a tag repeated in one caption counts once)
        ("role", pa.string()),  # one of TAG_ROLES
        ("weight", pa.float64()),  # the per-tag weight before per-image combination; null unless counted
        ("effective_count", pa.float64()),  # sum of the final image weights of the images carrying the tag
    ]
)
