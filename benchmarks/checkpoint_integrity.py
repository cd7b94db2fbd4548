"""What the checkpoint integrity checks cost (docs/reliability.md): hashing files and the finite check.

    python benchmarks/checkpoint_integrity.py              # 10 MB and 256 MB files, 64 MB of tensors
    python benchmarks/checkpoint_integrity.py --mb 10 1024 --tensor-mb 256

Files are hashed warm (just written: in the page cache), which is the case when a checkpoint is
hashed right after writing it; a resume reading a cold file is bound by the disk as well. Prints a
table and writes benchmarks/out/checkpoint_integrity.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer.train.checksums import file_digest  # noqa: E402
from sdxl_trainer.train.integrity import all_finite  # noqa: E402


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _hash_with(path: Path, name: str) -> str:
    h = hashlib.new(name)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[10, 256], help="file sizes to hash (MB)")
    ap.add_argument("--tensor-mb", type=int, default=64, help="fp32 tensors for the finite check (MB)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            path = Path(tmp) / f"{mb}.bin"
            path.write_bytes(os.urandom(mb << 20))
            for name in ("sha256", "blake2b"):
                fn = (lambda: file_digest(path)) if name == "sha256" else (lambda: _hash_with(path, name))
                s = _best(fn)
                rows.append({"what": f"{name} of a {mb} MB file (warm)", "seconds": s, "MB_per_s": mb / s})
            path.unlink()
    n = args.tensor_mb << 18  # fp32 elements
    tensors = list(torch.randn(n).split(n // 1000))  # ~1000 tensors, like a UNet's parameter list
    s = _best(lambda: all_finite(tensors))
    rows.append({"what": f"all_finite over {args.tensor_mb} MB fp32 in {len(tensors)} tensors (CPU)", "seconds": s,
                 "MB_per_s": args.tensor_mb / s})  # fmt: skip
    for r in rows:
        print(f"{r['what']:<60} {r['seconds'] * 1e3:9.1f} ms {r['MB_per_s']:9.0f} MB/s")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "command": " ".join(["python", *sys.argv]), "rows": rows}  # fmt: skip
    (out / "checkpoint_integrity.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
