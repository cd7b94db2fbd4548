"""The cache's on-disk format: round trips, both third-party readers, atomic shards, exact-once resume
(after an exception and after a real SIGKILL), config refusal, finalise and verify."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from sdxl_trainer.cache_format import (
    SDXL_DIMS,
    CacheDims,
    CacheRow,
    CacheWriter,
    Group,
    Shard,
    binary_to_tensor,
    cache_schema,
    check_config,
    clean_partial,
    completed_ids,
    finalise,
    fp16_bytes_to_tensor,
    list_groups,
    load_uncond,
    read_meta,
    read_rows,
    row_bytes,
    tensor_to_fp16_bytes,
    verify,
)
from sdxl_trainer.cache_format.layout import binary_array, list_temp_paths, samples_dir
from sdxl_trainer.cache_format.writer import encode_row, rows_to_table, write_shard_atomic
from sdxl_trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DIMS = CacheDims(latent_channels=4, text_dim=16, pooled_dim=8, variants=3)
CONFIG = {"model": "tiny", "variants": {"count": 3}, "flip": True}
G1, G2 = Group(64, 32, 1), Group(32, 64, 2)


def make_row(i: int, group: Group = G1, *, dims: CacheDims = DIMS, flip: bool = False) -> CacheRow:
    """Row i's tensors are a pure function of i, so a test can rebuild what it expects."""
    g = torch.Generator().manual_seed(i)
    latent = dims.latent_shape(group.bucket_width, group.bucket_height)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    # variant 2 repeats variant 0's caption: its embedding is stored once
    captions = [f"cap {i} a", f"cap {i} b", f"cap {i} a"][: dims.variants]
    hidden = [rand(*dims.text_shape(group.n_chunks)) for _ in captions]
    pooled = [rand(dims.pooled_dim) for _ in captions]
    if dims.variants >= 3:
        hidden[2], pooled[2] = hidden[0], pooled[0]
    return CacheRow(
        id=f"id{i:04d}", path=f"img/{i}.png", bucket_width=group.bucket_width, bucket_height=group.bucket_height,
        n_chunks=group.n_chunks, original_height=300 + i, original_width=200, crop_top=i, crop_left=2 * i,
        target_height=group.bucket_height, target_width=group.bucket_width, latent_mean=rand(*latent),
        latent_std=rand(*latent).abs(), text_hidden=hidden, text_pooled=pooled, captions=captions,
        latent_mean_flip=rand(*latent) if flip else None, latent_std_flip=rand(*latent).abs() if flip else None,
        crop_left_flip=100 + i if flip else None, tag_weight=0.5 + i if i % 2 else None,
    )  # fmt: skip


def write(cache: Path, ids, *, config=CONFIG, dims=DIMS, **kw) -> CacheWriter:
    with CacheWriter(cache, dims=dims, config=config, **kw) as w:
        for i in ids:
            w.add(make_row(i, G1 if i % 3 else G2, dims=dims, flip=i % 2 == 0))
    return w


def all_ids(cache: Path) -> list[str]:
    """Every id in every visible shard, repeats included."""
    paths = sorted(samples_dir(cache).rglob("*.parquet"))
    return [i for p in paths for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def test_fp16_bytes_round_trip_without_copy() -> None:
    t = torch.randn(3, 5, 7)
    back = fp16_bytes_to_tensor(tensor_to_fp16_bytes(t), (3, 5, 7))
    assert torch.equal(back, t.half())
    arrays = [np.full((2, 3), k, dtype=np.float16) for k in range(4)]
    with_null = binary_array([arrays[0], None, arrays[1]])
    assert with_null.null_count == 1 and with_null[2].as_py() == arrays[1].tobytes()
    arr = binary_array(arrays)
    view = binary_to_tensor(arr, (2, 3))
    data = arr.buffers()[2]
    assert data.address <= view.data_ptr() < data.address + data.size  # a view, not a copy
    del arr, data
    gc.collect()
    assert torch.equal(view, torch.arange(4, dtype=torch.float16)[:, None, None].expand(4, 2, 3))
    with pytest.raises(ValueError, match="bytes"):
        fp16_bytes_to_tensor(b"\x00" * 6, (2, 2))


def test_round_trip_through_read_rows(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write(cache, range(12), shard_max_rows=5, row_group_max_rows=2)
    finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    groups = list_groups(cache)
    assert set(groups) == {G1, G2} and sum(s.rows for v in groups.values() for s in v) == 12
    shard = Shard(groups[G1][0].path)
    ids = [int(i[2:]) for i in pq.read_table(shard.path, columns=["id"]).column("id").to_pylist()]
    rows, variant = [3, 0, 3, 1], [0, 1, 2, 4]
    flip = [ids[r] % 2 == 0 for r in rows]
    batch = shard.read_rows(rows, variant=variant, flip=flip)
    assert batch["id"] == [f"id{ids[r]:04d}" for r in rows] and batch["group"] == G1
    for b, (r, v, f) in enumerate(zip(rows, variant, flip)):
        src = make_row(ids[r], G1, flip=ids[r] % 2 == 0)
        assert torch.equal(batch["latent_mean"][b], (src.latent_mean_flip if f else src.latent_mean).half())
        assert torch.equal(batch["latent_std"][b], (src.latent_std_flip if f else src.latent_std).half())
        assert torch.equal(batch["text_hidden"][b], src.text_hidden[v % 3].half())
        assert torch.equal(batch["text_pooled"][b], src.text_pooled[v % 3].half())
        assert batch["captions"][b] == src.captions[v % 3]
        crop_left = src.crop_left_flip if f else src.crop_left
        assert batch["micro_conditioning"][b].tolist() == [src.original_height, 200, src.crop_top, crop_left, 32, 64]
        w = batch["tag_weight"][b].item()
        assert (np.isnan(w) and src.tag_weight is None) or w == pytest.approx(src.tag_weight)
    assert batch["flipped"].tolist() == flip
    every = read_rows(shard.path, [1, 2])  # all variants, duplicate caption resolved to its first copy
    assert every["text_hidden"].shape == (2, 3, 77, 16) and every["text_pooled"].shape == (2, 3, 8)
    src = make_row(ids[1], G1)
    for k in range(3):
        assert torch.equal(every["text_hidden"][0, k], src.text_hidden[k].half())
    no_flip = [r for r in range(shard.num_rows) if ids[r] % 2]
    with pytest.raises(ValueError, match="without a flip copy"):
        shard.read_rows(no_flip[:1], flip=[True])
    with pytest.raises(IndexError):
        shard.read_rows([shard.num_rows])


class _Spy:
    """Wraps ParquetFile to record which row groups and columns each read asks for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def read_row_groups(self, groups, columns=None, **kw):
        self.calls.append((list(groups), list(columns)))
        return self.inner.read_row_groups(groups, columns=columns, **kw)


def test_reads_only_the_row_groups_columns_and_variant_needed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with CacheWriter(cache, dims=DIMS, config=CONFIG, row_group_max_rows=2) as w:
        for i in range(10):
            w.add(make_row(i, G1, flip=True))
    shard = Shard(next(iter(list_groups(cache)[G1])).path)
    assert shard._file.metadata.num_row_groups == 5
    spy = shard._file = _Spy(shard._file)
    batch = shard.read_rows([7, 2], variant=[1, 1])
    groups = {tuple(g) for g, _ in spy.calls}
    assert groups == {(3, 1)}  # rows 7 and 2 live in row groups 3 and 1, read in request order
    read = {c for _, cols in spy.calls for c in cols}
    assert {"text_hidden_1", "text_pooled_1", "latent_mean"} <= read
    assert not read & {"text_hidden_0", "text_hidden_2", "latent_mean_flip", "latent_std_flip"}
    assert batch["id"] == ["id0007", "id0002"]
    spy.calls.clear()
    shard.read_rows([0, 1], variant=[2, 0], flip=[True, False])  # variant 2 repeats 0: column 0 only
    read = {c for _, cols in spy.calls for c in cols}
    assert "text_hidden_0" in read and "text_hidden_2" not in read and "latent_mean_flip" in read


def test_pyarrow_dataset_and_hf_datasets_read_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write(cache, range(9), shard_max_rows=4)
    tmp = samples_dir(cache) / G1.dirname() / ".r000-000099.parquet.x.tmp"
    tmp.write_bytes(b"half a shard")  # an unfinished shard must be invisible to both readers
    table = ds.dataset(samples_dir(cache), format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == [f"id{i:04d}" for i in range(9)]
    row = table.filter(pa.compute.equal(table.column("id"), "id0004")).to_pylist()[0]
    assert row["bucket"] == "64x32" and row["chunks"] == 1  # Hive partition columns
    src = make_row(4, G1, flip=True)
    assert torch.equal(fp16_bytes_to_tensor(row["latent_mean"], (4, 4, 8)), src.latent_mean.half())
    assert row["text_hidden_2"] is None and row["captions"][2] == row["captions"][0]

    import datasets

    files = str(samples_dir(cache) / "**" / "*.parquet")
    hf = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(hf["id"]) == [f"id{i:04d}" for i in range(9)]
    rec = hf[hf["id"].index("id0004")]
    assert torch.equal(fp16_bytes_to_tensor(rec["text_hidden_1"], (77, 16)), src.text_hidden[1].half())
    assert rec["crop_left_flip"] == 104 and rec["bucket_width"] == 64


def test_shard_and_row_group_bounds_and_names(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    w = write(cache, range(1, 12), shard_max_rows=3, row_group_max_rows=2)  # G1 gets ids not divisible by 3
    names = sorted(p.name for p in w.shards_written)
    assert names == [f"r000-{k:06d}.parquet" for k in range(1, len(names) + 1)]
    for p in w.shards_written:
        md = pq.read_metadata(p)
        assert md.num_rows <= 3 and all(md.row_group(i).num_rows <= 2 for i in range(md.num_row_groups))
    row = encode_row(make_row(0), DIMS)
    size = sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
    small = tmp_path / "small"  # the memory bound writes the largest group before its own bound
    w = write(small, range(6), buffer_max_bytes=int(2.5 * size))
    assert len(w.shards_written) >= 2 and sorted(all_ids(small)) == [f"id{i:04d}" for i in range(6)]
    again = write(small, range(6, 8))  # a resumed writer continues this rank's sequence
    assert min(int(p.name[5:11]) for p in again.shards_written) > max(int(p.name[5:11]) for p in w.shards_written)


def test_writer_refuses_bad_rows(tmp_path: Path) -> None:
    w = CacheWriter(tmp_path / "c", dims=DIMS, config=CONFIG)
    bad = make_row(1)
    bad.latent_mean[0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"img/1\.png.*latent_mean.*non-finite"):
        w.add(bad)
    big = make_row(2)
    big.text_hidden[1][0, 0] = 1e5  # finite in fp32, inf in fp16
    with pytest.raises(UserError, match="text_hidden_1"):
        w.add(big)
    wrong = make_row(3)
    wrong.latent_std = torch.zeros(4, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        w.add(wrong)
    few = make_row(4)
    few.captions = few.captions[:2]
    with pytest.raises(ValueError, match="3 variants"):
        w.add(few)
    half = make_row(5)
    half.crop_left_flip = 3
    with pytest.raises(ValueError, match="together"):
        w.add(half)
    w.add(make_row(6))
    with pytest.raises(ValueError, match="already added"):
        w.add(make_row(6))


def test_exception_mid_run_then_resume_is_exact_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    writer = CacheWriter(cache, dims=DIMS, config=CONFIG, shard_max_rows=3)
    for i in range(8):  # "killed" after 8 rows: no close, the buffered rows are lost
        writer.add(make_row(i, G1))
    (samples_dir(cache) / G1.dirname() / ".r000-000003.parquet.k1.tmp").write_bytes(b"PAR1 truncated")
    done = completed_ids(cache)
    assert done == {f"id{i:04d}" for i in range(6)}
    assert len(ds.dataset(samples_dir(cache), format="parquet", partitioning="hive").to_table()) == 6
    with pytest.raises(UserError, match="still being written"):
        finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    assert [p.name for p in clean_partial(cache)] == [".r000-000003.parquet.k1.tmp"]
    assert not list_temp_paths(cache)
    with CacheWriter(cache, dims=DIMS, config=CONFIG, shard_max_rows=3) as w:
        for i in range(12):
            if f"id{i:04d}" not in done:
                w.add(make_row(i, G1))
    finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    assert sorted(all_ids(cache)) == [f"id{i:04d}" for i in range(12)]
    assert verify(cache).ok


def test_failed_shard_write_leaves_nothing_visible(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    (samples_dir(cache) / G1.dirname()).mkdir(parents=True)
    table = rows_to_table([encode_row(make_row(1), DIMS)], cache_schema(DIMS.variants))
    target = samples_dir(cache) / G1.dirname() / "r000-000001.parquet"

    def broken(table, where, **kw):
        where.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_shard_atomic(table, target, row_group_size=1)
    assert not target.exists() and not list(target.parent.iterdir())


# The child writes rows with 2-row shards and stops for good just before its 3rd shard's rename,
# the temp file complete but invisible; the parent kills it there with SIGKILL.
CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_cache_format import CONFIG, DIMS, G1, make_row
from sdxl_trainer.cache_format import CacheWriter
real, calls = os.replace, []
def slow_replace(src, dst):
    calls.append(dst)
    if len(calls) == 3:
        open({marker!r}, "w").close()
        time.sleep(120)
    real(src, dst)
os.replace = slow_replace
w = CacheWriter({cache!r}, dims=DIMS, config=CONFIG, shard_max_rows=2)
for i in range(20):
    w.add(make_row(i, G1))
"""


def test_sigkill_while_writing_then_resume_is_exact_once(tmp_path: Path) -> None:
    cache, marker = tmp_path / "cache", tmp_path / "in-rename"
    script = CHILD.format(tests=str(Path(__file__).parent), marker=str(marker), cache=str(cache))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the writer exited before reaching its third shard"
            assert time.monotonic() < deadline, "the writer never reached its third shard"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert len(list_temp_paths(cache)) == 1  # the third shard, complete but never renamed
    done = completed_ids(cache)
    assert done == {f"id{i:04d}" for i in range(4)}
    check_config(cache, config=CONFIG, dims=DIMS)
    clean_partial(cache)
    with CacheWriter(cache, dims=DIMS, config=CONFIG, shard_max_rows=2) as w:
        for i in range(20):
            if f"id{i:04d}" not in done:
                w.add(make_row(i, G1))
    finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    assert sorted(all_ids(cache)) == [f"id{i:04d}" for i in range(20)]
    assert verify(cache).ok


def test_a_different_config_is_refused_unless_overwrite(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert check_config(cache, config=CONFIG, dims=DIMS) is False  # nothing there yet
    write(cache, range(4))
    assert check_config(cache, config=dict(CONFIG), dims=DIMS) is False
    other = {**CONFIG, "variants": {"count": 4}}
    with pytest.raises(UserError, match=r"different settings \(config\.variants\.count\).*--overwrite"):
        check_config(cache, config=other, dims=DIMS)
    with pytest.raises(UserError, match="dims.text_dim"):
        check_config(cache, config=CONFIG, dims=CacheDims(text_dim=32, pooled_dim=8, variants=3))
    finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    with pytest.raises(UserError, match="cache_meta.json"):  # the finalised record is checked first
        check_config(cache, config=other, dims=DIMS)
    assert check_config(cache, config=other, dims=DIMS, overwrite=True) is True
    assert completed_ids(cache) == set() and not (cache / "cache_meta.json").exists()
    assert check_config(cache, config=other, dims=DIMS) is False


def test_finalise_records_counts_bytes_and_uncond(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write(cache, range(10), shard_max_rows=4)
    uncond = {"text_hidden": torch.randn(77, 16), "text_pooled": torch.randn(8)}
    meta = finalise(cache, config=CONFIG, dims=DIMS, uncond=uncond)
    assert meta == read_meta(cache) and meta["config"] == CONFIG and meta["schema_version"] >= 1
    assert meta["rows"] == 10 and meta["flipped_rows"] == 5 and meta["variants"] == 3
    assert meta["rows_by_stored_variants"] == {"2": 10}  # variant 2 repeats variant 0
    groups = {(g["bucket_width"], g["bucket_height"], g["n_chunks"]): g["rows"] for g in meta["groups"]}
    assert groups == {tuple(G1): 6, tuple(G2): 4}
    files = list(samples_dir(cache).rglob("*.parquet"))
    assert meta["bytes_total"] == sum(p.stat().st_size for p in files) and len(meta["shards"]) == len(files)
    assert meta["bytes_per_sample"] == pytest.approx(meta["bytes_total"] / 10)
    parts = meta["bytes_per_sample_by_part"]
    assert parts["text_hidden"] == pytest.approx((6 * 2 * 77 * 16 * 2 + 4 * 2 * 154 * 16 * 2) / 10, rel=0.05)
    loaded = load_uncond(cache)
    assert torch.equal(loaded["text_hidden"], uncond["text_hidden"].half())
    # the guide's figure: an SDXL 3-chunk embedding is ~0.93 MB; 4×128×128 mean+std is 256 KiB
    assert row_bytes(SDXL_DIMS, Group(1024, 1024, 3), flip=False) == 2 * 2 * 4 * 128 * 128 + 2 * (3 * 77 * 2048 + 1280)
    with pytest.raises(ValueError, match="uncond"):
        finalise(cache, config=CONFIG, dims=DIMS, uncond={**uncond, "text_hidden": torch.zeros(70, 16)})


def test_two_ranks_write_one_cache_and_duplicates_are_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    w0 = CacheWriter(cache, dims=DIMS, config=CONFIG, rank=0, world_size=2, shard_max_rows=2)
    w1 = CacheWriter(cache, dims=DIMS, config=CONFIG, rank=1, world_size=2, shard_max_rows=2)
    for i in range(10):
        (w0 if i % 2 == 0 else w1).add(make_row(i, G1))
    w0.close(), w1.close()
    names = sorted(p.name for p in samples_dir(cache).rglob("*.parquet"))
    assert {n[:4] for n in names} == {"r000", "r001"} and len(names) == len(set(names)) == 6
    assert finalise(cache, config=CONFIG, dims=DIMS, uncond=None)["rows"] == 10
    with CacheWriter(cache, dims=DIMS, config=CONFIG, rank=1, world_size=2) as again:
        again.add(make_row(3, G1))  # a rank given an id that is already done
    with pytest.raises(UserError, match="id0003 is in the cache twice"):
        finalise(cache, config=CONFIG, dims=DIMS, uncond=None)


def test_verify_finds_counts_duplicates_and_bad_tensors(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write(cache, range(8), shard_max_rows=3)
    uncond = {"text_hidden": torch.zeros(77, 16), "text_pooled": torch.zeros(8)}
    finalise(cache, config=CONFIG, dims=DIMS, uncond=uncond)
    report = verify(cache)
    assert report.ok and report.rows == 8 and report.shards == len(read_meta(cache)["shards"])
    shards = sorted(samples_dir(cache).rglob("*.parquet"))
    shutil.copy(shards[0], shards[0].with_name("r005-000001.parquet"))  # same ids twice
    shards[-1].unlink()
    rows = [encode_row(make_row(50, G1), DIMS)]
    rows[0]["latent_std"] = np.full_like(rows[0]["latent_std"], np.inf)  # bypasses the writer's check
    rows[0]["text_pooled_1"] = rows[0]["text_pooled_1"][:4]
    table = rows_to_table(rows, cache_schema(DIMS.variants))
    meta = json.loads(pq.read_schema(shards[0]).metadata[b"sdxl_trainer"])
    meta["group"] = G1._asdict()
    table = table.replace_schema_metadata({b"sdxl_trainer": json.dumps(meta).encode()})
    pq.write_table(table, samples_dir(cache) / G1.dirname() / "r007-000001.parquet")
    problems = "\n".join(verify(cache).problems)
    assert "also in" in problems  # duplicate ids
    assert "listed in cache_meta.json but missing" in problems
    assert "id0050 has non-finite values" in problems and "latent_std" in problems
    assert "text_pooled_1: id id0050 has 8 bytes, expected 16" in problems
    assert "rows in total, cache_meta.json says 8" in problems
    assert not verify(cache).ok


def test_list_groups_counts_rows_before_and_after_finalise(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert list_groups(cache) == {}
    write(cache, range(7), shard_max_rows=2)
    before = {g: [s.rows for s in v] for g, v in list_groups(cache).items()}
    finalise(cache, config=CONFIG, dims=DIMS, uncond=None)
    after = {g: [s.rows for s in v] for g, v in list_groups(cache).items()}
    assert before == after and sum(map(sum, after.values())) == 7
    with pytest.raises(UserError, match="uncond"):
        load_uncond(cache)
