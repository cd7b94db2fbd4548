"""torch.compile through the trainer: compile time of regional (per transformer block) vs whole-UNet compile.

    python benchmarks/compile_time.py                          # tiny demo UNet, 128², eager/blocks/model
    python benchmarks/compile_time.py --model sdxl --resolution 256 --scopes eager,blocks   # full-size UNet
    python benchmarks/compile_time.py --backend aot_eager      # dynamo + AOT autograd only, no inductor

Each scope runs in a process of its own with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in a
fresh temporary folder, FX-graph and AOT-autograd caches off), so every figure is a cold compile, as
a user's first run sees it. The UNet goes through the trainer's own pieces: ``loop.build_unet``,
``loop.wrap_model`` (which compiles as ``compile_scope`` says), ``loop.make_optimizer``,
``loop.make_step``, and every update is ``TrainStep.update`` (fp32 on the CPU, AdamW, batch 2).

The updates, all with the same seed: ``--updates`` on a square bucket (the first one waits for the
compile; the rest give the steady update time), then two on a non-square bucket (the first of them
recompiles with the changed dimensions symbolic — PyTorch's automatic dynamic shapes), then one on a
third bucket, which must reuse that graph. Reported per scope: the first update's seconds
(compile + one update), the steady update's median, the seconds added by the bucket change, the
compiled graphs (dynamo's ``unique_graphs`` counter) after each phase, and the losses, whose
relative difference from eager shows the compiled graphs compute the same update.

Writes docs/results/compile_time.json (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_full  # noqa: E402
import train_gpu  # noqa: E402
from sdxl_trainer.dist import DistInfo  # noqa: E402
from sdxl_trainer.models import tiny  # noqa: E402
from sdxl_trainer.models.loading import read_part_config  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402
from sdxl_trainer.train.state import TrainState  # noqa: E402

SCOPES = ("eager", "blocks", "model")


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(height, width): the square bucket, then a wide and a tall one (sides multiples of 64, as the
    UNet's three downsamplings need)."""
    wide = (max(64, resolution * 3 // 4 // 64 * 64), -(-resolution * 5 // 4 // 64) * 64)
    tall = (wide[1], wide[0])
    return [(resolution, resolution), wide, tall]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One scope, measured in this (fresh) process."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # never fall back to eager silently inside the benchmark
    unet_config = tiny.unet_config() if args.model == "tiny" else read_part_config("unet")
    compiled = args.child != "eager"
    overrides = {"precision": "fp32", "batch_size": args.batch, "optimizer.learning_rate": 1e-4,
                 "compile": compiled, **({"compile_scope": args.child} if compiled else {})}  # fmt: skip
    cfg = memory_full.train_config(overrides, ckpt=False)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    with mock.patch.object(loop, "load_unet", train_gpu.random_unet_loader(unet_config)):
        torch.manual_seed(0)
        unet = loop.build_unet(cfg, device)
    model = loop.wrap_model(unet, cfg, DistInfo(), device)
    if compiled and args.backend != "inductor":  # re-wrap with the asked backend, same scope
        from sdxl_trainer.train.compile import repeated_blocks

        if args.child == "model":
            model = torch.compile(unet, backend=args.backend, dynamic=None)
        else:
            for block in repeated_blocks(unet):
                block.compile(backend=args.backend, dynamic=None, fullgraph=True)
    optimizer = loop.make_optimizer(cfg, unet)
    step = loop.make_step(cfg, device, DistInfo())
    build_s = time.perf_counter() - t0
    generator, state = torch.Generator(device).manual_seed(0), TrainState()
    height, width = buckets(args.resolution)[0]
    square = train_gpu.make_batch(unet_config, batch=args.batch, resolution=height, chunks=1, width=width)

    def update(batch: dict[str, Any]) -> tuple[float, float]:
        t = time.perf_counter()
        result = step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)
        loss = float(result.loss)
        return time.perf_counter() - t, loss

    times, losses, graphs = [], [], {}
    start_graphs = counters["stats"]["unique_graphs"]
    for _ in range(args.updates):
        s, loss = update(square)
        times.append(s)
        losses.append(loss)
    graphs["square"] = counters["stats"]["unique_graphs"] - start_graphs
    bucket_times = []
    for h, w in buckets(args.resolution)[1:2] * 2 + buckets(args.resolution)[2:]:
        s, loss = update(train_gpu.make_batch(unet_config, batch=args.batch, resolution=h, chunks=1, width=w))
        bucket_times.append(s)
        losses.append(loss)
        graphs[f"after {h}x{w}"] = counters["stats"]["unique_graphs"] - start_graphs
    steady = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    return {"scope": args.child, "backend": args.backend if compiled else None, "build_s": build_s,
            "first_update_s": times[0], "steady_update_s": steady, "compile_s": times[0] - steady,
            "bucket_change_s": bucket_times[0] - statistics.median(bucket_times[1:2]),
            "third_bucket_update_s": bucket_times[2], "update_s": times, "bucket_update_s": bucket_times,
            "graphs": graphs, "losses": losses}  # fmt: skip


def run_child(scope: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdxl-compile-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
        cmd = [sys.executable, __file__, "--child", scope, "--model", args.model, "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--updates", str(args.updates), "--threads", str(args.threads),
               "--backend", args.backend]  # fmt: skip
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        wall = time.perf_counter() - t
    lines = [x for x in done.stdout.splitlines() if x.startswith("RECORD ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{scope}: the measuring process failed (exit {done.returncode}): {tail}")
    return {**json.loads(lines[-1][len("RECORD "):]), "process_wall_s": wall}


def table(records: dict[str, dict[str, Any]]) -> str:
    eager = records.get("eager", {}).get("losses")
    lines = ["| scope | first update s | steady update s | compile s (first − steady) | bucket change s "
             "| graphs: square / +bucket / +3rd | loss vs eager (max rel.) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for scope, r in records.items():
        g = list(r["graphs"].values())
        rel = "–" if not eager or scope == "eager" else f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], eager)):.1e}"
        lines.append(f"| {scope} | {r['first_update_s']:.2f} | {r['steady_update_s']:.3f} | **{r['compile_s']:.1f}** | "
                     f"{r['bucket_change_s']:.1f} | {g[0]} / {g[1]} / {g[-1]} | {rel} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "sdxl"), default="tiny")
    ap.add_argument("--resolution", type=int, default=tiny.TINY_RESOLUTION, help="square bucket's side (px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--updates", type=int, default=6, help="updates on the square bucket (first = compile)")
    ap.add_argument("--scopes", default=",".join(SCOPES))
    ap.add_argument("--backend", default="inductor", help="inductor (what the trainer uses) or aot_eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/compile_time.json")
    ap.add_argument("--child", choices=SCOPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RECORD " + json.dumps(child(args)), flush=True)
        return
    scopes = [s.strip() for s in args.scopes.split(",")]
    if unknown := [s for s in scopes if s not in SCOPES]:
        raise SystemExit(f"unknown scope(s) {unknown}: choose from {', '.join(SCOPES)}")
    records = {}
    for scope in scopes:
        records[scope] = run_child(scope, args)
        r = records[scope]
        print(f"{scope}: first update {r['first_update_s']:.1f} s, steady {r['steady_update_s']:.3f} s, "
              f"graphs {r['graphs']}", flush=True)  # fmt: skip
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
           "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "platform": platform.platform(), "commit": memory_full._commit(),
           "model": args.model, "resolution": args.resolution, "batch": args.batch, "buckets": buckets(args.resolution),
           "records": records}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
