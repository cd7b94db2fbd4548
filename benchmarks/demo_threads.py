"""torch threads for the tiny demo model: 1 against 2 intra-op threads, on an idle and on a busy machine.

    python benchmarks/demo_threads.py                 # 80 VAE-fit steps and 40 tiny training updates
    python benchmarks/demo_threads.py --busy 2        # the same with 2 busy-looping processes beside it

The two pieces of `sdxl demo` that take its time: the kit's VAE fit (``models/tiny.fit_tiny_vae``,
a shortened run of its real settings) and tiny-UNet training updates (the trainer's own
forward + backward + AdamW updates of the tiny UNet on a 128² batch of 16, fp32). Each (threads, piece)
runs in a fresh process. ``--busy N`` starts N pure-Python busy loops first (the "machine shared
with other jobs" case the demo's ``--threads 1`` advice is about) and stops them after. The
1-minute load average before each run is recorded beside its wall time.

Writes docs/results/demo_threads.json (``--out``, appending one record per call) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, pathlib, sys, tempfile, time, torch
from sdxl_trainer.models import tiny, vae_fit
from sdxl_trainer.models.loading import load_pipeline_parts
threads, piece, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
parts = load_pipeline_parts(tiny.build_tiny_model(pathlib.Path(tempfile.mkdtemp()) / "m", fit_vae=False))
if piece == "vae_fit":
    t0 = time.perf_counter()
    tiny.fit_tiny_vae(parts.vae, settings=vae_fit.FitSettings(steps=steps, num_threads=threads))
else:
    unet, c = parts.unet, parts.unet.config
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    side = tiny.TINY_RESOLUTION // 8
    x = torch.randn(16, c.in_channels, side, side, generator=g)
    cond = torch.randn(16, 77, c.cross_attention_dim, generator=g)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(16, pooled, generator=g), "time_ids": torch.zeros(16, 6)}
    t0 = time.perf_counter()
    for _ in range(steps):
        unet(x, torch.full((16,), 500), cond, added_cond_kwargs=added).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _spin() -> None:
    while True:
        pass


def run_child(threads: int, piece: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), piece, str(steps)], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes beside the runs")
    ap.add_argument("--fit-steps", type=int, default=80)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/demo_threads.json")
    args = ap.parse_args()
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    rows = []
    try:
        time.sleep(2 if spinners else 0)
        for piece, steps in (("vae_fit", args.fit_steps), ("unet_updates", args.updates)):
            for threads in (1, 2):
                load = os.getloadavg()[0]
                seconds = run_child(threads, piece, steps)
                rows.append({"piece": piece, "steps": steps, "threads": threads, "busy_processes": args.busy,
                             "load_1min_before": round(load, 2), "seconds": round(seconds, 2),
                             "seconds_per_step": round(seconds / steps, 4)})  # fmt: skip
                print(f"{piece:13s} threads {threads}  busy {args.busy}  load {load:4.2f}  "
                      f"{seconds:7.2f} s  ({seconds / steps * 1000:.0f} ms/step)", flush=True)
    finally:
        for p in spinners:
            p.terminate()
    record = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}  # fmt: skip
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*old, record], indent=2) + "\n")


if __name__ == "__main__":
    main()
