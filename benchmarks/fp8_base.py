"""fp8 frozen base for LoRA (``lora.fp8_base``): rounding error, training loss against the bf16 base, bytes stored.

    python benchmarks/fp8_base.py                    # tiny model: rounding + 20 updates per base; full size on meta
    python benchmarks/fp8_base.py --steps 50 --real  # also build the full-size UNet in bf16 on the CPU (~6 GB RAM)

1. Rounding: every Linear/Conv2d weight of the tiny demo UNet (seed 0) quantised as models/fp8.py
   does (power-of-two scale per output channel), and two alternatives for comparison: the exact
   absmax/448 scale per channel, and one absmax/448 scale per tensor. Relative rms error over all
   weights (‖Ŵ − W‖/‖W‖), the largest relative error of a normal value, and the share of subnormals.
2. Training: ``loop.run`` as in tests/test_models_fp8.py — tiny model, 64 synthetic images (random
   VAE, the test kit), LoRA r4 α16 on the attention projections, flow objective, AdamW 1e-3, batch 2
   — for --steps updates with three bases: fp32, bf16 (the autocast precision; the plain LoRA path)
   and fp8. bf16 autocast for the bf16 and fp8 bases; fp32 for the fp32 base, whose difference to the
   bf16 base puts the fp8 one in proportion. The same seed, batches and noise in every run.
3. Bytes: the full-size SDXL UNet (the shipped sdxl-base-1.0 config) with a LoRA r16 on the default
   targets, built the way ``loop.build_unet`` builds it (base in bf16, adapter fp32), then
   ``store_base_fp8``: parameter bytes by dtype, on the meta device (exact: shapes × element sizes).
   With --real the same on the CPU with real tensors, counting distinct storages, plus the process's
   peak RSS — a check that the conversion really frees the 16-bit weights.

Prints a table and writes benchmarks/out/fp8_base.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer import console  # noqa: E402
from sdxl_trainer.config import StatsConfig, TrainConfig, load_config  # noqa: E402
from sdxl_trainer.demo import demo_cache_config, demo_scan_config  # noqa: E402
from sdxl_trainer.models import fp8  # noqa: E402
from sdxl_trainer.models.loading import build_sdxl_part, load_unet  # noqa: E402
from sdxl_trainer.models.lora import add_lora  # noqa: E402
from sdxl_trainer.models.tiny import build_tiny_model  # noqa: E402
from sdxl_trainer.prep import cache, scan, stats  # noqa: E402
from sdxl_trainer.synthetic import build_synthetic_dataset  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402

KIT = {"images": 64, "seed": 0, "fit_vae": False}  # the test fixtures' kit (tests/conftest.py)
MIN_NORMAL = 2.0**-6


def build_kit(root: Path) -> tuple[Path, Path]:
    """The tiny model and a cache of synthetic images under ``root``; reused when complete."""
    model, data, work, marker = root / "model", root / "data", root / "work", root / "kit.json"
    if marker.is_file() and json.loads(marker.read_text()) == KIT:
        return model, work
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    build_tiny_model(model, seed=KIT["seed"], fit_vae=KIT["fit_vae"])
    build_synthetic_dataset(data, n=KIT["images"], seed=KIT["seed"])
    scan.run(demo_scan_config(data, work, model))
    stats.run(StatsConfig(work=work, model=model, device="cpu", max_images=16))
    cache.run(demo_cache_config(work, model))
    marker.write_text(json.dumps(KIT))
    return model, work


# ── 1. rounding ─────────────────────────────────────────────────────────────────────────────────


def _scheme(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised weight, scale broadcast to w) for one scaling scheme."""
    if name == "per-channel, power of two (ours)":
        q, scale = fp8.quantize(w)
    else:
        dims = tuple(range(1, w.ndim)) if name.startswith("per-channel") else tuple(range(w.ndim))
        scale = w.abs().amax(dim=dims, keepdim=True).clamp(min=1e-30) / fp8.FP8_MAX
        q = (w / scale).to(fp8.FP8)
    return q.float() * scale, scale.expand_as(w)


def rounding(model: Path) -> dict[str, dict[str, float]]:
    weights = [m.weight.detach() for m in load_unet(model).modules() if type(m) in (nn.Linear, nn.Conv2d)]
    bf16 = [w.bfloat16().float() for w in weights]
    out = {}
    for name in ("per-channel, power of two (ours)", "per-channel, absmax/448", "per-tensor, absmax/448",
                 "per-channel, power of two, from the bf16 copy"):  # fmt: skip
        source = bf16 if name.endswith("bf16 copy") else weights
        err2 = den2 = max_rel = 0.0
        sub = total = 0
        for w, src in zip(weights, source):
            back, scale = _scheme(src, name.removesuffix(", from the bf16 copy"))
            err2 += float((back - w).pow(2).sum())
            den2 += float(w.pow(2).sum())
            normal = (src / scale).abs() >= MIN_NORMAL
            max_rel = max(max_rel, float(((back - w).abs() / w.abs())[normal].max()))
            sub += int((~normal & (w != 0)).sum())
            total += w.numel()
        out[name] = {"rms_relative": math.sqrt(err2 / den2), "max_relative_normal": max_rel,
                     "subnormal_share": sub / total}  # fmt: skip
    return out


# ── 2. training ─────────────────────────────────────────────────────────────────────────────────


def train(model: Path, work: Path, out: Path, *, base: str, steps: int) -> dict:
    cfg = load_config(TrainConfig, None, {
        "model": str(model), "work": str(work), "out": str(out), "device": "cpu",
        "precision": "fp32" if base == "fp32" else "bf16", "batch_size": 2, "num_steps": steps,
        "optimizer.learning_rate": 1e-3, "logging.every_steps": 1, "data.workers": 1, "logging.tensorboard": False,
        "lora.enabled": True, "lora.rank": 4, "lora.fp8_base": base == "fp8", "objective.name": "flow",
        "checkpoints.diffusers": False, "checkpoints.single_file": False,
    })  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = loop.run(cfg)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    adapter = load_file(Path(summary["checkpoint"]) / "trainable.safetensors")
    return {"losses": losses, "adapter": adapter, "seconds": time.perf_counter() - t0}


def compare(a: dict, b: dict) -> dict[str, float]:
    """b against a: relative loss differences per update, and the trained adapters' relative distance."""
    rel = [abs(y - x) / x for x, y in zip(a["losses"], b["losses"])]
    keys = sorted(a["adapter"])
    diff = torch.cat([(b["adapter"][k] - a["adapter"][k]).flatten() for k in keys])
    ref = torch.cat([a["adapter"][k].flatten() for k in keys])
    return {"loss_rel_mean": sum(rel) / len(rel), "loss_rel_max": max(rel), "loss_rel_last": rel[-1],
            "mean_loss_rel": abs(sum(b["losses"]) - sum(a["losses"])) / sum(a["losses"]),
            "adapter_rel": float(diff.norm() / ref.norm())}  # fmt: skip


# ── 3. bytes ────────────────────────────────────────────────────────────────────────────────────


def full_size_lora(device: str) -> nn.Module:
    """The full-size UNet as loop.build_unet holds a bf16 LoRA r16 (random weights; bf16 from the start on
    the CPU, so it never needs the fp32 model's 10 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = build_sdxl_part("unet", device=device, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(previous)
    add_lora(unet, rank=16, alpha=16.0)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def rss() -> int:
    """The process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def storage_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind the parameters: what the tensors really occupy."""
    seen = {}
    for p in module.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def bytes_full_size(real: bool) -> dict:
    unet = full_size_lora("meta")
    out = {"bf16_base": fp8.stored_bytes(unet), "fp8_base": fp8.stored_bytes(fp8.store_base_fp8(unet))}
    if real:
        t0 = time.perf_counter()
        unet = full_size_lora("cpu")
        before = storage_bytes(unet)
        rss_built, peak_built = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t1 = time.perf_counter()
        fp8.store_base_fp8(unet)
        out["real"] = {"storage_bytes_bf16_base": before, "storage_bytes_fp8_base": storage_bytes(unet),
                       "by_dtype_fp8_base": fp8.stored_bytes(unet), "rss_after_build": rss_built,
                       "rss_after_conversion": rss(),
                       "peak_rss_build": peak_built, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       "build_s": t1 - t0, "convert_s": time.perf_counter() - t1}  # fmt: skip
    return out


# ── report ──────────────────────────────────────────────────────────────────────────────────────


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="updates per training run")
    p.add_argument("--real", action="store_true", help="also build the full-size UNet on the CPU (bf16, ~6 GB)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench-fp8", help="kit folder")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console.set_quiet(True)
    model, work = build_kit(args.dir)
    result = {"rounding": rounding(model)}
    runs = {base: train(model, work, args.dir / f"run-{base}", base=base, steps=args.steps)
            for base in ("fp32", "bf16", "fp8")}  # fmt: skip
    result["training"] = {
        "steps": args.steps, "losses": {b: r["losses"] for b, r in runs.items()},
        "seconds": {b: r["seconds"] for b, r in runs.items()},
        "fp8_vs_bf16": compare(runs["bf16"], runs["fp8"]), "bf16_vs_fp32": compare(runs["fp32"], runs["bf16"]),
    }  # fmt: skip
    result["full_size_bytes"] = bytes_full_size(args.real)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "commit": commit.stdout.strip(),
                         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
                         "command": " ".join(sys.argv)}  # fmt: skip
    report(result)
    path = ROOT / "benchmarks" / "out" / "fp8_base.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwritten {path.relative_to(ROOT)}")


def report(r: dict) -> None:
    print("rounding, tiny UNet weights          rms rel.   max rel. (normal)   subnormal share")
    for name, x in r["rounding"].items():
        print(f"  {name:<44} {x['rms_relative']:.4f}     {x['max_relative_normal']:.4f}            "
              f"{x['subnormal_share']:.2e}")  # fmt: skip
    t = r["training"]
    print(f"\ntraining, {t['steps']} updates: loss mean over updates "
          + ", ".join(f"{b} base {sum(v) / len(v):.5f}" for b, v in t["losses"].items()))
    for pair in ("fp8_vs_bf16", "bf16_vs_fp32"):
        c = t[pair]
        print(f"  {pair}: per-update loss rel. diff mean {c['loss_rel_mean']:.4f}, max {c['loss_rel_max']:.4f}, "
              f"last {c['loss_rel_last']:.4f}; mean loss {c['mean_loss_rel']:.4f}; adapter {c['adapter_rel']:.4f}")
    b = r["full_size_bytes"]
    print("\nfull-size SDXL UNet + LoRA r16, parameter bytes (GB = 1e9 B) by dtype")
    for name in ("bf16_base", "fp8_base"):
        print(f"  {name}: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in b[name].items())
              + f"; total {sum(b[name].values()) / 1e9:.3f}")  # fmt: skip
    if "real" in b:
        x = b["real"]
        print(f"  real tensors: storages {x['storage_bytes_bf16_base'] / 1e9:.3f} → {x['storage_bytes_fp8_base'] / 1e9:.3f}"
              f" GB; RSS {x['rss_after_build'] / 1e9:.2f} GB built, {x['rss_after_conversion'] / 1e9:.2f} GB converted"
              f" (peak {x['peak_rss_build'] / 1e9:.2f} by the build, {x['peak_rss'] / 1e9:.2f} in all); build {x['build_s']:.0f} s, conversion {x['convert_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
