"""The trainer's data side: bucket sampler, cache dataset and prefetching loader on a small cache.

The cache is written with ``cache_format.CacheWriter`` from tensors that are a pure function of the
row number, so a test can rebuild what any batch should contain.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from sdxl_trainer.cache_format import CacheDims, CacheRow, CacheWriter, Group, finalise
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import TAG_WEIGHTS_SCHEMA, write_table
from sdxl_trainer.train.data import CacheDataset, uncond_text
from sdxl_trainer.train.loader import CacheLoader
from sdxl_trainer.train.sampler import BatchSpec, BucketBatchSampler, holdout_hash

DIMS = CacheDims(latent_channels=4, text_dim=16, pooled_dim=8, variants=3)
CONFIG = {"model": "tiny", "variants": {"count": 3}}
G1, G2, G3 = Group(64, 32, 1), Group(32, 64, 2), Group(32, 32, 3)
N = 51
UNCOND = -7.0


def group_of(i: int) -> Group:
    return G1 if i < 23 else G2 if i < 40 else G3


def has_flip(i: int) -> bool:
    return group_of(i) == G1 or (group_of(i) == G3 and i % 2 == 0)


def make_row(i: int) -> CacheRow:
    """Row i; its flip copy's mean is offset by +100 so a test can tell which copy a latent came from."""
    group, flip = group_of(i), has_flip(i)
    g = torch.Generator().manual_seed(i)
    latent = DIMS.latent_shape(group.bucket_width, group.bucket_height)
    captions = [f"cap {i} a", f"cap {i} b", f"cap {i} a"]  # variant 2 repeats variant 0: stored once
    hidden = [torch.randn(*DIMS.text_shape(group.n_chunks), generator=g) for _ in range(2)]
    pooled = [torch.randn(DIMS.pooled_dim, generator=g) for _ in range(2)]
    mean, std = torch.randn(*latent, generator=g), torch.rand(*latent, generator=g) + 0.5
    return CacheRow(
        id=f"id{i:04d}", path=f"img/{i}.png", bucket_width=group.bucket_width, bucket_height=group.bucket_height,
        n_chunks=group.n_chunks, original_height=300 + i, original_width=200 + i, crop_top=i, crop_left=2 * i,
        target_height=group.bucket_height, target_width=group.bucket_width, latent_mean=mean, latent_std=std,
        text_hidden=[hidden[0], hidden[1], hidden[0]], text_pooled=[pooled[0], pooled[1], pooled[0]],
        captions=captions, latent_mean_flip=mean + 100 if flip else None, latent_std_flip=std if flip else None,
        crop_left_flip=1000 + i if flip else None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    cache = root / "cache"
    with CacheWriter(cache, dims=DIMS, config=CONFIG, shard_max_rows=6, row_group_max_rows=2) as w:
        for i in range(N):
            w.add(make_row(i))
    uncond = {"text_hidden": torch.full((77, 16), UNCOND), "text_pooled": torch.full((8,), UNCOND)}
    finalise(cache, config=CONFIG, dims=DIMS, uncond=uncond)
    ids = [f"id{i:04d}" for i in range(N + 5)]  # weights may cover more images than the cache holds
    table = pa.table({"id": ids, "weight": [1.0 + k / 100 for k in range(N + 5)], "n_counted": [1] * len(ids)})
    write_table(table.cast(TAG_WEIGHTS_SCHEMA), root / "tag_weights.parquet", artifact="tag_weights", config={})
    return cache


def row_of(id_: str) -> int:
    return int(id_[2:])


def epoch_rows(sampler: BucketBatchSampler, ds: CacheDataset, epoch: int) -> list[tuple]:
    """(group, shard path, row) of every sample of an epoch, in order."""
    return [(b.group, str(ds.index.shards[b.group][s]), r) for b in sampler.batches(epoch) for s, r in zip(b.shard, b.row)]


def collect(loader: CacheLoader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        for key in ("latents", "text_hidden", "text_pooled", "time_ids", "tag_weight", "flipped", "uncond"):
            assert torch.equal(x[key], y[key]), key


# ── sampler ────────────────────────────────────────────────────────────────────────────────────


def test_epoch_covers_every_row_once_and_batches_are_group_pure(cache: Path) -> None:
    ds = CacheDataset(cache, seed=3)
    keep = ds.train_sampler(batch_size=4, drop_last=False)
    rows = epoch_rows(keep, ds, 0)
    assert len(rows) == N and len(set(rows)) == N
    assert len(keep) == len(keep.batches(0)) == sum(-(-n // 4) for n in (23, 17, 11))
    drop = ds.train_sampler(batch_size=4, drop_last=True)
    assert all(len(b.row) == 4 for b in drop.batches(0)) and len(drop) == sum(n // 4 for n in (23, 17, 11))
    assert len(set(epoch_rows(drop, ds, 0))) == 4 * len(drop)
    for batch in collect(CacheLoader(ds, keep)):  # the data agrees: one group's ids and shapes
        assert {group_of(row_of(i)) for i in batch["ids"]} == {batch["group"]}
        g = batch["group"]
        assert batch["latents"].shape[1:] == DIMS.latent_shape(g.bucket_width, g.bucket_height)
        assert batch["text_hidden"].shape[1:] == DIMS.text_shape(g.n_chunks)


def test_epochs_differ_and_order_is_a_function_of_seed_and_epoch(cache: Path) -> None:
    ds = CacheDataset(cache, seed=3)
    s = ds.train_sampler(batch_size=4)
    e0, e1 = epoch_rows(s, ds, 0), epoch_rows(s, ds, 1)
    assert e0 != e1
    assert [b.group for b in s.batches(0)] != [b.group for b in s.batches(1)]
    again = CacheDataset(cache, seed=3).train_sampler(batch_size=4)
    assert epoch_rows(again, ds, 1) == e1
    assert epoch_rows(CacheDataset(cache, seed=4).train_sampler(batch_size=4), ds, 0) != e0


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shares_are_disjoint_equal_and_match_one_process(cache: Path, world: int, drop_last: bool) -> None:
    ds = CacheDataset(cache, seed=5, p_uncond=0.3)
    single = ds.train_sampler(batch_size=2 * world, drop_last=drop_last).batches(1)
    ranks = [ds.train_sampler(batch_size=2, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == len(single)
    per_rank = [s.batches(1) for s in ranks]
    seen = []
    for step, whole in enumerate(single):
        parts = [p[step] for p in per_rank]
        assert {p.group for p in parts} == {whole.group}  # every rank in the same bucket at each step
        assert len({len(p.row) for p in parts}) == 1
        pairs = [(p.group, s, r) for p in parts for s, r in zip(p.shard.tolist(), p.row.tolist())]
        if drop_last or len(whole.row) % world == 0:
            assert pairs == [(whole.group, s, r) for s, r in zip(whole.shard.tolist(), whole.row.tolist())]
        seen += pairs
    if drop_last:
        assert len(set(seen)) == len(seen)  # disjoint
    else:  # a kept tail is padded so every rank has a batch: the whole epoch is covered
        assert len({(b.group, s, r) for p in per_rank for b in p for s, r in zip(b.shard, b.row)}) == N
    # the data too: rank r's samples are the single process's samples at the same positions
    if drop_last:
        big = ds.load(single[3])
        small = [ds.load(p[3]) for p in per_rank]
        for key in ("latents", "text_hidden", "text_pooled", "time_ids", "flipped", "uncond"):
            assert torch.equal(torch.cat([b[key] for b in small]), big[key]), key
        assert sum((b["ids"] for b in small), []) == big["ids"]


def test_sampler_from_row_counts_and_shard_window() -> None:
    groups = {Group(64, 64, 1): [5, 3, 7], Group(32, 64, 2): [4]}  # row counts per shard
    s = BucketBatchSampler(groups, batch_size=2, seed=0, drop_last=False)
    pairs = [(b.group, sh, r) for b in s.batches(0) for sh, r in zip(b.shard.tolist(), b.row.tolist())]
    assert len(pairs) == len(set(pairs)) == 19 and len(s) == 8 + 2  # ceil(15 / 2) + 4 / 2
    windowed = BucketBatchSampler(groups, batch_size=2, seed=0, drop_last=False, shard_window=1)
    order = [sh for b in windowed.batches(0) if b.group == Group(64, 64, 1) for sh in b.shard.tolist()]
    assert sorted(order) == sorted([0] * 5 + [1] * 3 + [2] * 7)
    assert sum(a != b for a, b in zip(order, order[1:])) == 2  # one shard at a time: 3 runs
    rows = [(sh, r) for b in windowed.batches(1) if b.group == Group(64, 64, 1) for sh, r in zip(b.shard, b.row)]
    assert rows != [(sh, r) for b in windowed.batches(0) if b.group == Group(64, 64, 1) for sh, r in zip(b.shard, b.row)]


def test_sampler_state_round_trip_and_refusal(cache: Path) -> None:
    ds = CacheDataset(cache)
    s = ds.train_sampler(batch_size=4)
    assert len(list(s)) == len(s) and (s.epoch, s.step) == (1, 0)  # a whole epoch rolls over
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    fresh = ds.train_sampler(batch_size=4)
    fresh.load_state_dict(state)
    nxt = next(iter(fresh))
    assert (nxt.epoch, nxt.step) == (1, 2) and np.array_equal(nxt.row, next(it).row)
    other = ds.train_sampler(batch_size=3)
    with pytest.raises(UserError, match="batch_size"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert (other.epoch, other.step) == (1, 2)
    with pytest.raises(UserError, match="lower the batch size"):
        ds.train_sampler(batch_size=40)


# ── dataset ────────────────────────────────────────────────────────────────────────────────────


def test_batch_contents_match_the_rows_written(cache: Path) -> None:
    ds = CacheDataset(cache, seed=1, p_flip=0.5, tag_weights=cache.parent / "tag_weights.parquet")
    batches = collect(CacheLoader(ds, ds.train_sampler(batch_size=3, drop_last=False)))
    variants, flips = [], []
    for batch in batches:
        for b, id_ in enumerate(batch["ids"]):
            i = row_of(id_)
            src, flipped = make_row(i), bool(batch["flipped"][b])
            assert flipped <= has_flip(i)
            k = [c for c in (0, 1) if batch["captions"][b] == src.captions[c]][0]
            variants.append(batch["captions"][b])
            assert torch.equal(batch["text_hidden"][b], src.text_hidden[k].half())
            assert torch.equal(batch["text_pooled"][b], src.text_pooled[k].half())
            crop_left = src.crop_left_flip if flipped else src.crop_left
            expect = [src.original_height, src.original_width, src.crop_top, crop_left, src.target_height, src.target_width]
            assert batch["time_ids"][b].tolist() == expect and batch["time_ids"].dtype == torch.float32
            mean = (src.latent_mean_flip if flipped else src.latent_mean).half().float()
            assert (batch["latents"][b] - mean).abs().max() < 20  # the right copy (the other is 100 away)
            assert batch["tag_weight"][b].item() == pytest.approx(1.0 + i / 100)
            if has_flip(i):
                flips.append(flipped)
    assert 0.3 < np.mean(flips) < 0.7
    b_share = np.mean([c.endswith("b") for c in variants])  # variant 1 of 3 is "b": uniform over slots
    assert 0.15 < b_share < 0.5


def test_latent_draws_have_the_stored_mean_and_std(cache: Path) -> None:
    ds = CacheDataset(cache, seed=2, p_flip=0.0)
    draws, zeros = [], np.zeros(16, dtype=np.int64)
    for step in range(64):  # 1024 draws of row 0 of G1's first shard
        batch = ds.load(BatchSpec(0, step, G1, zeros, zeros, np.arange(16)))
        draws.append(batch["latents"])
    z = torch.cat(draws).double()
    src = make_row(row_of(batch["ids"][0]))
    mean, std = src.latent_mean.half().double(), src.latent_std.half().double()
    assert (z.mean(0) - mean).abs().max() < 5 * std.max() / 32
    standard = (z - mean) / std
    assert abs(standard.mean().item()) < 0.02 and abs(standard.std().item() - 1) < 0.02
    assert not torch.equal(draws[0][0], draws[0][1])  # fresh noise per sample


def test_uncond_dropout_rate_and_padding(cache: Path) -> None:
    ds = CacheDataset(cache, seed=9, p_uncond=0.3)
    loader = CacheLoader(ds, ds.train_sampler(batch_size=2, drop_last=False))
    dropped = []
    for _ in range(6):
        for batch in loader:
            for b, d in enumerate(batch["uncond"].tolist()):
                dropped.append(d)
                if d:
                    assert batch["captions"][b] == ""
                    assert bool((batch["text_hidden"][b] == UNCOND).all()) and bool((batch["text_pooled"][b] == UNCOND).all())
                else:
                    assert not bool((batch["text_hidden"][b] == UNCOND).all())
    assert len(dropped) == 6 * N and abs(np.mean(dropped) - 0.3) < 0.07
    padded = uncond_text(torch.arange(2 * 77 * 3, dtype=torch.float32).reshape(154, 3), n_chunks=3, tokens_per_chunk=77)
    assert padded.shape == (231, 3) and torch.equal(padded[154:], padded[77:154])
    assert CacheDataset(cache, p_uncond=0.0).load(ds.train_sampler(batch_size=2).batches(0)[0])["uncond"].sum() == 0


def test_tag_weights_default_and_missing_ids(cache: Path, tmp_path: Path) -> None:
    ds = CacheDataset(cache)
    batch = ds.load(ds.train_sampler(batch_size=4).batches(0)[0])
    assert torch.equal(batch["tag_weight"], torch.ones(4))
    partial = pa.table({"id": ["id0000"], "weight": [2.0], "n_counted": [1]}).cast(TAG_WEIGHTS_SCHEMA)
    write_table(partial, tmp_path / "tw.parquet", artifact="tag_weights", config={})
    with pytest.raises(UserError, match="no tag weight"):
        CacheDataset(cache, tag_weights=tmp_path / "tw.parquet")
    with pytest.raises(UserError, match="not found"):
        CacheDataset(cache, tag_weights=tmp_path / "missing.parquet")


def test_holdout_is_deterministic_and_never_trained_on(cache: Path) -> None:
    ds = CacheDataset(cache, seed=1, holdout_fraction=0.2)
    expected = {f"id{i:04d}" for i in range(N)}
    hashes = holdout_hash(sorted(expected))
    assert set(ds.index.holdout_ids) == {i for i, h in zip(sorted(expected), hashes) if h < 0.2 * 2**64}
    assert 0 < len(ds.index.holdout_ids) < N
    held = set(ds.index.holdout_ids)
    trained = {i for b in collect(CacheLoader(ds, ds.train_sampler(batch_size=2, drop_last=False))) for i in b["ids"]}
    assert trained == expected - held
    val = collect(CacheLoader(ds, ds.holdout_batches(batch_size=3), augment=False))
    assert sorted(i for b in val for i in b["ids"]) == sorted(held)
    for b in val:  # fixed: the posterior mean, variant 0, no flip, no dropout
        for j, id_ in enumerate(b["ids"]):
            src = make_row(row_of(id_))
            assert torch.equal(b["latents"][j], src.latent_mean.half().float()) and b["captions"][j] == src.captions[0]
    again = collect(CacheLoader(ds, ds.holdout_batches(batch_size=3), augment=False))
    assert_same_batches(val, again)
    other_seed = CacheDataset(cache, seed=7, holdout_fraction=0.2)
    assert other_seed.index.holdout_ids == ds.index.holdout_ids  # the split depends on ids only
    by_count = CacheDataset(cache, holdout_count=5)
    assert len(by_count.index.holdout_ids) == 5 and sum(r.size for v in by_count.index.train.values() for r in v) == N - 5


# ── loader: resume, prefetch, errors ───────────────────────────────────────────────────────────


@pytest.mark.parametrize("stop", [(0, 5), (1, 0), (1, 7)])
def test_resume_continues_bitwise(cache: Path, stop: tuple[int, int]) -> None:
    kw = {"seed": 11, "p_flip": 0.5, "p_uncond": 0.25, "holdout_fraction": 0.1}
    ds = CacheDataset(cache, **kw)
    full_loader = CacheLoader(ds, ds.train_sampler(batch_size=3, drop_last=False), prefetch=3, workers=2)
    full = collect(full_loader) + collect(full_loader) + collect(full_loader)  # three epochs
    per_epoch = len(full_loader)
    cut = stop[0] * per_epoch + stop[1]

    first = CacheLoader(ds, ds.train_sampler(batch_size=3, drop_last=False), prefetch=2)
    done = collect(first) if stop[0] else []
    done += collect(first, stop[1]) if stop[1] else []
    state = first.state_dict()  # taken mid-epoch while read-ahead is in flight
    first.close()
    assert (state["epoch"], state["step"]) == stop and len(done) == cut

    ds2 = CacheDataset(cache, **kw)
    resumed = CacheLoader(ds2, ds2.train_sampler(batch_size=3, drop_last=False), prefetch=4, workers=1)
    resumed.load_state_dict(state)
    rest = []
    while len(done) + len(rest) < len(full):
        rest += collect(resumed)
    assert_same_batches(done + rest, full)
    assert any(b["flipped"].any() for b in rest) and any(b["uncond"].any() for b in rest)


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sdxl-cache-reader")]


def test_prefetch_is_bounded_and_threads_stop(cache: Path) -> None:
    ds = CacheDataset(cache)
    started, lock = [0], threading.Lock()
    load = ds.load

    def counting_load(spec, **kw):
        with lock:
            started[0] += 1
        return load(spec, **kw)

    ds.load = counting_load
    loader = CacheLoader(ds, ds.train_sampler(batch_size=2), prefetch=3, workers=2)
    delivered = 0
    for _ in loader:
        delivered += 1
        time.sleep(0.01)  # a slow consumer: the readers must wait, not run ahead
        assert started[0] <= delivered + 3
        if delivered == 6:
            break
    assert reader_threads()
    loader.close()
    assert not reader_threads()
    with CacheLoader(ds, ds.train_sampler(batch_size=2), workers=2) as again:
        assert len(collect(again)) == len(again)
    assert not reader_threads()


def test_reader_error_reaches_the_consumer(cache: Path) -> None:
    ds = CacheDataset(cache)
    load, calls = ds.load, [0]

    def failing(spec, **kw):
        calls[0] += 1
        if spec.step == 3:
            raise RuntimeError("disk on fire")
        return load(spec, **kw)

    ds.load = failing
    sampler = ds.train_sampler(batch_size=2)
    loader = CacheLoader(ds, sampler, prefetch=2, workers=2)
    got = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 3 and (sampler.epoch, sampler.step) == (0, 3)  # the failed batch is not counted
    loader.close()
    assert not reader_threads()


def test_unfinished_cache_and_bad_options_are_refused(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        CacheDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not both"):
        CacheDataset(cache, holdout_fraction=0.1, holdout_count=3)
    with pytest.raises(UserError, match="leaves no training rows"):
        CacheDataset(cache, holdout_count=N)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            CacheDataset(cache, pin_memory=True)
