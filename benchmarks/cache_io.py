"""Cache write/read throughput at real SDXL sizes (CPU), and VAE-encode images/s (GPU, --gpu-vae).

    python benchmarks/cache_io.py                      # 1000 samples of 1024² (4×128×128 latents,
                                                       # 3×77×2048 text, 1 variant), ~1.2 GB in /tmp
    python benchmarks/cache_io.py --samples 2000 --variants 2 --flip
    python benchmarks/cache_io.py --gpu-vae            # adds the full-size SDXL VAE on CUDA

Rows are random tensors (content does not matter: tensor columns are stored uncompressed). Reads
are timed twice: "warm" right after writing (files in the page cache: CPU/memory bound) and "cold"
after asking the kernel to drop each file's cached pages (posix_fadvise DONTNEED: disk bound).
Prints a table and writes benchmarks/out/cache_io.json.
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
import pyarrow
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer.cache_format import (  # noqa: E402
    SDXL_DIMS,
    CacheRow,
    CacheWriter,
    Group,
    Shard,
    completed_ids,
    finalise,
    list_groups,
    verify,
)
from sdxl_trainer.console import table  # noqa: E402

VAE_CONFIG = ROOT / "sdxl_trainer/models/configs/sdxl-base-1.0/vae/config.json"
GPU_NEED = 16.0  # samples/s one H100 consumes in a full finetune (GUIDE.md target)


def _pool(size: int, *, group: Group, variants: int, flip: bool, seed: int) -> list[dict]:
    """A few distinct random samples, cycled over the rows so generation stays out of the timing."""
    g = torch.Generator().manual_seed(seed)
    latent = SDXL_DIMS.latent_shape(group.bucket_width, group.bucket_height)
    text = SDXL_DIMS.text_shape(group.n_chunks)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).half()

    return [
        {
            "latent_mean": rand(*latent),
            "latent_std": rand(*latent).abs(),
            "text_hidden": [rand(*text) for _ in range(variants)],
            "text_pooled": [rand(SDXL_DIMS.pooled_dim) for _ in range(variants)],
            "latent_mean_flip": rand(*latent) if flip else None,
            "latent_std_flip": rand(*latent).abs() if flip else None,
        }
        for _ in range(size)
    ]


def _row(i: int, tensors: dict, group: Group, *, variants: int, flip: bool) -> CacheRow:
    w, h = group.bucket_width, group.bucket_height
    return CacheRow(
        id=f"{i:032x}", path=f"images/{i:07d}.jpg", bucket_width=w, bucket_height=h, n_chunks=group.n_chunks,
        original_height=h + 100, original_width=w + 50, crop_top=50, crop_left=25, target_height=h, target_width=w,
        captions=[f"caption {i} variant {v}, 1girl, solo, looking at viewer" for v in range(variants)],
        crop_left_flip=25 if flip else None, tag_weight=1.0, **tensors,
    )  # fmt: skip


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_write(cache: Path, args: argparse.Namespace, group: Group) -> dict:
    pool = _pool(16, group=group, variants=args.variants, flip=args.flip, seed=args.seed)
    rg = {} if args.row_group_mb is None else {"row_group_max_bytes": int(args.row_group_mb * (1 << 20))}
    start = time.perf_counter()
    with CacheWriter(
        cache, dims=replace(SDXL_DIMS, variants=args.variants), config={"bench": True},
        shard_max_bytes=args.shard_mb << 20, **rg,
    ) as writer:  # fmt: skip
        for i in range(args.samples):
            writer.add(_row(i, pool[i % len(pool)], group, variants=args.variants, flip=args.flip))
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in writer.shards_written)
    return {"seconds": seconds, "samples": args.samples, "bytes": nbytes, "shards": len(writer.shards_written)}


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_sequential(shards: list[Path], batch: int) -> dict:
    """Every row in file order, ``batch`` consecutive rows per read."""
    start, count, nbytes = time.perf_counter(), 0, 0
    for path in shards:
        shard = Shard(path)
        for lo in range(0, shard.num_rows, batch):
            rows = range(lo, min(lo + batch, shard.num_rows))
            b = shard.read_rows(rows, variant=[0] * len(rows))
            count += len(b["id"])
            nbytes += sum(b[k].numel() * 2 for k in ("latent_mean", "latent_std", "text_hidden", "text_pooled"))
    return {"seconds": time.perf_counter() - start, "samples": count, "bytes": nbytes}


def bench_random(
    shards: list[tuple[Path, int]], *, batch: int, batches: int, seed: int, threads: bool, flip: bool
) -> dict:
    """Bucket-pure shuffled batches: a random shard of the group, ``batch`` random rows of it,
    a random variant per row (and a random half flipped when the cache has flips)."""
    rng = np.random.default_rng(seed)
    opened = {p: Shard(p, use_threads=threads) for p, _ in shards}
    weights = np.array([n for _, n in shards], dtype=float)
    start, rows, nbytes = time.perf_counter(), 0, 0
    for _ in range(batches):
        path, n = shards[rng.choice(len(shards), p=weights / weights.sum())]
        picked = rng.choice(n, size=min(batch, n), replace=False)
        flips = rng.random(picked.size) < 0.5 if flip else None
        b = opened[path].read_rows(picked, variant=rng.integers(0, 1 << 30, size=picked.size), flip=flips)
        rows += len(b["id"])
        nbytes += sum(b[k].numel() * 2 for k in ("latent_mean", "latent_std", "text_hidden", "text_pooled"))
    return {"seconds": time.perf_counter() - start, "samples": rows, "bytes": nbytes}


def bench_gpu_vae(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        print("--gpu-vae: skipped, no CUDA device", file=sys.stderr)
        return {"skipped": "no CUDA device"}
    if not VAE_CONFIG.is_file():
        print(f"--gpu-vae: skipped, {VAE_CONFIG.relative_to(ROOT)} is absent", file=sys.stderr)
        return {"skipped": f"{VAE_CONFIG} absent"}
    from diffusers import AutoencoderKL

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.vae_dtype]
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(VAE_CONFIG.parent)).to("cuda", dtype).eval()
    x = torch.randn(args.vae_batch, 3, 1024, 1024, device="cuda", dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            vae.encode(x).latent_dist.std
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.vae_iters):
            dist = vae.encode(x).latent_dist
            dist.mean.float(), dist.std.float()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = args.vae_batch * args.vae_iters
    return {
        "device": torch.cuda.get_device_name(),
        "dtype": args.vae_dtype,
        "batch": args.vae_batch,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def _rate(r: dict) -> dict:
    return dict(r, samples_per_s=r["samples"] / r["seconds"], mb_per_s=r["bytes"] / r["seconds"] / 1e6)


def _repeat(fn, repeats: int, before=None) -> dict:
    """Best and median of ``repeats`` runs: on a shared machine the best run is the least disturbed."""
    runs = []
    for _ in range(repeats):
        if before:
            before()
        runs.append(_rate(fn()))
    runs.sort(key=lambda r: r["samples_per_s"])
    median = runs[len(runs) // 2]["samples_per_s"]
    return dict(runs[-1], median_samples_per_s=median, runs=[r["samples_per_s"] for r in runs])


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--bucket", default="1024x1024", help="WxH")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--row-group-mb", type=float, default=None, help="default: the writer's (1 MiB)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="read runs per case; the table shows best and median")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temporary cache (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the cache folder")
    ap.add_argument("--gpu-vae", action="store_true")
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-iters", type=int, default=10)
    ap.add_argument("--vae-dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/cache_io.json")
    args = ap.parse_args()
    w, h = (int(s) for s in args.bucket.split("x"))
    group = Group(w, h, args.chunks)

    load_before = os.getloadavg()  # other work on the machine shows here: the figures are only as quiet as it
    work = Path(tempfile.mkdtemp(prefix="cache_io-", dir=args.dir))
    cache = work / "cache"
    try:
        results = {"write": _repeat(lambda: bench_write(cache, args, group), 1)}
        dims = replace(SDXL_DIMS, variants=args.variants)
        t_fin, _ = _timed(lambda: finalise(cache, config={"bench": True}, dims=dims, uncond=None))
        t_ids, ids = _timed(lambda: completed_ids(cache))
        shards = list_groups(cache)[group]
        paths = [s.path for s in shards]
        k, drop = args.repeats, lambda: _drop_page_cache(paths)
        results["read_sequential_warm"] = _repeat(lambda: bench_sequential(paths, args.batch), k)
        rand = {"batch": args.batch, "batches": args.batches, "seed": args.seed, "flip": args.flip}
        pairs = [(s.path, s.rows) for s in shards]
        results["read_random_warm"] = _repeat(lambda: bench_random(pairs, **rand, threads=True), k)
        results["read_random_warm_1thread"] = _repeat(lambda: bench_random(pairs, **rand, threads=False), k)
        results["read_random_cold"] = _repeat(lambda: bench_random(pairs, **rand, threads=True), k, before=drop)
        results["read_sequential_cold"] = _repeat(lambda: bench_sequential(paths, args.batch), k, before=drop)
        t_verify, report = _timed(lambda: verify(cache))
        assert report.ok and len(ids) == args.samples, report.problems
        results["finalise_s"], results["completed_ids_s"], results["verify_s"] = t_fin, t_ids, t_verify
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.gpu_vae:
        results["gpu_vae"] = bench_gpu_vae(args)

    bytes_per_sample = results["write"]["bytes"] / args.samples
    best_random = results["read_random_warm"]["samples_per_s"]
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "versions": {"torch": torch.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__},
        "setup": {k: str(v) for k, v in vars(args).items()},
        "bytes_per_sample": bytes_per_sample,
        "target": {"gpu_need_samples_per_s": GPU_NEED, "x_one_gpu_random_warm": best_random / GPU_NEED},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    rows = [
        (
            name, f"{r['samples_per_s']:,.0f}", f"{r['median_samples_per_s']:,.0f}", f"{r['mb_per_s']:,.0f}",
            f"{r['samples_per_s'] / GPU_NEED:,.1f}×",
        )
        for name, r in results.items()
        if isinstance(r, dict) and "samples_per_s" in r
    ]  # fmt: skip
    title = f"cache I/O: {args.samples} × {args.bucket}, {args.chunks} chunks, {bytes_per_sample / 1e6:.2f} MB/sample"
    table(title, rows, columns=("", "samples/s best", "median", "MB/s best", "best vs 16/s"))
    print(f"finalise {t_fin:.2f}s · completed_ids {t_ids:.2f}s · verify {t_verify:.2f}s → {args.out}")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "gpu_vae" in results and "images_per_s" in results["gpu_vae"]:
        print(f"VAE encode 1024² ({args.vae_dtype}): {results['gpu_vae']['images_per_s']:.1f} images/s")


if __name__ == "__main__":
    main()
