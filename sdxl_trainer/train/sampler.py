"""Which cached rows make each training batch: bucket-pure, reshuffled every epoch, split across ranks.

Pure index logic (no I/O). The input is the cache's groups — every (bucket width, bucket height,
chunk count) with, per shard, its row count or the rows that may be used (the training split). Every
row of a group has tensors of the same shapes, so a batch never needs padding.

An epoch, from ``(seed, epoch)`` alone:

1. each group's rows are permuted (optionally shard-window by shard-window, see ``shard_window``);
2. each group's permutation is cut into *global* batches of ``batch_size × world_size`` rows; the
   group's tail is dropped (``drop_last``, the default: every step has the full batch) or kept as a
   last, smaller global batch;
3. the global batches of all groups are interleaved in a random order (each group keeps its own
   order, so consecutive steps change bucket);
4. rank ``r`` takes rows ``[r·b, (r+1)·b)`` of every global batch, ``b`` its per-rank size.

Per-image repeats (``repeats``: how many times each listed row is shown per epoch, kohya's
``num_repeats``) list a row that many times before step 1: an epoch is then the repeated set, each
copy permuted independently (two copies may share a batch), still bucket-pure and still a pure
function of ``(seed, epoch)``.

So every rank gets the same number of batches, all ranks are in the same group at the same step
(equal shapes, equal compute), the shares are disjoint and, with ``world_size`` ranks of batch
``B``, together hold exactly the rows one process with batch ``B × world_size`` would see. A kept
tail that does not divide by ``world_size`` is padded by wrapping around the group's permutation
(up to ``world_size − 1`` rows repeat, like ``torch.utils.data.DistributedSampler``).

The validation hold-out (:func:`holdout_mask`) is decided here too, from a hash of each id alone.

Each row of a batch carries its ``position`` in the global batch; with the epoch and the step it
keys the per-sample randomness of the reader (variant, flip, dropout, latent noise), so that too does
not depend on how the global batch is split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sdxl_trainer.errors import UserError

_ORDER_STREAM = 0x0BDE  # keeps the sampler's generators apart from the reader's (same seed)


def holdout_hash(ids: list[str]) -> np.ndarray:
    """A uniform uint64 per id (BLAKE2b of the id): the split does not depend on seed or order."""
    digest = (hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.fromiter((int.from_bytes(d, "little") for d in digest), dtype=np.uint64, count=len(ids))


def holdout_mask(hashes: np.ndarray, *, fraction: float = 0.0, count: int = 0) -> np.ndarray:
    """Held-out rows: hash below ``fraction`` of the range, or the ``count`` smallest hashes."""
    if fraction and count:
        raise ValueError("give holdout_fraction or holdout_count, not both")
    if not 0.0 <= fraction < 1.0 or count < 0:
        raise ValueError(f"holdout_fraction={fraction} must be in [0, 1) and holdout_count={count} ≥ 0")
    if count:
        if count >= hashes.size:
            raise UserError(
                f"holdout_count={count} leaves no training rows (the cache has {hashes.size})",
                where="validation split",
                fix="hold out fewer images",
            )
        return hashes <= np.partition(hashes, count - 1)[count - 1]
    return hashes < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))



class BatchSpec(NamedTuple):
    """One rank's batch: ``row[i]`` of shard ``shard[i]`` (an index into the group's shard list)."""

    epoch: int
    step: int  # index of the global batch within the epoch
    group: Hashable
    shard: np.ndarray  # int64 (b,)
    row: np.ndarray  # int64 (b,)
    position: np.ndarray  # int64 (b,): index of the sample in the global batch


def _rows_of(entry: int | Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(entry, (int, np.integer)):
        return np.arange(int(entry), dtype=np.int64)
    return np.asarray(entry, dtype=np.int64).reshape(-1)


def group_permutation(
    shards: Sequence[np.ndarray], *, rng: np.random.Generator, shard_window: int | None
) -> np.ndarray:
    """(n, 2) int64 array of (shard, row) in a random order covering every listed row once.

    ``shard_window=k`` permutes the shards, then the rows within each run of k shards: every
    stretch of the order touches at most 2k shards (few files open at once on huge caches).
    """
    pairs = [np.stack([np.full(r.size, s, dtype=np.int64), r], axis=1) for s, r in enumerate(shards)]
    if shard_window is None or shard_window >= len(shards):
        allrows = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
        return allrows[rng.permutation(len(allrows))]
    order = rng.permutation(len(shards))
    windows = []
    for start in range(0, len(order), shard_window):
        block = np.concatenate([pairs[s] for s in order[start : start + shard_window]])
        windows.append(block[rng.permutation(len(block))])
    return np.concatenate(windows)


def global_batches(perm: np.ndarray, *, size: int, world_size: int, drop_last: bool) -> list[np.ndarray]:
    """Cut one group's permutation into global batches of ``size`` rows (tail dropped or padded)."""
    n_full = len(perm) // size
    out = [perm[i * size : (i + 1) * size] for i in range(n_full)]
    tail = len(perm) - n_full * size
    if tail and not drop_last:
        padded = -(-tail // world_size) * world_size
        wrap = np.resize(perm, (padded - tail, 2)) if padded > tail else perm[:0]  # np.resize repeats
        out.append(np.concatenate([perm[n_full * size :], wrap]))
    return out


def repeat_rows(
    keys: Sequence[Hashable], shards: Mapping[Hashable, list[np.ndarray]],
    repeats: Mapping[Hashable, Sequence[Sequence[int] | np.ndarray]],
) -> tuple[dict[Hashable, list[np.ndarray]], str | None]:
    """Each listed row ``repeats`` times, and a short digest of (group, shard, row, repeats) — None when
    every row is shown once, so a run without repeats records what it recorded before they existed."""
    out, digest, trivial = {}, hashlib.blake2b(digest_size=8), True
    for gi, key in enumerate(keys):
        reps = repeats.get(key)
        if reps is None:
            reps = [np.ones(r.size, dtype=np.int64) for r in shards[key]]
        if len(reps) != len(shards[key]):
            raise ValueError(f"group {key}: {len(reps)} repeat arrays for {len(shards[key])} shards")
        out[key] = []
        for si, (rows, rep) in enumerate(zip(shards[key], reps)):
            rep = np.asarray(rep, dtype=np.int64).reshape(-1)
            if rep.shape != rows.shape or (rep < 1).any():
                raise ValueError(f"group {key}, shard {si}: repeats must be ≥ 1, one per listed row")
            once = bool((rep == 1).all())
            trivial = trivial and once
            digest.update(f"{gi}/{key}/{si}/{rows.size}".encode() + rows.tobytes() + rep.tobytes())
            out[key].append(rows if once else np.repeat(rows, rep))
    return out, None if trivial else digest.hexdigest()


class BucketBatchSampler:
    """Bucket-pure, per-epoch shuffled batches for one rank, with an exactly resumable position.

    ``groups`` maps a group key (sortable, e.g. ``cache_format.Group``) to its shards, each given as
    a row count or as the row indices to use. ``repeats`` (optional) gives, per group and shard, how
    many times each of those rows is shown per epoch (≥ 1; parallel to the rows). Iterating yields the
    rest of the current epoch; the position (``epoch``, ``step`` = index of the next batch) moves as
    batches are handed out.
    """

    def __init__(
        self,
        groups: Mapping[Hashable, Sequence[int | Sequence[int] | np.ndarray]],
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shard_window: int | None = None,
        repeats: Mapping[Hashable, Sequence[Sequence[int] | np.ndarray]] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shard_window is not None and shard_window < 1:
            raise ValueError(f"shard_window={shard_window} must be ≥ 1 or None")
        if seed < 0:
            raise ValueError(f"seed={seed} must be ≥ 0")
        self.keys = sorted(groups)
        self.shards = {k: [_rows_of(e) for e in groups[k]] for k in self.keys}
        self.repeats_digest = None
        if repeats is not None:
            self.shards, self.repeats_digest = repeat_rows(self.keys, self.shards, repeats)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.shard_window = drop_last, shard_window
        self.rows = sum(int(r.size) for k in self.keys for r in self.shards[k])
        self.epoch, self.step = 0, 0
        self._cache: tuple[int, list[BatchSpec]] | None = None
        size = batch_size * world_size
        counts = [sum(int(r.size) for r in self.shards[k]) for k in self.keys]
        self._len = sum(c // size + (0 if drop_last or c % size == 0 else 1) for c in counts)
        if self._len == 0:
            raise UserError(
                f"no batch of {batch_size} × {world_size} rank(s) fits in any bucket group "
                f"(largest group: {max(counts, default=0)} rows)",
                where="batch sampler",
                fix="lower the batch size, or keep incomplete batches (drop_last false)",
            )

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self._len

    def batches(self, epoch: int) -> list[BatchSpec]:
        """This rank's batches of ``epoch``, in order; a pure function of the inputs and ``epoch``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        size = self.batch_size * self.world_size
        per_group = []
        for gi, key in enumerate(self.keys):
            rng = np.random.default_rng([self.seed, epoch, _ORDER_STREAM, gi])
            perm = group_permutation(self.shards[key], rng=rng, shard_window=self.shard_window)
            per_group.append(global_batches(perm, size=size, world_size=self.world_size, drop_last=self.drop_last))
        labels = np.repeat(np.arange(len(self.keys)), [len(b) for b in per_group])
        labels = labels[np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).permutation(labels.size)]
        taken = [0] * len(self.keys)
        out = []
        for step, gi in enumerate(labels.tolist()):
            glob = per_group[gi][taken[gi]]
            taken[gi] += 1
            b = len(glob) // self.world_size
            lo = self.rank * b
            pos = np.arange(lo, lo + b, dtype=np.int64)
            mine = glob[lo : lo + b]
            out.append(BatchSpec(epoch, step, self.keys[gi], mine[:, 0].copy(), mine[:, 1].copy(), pos))
        self._cache = (epoch, out)
        return out

    def advance(self) -> None:
        """One batch handed out: move to the next, rolling over into the next epoch."""
        self.step += 1
        if self.step >= self._len:
            self.epoch, self.step = self.epoch + 1, 0

    def __iter__(self) -> Iterator[BatchSpec]:
        """The rest of the current epoch; the position moves before each batch is yielded."""
        epoch = self.epoch
        for spec in self.batches(epoch)[self.step :]:
            self.advance()
            yield spec

    def config(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "shard_window": -1 if self.shard_window is None else self.shard_window,
            "rows": self.rows,
            # which rows repeat how often (only with repeats: a run without them records what it did before)
            **({"repeats": self.repeats_digest} if self.repeats_digest else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch, and the settings that give the order its meaning."""
        return {"epoch": self.epoch, "step": self.step, "config": self.config()}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Continue at the saved position; ``strict`` refuses other settings (another order)."""
        saved = dict(state.get("config", {}))
        if strict and saved != self.config():
            changed = sorted(k for k in set(saved) | set(self.config()) if saved.get(k) != self.config().get(k))
            raise UserError(
                f"the checkpoint's data order was made with other settings ({', '.join(changed)}): "
                f"saved {saved}, now {self.config()}",
                where="batch sampler state",
                fix="resume with the same batch size, world size, seed, cache and per-image repeats, or pass --force "
                "to accept the new order",
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or step < 0:
            raise ValueError(f"invalid sampler position epoch={epoch}, step={step}")
        # A forced resume with a shorter epoch continues at the next epoch rather than past its end.
        self.epoch, self.step = (epoch, step) if step < self._len else (epoch + 1, 0)


class FixedBatches:
    """The same group-pure batches every pass, unshuffled: a validation split.

    Rows are taken group by group (sorted), in (shard, row) order; rank ``r`` of ``world_size``
    takes batches ``r, r + world_size, …`` (counts may differ by one between ranks, so reduce the
    validation loss as a sum and a count, not per batch). Same position interface as
    :class:`BucketBatchSampler`; a pass is an "epoch".
    """

    def __init__(
        self,
        groups: Mapping[Hashable, Sequence[int | Sequence[int] | np.ndarray]],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size} must be ≥ 1 and rank {rank} in [0, {world_size})")
        specs = []
        for key in sorted(groups):
            pairs = [(s, r) for s, rows in enumerate(groups[key]) for r in _rows_of(rows).tolist()]
            for lo in range(0, len(pairs), batch_size):
                chunk = np.asarray(pairs[lo : lo + batch_size], dtype=np.int64).reshape(-1, 2)
                pos = np.arange(len(chunk), dtype=np.int64)
                specs.append(BatchSpec(0, len(specs), key, chunk[:, 0].copy(), chunk[:, 1].copy(), pos))
        self.specs = specs[rank::world_size]
        self.epoch, self.step = 0, 0

    def __len__(self) -> int:
        return len(self.specs)

    def batches(self, epoch: int) -> list[BatchSpec]:
        return self.specs

    def advance(self) -> None:
        self.step += 1
        if self.step >= len(self.specs):
            self.epoch, self.step = self.epoch + 1, 0

    def __iter__(self) -> Iterator[BatchSpec]:
        for spec in self.specs[self.step :]:
            self.advance()
            yield spec

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
