"""Full-size SDXL VAE decoder finetuning, measured on this CPU: wall time and peak memory per update.

    python benchmarks/vae_full.py                         # fp32, then bf16 autocast; 512² crop, batch 1, 2 updates
    python benchmarks/vae_full.py --precisions fp32 --updates 1 --crop 256

The VAE is SDXL base 1.0's architecture from the shipped config (``sdxl_trainer/models/configs``)
with random weights — the cost does not depend on the values. Each precision runs in its own
process through `sdxl train-vae`'s own pieces: ``loop.build_vae`` (encoder frozen, decoder
trainable; its ``load_vae`` swapped for the random full-size VAE), AdamW over ``param_groups`` as
``loop.run`` builds it, ``make_loss`` (L1 + 0.2·(1 − MS-SSIM) at crops ≥ 161 px) and ``loop.update``
(encode under no_grad → posterior sample → decode under the precision's autocast → loss → backward →
clip → step). Reported per update: wall time, and the process's peak resident set (VmHWM, reset just
before the first update; ``rss_before_gb`` is the resident set then: weights built, no optimiser
state yet). The first update also creates AdamW's two moment buffers; later updates are the steady
state. Results are merged into docs/results/vae_full.json (``--out``; one record per precision and
crop, each with its date, command and the load average at its end) with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
GB = 1e9


def _vm_gb(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / GB
    return None


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def child(precision: str, crop: int, updates: int) -> dict:
    """One precision in this process: build, then ``updates`` timed calls of ``loop.update``."""
    import torch

    from sdxl_trainer.config import VaeTrainConfig, load_config
    from sdxl_trainer.models.loading import build_sdxl_part
    from sdxl_trainer.train.optim import build_optimizer, param_groups
    from sdxl_trainer.train.state import TrainState
    from sdxl_trainer.vae_train import loop
    from sdxl_trainer.vae_train.quality import make_loss

    torch.manual_seed(0)
    cfg = load_config(VaeTrainConfig, None, {"model": "unused", "work": "unused", "out": "unused", "device": "cpu",
                                             "precision": precision, "crop": crop, "batch_size": 1})  # fmt: skip
    full = build_sdxl_part("vae", device="cpu")  # random weights, SDXL base 1.0's architecture
    with mock.patch.object(loop, "load_vae", lambda *a, **k: full):
        vae = loop.build_vae(cfg, torch.device("cpu"))
    params = [p for p in vae.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = build_optimizer(param_groups(unet=vae, lr=o.learning_rate, weight_decay=o.weight_decay, name="decoder"),
                                name=o.name, lr=o.learning_rate, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                fused_backward_pass=False, bf16_weights=False, seed=0)  # fmt: skip
    parts = {"state": TrainState(), "optimizer": optimizer, "ema": None}
    loss_fn, loss_name = make_loss(crop=crop, l1_weight=cfg.loss.l1_weight, ssim_weight=cfg.loss.ssim_weight)
    crops = torch.rand(1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    autocast = torch.bfloat16 if precision == "bf16" else None
    rss_before = _vm_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    times, results = [], []
    for i in range(updates):
        t0 = time.perf_counter()
        results.append(loop.update(vae, crops, loss_fn=loss_fn, parts=parts, cfg=cfg, params=params,
                                   generator=torch.Generator().manual_seed(i), autocast=autocast))  # fmt: skip
        times.append(time.perf_counter() - t0)
        print(f"{precision}: update {i + 1}/{updates} {times[-1]:.1f} s, peak RSS {_vm_gb('VmHWM'):.2f} GB", flush=True)
    counts = {side: sum(p.numel() for n, p in vae.named_parameters() if n.startswith(side))
              for side in ("encoder.", "quant_conv.", "post_quant_conv.", "decoder.")}  # fmt: skip
    return {"precision": precision, "crop": crop, "batch_size": 1, "updates": updates, "update_s": times,
            "peak_rss_gb": _vm_gb("VmHWM"), "rss_before_gb": rss_before, "loss": loss_name,
            "losses": [r["loss"] for r in results], "skipped": [r["skipped"] for r in results],
            "trained_params": sum(p.numel() for p in params), "params_by_side": counts,
            "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (CPU autocast)")
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "vae_full.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.crop, args.updates)), flush=True)
        return
    import torch

    records = []
    for precision in args.precisions.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", precision, "--crop", str(args.crop), "--updates",
                               str(args.updates)], capture_output=True, text=True)  # fmt: skip
        sys.stdout.write(proc.stdout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            records.append({"precision": precision, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            records.append(json.loads(line.removeprefix("RESULT ")))
    load = os.getloadavg()[0]
    command = " ".join(["python", *sys.argv])
    for r in records:
        r.update(date=dt.date.today().isoformat(), command=command, load_average_1min_at_end=round(load, 2))
    # merged into the file: one record per precision@crop, the newest run's
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged = {f"{r['precision']}@{r.get('crop', args.crop)}": r for r in old.get("records", [])}
    merged.update({f"{r['precision']}@{args.crop}": r for r in records})
    doc = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE")
                       * os.sysconf("SC_PHYS_PAGES") / GB, 1), "platform": platform.platform()},
           "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "records": list(merged.values())}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in records:
        if "error" in r:
            print(f"{r['precision']}: failed: {r['error']}")
        else:
            print(f"{r['precision']}: {', '.join(f'{t:.1f}' for t in r['update_s'])} s per update, "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB (before {r['rss_before_gb']:.2f} GB)")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
