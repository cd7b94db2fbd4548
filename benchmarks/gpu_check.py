"""One GPU check: the figures a single H100/H200 answers in under 8 minutes, in one JSON.

    python benchmarks/gpu_check.py                 # on the GPU (benchmarks/gpu_check.sh sets it up)
    python benchmarks/gpu_check.py --dry-run       # any machine: every code path on the CPU, tiny UNet

Parts, each recorded on its own (a part that fails records its error, the others still run, and
the exit status is 1 when any part failed — never a quiet success):

1. environment: torch, CUDA, device name, package versions; preflight refuses to start without CUDA.
2. attention: which scaled-dot-product kernel the UNet's attention actually runs (the aten op seen
   by the profiler in one forward: flash, memory-efficient, cuDNN or math).
3. bf16 vs fp32: the same fixed batch, level and noise through ``TrainStep.loss`` in fp32 and under
   bf16 autocast; the relative difference of the losses and of the UNet outputs.
4. LoRA r16 peak memory, batch 1 at 1024²: ``torch.cuda.max_memory_allocated`` over two updates, with
   the bf16 base and the fp8 base (``lora.fp8_base``), gradient checkpointing on.
5. full finetune throughput at 1024², bf16 autocast, fp32 masters, AdamW: samples/s at the largest
   batch that fits (from --batch, halved on out-of-memory), checkpointing off/on × compile off/on,
   and FLOP utilisation from the counted FLOPs (train_gpu.py does the measuring).

The dry run uses the tiny demo UNet at 128² on the CPU with compile off: its figures test the code,
not a GPU. Writes benchmarks/out/gpu_check.json (dry run: gpu_check_dryrun.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import memory_full  # noqa: E402
import train_gpu  # noqa: E402
from sdxl_trainer.dist import DistInfo  # noqa: E402
from sdxl_trainer.models import tiny  # noqa: E402
from sdxl_trainer.models.loading import read_part_config  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402
from sdxl_trainer.train.state import TrainState  # noqa: E402

SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
            "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
            "_scaled_dot_product_attention_math": "math"}  # fmt: skip
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env = {"python": platform.python_version(), "versions": versions, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, memory_gb=props.total_memory / 1e9, capability=f"{props.major}.{props.minor}")
    return env


def build(unet_config: dict, overrides: dict[str, Any], device: torch.device, *, ckpt: bool):
    """The trainer's own pieces (as memory_full.measure builds them), on ``device``."""
    cfg = memory_full.train_config({**overrides, "device": device.type}, ckpt=ckpt)
    with mock.patch.object(loop, "load_unet", memory_full.random_unet_loader(unet_config)):
        unet = loop.build_unet(cfg, device)
    model = loop.wrap_model(unet, cfg, DistInfo(), device)
    optimizer = loop.make_optimizer(cfg, unet)
    return cfg, unet, model, optimizer, loop.make_step(cfg, device, DistInfo())


def attention_backend(unet_config: dict, device: torch.device, *, resolution: int) -> dict[str, Any]:
    """The SDPA kernels one bf16 forward runs, read off the profiler's aten ops."""
    from torch.profiler import ProfilerActivity, profile

    _, unet, _, _, step = build(unet_config, {}, device, ckpt=False)
    batch = step.to_device(train_gpu.make_batch(unet_config, batch=1, resolution=resolution, chunks=1))
    t = torch.full((1,), 500, device=device)
    added = {"text_embeds": batch["text_pooled"].float(), "time_ids": batch["time_ids"]}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), step.autocast(), profile(activities=activities) as prof:
        unet(batch["latents"], t, encoder_hidden_states=batch["text_hidden"].float(), added_cond_kwargs=added)
    seen: dict[str, int] = {}
    for event in prof.events():
        op = event.name.removeprefix("aten::")
        if op in SDPA_OPS:
            seen[SDPA_OPS[op]] = seen.get(SDPA_OPS[op], 0) + 1
    return {"kernels": seen, "used": max(seen, key=seen.get) if seen else "none found"}


def bf16_vs_fp32(unet_config: dict, device: torch.device, *, resolution: int) -> dict[str, Any]:
    """One fixed batch, level and noise: the loss in fp32 and under bf16 autocast, same weights."""
    _, unet, model, _, step32 = build(unet_config, {"precision": "fp32"}, device, ckpt=False)
    step16 = loop.make_step(memory_full.train_config({"device": device.type, "precision": "bf16"}, ckpt=False),
                            device, DistInfo())  # fmt: skip
    batch = train_gpu.make_batch(unet_config, batch=2, resolution=resolution, chunks=1)
    losses, outputs = {}, {}
    for name, step in (("fp32", step32), ("bf16", step16)):
        generator = torch.Generator(device).manual_seed(0)
        captured = []
        hook = unet.register_forward_hook(lambda m, a, out: captured.append(out[0].detach().float()))
        with torch.no_grad():
            losses[name] = float(step.loss(model, batch, generator=generator))
        hook.remove()
        outputs[name] = captured[0]
    diff = (outputs["bf16"] - outputs["fp32"]).norm() / outputs["fp32"].norm()
    return {"loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"],
            "loss_relative_difference": abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"]),
            "output_relative_difference": float(diff)}  # fmt: skip


def peak_memory(unet_config: dict, device: torch.device, *, resolution: int, names: tuple[str, ...]) -> dict[str, Any]:
    """Peak allocated memory of two updates at batch 1, checkpointing on, per memory_full configuration
    (LoRA r16 with the bf16 and fp8 bases; the full finetune with both savers and Adafactor)."""
    out: dict[str, Any] = {}
    for name in names:
        why = memory_full.available(name)
        if why:
            out[name] = {"error": why}
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        _, _, model, optimizer, step = build(unet_config, memory_full.CONFIGS[name], device, ckpt=True)
        batch = train_gpu.make_batch(unet_config, batch=1, resolution=resolution, chunks=1)
        generator, state = torch.Generator(device).manual_seed(0), TrainState()
        t0 = time.perf_counter()
        for _ in range(2):
            result = step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)
        out[name] = {"s_per_update": (time.perf_counter() - t0) / 2, "loss": float(result.loss),
                     "skipped": state.skipped}  # fmt: skip
        if device.type == "cuda":
            out[name]["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            out[name]["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        del model, optimizer, step
    return out


def throughput(unet_config: dict, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    ns = argparse.Namespace(configs="full-adamw", checkpointing=args.checkpointing, compile=args.compile,
                            compile_mode="default", batch=args.batch, chunks=1, resolution=args.resolution,
                            objective="v_ztsnr", warmup=args.warmup, steps=args.steps)  # fmt: skip
    flops = train_gpu.flops_by_kind(unet_config, resolution=args.resolution, chunks=1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = train_gpu.peak_tflops(name, None)
    runs = train_gpu.run_all(unet_config, device=device, flops=flops, peak=peak, args=ns)
    return {"flops_per_sample": flops, "peak_bf16_tflops": peak, "runs": runs,
            "target_samples_per_s": train_gpu.TARGET_FULL_SAMPLES_S}  # fmt: skip


def run_part(doc: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        doc[name] = fn()
        status = "ok"
    except Exception as e:  # noqa: BLE001 — recorded, and the exit status says so
        doc[name] = {"error": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-2000:]}
        status = f"FAILED ({type(e).__name__}: {str(e)[:200]})"
    doc.setdefault("seconds", {})[name] = time.perf_counter() - t0
    print(f"[gpu_check] {name}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny UNet: checks the code paths, measures no GPU")
    ap.add_argument("--batch", type=int, default=16, help="full finetune batch to start from (halved on OOM)")
    ap.add_argument("--checkpointing", default="off,on", choices=("off", "on", "off,on"))
    ap.add_argument("--compile", default="off,on", choices=("off", "on", "off,on"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.resolution = tiny.TINY_RESOLUTION if args.dry_run else 1024
    if args.dry_run:
        args.batch, args.compile, args.warmup, args.steps = 2, "off", 1, 1
    args.out = args.out or ROOT / "benchmarks/out" / ("gpu_check_dryrun.json" if args.dry_run else "gpu_check.json")
    return args


def main() -> int:
    args = parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); run with --dry-run to check the "
              "code on a CPU, or install a CUDA build of torch (benchmarks/gpu_check.sh does)", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)  # tiny model: more threads only thrash on a busy machine
    unet_config = tiny.unet_config() if args.dry_run else read_part_config("unet")
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(["python", *sys.argv]), "dry_run": args.dry_run,
                           "resolution": args.resolution}  # fmt: skip
    started = time.perf_counter()
    run_part(doc, "environment", lambda: environment(device))
    run_part(doc, "attention", lambda: attention_backend(unet_config, device, resolution=args.resolution))
    run_part(doc, "bf16_vs_fp32", lambda: bf16_vs_fp32(unet_config, device, resolution=args.resolution))
    run_part(doc, "lora_peak_memory", lambda: peak_memory(unet_config, device, resolution=args.resolution,
                                                          names=("lora-r16-bf16", "lora-r16-fp8")))  # fmt: skip
    run_part(doc, "full_savers_peak_memory", lambda: peak_memory(unet_config, device, resolution=args.resolution,
                                                                 names=("full-adafactor-fused-bf16sr",)))  # fmt: skip
    run_part(doc, "full_finetune_throughput", lambda: throughput(unet_config, device, args))
    doc["total_s"] = time.perf_counter() - started
    failed = [k for k, v in doc.items() if isinstance(v, dict) and "error" in v]
    failed += [f"{part}/{k}" for part in ("lora_peak_memory", "full_savers_peak_memory")
               for k, v in doc.get(part, {}).items() if isinstance(v, dict) and "error" in v]  # fmt: skip
    failed += [f"run {r['config']} ckpt={r['checkpointing']} compile={r['compile']}"
               for r in doc.get("full_finetune_throughput", {}).get("runs", []) if "error" in r]  # fmt: skip
    doc["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"[gpu_check] {'FAILED: ' + ', '.join(failed) if failed else 'all parts ok'} in {doc['total_s']:.0f} s "
          f"→ {args.out}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
