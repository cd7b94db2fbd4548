"""Per-image settings from the manifest (issue #11): repeats per epoch, caption dropout, keep_tokens.

The unit tests write a small cache with ``cache_format.CacheWriter`` and a manifest holding only the
columns the trainer joins; the last tests use the tiny kit (scan → cache) for ``prep cache``'s
re-encoding and a short ``train.loop.run``.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sdxl_trainer.cache_format import CacheDims, CacheRow, CacheWriter, Group, finalise
from sdxl_trainer.cache_format.layout import list_shard_paths
from sdxl_trainer.caption_variants import with_keep_tokens
from sdxl_trainer.config import CacheConfig, CaptionVariantsConfig, TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import MANIFEST_SCHEMA, read_table, write_table
from sdxl_trainer.train.data import CacheDataset
from sdxl_trainer.train.loader import CacheLoader

DIMS = CacheDims(latent_channels=4, text_dim=16, pooled_dim=8, variants=2)
CONFIG = {"model": "tiny", "variants": {"count": 2}}
G1, G2 = Group(64, 32, 1), Group(32, 32, 2)
N = 30
UNCOND = -7.0
IDS = [f"id{i:04d}" for i in range(N)]
REPEATS = [1 + i % 3 for i in range(N)]  # 1, 2, 3, 1, 2, 3, …
DATASET = ["a" if i % 2 else "b" for i in range(N)]


def group_of(i: int) -> Group:
    return G1 if i < 18 else G2


def make_row(i: int) -> CacheRow:
    group = group_of(i)
    g = torch.Generator().manual_seed(i)
    latent = DIMS.latent_shape(group.bucket_width, group.bucket_height)
    hidden = [torch.randn(*DIMS.text_shape(group.n_chunks), generator=g) for _ in range(2)]
    pooled = [torch.randn(DIMS.pooled_dim, generator=g) for _ in range(2)]
    return CacheRow(
        id=IDS[i], path=f"img/{i}.png", bucket_width=group.bucket_width, bucket_height=group.bucket_height,
        n_chunks=group.n_chunks, original_height=100, original_width=100, crop_top=0, crop_left=0,
        target_height=group.bucket_height, target_width=group.bucket_width, latent_mean=torch.randn(*latent, generator=g),
        latent_std=torch.rand(*latent, generator=g) + 0.5, text_hidden=hidden, text_pooled=pooled,
        captions=[f"cap {i} a", f"cap {i} b"],
    )  # fmt: skip


def write_manifest(path: Path, *, repeats=None, caption_dropout=None, old: bool = False, ids=IDS) -> Path:
    """A manifest of ok rows with the given per-image columns (``old``: written before they existed)."""
    rows = [{"id": i, "path": f"img/{k}.png", "status": "ok", "dataset": DATASET[k % N],
             "repeats": None if repeats is None else repeats[k],
             "caption_dropout": None if caption_dropout is None else caption_dropout[k]} for k, i in enumerate(ids)]
    rows.append({"id": IDS[0], "path": "dup/0.png", "status": "duplicate", "repeats": 9})  # not joined: not ok
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    if old:
        table = table.drop_columns(["dataset", "repeats", "keep_tokens", "caption_dropout"])
    write_table(table, path, artifact="manifest", config={})
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("repeats") / "cache"
    with CacheWriter(cache, dims=DIMS, config=CONFIG, shard_max_rows=7, row_group_max_rows=2) as w:
        for i in range(N):
            w.add(make_row(i))
    uncond = {"text_hidden": torch.full((77, 16), UNCOND), "text_pooled": torch.full((8,), UNCOND)}
    finalise(cache, config=CONFIG, dims=DIMS, uncond=uncond)
    return cache


@pytest.fixture(scope="module")
def manifest(cache: Path) -> Path:
    return write_manifest(cache.parent / "manifest.parquet", repeats=REPEATS)


def batch_ids(ds: CacheDataset, spec) -> list[str]:
    return ds.index.ids[spec.group].take(pa.array(ds.index.offsets[spec.group][spec.shard] + spec.row)).to_pylist()


def epoch_ids(ds: CacheDataset, sampler, epoch: int) -> list[list[str]]:
    return [batch_ids(ds, b) for b in sampler.batches(epoch)]


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
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"] and (x["epoch"], x["step"]) == (y["epoch"], y["step"])
        for key in ("latents", "text_hidden", "text_pooled", "time_ids", "flipped", "uncond"):
            assert torch.equal(x[key], y[key]), key


# ── (a) an epoch shows each training image `repeats` times ──────────────────────────────────────


def test_an_epoch_shows_each_training_image_repeats_times_bucket_pure(cache: Path, manifest: Path) -> None:
    ds = CacheDataset(cache, seed=5, manifest=manifest, holdout_fraction=0.2)
    held = set(ds.index.holdout_ids)
    assert 0 < len(held) < N
    sampler = ds.train_sampler(batch_size=4, drop_last=False)
    for epoch in (0, 1):
        batches = epoch_ids(ds, sampler, epoch)
        counts = Counter(i for b in batches for i in b)
        assert counts == {i: r for i, r in zip(IDS, REPEATS) if i not in held}
        for b, spec in zip(batches, sampler.batches(epoch)):
            assert {group_of(int(i[2:])) for i in b} == {spec.group}  # bucket-pure
    train_rows = sum(r for i, r in zip(IDS, REPEATS) if i not in held)
    assert sampler.rows == train_rows
    per_group = Counter()
    for i, r in zip(IDS, REPEATS):
        if i not in held:
            per_group[group_of(int(i[2:]))] += r
    assert len(sampler) == sum(math.ceil(c / 4) for c in per_group.values())
    # the hold-out: each held-out image once, none repeated, never in a training batch
    val = [i for b in ds.holdout_batches(batch_size=3).batches(0) for i in batch_ids(ds, b)]
    assert sorted(val) == sorted(held)
    images = N - len(held)
    assert ds.describe_epoch(sampler) == f"epoch = {images} training images, {train_rows} samples with repeats: " \
                                         f"{len(sampler)} batches of 4"  # fmt: skip


def test_repeated_copies_draw_their_own_randomness(cache: Path, manifest: Path) -> None:
    """Two copies of an image in one epoch are two samples: their own latent noise and variant."""
    ds = CacheDataset(cache, seed=2, manifest=manifest)
    seen: dict[str, list[torch.Tensor]] = {}
    for batch in collect(CacheLoader(ds, ds.train_sampler(batch_size=4, drop_last=False))):
        for j, i in enumerate(batch["ids"]):
            seen.setdefault(i, []).append(batch["latents"][j])
    three = [v for k, v in seen.items() if REPEATS[int(k[2:])] == 3]
    assert three and all(len(v) == 3 and not torch.equal(v[0], v[1]) for v in three)


# ── (b) a pure function of (seed, epoch); exact resume mid-epoch ────────────────────────────────


def test_order_is_a_function_of_seed_and_epoch_and_resume_is_bitwise(cache: Path, manifest: Path) -> None:
    kw = {"seed": 11, "p_uncond": 0.25, "manifest": manifest, "holdout_count": 3}
    ds = CacheDataset(cache, **kw)
    s = ds.train_sampler(batch_size=3)
    again = CacheDataset(cache, **kw).train_sampler(batch_size=3)
    assert epoch_ids(ds, s, 1) == epoch_ids(ds, again, 1) and epoch_ids(ds, s, 0) != epoch_ids(ds, s, 1)
    other_seed = CacheDataset(cache, **{**kw, "seed": 12}).train_sampler(batch_size=3)
    assert epoch_ids(ds, other_seed, 0) != epoch_ids(ds, s, 0)

    full_loader = CacheLoader(ds, ds.train_sampler(batch_size=3), prefetch=2)
    full = collect(full_loader) + collect(full_loader)  # two epochs
    per_epoch = len(full_loader)
    first = CacheLoader(ds, ds.train_sampler(batch_size=3), prefetch=3, workers=2)
    done = collect(first) + collect(first, 4)  # epoch 0, then 4 batches of epoch 1
    state = first.state_dict()
    first.close()
    assert (state["epoch"], state["step"]) == (1, 4) and "repeats" in state["config"]
    ds2 = CacheDataset(cache, **kw)
    resumed = CacheLoader(ds2, ds2.train_sampler(batch_size=3), prefetch=1)
    resumed.load_state_dict(state)
    rest = collect(resumed)
    assert len(done) + len(rest) == 2 * per_epoch
    assert_same_batches(done + rest, full)


# ── (c) changed repeats: a strict resume refuses and names --force ──────────────────────────────


def test_changed_repeats_refuse_a_strict_resume(cache: Path, manifest: Path, tmp_path: Path) -> None:
    state = CacheDataset(cache, manifest=manifest).train_sampler(batch_size=4).state_dict()
    swapped = list(REPEATS)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # 1 ↔ 2: the same number of samples per epoch
    other = CacheDataset(cache, manifest=write_manifest(tmp_path / "m.parquet", repeats=swapped)).train_sampler(batch_size=4)
    assert other.rows == state["config"]["rows"]
    with pytest.raises(UserError, match="--force") as e:
        other.load_state_dict(state)
    assert "(repeats)" in str(e.value)
    other.load_state_dict(state, strict=False)  # --force: accepted, the order changes from here on
    # back to all-ones: the digest disappears (and the row count changes)
    plain = CacheDataset(cache, manifest=write_manifest(tmp_path / "p.parquet", repeats=[1] * N)).train_sampler(batch_size=4)
    with pytest.raises(UserError, match="repeats, rows"):
        plain.load_state_dict(state)


# ── (d) per-image caption dropout ───────────────────────────────────────────────────────────────


def test_per_image_caption_dropout_overrides_p_uncond(cache: Path, tmp_path: Path) -> None:
    own = [1.0 if d == "a" else None for d in DATASET]  # dataset a: always dropped; b: the run's p_uncond
    ds = CacheDataset(cache, seed=3, p_uncond=0.0, manifest=write_manifest(tmp_path / "m.parquet", caption_dropout=own))
    loader = CacheLoader(ds, ds.train_sampler(batch_size=4, drop_last=False))
    seen = Counter()
    for _ in range(2):
        for batch in loader:
            for j, i in enumerate(batch["ids"]):
                dropped = bool(batch["uncond"][j])
                seen[(DATASET[int(i[2:])], dropped)] += 1
                assert dropped == (DATASET[int(i[2:])] == "a")
                assert dropped == bool((batch["text_hidden"][j] == UNCOND).all()) == (batch["captions"][j] == "")
    assert seen[("a", True)] == 2 * 15 and seen[("b", False)] == 2 * 15
    # b at the run's rate: p_uncond 1 drops everything; a row's own 0 is never dropped
    zero_a = [0.0 if d == "a" else None for d in DATASET]
    ds = CacheDataset(cache, seed=3, p_uncond=1.0, manifest=write_manifest(tmp_path / "z.parquet", caption_dropout=zero_a))
    for batch in collect(CacheLoader(ds, ds.train_sampler(batch_size=4, drop_last=False))):
        assert batch["uncond"].tolist() == [DATASET[int(i[2:])] == "b" for i in batch["ids"]]
    # validation never drops
    held = CacheDataset(cache, manifest=tmp_path / "m.parquet", holdout_count=6)
    assert not any(b["uncond"].any() for b in collect(CacheLoader(held, held.holdout_batches(batch_size=3), augment=False)))


# ── (e) without the columns: exactly today's batches ────────────────────────────────────────────


def test_old_manifest_or_plain_values_give_the_batches_of_today(cache: Path, tmp_path: Path) -> None:
    kw = {"seed": 4, "p_uncond": 0.3, "holdout_fraction": 0.1}
    base = CacheDataset(cache, **kw)
    base_sampler = base.train_sampler(batch_size=3)
    expect = collect(CacheLoader(base, base_sampler)) + collect(CacheLoader(base, base.train_sampler(batch_size=3)))
    for path in (write_manifest(tmp_path / "old.parquet", old=True), write_manifest(tmp_path / "ones.parquet",
                 repeats=[1] * N, caption_dropout=[None] * N), tmp_path / "absent.parquet"):  # fmt: skip
        ds = CacheDataset(cache, manifest=path, **kw)
        sampler = ds.train_sampler(batch_size=3)
        assert sampler.config() == base_sampler.config() and "repeats" not in sampler.config()
        assert_same_batches(collect(CacheLoader(ds, sampler)) + collect(CacheLoader(ds, ds.train_sampler(batch_size=3))),
                            expect)  # fmt: skip


def test_bad_per_image_values_are_one_line_errors(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not match the manifest: 1 cached image\(s\) are no longer in it.*id0029"):
        CacheDataset(cache, manifest=write_manifest(tmp_path / "short.parquet", repeats=REPEATS, ids=IDS[:-1]))
    zero = list(REPEATS)
    zero[4] = 0
    with pytest.raises(UserError, match="repeats must be ≥ 1.*id0004 has 0"):
        CacheDataset(cache, manifest=write_manifest(tmp_path / "zero.parquet", repeats=zero))
    with pytest.raises(UserError, match=r"caption_dropout must be in \[0, 1\].*id0002"):
        too_high = [None, None, 1.5] + [None] * (N - 3)
        CacheDataset(cache, manifest=write_manifest(tmp_path / "p.parquet", caption_dropout=too_high))
    with pytest.raises(UserError, match="keep_tokens=-1"):
        with_keep_tokens(CaptionVariantsConfig(), -1)


# ── (f) keep_tokens per row: its variants change, and prep cache re-encodes just that row ───────


def rewrite_manifest(path: Path, **columns: list) -> None:
    """Replace some columns of a real manifest, keeping its provenance and source description."""
    table, meta = read_table(path, artifact="manifest", produced_by="sdxl prep scan")
    for name, values in columns.items():
        column = pa.array(values, type=MANIFEST_SCHEMA.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    extra = {k: v for k, v in meta.items() if k not in ("artifact", "schema_version", "package_version", "created", "config")}
    write_table(table, path, artifact="manifest", config=meta["config"], extra=extra)


@pytest.fixture
def work(tiny_work: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_work, tmp_path / "work"))


def _cached_captions(cache: Path) -> dict[str, list[str]]:
    out = {}
    for _, path in list_shard_paths(cache):
        t = pq.read_table(path, columns=["id", "captions"])
        out.update(zip(t["id"].to_pylist(), t["captions"].to_pylist()))
    return out


def test_keep_tokens_per_row_re_encodes_only_that_row(work: Path, tiny_model_dir: Path) -> None:
    from sdxl_trainer.demo import demo_cache_config
    from sdxl_trainer.prep import cache
    from sdxl_trainer.prep.cache_sync import variant_texts
    from sdxl_trainer.prep.pixels import read_manifest

    cfg: CacheConfig = demo_cache_config(work, tiny_model_dir)
    rows, _ = read_manifest(work)
    before = _cached_captions(work / "cache")
    assert all(variant_texts(cfg, r) == before[r["id"]] for r in rows)  # keep_tokens null: keep_first (0)
    # an image whose variants change when its first 3 tags are kept
    target = next(r for r in rows if variant_texts(cfg, {**r, "keep_tokens": 3}) != variant_texts(cfg, r))
    table = pq.read_table(work / "manifest.parquet", columns=["id", "status"]).to_pylist()
    rewrite_manifest(work / "manifest.parquet",
                     keep_tokens=[3 if r["id"] == target["id"] and r["status"] == "ok" else None for r in table])  # fmt: skip
    rows, _ = read_manifest(work)
    assert [r["keep_tokens"] for r in rows if r["id"] == target["id"]] == [3]
    summary = cache.run(cfg)
    assert summary["resumed_from_previous_run"] == len(rows) - 1  # every other row kept as it was
    after = _cached_captions(work / "cache")
    want = variant_texts(cfg, {**target, "keep_tokens": 3})
    assert after[target["id"]] == want != before[target["id"]]
    first3 = target["tags"][:3]
    assert all(v.split(", ")[:3] == first3 for v in want)  # the kept tags lead every variant, in order
    assert {k: v for k, v in after.items() if k != target["id"]} == {k: v for k, v in before.items() if k != target["id"]}


def test_on_the_fly_prompts_keep_the_rows_own_first_tags(tiny_work: Path, tmp_path: Path) -> None:
    from sdxl_trainer.config.train import TextSection
    from sdxl_trainer.train.text_mode import TextMode, load_captions, load_keep_tokens

    assert load_keep_tokens(tiny_work) == {}  # the scan leaves keep_tokens null
    captions = load_captions(tiny_work)
    image_id = max(captions, key=lambda i: len(captions[i][0]))
    text = TextMode(tokenizers=(None, None), encoders=(None, None), captions=captions,
                    cfg=TextSection(mode="on_the_fly", variants={"max_dropout": 0.9}), device=torch.device("cpu"),
                    keep_tokens={image_id: 2})  # fmt: skip
    tags = captions[image_id][0]
    for step in range(8):
        batch = {"ids": [image_id] * 4, "uncond": torch.zeros(4, dtype=torch.bool)}
        text.set_prompts([batch], seed=0, step=step)
        assert all(p.split(", ")[:2] == tags[:2] for p in batch["prompts"])


# ── (g) a short run: the epoch line, and num_epochs counting the repeated set ───────────────────


def test_train_counts_epochs_of_the_repeated_set(work: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from sdxl_trainer import console
    from sdxl_trainer.train import loop

    table = pq.read_table(work / "manifest.parquet", columns=["id", "status"]).to_pylist()
    ok = sorted(r["id"] for r in table if r["status"] == "ok")
    tripled = set(ok[:10])
    rewrite_manifest(work / "manifest.parquet", repeats=[3 if r["id"] in tripled else 1 for r in table])
    lines: list[str] = []
    monkeypatch.setattr(console, "info", lines.append)
    settings = {
        "model": str(tiny_model_dir), "work": str(work), "out": str(tmp_path / "run"), "device": "cpu",
        "precision": "fp32", "batch_size": 4, "num_epochs": 0.05, "checkpoints.diffusers": False,
        "checkpoints.single_file": False, "data.workers": 1, "logging.tensorboard": False}  # fmt: skip
    cfg = load_config(TrainConfig, None, settings)
    summary = loop.run(cfg)
    ds = CacheDataset(work / "cache", seed=cfg.seed, manifest=work / "manifest.parquet")
    sampler = ds.train_sampler(batch_size=4)
    assert sampler.rows == len(ok) + 2 * len(tripled)
    epoch = [x for x in lines if x.startswith("epoch = ")]
    assert epoch == [f"epoch = {len(ok)} training images, {len(ok) + 20} samples with repeats: {len(sampler)} batches of 4"]
    plain = CacheDataset(work / "cache", seed=cfg.seed).train_sampler(batch_size=4)
    assert len(sampler) > len(plain)
    assert summary["steps"] == math.ceil(0.05 * len(sampler)) and summary["samples"] == 4 * summary["steps"]
    seen = Counter(i for b in epoch_ids(ds, sampler, 0) for i in b)
    assert all(seen[i] <= (3 if i in tripled else 1) for i in ok)  # drop_last drops a few tails
    assert np.mean([seen[i] for i in tripled]) > 2
    # a rescan that moved repeats from one image to another: same epoch length, another order
    moved = (tripled - {ok[0]}) | {ok[-1]}
    rewrite_manifest(work / "manifest.parquet", repeats=[3 if r["id"] in moved else 1 for r in table])
    longer = {**settings, "num_epochs": 0.15, "resume": "latest"}
    with pytest.raises(UserError, match="--force") as e:
        loop.run(load_config(TrainConfig, None, longer))
    assert "(repeats)" in str(e.value)
    assert loop.run(load_config(TrainConfig, None, {**longer, "force": True}))["steps"] == math.ceil(0.15 * len(sampler))
