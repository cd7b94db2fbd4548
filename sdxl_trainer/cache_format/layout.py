"""Where the cache's files live, its Arrow schema, and fp16 tensors ⇄ Arrow binary without copies.

A cache folder (``WORK/cache``) holds::

    samples/bucket=<W>x<H>/chunks=<n>/r<rank:03d>-<seq:06d>.parquet   one row per image
    uncond.safetensors                                                the empty prompt, once
    cache_meta.json                                                   written last, by finalise

The ``key=value`` folder names are Hive partitions, so ``pyarrow.dataset`` and ``datasets`` read the
folder as one table, and a reader takes a whole batch from one (bucket, chunk-count) group, where
every tensor has the same shape. Tensors are float16 bytes in binary columns: their shapes follow
from the group and :class:`CacheDims`, which every shard and ``cache_meta.json`` record.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import META_KEY, SCHEMA_VERSION, reading_parquet

SAMPLES_DIR = "samples"
META_NAME = "cache_meta.json"
UNCOND_NAME = "uncond.safetensors"
META_ARTIFACT = "cache_meta"
SHARD_ARTIFACT = "cache_shard"
PRODUCED_BY = "sdxl prep cache WORK --model MODEL"
SHARD_RE = re.compile(r"^r(\d{3})-(\d{6})\.parquet$")
GROUP_RE = re.compile(r"^bucket=(\d+)x(\d+)/chunks=(\d+)$")
# In-flight shards: the dot hides them from pyarrow.dataset (it skips "." and "_" names) and the
# suffix from any "*.parquet" glob, so no reader ever sees half a shard.
TMP_SUFFIX = ".tmp"
# A damaged shard costs only its own rows: the cache stage re-encodes whatever is not in a shard.
SHARD_FIX = f"delete this shard and re-run `{PRODUCED_BY}` (it re-encodes only this shard's rows)"


def reading_shard(path: Path):
    """Context manager: a damaged shard's pyarrow/OS error becomes one line naming it (schema.reading_parquet)."""
    return reading_parquet(path, fix=SHARD_FIX)


@dataclass(frozen=True)
class CacheDims:
    """Sizes that turn a group (bucket, chunk count) into tensor shapes, and the variant count.

    Defaults are real SDXL's sizes with one caption variant.
    """

    latent_channels: int = 4
    text_dim: int = 2048  # D: penultimate hidden states of CLIP-L (768) and bigG (1280), concatenated
    pooled_dim: int = 1280  # P: bigG's projected pooled embedding
    tokens_per_chunk: int = 77  # 75 tokens + BOS + EOS
    vae_factor: int = 8  # pixels per latent pixel
    variants: int = 1  # caption variants per image (the cache's layout, not the model's)

    def latent_shape(self, bucket_width: int, bucket_height: int) -> tuple[int, int, int]:
        return (self.latent_channels, bucket_height // self.vae_factor, bucket_width // self.vae_factor)

    def text_shape(self, n_chunks: int) -> tuple[int, int]:
        return (n_chunks * self.tokens_per_chunk, self.text_dim)

    def pooled_shape(self) -> tuple[int]:
        return (self.pooled_dim,)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheDims":
        return cls(**{k: int(v) for k, v in data.items()})


SDXL_DIMS = CacheDims()


class Group(NamedTuple):
    """A partition: every row in it has tensors of the same shapes, so it batches without padding."""

    bucket_width: int
    bucket_height: int
    n_chunks: int

    def dirname(self) -> str:
        return f"bucket={self.bucket_width}x{self.bucket_height}/chunks={self.n_chunks}"


def text_columns(k: int) -> tuple[str, str]:
    return f"text_hidden_{k}", f"text_pooled_{k}"


# One row per image. Micro-conditioning in pixels, SDXL's add_time_ids order; crop_left_flip is the
# crop's left edge measured in the mirrored image (target_width-wide crop of a W-wide resize:
# W − crop_left − target_width), null without a flip copy.
_HEAD = [
    ("id", pa.string()),  # manifest id
    ("path", pa.string()),  # manifest path, for messages
    ("bucket_width", pa.int32()),
    ("bucket_height", pa.int32()),
    ("n_chunks", pa.int32()),  # 75-token chunks every text variant of the row is padded to
    ("original_height", pa.int32()),
    ("original_width", pa.int32()),
    ("crop_top", pa.int32()),
    ("crop_left", pa.int32()),
    ("target_height", pa.int32()),
    ("target_width", pa.int32()),
    ("crop_left_flip", pa.int32()),
    ("captions", pa.list_(pa.string())),  # the V variant strings, in variant order
    ("tag_weight", pa.float32()),  # optional per-sample loss weight
    ("latent_mean", pa.binary()),  # fp16 C×h×w: the VAE posterior's mean, unscaled
    ("latent_std", pa.binary()),  # fp16 C×h×w: its std, so training draws a fresh sample
    ("latent_mean_flip", pa.binary()),  # the horizontally flipped image's; null when flip is off
    ("latent_std_flip", pa.binary()),
]
LATENT_COLUMNS = ("latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip")
SMALL_COLUMNS = tuple(name for name, _ in _HEAD if name not in LATENT_COLUMNS)


def cache_schema(variants: int) -> pa.Schema:
    """The Arrow schema of a cache with ``variants`` caption variants per image.

    Variant k's embedding is in its own columns, text_hidden_k (fp16 (n_chunks·77)×D) and
    text_pooled_k (fp16 P), so a reader fetches only the variant it uses. They are null when
    captions[k] repeats an earlier caption of the row: that text is stored once, at its first index.
    """
    text = [(name, pa.binary()) for k in range(variants) for name in text_columns(k)]
    return pa.schema(_HEAD + text)


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Writer options: tensors uncompressed (near-random fp16, read at memory speed), the rest zstd."""
    tensor = [f.name for f in schema if f.type == pa.binary()]
    compression = {f.name: "none" if f.name in tensor else "zstd" for f in schema}
    compression["captions.list.element"] = compression.pop("captions")  # nested leaves by path
    return {
        "compression": compression,
        # min/max statistics of megabyte-sized values would bloat every footer for nothing
        "write_statistics": ["id", "bucket_width", "bucket_height", "n_chunks"],
        "use_dictionary": ["path", "bucket_width", "bucket_height", "n_chunks"],
        # a CRC per data page, checked by every read (reader.Shard): damage is caught where it is read
        "write_page_checksum": True,
    }


def samples_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / SAMPLES_DIR


def shard_name(rank: int, seq: int) -> str:
    return f"r{rank:03d}-{seq:06d}.parquet"


def group_of_dir(group_dir: Path, cache_dir: Path) -> Group:
    rel = group_dir.relative_to(samples_dir(cache_dir)).as_posix()
    m = GROUP_RE.match(rel)
    if m is None:
        raise UserError(
            f"unexpected folder {rel!r} in the cache (expected bucket=<W>x<H>/chunks=<n>)",
            where=str(group_dir),
            fix="remove it; the cache folder holds only what `sdxl prep cache` writes",
        )
    return Group(int(m[1]), int(m[2]), int(m[3]))


def list_shard_paths(cache_dir: Path) -> list[tuple[Group, Path]]:
    """Every visible (finished) shard, sorted, with its group; temp files are not listed."""
    root = samples_dir(cache_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("bucket=*/chunks=*/*.parquet")):
        if SHARD_RE.match(path.name) is None:
            raise UserError(
                "unexpected file in the cache", where=str(path), fix="remove it; shards are named r<rank>-<seq>.parquet"
            )
        found.append((group_of_dir(path.parent, cache_dir), path))
    return found


def list_temp_paths(cache_dir: Path, *, rank: int | None = None) -> list[Path]:
    """Shards a writer started but did not finish (all ranks, or one)."""
    root = samples_dir(cache_dir)
    if not root.is_dir():
        return []
    prefix = ".r" if rank is None else f".r{rank:03d}-"
    return sorted(p for p in root.glob(f"bucket=*/chunks=*/{prefix}*{TMP_SUFFIX}"))


def shard_meta(schema: pa.Schema, path: Path) -> dict[str, Any]:
    """The provenance record a shard carries; a clear error for a foreign or out-of-date file."""
    raw = (schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw is not None else {}
    if meta.get("artifact") != SHARD_ARTIFACT:
        raise UserError("not a cache shard written by sdxl-trainer", where=str(path), fix="remove it from the cache")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"cache schema version {meta.get('schema_version')} does not match this sdxl-trainer's {SCHEMA_VERSION}",
            where=str(path),
            fix=f"rebuild the cache: `{PRODUCED_BY} --overwrite`",
        )
    return meta


def read_shard_meta(path: Path) -> dict[str, Any]:
    with reading_shard(path):
        schema = pq.read_schema(path)
    return shard_meta(schema, path)


# ── tensors ⇄ bytes ──────────────────────────────────────────────────────────────────────────────


def to_fp16_array(value: Any) -> np.ndarray:
    """A torch tensor or array as a C-contiguous float16 numpy array on the CPU (copies only to convert)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float16).contiguous().numpy()
    return np.ascontiguousarray(value, dtype=np.float16)


def finite_rows(values: np.ndarray) -> np.ndarray:
    """Per row of a 2-D float16 array: are all values finite? (Exponent bits not all ones: ~15×
    faster than torch.isfinite on CPU float16, which matters when verify reads a whole cache.)"""
    bits = values.view(np.uint16)
    return ~np.any((bits & 0x7C00) == 0x7C00, axis=-1)


def tensor_to_fp16_bytes(value: Any) -> bytes:
    """Encode a tensor as its float16 bytes (C order); the shape is kept elsewhere."""
    return to_fp16_array(value).tobytes()


def _frombuffer(buf: Any, *, count: int, offset: int) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, dtype=torch.float16)
    # Arrow buffers and bytes are read-only to Python; the view is documented read-only, so the
    # "non-writable buffer" warning would only be noise on every batch.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.float16, count=count, offset=offset)


def fp16_bytes_to_tensor(buf: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only float16 view of ``buf`` (bytes, Arrow buffer or scalar) with ``shape``; no copy."""
    if isinstance(buf, pa.BinaryScalar):
        buf = buf.as_buffer()
    count = math.prod(shape)
    if len(memoryview(buf)) != 2 * count:
        raise ValueError(f"{len(memoryview(buf))} bytes do not hold a float16 tensor of shape {tuple(shape)}")
    return _frombuffer(buf, count=count, offset=0).view(shape)


def binary_array(items: list[np.ndarray | None]) -> pa.BinaryArray:
    """One Arrow binary array from float16 arrays (None → null) with a single concatenation."""
    sizes = np.fromiter((0 if a is None else a.nbytes for a in items), dtype=np.int64, count=len(items))
    ends = np.cumsum(sizes)
    if len(items) and ends[-1] >= 2**31:
        raise ValueError("more than 2 GiB in one binary column chunk; lower shard_max_bytes")
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    offsets[1:] = ends
    present = [a.reshape(-1).view(np.uint8) for a in items if a is not None]
    data = np.concatenate(present) if present else np.zeros(0, dtype=np.uint8)
    nulls = len(items) - len(present)
    validity = None
    if nulls:
        mask = np.fromiter((a is not None for a in items), dtype=bool, count=len(items))
        validity = pa.py_buffer(np.packbits(mask, bitorder="little"))
    buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(items), buffers, null_count=nulls)


def single_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return pa.array([], type=column.type)
        return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    return column


def binary_sizes(array: pa.BinaryArray) -> np.ndarray:
    """Byte length of every value (0 for nulls), from the offsets buffer."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1, offset=4 * array.offset)
    return np.diff(offsets)


def binary_to_tensor(array: pa.BinaryArray | pa.ChunkedArray, shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) float16 view of N equal-sized, non-null binary values; no copy for one chunk."""
    array = single_chunk(array)
    n, item = len(array), 2 * math.prod(shape)
    if array.null_count:
        raise ValueError("binary_to_tensor needs non-null values")
    sizes = binary_sizes(array)
    if n and not np.all(sizes == item):
        bad = int(np.flatnonzero(sizes != item)[0])
        raise ValueError(f"value {bad} has {sizes[bad]} bytes; expected {item} for float16 {tuple(shape)}")
    if n == 0:
        return torch.empty((0, *shape), dtype=torch.float16)
    start = int(np.frombuffer(array.buffers()[1], dtype=np.int32, count=1, offset=4 * array.offset)[0])
    return _frombuffer(array.buffers()[2], count=n * item // 2, offset=start).view(n, *shape)


def row_bytes(dims: CacheDims, group: Group, *, flip: bool, distinct_variants: int | None = None) -> int:
    """Tensor bytes of one row (all ``dims.variants`` distinct unless told): a cache's size before it is written."""
    latent = 2 * 2 * math.prod(dims.latent_shape(group.bucket_width, group.bucket_height))
    text = 2 * (math.prod(dims.text_shape(group.n_chunks)) + dims.pooled_dim)
    return latent * (2 if flip else 1) + text * (dims.variants if distinct_variants is None else distinct_variants)
