"""The trainer's data: cached rows → training batches, with exact-resume randomness and prefetch.

Reads ``WORK/cache`` through :mod:`sdxl_trainer.cache_format` only (never ``prep``). Pieces:

- :func:`scan_cache` — one pass over the shards' small columns at start-up: which rows have a flip
  copy, which ids are held out for validation (a hash of the id, so the split is the same in every
  run), the tag weights joined by id, and each image's repeats and caption dropout from the manifest
  (per_image.py);
- :class:`CacheDataset` — a :class:`~sdxl_trainer.train.sampler.BatchSpec` → a batch of tensors:
  per sample a caption variant, the flip copy, a fresh latent draw ``mean + std·ε`` and
  unconditional-prompt dropout, all drawn from generators keyed by (seed, epoch, step, position in
  the global batch), so a resumed run — or another world size — draws exactly the same;
- :class:`~sdxl_trainer.train.loader.CacheLoader` (its own module) — reads ahead ``prefetch``
  batches on a few threads (bounded memory), re-raises reader errors in the consumer, and keeps the
  position of what it has handed out.

docs/data-loading.md describes the batch, the randomness and the performance.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sdxl_trainer.cache_format import CacheDims, Group, Shard, binary_to_tensor, list_groups, load_uncond, read_meta
from sdxl_trainer.cache_format.layout import reading_shard, samples_dir, text_columns
from sdxl_trainer.cache_format.reader import MICRO_COLUMNS
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import read_table
from sdxl_trainer.train.per_image import epoch_line, join_per_image, uncond_chance
from sdxl_trainer.train.sampler import (
    BatchSpec,
    BucketBatchSampler,
    FixedBatches,
    holdout_hash,
    holdout_mask,
)

_READER_STREAM = 0x5EED  # keeps the reader's generators apart from the sampler's (same seed)
TAG_WEIGHTS_PRODUCER = "sdxl prep weights"


def join_tag_weights(path: Path, ids: pa.ChunkedArray) -> np.ndarray:
    """float32 weight of every id in ``ids`` from WORK/tag_weights.parquet; every id must be there."""
    table, _ = read_table(Path(path), artifact="tag_weights", produced_by=TAG_WEIGHTS_PRODUCER)
    where = pc.index_in(ids, value_set=table.column("id").combine_chunks())
    if where.null_count:
        first = ids.filter(pc.is_null(where))[0].as_py()
        raise UserError(
            f"{where.null_count} cached image(s) have no tag weight (first: id {first})",
            where=str(path),
            fix="re-run `sdxl prep weights WORK` on the work dir the cache was built from",
        )
    weights = table.column("weight").take(where).to_numpy().astype(np.float32)
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise UserError("tag weights must be finite and ≥ 0", where=str(path), fix="re-run `sdxl prep weights WORK`")
    return weights


@dataclass
class CacheIndex:
    """What the trainer knows about every row without reading its tensors; per group, flat over shards."""

    dims: CacheDims
    shards: dict[Group, list[Path]] = field(default_factory=dict)
    offsets: dict[Group, np.ndarray] = field(default_factory=dict)  # first flat index of each shard
    ids: dict[Group, pa.StringArray] = field(default_factory=dict)
    micro: dict[Group, np.ndarray] = field(default_factory=dict)  # int32 (rows, 6), SDXL add_time_ids order
    crop_left_flip: dict[Group, np.ndarray] = field(default_factory=dict)  # int32, −1 without a flip copy
    stored: dict[Group, np.ndarray] = field(default_factory=dict)  # uint8 (rows, V): where variant k's text is
    tag_weight: dict[Group, np.ndarray] | None = None  # float32 per row, None without a weights file
    repeats: dict[Group, np.ndarray] = field(default_factory=dict)  # int32 ≥ 1 per row: times shown per epoch
    caption_dropout: dict[Group, np.ndarray] | None = None  # float32 per row, NaN = p_uncond; None: no row has one
    train: dict[Group, list[np.ndarray]] = field(default_factory=dict)  # row indices per shard
    holdout: dict[Group, list[np.ndarray]] = field(default_factory=dict)
    holdout_ids: list[str] = field(default_factory=list)

    def has_flip(self, group: Group, flat: np.ndarray) -> np.ndarray:
        return self.crop_left_flip[group][flat] >= 0


def stored_variants(captions: pa.ChunkedArray, variants: int) -> np.ndarray:
    """(rows, V) uint8: variant k's text is stored under the first variant with the same caption
    (cache-format.md, "Variants"); computed once here so a read fetches the right columns directly."""
    texts = [pc.list_element(captions, k) for k in range(variants)]
    out = np.tile(np.arange(variants, dtype=np.uint8), (len(captions), 1))
    for k in range(1, variants):
        for j in reversed(range(k)):  # descending, so the earliest equal caption is assigned last
            same = pc.equal(texts[j], texts[k]).to_numpy(zero_copy_only=False).astype(bool)
            out[same, k] = j
    return out


def _check_complete(cache_dir: Path, meta: dict, groups: Mapping[Group, list]) -> None:
    listed = {s["path"] for s in meta["shards"]}
    visible = {i.path.relative_to(samples_dir(cache_dir)).as_posix() for infos in groups.values() for i in infos}
    if listed != visible:
        odd = sorted(listed ^ visible)[0]
        raise UserError(
            f"the cache's shards differ from cache_meta.json ({odd} is {'missing' if odd in listed else 'not listed'})",
            where=str(cache_dir),
            fix="finish the cache: re-run `sdxl prep cache WORK --model MODEL` (it resumes and re-finalises)",
        )


def scan_cache(
    cache_dir: Path, *, holdout_fraction: float = 0.0, holdout_count: int = 0, tag_weights: Path | None = None,
    manifest: Path | None = None,
) -> CacheIndex:
    """Read the small columns of every shard of a finished cache (never its tensors) and build the index.

    Ids and micro-conditioning are kept (~80 bytes a row in all), so a batch read fetches only tensors.
    ``manifest`` (WORK/manifest.parquet) gives per-image repeats and caption dropout; None: 1 and none.
    """
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)  # a clear error until `prep cache` has finalised
    index = CacheIndex(CacheDims.from_dict(meta["dims"]))
    groups = list_groups(cache_dir)
    _check_complete(cache_dir, meta, groups)
    keys, counts = sorted(groups), {}
    for g in keys:
        columns = ["id", "captions", *MICRO_COLUMNS, "crop_left_flip"]
        table = pa.concat_tables([_small_columns(info.path, columns) for info in groups[g]])
        counts[g] = [info.rows for info in groups[g]]
        if table.num_rows != sum(counts[g]):
            raise UserError("row counts differ from cache_meta.json", where=str(cache_dir / g.dirname()),
                            fix="re-run `sdxl prep cache WORK --model MODEL` to re-finalise")  # fmt: skip
        index.ids[g] = table.column("id").combine_chunks()
        index.micro[g] = np.stack([table.column(c).to_numpy() for c in MICRO_COLUMNS], axis=1).astype(np.int32)
        index.crop_left_flip[g] = table.column("crop_left_flip").fill_null(-1).to_numpy().astype(np.int32)
        index.stored[g] = stored_variants(table.column("captions"), index.dims.variants)
    all_ids = pa.chunked_array([index.ids[g] for g in keys], type=pa.string())
    held = holdout_mask(holdout_hash(all_ids.to_pylist()), fraction=holdout_fraction, count=holdout_count)
    weights = None if tag_weights is None else join_tag_weights(tag_weights, all_ids)
    index.tag_weight = None if weights is None else {}
    per = join_per_image(manifest, all_ids, cache_meta=meta)
    index.caption_dropout = None if per.caption_dropout is None else {}
    index.holdout_ids = sorted(all_ids.filter(pa.array(held)).to_pylist())
    start = 0
    for g in keys:
        n = sum(counts[g])
        index.shards[g] = [info.path for info in groups[g]]
        index.offsets[g] = np.concatenate([[0], np.cumsum(counts[g])[:-1]]).astype(np.int64)
        if weights is not None:
            index.tag_weight[g] = weights[start : start + n]
        index.repeats[g] = per.repeats[start : start + n]
        if per.caption_dropout is not None:
            index.caption_dropout[g] = per.caption_dropout[start : start + n]
        bounds = list(zip(index.offsets[g].tolist(), counts[g]))
        mine = held[start : start + n]
        index.train[g] = [np.flatnonzero(~mine[o : o + c]) for o, c in bounds]
        index.holdout[g] = [np.flatnonzero(mine[o : o + c]) for o, c in bounds]
        start += n
    return index


def _small_columns(path: Path, columns: list[str]) -> pa.Table:
    with reading_shard(path):
        return pq.read_table(path, columns=columns)


def uncond_text(hidden: torch.Tensor, *, n_chunks: int, tokens_per_chunk: int) -> torch.Tensor:
    """The empty prompt at ``n_chunks`` chunks: an empty prompt's extra chunks are all the empty chunk
    (BOS EOS pad…, encoded alone), so its last stored chunk is repeated, or chunks are dropped."""
    chunks = hidden.reshape(-1, tokens_per_chunk, hidden.shape[-1])
    if n_chunks > chunks.shape[0]:
        chunks = torch.cat([chunks, chunks[-1:].expand(n_chunks - chunks.shape[0], -1, -1)])
    return chunks[:n_chunks].reshape(n_chunks * tokens_per_chunk, -1).contiguous()


def sample_choices(
    *, seed: int, epoch: int, step: int, positions: np.ndarray, variants: int
) -> dict[str, np.ndarray]:
    """Per sample: caption variant (uniform), two uniforms (flip, dropout), a latent-noise seed.

    Each sample's generator is keyed by (seed, epoch, step, position): the same sample of the same
    global batch draws the same, whatever the rank split, the prefetch depth or a resume.
    """
    kinds = {"variant": np.int64, "u_flip": np.float64, "u_uncond": np.float64, "noise_seed": np.int64}
    out = {k: np.empty(len(positions), dtype=t) for k, t in kinds.items()}
    for j, p in enumerate(positions.tolist()):
        rng = np.random.default_rng([seed, epoch, step, p, _READER_STREAM])
        out["variant"][j] = rng.integers(variants)
        out["u_flip"][j], out["u_uncond"][j] = rng.random(2)
        out["noise_seed"][j] = rng.integers(2**63 - 1)
    return out


def sample_latents(
    out: torch.Tensor, rows: np.ndarray, mean: Sequence[torch.Tensor], std: Sequence[torch.Tensor], seeds: np.ndarray
) -> None:
    """``out[rows[j]] = mean[j] + std[j]·ε``, ε ~ N(0, I) in fp32 from a generator seeded by ``seeds[j]``."""
    g = torch.Generator()
    for j, (i, s) in enumerate(zip(rows.tolist(), seeds.tolist())):
        g.manual_seed(s)
        torch.randn(out[i].shape, generator=g, out=out[i])
        out[i].mul_(std[j]).add_(mean[j])  # fp16 operands, fp32 result


class CacheDataset:
    """Batches of a finished cache: see :meth:`load`. Thread-safe (each thread opens its own shards)."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        seed: int = 0,
        p_flip: float = 0.5,
        p_uncond: float = 0.0,
        tag_weights: Path | None = None,
        holdout_fraction: float = 0.0,
        holdout_count: int = 0,
        manifest: Path | None = None,
        pin_memory: bool = False,
        max_open_shards: int = 64,
        arrow_threads: bool = False,
    ):
        if not (0.0 <= p_flip <= 1.0 and 0.0 <= p_uncond <= 1.0) or seed < 0 or max_open_shards < 1:
            raise ValueError(
                f"need p_flip, p_uncond in [0, 1], seed ≥ 0, max_open_shards ≥ 1; "
                f"got {p_flip}, {p_uncond}, {seed}, {max_open_shards}"
            )
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory needs CUDA")
        self.cache_dir, self.seed, self.p_flip, self.p_uncond = Path(cache_dir), seed, p_flip, p_uncond
        self.pin_memory, self.max_open_shards, self.arrow_threads = pin_memory, max_open_shards, arrow_threads
        self.index = scan_cache(self.cache_dir, holdout_fraction=holdout_fraction, holdout_count=holdout_count,
                                tag_weights=tag_weights, manifest=manifest)  # fmt: skip
        self.dims = self.index.dims
        self._uncond: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        own = self.index.caption_dropout
        if p_uncond > 0 or (own is not None and any((v > 0).any() for v in own.values())):  # NaN > 0 is False
            u = load_uncond(self.cache_dir)
            for n in sorted({g.n_chunks for g in self.index.shards}):
                hidden = uncond_text(u["text_hidden"], n_chunks=n, tokens_per_chunk=self.dims.tokens_per_chunk)
                self._uncond[n] = (hidden, u["text_pooled"])
        self._local = threading.local()

    def train_sampler(self, *, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                      shard_window: int | None = None) -> BucketBatchSampler:  # fmt: skip
        """The training split, each row listed ``repeats`` times (the hold-out is never repeated)."""
        ix = self.index
        repeats = {g: [ix.repeats[g][o + rows] for o, rows in zip(ix.offsets[g].tolist(), ix.train[g])]
                   for g in ix.train}  # fmt: skip
        return BucketBatchSampler(ix.train, batch_size=batch_size, seed=self.seed, rank=rank, world_size=world_size,
                                  drop_last=drop_last, shard_window=shard_window, repeats=repeats)  # fmt: skip

    def describe_epoch(self, sampler: BucketBatchSampler) -> str:
        """One line: training images, samples per epoch with repeats, batches (num_epochs counts these)."""
        images = sum(int(r.size) for v in self.index.train.values() for r in v)
        return epoch_line(images=images, samples=sampler.rows, batches=len(sampler),
                          batch=sampler.batch_size * sampler.world_size)  # fmt: skip

    def holdout_batches(self, *, batch_size: int, rank: int = 0, world_size: int = 1) -> FixedBatches:
        return FixedBatches(self.index.holdout, batch_size=batch_size, rank=rank, world_size=world_size)

    def _shard(self, group: Group, s: int) -> Shard:
        """This thread's open shard (an LRU of ``max_open_shards``: a Parquet footer is parsed once)."""
        cache = getattr(self._local, "shards", None)
        if cache is None:
            cache = self._local.shards = OrderedDict()
        shard = cache.get((group, s))
        if shard is None:
            shard = Shard(self.index.shards[group][s], use_threads=self.arrow_threads)
            if shard.group != group or shard.dims != self.dims:
                raise UserError("shard does not match its folder or the cache's dims", where=str(shard.path),
                                fix="rebuild the cache with `sdxl prep cache WORK --model MODEL --overwrite`")  # fmt: skip
            cache[(group, s)] = shard
            if len(cache) > self.max_open_shards:
                cache.popitem(last=False)
        else:
            cache.move_to_end((group, s))
        return shard

    def _empty(self, group: Group, n: int) -> dict[str, Any]:
        d, pin = self.dims, self.pin_memory
        return {
            "latents": torch.empty((n, *d.latent_shape(group.bucket_width, group.bucket_height)), pin_memory=pin),
            "text_hidden": torch.empty((n, *d.text_shape(group.n_chunks)), dtype=torch.float16, pin_memory=pin),
            "text_pooled": torch.empty((n, *d.pooled_shape()), dtype=torch.float16, pin_memory=pin),
            "time_ids": torch.empty((n, 6), pin_memory=pin),
            "tag_weight": torch.ones(n).pin_memory() if pin else torch.ones(n),
            "ids": [""] * n,
            "captions": [""] * n,
        }

    def load(self, spec: BatchSpec, *, augment: bool = True) -> dict[str, Any]:
        """Read one batch. Keys: ``latents`` (B,C,h,w) fp32, raw (un-normalised) VAE latents;
        ``text_hidden`` (B, n·77, D) and ``text_pooled`` (B, P) fp16; ``time_ids`` (B, 6) fp32 in SDXL's
        order (original h, w, crop top, left, target h, w); ``tag_weight`` (B,) fp32 (1 without a
        weights file); ``ids``, ``captions`` (lists; "" where dropped); ``flipped``, ``uncond`` (B,) bool;
        ``group``, ``epoch``, ``step``. ``augment=False`` (validation): variant 0, no flip, no dropout,
        and the posterior mean as the latent.
        """
        group, n = spec.group, len(spec.row)
        flat = self.index.offsets[group][spec.shard] + spec.row
        ch = None
        if augment:
            ch = sample_choices(seed=self.seed, epoch=spec.epoch, step=spec.step, positions=spec.position,
                                variants=self.dims.variants)  # fmt: skip
            own = None if self.index.caption_dropout is None else self.index.caption_dropout[group][flat]
            slot, drop = ch["variant"], ch["u_uncond"] < uncond_chance(own, self.p_uncond)
            flip = self.index.has_flip(group, flat) & (ch["u_flip"] < self.p_flip)
        else:
            slot, flip, drop = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        # which text columns to read: the stored copy of the chosen variant; none for a dropped prompt
        text = np.where(drop, -1, self.index.stored[group][flat, slot].astype(np.int64))
        out = self._empty(group, n)
        # one read per (shard, flip, text) combination, fetching exactly the columns it needs
        stride = self.dims.variants + 1
        combos, which = np.unique((spec.shard * 2 + flip) * stride + text + 1, return_inverse=True)
        for c, key in enumerate(combos.tolist()):
            s, f, k = key // stride // 2, key // stride % 2, key % stride - 1
            pos = np.flatnonzero(which == c)
            table = self._shard(group, s).gather(spec.row[pos], _columns(flip=bool(f), text=k))
            self._fill(out, table, group=group, pos=pos, slot=slot[pos], text=k >= 0,
                       seeds=None if ch is None else ch["noise_seed"][pos])  # fmt: skip
        micro = self.index.micro[group][flat]
        micro[flip, 3] = self.index.crop_left_flip[group][flat][flip]  # crop_left in the mirrored image
        out["time_ids"].copy_(torch.from_numpy(micro.astype(np.float32)))
        out["ids"] = self.index.ids[group].take(pa.array(flat)).to_pylist()
        if drop.any():
            hidden, pooled = self._uncond[group.n_chunks]
            out["text_hidden"][torch.from_numpy(drop)] = hidden
            out["text_pooled"][torch.from_numpy(drop)] = pooled
        if self.index.tag_weight is not None:
            out["tag_weight"].copy_(torch.from_numpy(self.index.tag_weight[group][flat]))
        out.update(flipped=torch.from_numpy(flip.copy()), uncond=torch.from_numpy(drop.copy()), group=group,
                   epoch=spec.epoch, step=spec.step)  # fmt: skip
        return out

    def _fill(self, out: dict[str, Any], table: pa.Table, *, group: Group, pos: np.ndarray, slot: np.ndarray,
              text: bool, seeds: np.ndarray | None) -> None:  # fmt: skip
        """Copy one read's rows into batch positions ``pos`` (tensors straight from the Arrow buffers)."""
        d, rows = self.dims, pos.tolist()
        latent = d.latent_shape(group.bucket_width, group.bucket_height)
        mean, std = _row_views(table.column(0), latent), _row_views(table.column(1), latent)
        if seeds is not None:
            sample_latents(out["latents"], pos, mean, std, seeds)
        else:
            for j, i in enumerate(rows):
                out["latents"][i].copy_(mean[j])
        if not text:
            return
        hidden = _row_views(table.column(2), d.text_shape(group.n_chunks))
        pooled = _row_views(table.column(3), d.pooled_shape())
        captions = table.column(4).to_pylist()
        for j, i in enumerate(rows):
            out["text_hidden"][i].copy_(hidden[j])
            out["text_pooled"][i].copy_(pooled[j])
            out["captions"][i] = captions[j][slot[j]]


def _columns(*, flip: bool, text: int) -> list[str]:
    """The latent pair (plain or flipped), then the text pair stored at index ``text`` and the captions
    (none for a dropped prompt, ``text`` < 0); ids and micro-conditioning come from the index."""
    latent = ["latent_mean_flip", "latent_std_flip"] if flip else ["latent_mean", "latent_std"]
    return [*latent, *text_columns(text), "captions"] if text >= 0 else latent


def _row_views(column: pa.ChunkedArray, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """One read-only fp16 view per value, chunk by chunk (no concatenation copy)."""
    return [row for chunk in column.chunks for row in binary_to_tensor(chunk, shape)]
