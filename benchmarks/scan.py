"""`sdxl prep scan` throughput: images/s with the full decode check (default) and header-only (--fast).

    python benchmarks/scan.py                       # 5000 one-megapixel JPEGs + 100 PNGs, 2 runs each
    python benchmarks/scan.py --jpegs 1000 --pngs 20 --repeats 1 --workers 2
    python benchmarks/scan.py --target-only --repeats 5   # just the JPEG full-decode runs

The images are generated once into --data (default: $TMPDIR/sdxl-bench-scan) and reused by later
runs: photo-like content (colour gradients, blotches, grain) at JPEG quality 90, sizes around
1 MP in the SDXL bucket aspect ratios, each with a tag sidecar. Every run scans into a fresh work
folder, so nothing is reused from a previous manifest. Two data sets: the JPEGs alone (the
GUIDE.md target: ≥ 500 images/s on 2 cores with the full decode) and JPEGs + PNGs (RGBA, flat art).
The files sit in the page cache (just written or read): this measures decode + hash, not the disk.
Prints a table and writes benchmarks/out/scan.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer import console  # noqa: E402
from sdxl_trainer.config import ScanConfig  # noqa: E402
from sdxl_trainer.prep import scan  # noqa: E402

SIZES = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]
TAGS = ["1girl", "solo", "outdoors", "sky", "cloud", "tree", "smile", "long hair", "red eyes", "city"]
TARGET = 500.0  # images/s, default mode, 2 cores (GUIDE.md)
GENERATOR_VERSION = 2  # bump when the generated pixels change
GRAIN_SIGMA = 6.0  # sets the JPEG size: ~0.25 MB per megapixel at quality 90


_GRAIN: dict[int, np.ndarray] = {}


def _grain(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    # One grain field per process, cropped at a random offset: drawing 3 M normals per image is
    # what made generation slow.
    if 0 not in _GRAIN:
        _GRAIN[0] = np.random.default_rng(0).normal(0, GRAIN_SIGMA, (1600, 1600, 3)).astype(np.float32)
    g = _GRAIN[0]
    y0, x0 = rng.integers(0, g.shape[0] - h + 1), rng.integers(0, g.shape[1] - w + 1)
    return g[y0 : y0 + h, x0 : x0 + w]


def _photo(seed: int, size: tuple[int, int], *, grain: bool = True) -> Image.Image:
    """Photo-like pixels: gradients + soft blotches + grain, for realistic JPEG sizes (~0.25 MB/MP at q90).
    Without grain it is more like flat digital art, which is what PNGs usually hold."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    t = (x / w * rng.uniform(0.2, 1) + y / h * rng.uniform(0.2, 1))[..., None] / 2
    base = c0 * (1 - t) + c1 * t
    blotch = Image.fromarray(rng.integers(0, 255, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8))
    blotch = np.asarray(blotch.resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = base * 0.5 + blotch * 0.5
    if grain:
        pixels = pixels + _grain(rng, w, h)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _make(args: tuple[Path, int, str]) -> None:
    folder, i, kind = args
    size = SIZES[i % len(SIZES)]
    im = _photo(i, size, grain=kind != "png")
    stem = folder / kind / f"{i:05d}"
    if kind == "png":
        im.putalpha(255)  # RGBA, so the alpha path is part of the measurement
        im.save(f"{stem}.png", compress_level=6)
    else:
        im.save(f"{stem}.jpg", quality=90)
    rng = np.random.default_rng(i)
    stem.with_suffix(".txt").write_text(", ".join(rng.choice(TAGS, size=4, replace=False)))


def generate(folder: Path, *, jpegs: int, pngs: int, workers: int) -> None:
    """Fill folder/jpg and folder/png, each kept when a stamp says it already holds what is asked."""
    jobs = []
    for kind, n, first in (("jpg", jpegs, 0), ("png", pngs, jpegs)):
        sub, stamp = folder / kind, folder / kind / f".complete-{n}-{GENERATOR_VERSION}"
        if stamp.is_file():
            print(f"reusing {n} {kind} files in {sub}")
            continue
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
        jobs += [(folder, first + i, kind) for i in range(n)]
    if jobs:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in console.track(pool.imap_unordered(_make, jobs, chunksize=16), "generating", len(jobs), "img"):
                pass
    for kind, n in (("jpg", jpegs), ("png", pngs)):
        (folder / kind / f".complete-{n}-{GENERATOR_VERSION}").touch()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _mean_kb(folder: Path, pattern: str) -> float:
    sizes = [f.stat().st_size for f in folder.glob(pattern)]
    return sum(sizes) / max(1, len(sizes)) / 1e3


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(folder: Path, *, fast: bool, workers: int, repeats: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(prefix="sdxl-bench-scan-work-"))
        cpu0 = _cpu_seconds()
        try:
            console.set_quiet(True)
            summary = scan.run(ScanConfig(data_dir=folder, out=work, fast=fast, workers=workers))
        finally:
            console.set_quiet(False)
            shutil.rmtree(work, ignore_errors=True)
        cpu = _cpu_seconds() - cpu0
        run = {k: summary[k] for k in ("files_found", "ok", "read", "seconds", "probe_seconds", "images_per_second",
                                       "workers")}  # fmt: skip
        run["end_to_end_images_per_second"] = round(summary["files_found"] / summary["seconds"], 1)
        # CPU time of this process and its (finished) workers: what the scan costs, whatever else
        # the machine was running. files / CPU-seconds × cores is the rate on idle cores, if it scales.
        run["cpu_seconds"] = round(cpu, 2)
        run["cpu_ms_per_image"] = round(1000 * cpu / summary["files_found"], 3)
        runs.append(run)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpegs", type=int, default=5000)
    p.add_argument("--pngs", type=int, default=100)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench-scan")
    p.add_argument("--workers", type=int, default=0, help="scan processes (0 = all cores)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--target-only", action="store_true", help="only the JPEG full-decode runs (the GUIDE.md target)")
    args = p.parse_args()
    workers = scan.worker_count(args.workers)
    generate(args.data, jpegs=args.jpegs, pngs=args.pngs, workers=workers)
    size_mb = sum(f.stat().st_size for f in args.data.rglob("*") if f.is_file()) / 1e6
    jpeg_kb, png_kb = (_mean_kb(args.data / kind, f"*.{kind}") for kind in ("jpg", "png"))
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {}
    for data_label, folder in (("JPEG", args.data / "jpg"), ("JPEG+PNG", args.data))[: 1 if args.target_only else 2]:
        for mode, fast in (("full decode", False), ("--fast", True))[: 1 if args.target_only else 2]:
            results[f"{data_label}, {mode}"] = measure(folder, fast=fast, workers=args.workers, repeats=args.repeats)
    best = {m: max(r["images_per_second"] for r in runs) for m, runs in results.items()}
    cpu_ms = {m: min(r["cpu_ms_per_image"] for r in runs) for m, runs in results.items()}
    idle_rate = {m: round(workers * 1000 / ms, 1) for m, ms in cpu_ms.items()}
    rows = [(m, runs[0]["files_found"], f"{best[m]:,.1f}",
             f"{max(r['end_to_end_images_per_second'] for r in runs):,.1f}", f"{cpu_ms[m]:.2f}",
             f"{idle_rate[m]:,.0f}", ", ".join(f"{r['seconds']:.2f}" for r in runs)) for m, runs in results.items()]
    console.table(f"prep scan: {args.jpegs} JPEGs ({jpeg_kb:.0f} kB) + {args.pngs} PNGs ({png_kb:.0f} kB), "
                  f"{workers} workers, {_cpu_name()}, load {load_before[0]:.1f}", rows,
                  columns=("data, mode", "files", "img/s", "end-to-end", "CPU ms/img", "idle-core img/s",
                           "run s"))  # fmt: skip
    console.info("img/s: files checked per wall second (best run); end-to-end includes the folder walk and "
                 f"writing; idle-core img/s = {workers} / CPU seconds per image (what idle cores would give)")
    doc = {
        "benchmark": "prep scan",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": _cpu_name(), "cores_usable": scan.worker_count(0), "platform": platform.platform(),
                    "python": platform.python_version(), "pillow": PIL.__version__,
                    "libjpeg_turbo": features.version("libjpeg_turbo")},
        "data": {"folder": str(args.data), "jpegs": args.jpegs, "pngs": args.pngs, "megabytes": round(size_mb, 1),
                 "jpeg_kb_mean": round(jpeg_kb, 1), "png_kb_mean": round(png_kb, 1)},
        "load_average_before": load_before,
        "workers": workers,
        "target_images_per_second": TARGET,
        "best_images_per_second": best,
        "cpu_ms_per_image": cpu_ms,
        "images_per_second_on_idle_cores_from_cpu_time": idle_rate,
        "load_average_after": os.getloadavg(),
        "runs": results,
    }
    out = ROOT / "benchmarks" / "out" / "scan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
