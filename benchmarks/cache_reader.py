"""The trainer's cache reader (sampler + CacheDataset + CacheLoader) at real SDXL sizes, on the CPU.

    python benchmarks/cache_reader.py                  # 600 rows of 1024² (4×128×128 latents mean+std,
                                                       # flip copies), 1–3 chunks × 77 × 2048 text,
                                                       # 4 caption variants: ~1.8 GB in /tmp
    python benchmarks/cache_reader.py --samples 1000 --batches 150 --cores 2

What a training step gets: bucket-pure shuffled batches, a caption variant per sample, flips,
a fresh latent draw mean + std·ε (fp32), uncond dropout 10 %, tag weights, prefetch threads.
Compared with GUIDE.md's target: ≥ 50 × one GPU's need (~16 samples/s) = 800 samples/s.
The cache is warm (just written, in the page cache): this measures the CPU and memory side.
A breakdown times each part of a batch alone, and a memory-copy figure puts bytes/sample in
proportion. Prints a table and writes benchmarks/out/cache_reader.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer.cache_format import SDXL_DIMS, CacheRow, CacheWriter, Shard, finalise  # noqa: E402
from sdxl_trainer.console import table  # noqa: E402
from sdxl_trainer.schema import TAG_WEIGHTS_SCHEMA, write_table  # noqa: E402
from sdxl_trainer.train.loader import CacheLoader  # noqa: E402
from sdxl_trainer.train.data import (  # noqa: E402
    CacheDataset,
    _columns,
    _row_views,
    sample_choices,
    sample_latents,
)

GPU_NEED = 16.0  # samples/s one H100 consumes in a full finetune (GUIDE.md)
TARGET = 50 * GPU_NEED


def _pool(size: int, *, n_chunks: int, variants: int, seed: int) -> list[dict]:
    """A few distinct random rows per chunk count, cycled, so generating them stays out of the write time."""
    g = torch.Generator().manual_seed(seed + n_chunks)
    latent = SDXL_DIMS.latent_shape(1024, 1024)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).half()

    return [
        {
            "latent_mean": rand(*latent),
            "latent_std": rand(*latent).abs(),
            "latent_mean_flip": rand(*latent),
            "latent_std_flip": rand(*latent).abs(),
            "text_hidden": [rand(*SDXL_DIMS.text_shape(n_chunks)) for _ in range(variants)],
            "text_pooled": [rand(SDXL_DIMS.pooled_dim) for _ in range(variants)],
        }
        for _ in range(size)
    ]


def write_cache(work: Path, *, samples: int, variants: int, seed: int, shard_rows: int | None) -> tuple[Path, Path, float]:
    """A finished cache (default row groups: one row each at these sizes) and its tag weights."""
    cache, dims = work / "cache", replace(SDXL_DIMS, variants=variants)
    pools = {n: _pool(4, n_chunks=n, variants=variants, seed=seed) for n in (1, 2, 3)}
    start = time.perf_counter()
    kw = {} if shard_rows is None else {"shard_max_rows": shard_rows}
    with CacheWriter(cache, dims=dims, config={"bench": True}, **kw) as w:
        for i in range(samples):
            n = 1 + i % 3
            w.add(CacheRow(
                id=f"{i:032x}", path=f"images/{i:07d}.jpg", bucket_width=1024, bucket_height=1024, n_chunks=n,
                original_height=1100, original_width=1050, crop_top=38, crop_left=13, target_height=1024,
                target_width=1024, captions=[f"caption {i} v{v}, 1girl, solo" for v in range(variants)],
                crop_left_flip=13, **pools[n][i % 4],
            ))  # fmt: skip
    uncond = {"text_hidden": torch.zeros(77, 2048), "text_pooled": torch.zeros(1280)}
    finalise(cache, config={"bench": True}, dims=dims, uncond=uncond)
    seconds = time.perf_counter() - start
    ids = [f"{i:032x}" for i in range(samples)]
    weights = pa.table({"id": ids, "weight": np.linspace(0.5, 1.5, samples), "n_counted": [3] * samples})
    write_table(weights.cast(TAG_WEIGHTS_SCHEMA), work / "tag_weights.parquet", artifact="tag_weights", config={})
    return cache, work / "tag_weights.parquet", seconds


def run_loader(ds: CacheDataset, *, batch: int, batches: int, workers: int, prefetch: int, repeats: int) -> dict:
    """Consume ``batches`` batches (over epochs as needed) as a training loop would, ``repeats`` times
    after a warm-up; the best run is the least disturbed by other jobs, the CPU time the least noisy."""
    loader = CacheLoader(ds, ds.train_sampler(batch_size=batch), prefetch=prefetch, workers=workers)
    for _ in zip(range(batches), loader):  # warm-up (same threads): open shards, touch the mapped pages
        pass
    rates, cpus = [], []
    for _ in range(repeats):
        got = samples = 0
        start, cpu = time.perf_counter(), time.process_time()
        while got < batches:
            for b in loader:
                got, samples = got + 1, samples + len(b["ids"])
                if got == batches:
                    break
        rates.append(samples / (time.perf_counter() - start))
        cpus.append(1e6 * (time.process_time() - cpu) / samples)
    loader.close()
    return {"batch": batch, "workers": workers, "prefetch": prefetch, "samples_per_run": samples,
            "samples_per_s": max(rates), "samples_per_s_median": float(np.median(rates)),
            "cpu_us_per_sample": min(cpus), "runs_samples_per_s": rates}  # fmt: skip


def breakdown(ds: CacheDataset, *, batch: int, batches: int) -> dict:
    """CPU µs per sample of each step of ``CacheDataset.load``, each timed alone on one thread:
    the same reads (one per (shard, flip, text variant) combination, exactly the needed columns)."""
    specs = ds.train_sampler(batch_size=batch).batches(0)[:batches]
    names = ("choices (per-sample generators)", "read (Parquet row groups → Arrow)", "copy text into the batch",
             "latent draw mean + std·ε (fp32)", "whole load() (incl. the rest)")  # fmt: skip
    cpu = dict.fromkeys(names, 0.0)
    n = read_bytes = 0
    for spec in specs:
        c0 = time.process_time()
        ch = sample_choices(seed=0, epoch=0, step=spec.step, positions=spec.position, variants=ds.dims.variants)
        c1 = time.process_time()
        flat = ds.index.offsets[spec.group][spec.shard] + spec.row
        text = ds.index.stored[spec.group][flat, ch["variant"]].astype(np.int64)
        flip = ch["u_flip"] < 0.5
        reads = []
        for s, f, k in {(int(a), bool(b), int(c)) for a, b, c in zip(spec.shard, flip, text)}:
            pos = np.flatnonzero((spec.shard == s) & (flip == f) & (text == k))
            reads.append(ds._shard(spec.group, s).gather(spec.row[pos], _columns(flip=f, text=k)))
        c2 = time.process_time()
        g, d = spec.group, ds.dims
        for t in reads:
            for row in _row_views(t.column(2), d.text_shape(g.n_chunks)):
                torch.empty_like(row).copy_(row)
        c3 = time.process_time()
        latent = d.latent_shape(g.bucket_width, g.bucket_height)
        for t in reads:
            out = torch.empty((t.num_rows, *latent))
            mean, std = _row_views(t.column(0), latent), _row_views(t.column(1), latent)
            sample_latents(out, np.arange(t.num_rows), mean, std, ch["noise_seed"][: t.num_rows])
        c4 = time.process_time()
        ds.load(spec)
        c5 = time.process_time()
        for key, dt_ in zip(names, (c1 - c0, c2 - c1, c3 - c2, c4 - c3, c5 - c4)):
            cpu[key] += dt_
        n += len(spec.row)
        read_bytes += sum(t.column(j).nbytes for t in reads for j in range(4))
    return {"us_per_sample": {k: 1e6 * v / n for k, v in cpu.items()}, "read_bytes_per_sample": read_bytes / n}


def memcpy_gb_s(mb: int = 256, repeats: int = 5) -> float:
    """One thread copying a large buffer: bytes moved (read + write) per second, the memory ceiling."""
    src, dst = torch.empty(mb << 20, dtype=torch.uint8).fill_(1), torch.empty(mb << 20, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * repeats * (mb << 20) / (time.perf_counter() - start) / 1e9


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--batches", type=int, default=120, help="batches timed per configuration")
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best and median reported)")
    ap.add_argument("--shard-rows", type=int, default=16, help="rows per shard of the many-shard layout")
    ap.add_argument("--cores", type=int, default=2, help="pin the process to this many CPU cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temporary cache (default: system temp)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/cache_reader.json")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    torch.set_num_threads(1)  # the breakdown's 'one thread'; reader threads set 1 themselves
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    load_before = os.getloadavg()
    layouts, runs, parts = {}, [], {}
    for name, shard_rows in (("256 MB shards", None), (f"{args.shard_rows}-row shards", args.shard_rows)):
        work = Path(tempfile.mkdtemp(prefix="cache_reader-", dir=args.dir))
        try:
            cache, weights, write_s = write_cache(work, samples=args.samples, variants=args.variants, seed=args.seed,
                                                  shard_rows=shard_rows)  # fmt: skip
            shard_paths = sorted(cache.rglob("*.parquet"))
            cache_bytes = sum(p.stat().st_size for p in shard_paths)
            start = time.perf_counter()
            ds = CacheDataset(cache, seed=args.seed, p_flip=0.5, p_uncond=0.1, tag_weights=weights, holdout_fraction=0.02)
            index_s = time.perf_counter() - start
            layouts[name] = {"shards": len(shard_paths), "bytes": cache_bytes, "bytes_per_row": cache_bytes / args.samples,
                             "write_s": write_s, "index_s": index_s, "shard_open_ms": shard_open_ms(shard_paths)}  # fmt: skip
            for b in (int(x) for x in args.batch_sizes.split(",")):
                for w in (int(x) for x in args.workers.split(",")):
                    runs.append({"layout": name, **run_loader(ds, batch=b, batches=args.batches, workers=w,
                                                               prefetch=args.prefetch, repeats=args.repeats)})
            parts[name] = breakdown(ds, batch=8, batches=min(args.batches, 40))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    bandwidth = memcpy_gb_s()

    best = max(runs, key=lambda r: r["samples_per_s"])
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": _cpu_name(), "cores_used": cores, "cores": os.cpu_count(), "platform": platform.platform()},
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
        "setup": {k: str(v) for k, v in vars(args).items()},
        "target_samples_per_s": TARGET,
        "best": {**best, "x_one_gpu": best["samples_per_s"] / GPU_NEED, "meets_target": best["samples_per_s"] >= TARGET},
        "layouts": layouts,
        "runs": runs,
        "breakdown_batch8_one_thread": parts,
        "memcpy_gb_s_one_thread": bandwidth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    report(doc, args=args, cores=cores)


def report(doc: dict, *, args: argparse.Namespace, cores: int) -> None:
    rows = [(r["layout"], str(r["batch"]), str(r["workers"]), f"{r['samples_per_s']:,.0f}",
             f"{r['samples_per_s_median']:,.0f}", f"{r['cpu_us_per_sample']:,.0f}",
             f"{r['samples_per_s'] / GPU_NEED:,.1f}×", "yes" if r["samples_per_s"] >= TARGET else "no") for r in doc["runs"]]  # fmt: skip
    title = f"cache reader: {args.samples} rows of 1024², 1–3 chunks, {args.variants} variants, {cores} cores, prefetch {args.prefetch}"
    table(title, rows, columns=("layout", "batch", "threads", "samples/s best", "median", "CPU µs/sample", "best × 16/s", f"≥ {TARGET:.0f}"))
    names = list(doc["breakdown_batch8_one_thread"])
    parts = doc["breakdown_batch8_one_thread"]
    keys = list(parts[names[0]]["us_per_sample"])
    rows = [(k, *(f"{parts[n]['us_per_sample'][k]:,.0f} µs" for n in names)) for k in keys]
    rest = [parts[n]["us_per_sample"]["whole load() (incl. the rest)"] - sum(list(parts[n]["us_per_sample"].values())[:-1])
            for n in names]  # fmt: skip
    rows.insert(-1, ("rest of load() (captions, ids, time_ids, Python)", *(f"{r:,.0f} µs" for r in rest)))
    rows.append(("MB read from the cache", *(f"{parts[n]['read_bytes_per_sample'] / 1e6:.2f}" for n in names)))
    table("per sample, batch 8, one thread, each part timed alone", rows, columns=("part", *names))
    for name, lay in doc["layouts"].items():
        print(f"{name}: {lay['shards']} shards, {lay['bytes_per_row'] / 1e6:.2f} MB/row, write {lay['write_s']:.1f}s, "
              f"index {lay['index_s']:.2f}s, open a shard {lay['shard_open_ms']:.1f} ms")  # fmt: skip
    load = doc["load_average_1_5_15"]
    print(f"memcpy {doc['memcpy_gb_s_one_thread']:.1f} GB/s moved (one thread) · load average before/after "
          f"{load['before'][0]:.1f} / {load['after'][0]:.1f} → {args.out}")


def shard_open_ms(paths: list[Path]) -> float:
    """Opening a shard (footer parse): what each miss of a reader thread's open-shard cache costs."""
    largest = max(paths, key=lambda p: p.stat().st_size)
    start = time.perf_counter()
    for _ in range(10):
        Shard(largest)
    return (time.perf_counter() - start) / 10 * 1e3


if __name__ == "__main__":
    main()
