"""Full-size SDXL UNet training on one GPU: samples/s, FLOP utilisation and peak memory per configuration.

    python benchmarks/train_gpu.py                                  # every configuration that fits
    python benchmarks/train_gpu.py --configs full-adamw,lora-r16 --checkpointing on --compile off,on
    python benchmarks/train_gpu.py --batch 16 --chunks 3 --peak-tflops 989
    python benchmarks/train_gpu.py --dry-run                        # no GPU: the CPU-side logic (below)

The UNet is SDXL base 1.0's architecture from the shipped config with random weights, trained at
1024² (latents 4×128×128, text 77×2048 per chunk, pooled 1280, six time ids) under bf16 autocast
with fp32 master weights. Configurations: full finetune with AdamW, Adafactor and (when bitsandbytes
is importable) 8-bit AdamW at --batch (halved on out-of-memory until it fits), and LoRA rank 16
at batch 1 — each with and without gradient checkpointing and torch.compile.

It measures our trainer, not a separate script: the UNet goes through ``loop.build_unet`` (LoRA,
checkpointing) and ``loop.wrap_model`` (compile), the optimiser through ``train.optim``, and each
update is ``TrainStep.update`` from ``loop.make_step`` (level and noise draw, objective, autocast
forward with added_cond_kwargs, weighted MSE, backward, gradient norm + clip, finiteness check,
step). Only the weights file is replaced (``loop.load_unet`` returns the random UNet) and the batch
is fixed (the cache reader has its own benchmark, cache_reader.py).

FLOPs of one 1024² sample's forward + backward are counted with ``torch.utils.flop_counter`` on the
meta device (no memory, no GPU); utilisation = counted FLOPs × samples/s ÷ the device's dense bf16
peak (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312, else --peak-tflops).
Gradient checkpointing recomputes the forward; utilisation counts model FLOPs (no recomputation).

--dry-run (any machine): counts the FLOPs at full size on the meta device, estimates the static
memory of each configuration (weights, gradients, optimiser state), and runs the whole measurement
path on the CPU with the tiny demo UNet at 128² (compile off) — timing figures from it are CPU
figures for a tiny model, nothing about a GPU. Prints a table, writes benchmarks/out/train_gpu.json
(dry run: train_gpu_dryrun.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from sdxl_trainer import console  # noqa: E402
from sdxl_trainer.config import TrainConfig  # noqa: E402
from sdxl_trainer.dist import DistInfo  # noqa: E402
from sdxl_trainer.models import tiny  # noqa: E402
from sdxl_trainer.models.loading import read_part_config  # noqa: E402
from sdxl_trainer.models.lora import add_lora  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402
from sdxl_trainer.train.state import TrainState  # noqa: E402

GUIDE_TFLOP_FWD_BWD = 20.2  # GUIDE.md: SDXL UNet fwd+bwd per 1024² sample
TARGET_FULL_SAMPLES_S = 16.0  # GUIDE.md: full finetune, one H100
TARGET_LORA_GB = 10.0  # GUIDE.md: LoRA r16 batch 1 peak
SCALING_FACTOR = 0.13025  # SDXL's VAE; set so the step needs no VAE config on disk
# dense bf16 tensor-core peaks, TFLOP/s; more specific names first
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
CONFIGS = {  # name → optimiser, LoRA rank (None: full finetune), batch (None: --batch)
    "full-adamw": ("adamw", None, None),
    "full-adafactor": ("adafactor", None, None),
    "full-adamw8bit": ("adamw8bit", None, None),
    "lora-r16": ("adamw", 16, 1),
}


# ── the model and its inputs ──────────────────────────────────────────────────────────────────────


def unet_dims(config: dict) -> dict[str, int]:
    """Input sizes a UNet config implies: latent channels, text width, pooled width (SDXL text_time)."""
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"channels": config["in_channels"], "text": config["cross_attention_dim"], "pooled": pooled}


def make_batch(config: dict, *, batch: int, resolution: int, chunks: int, device: str = "cpu",
               width: int | None = None) -> dict[str, Any]:  # fmt: skip
    """A batch as the cache reader hands it over: raw latents fp32, text fp16, time ids, tag weights.
    ``resolution`` is the height; ``width`` (default: the height) makes a non-square bucket."""
    d, height, width = unet_dims(config), resolution, width or resolution
    g = torch.Generator().manual_seed(0)
    batch_ = {
        "latents": torch.randn(batch, d["channels"], height // 8, width // 8, generator=g) / SCALING_FACTOR,
        "text_hidden": torch.randn(batch, 77 * chunks, d["text"], generator=g).half(),
        "text_pooled": torch.randn(batch, d["pooled"], generator=g).half(),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.float32),
        "tag_weight": torch.ones(batch),
    }
    return {k: v.to(device) for k, v in batch_.items()}


def random_unet_loader(config: dict):
    """Stands in for ``loop.load_unet``: the architecture of ``config`` with fresh random weights, made
    directly in the asked dtype and device (no transient fp32 copy; fake tensors cannot be converted
    by ``Module.to``)."""
    from diffusers import UNet2DConditionModel

    def load(model_dir, *, dtype=torch.float32, device="cpu"):
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return UNet2DConditionModel.from_config(config)
        finally:
            torch.set_default_dtype(before)

    return load


def train_config(name: str, *, batch: int, checkpointing: bool, compile_: bool, args: argparse.Namespace) -> TrainConfig:
    optimizer, rank, _ = CONFIGS[name]
    return TrainConfig(
        model=Path("random-weights"), work=Path("unused"), out=Path("unused"), num_steps=1, batch_size=batch,
        precision="bf16", gradient_checkpointing=checkpointing, compile=compile_, compile_mode=args.compile_mode,
        latents={"scaling_factor": SCALING_FACTOR}, objective={"name": args.objective},
        lora={"enabled": rank is not None, "rank": rank or 16, "alpha": float(rank or 16)},
        optimizer={"name": optimizer, "learning_rate": 1e-5}, logging={"tensorboard": False},
    )  # fmt: skip


# ── counting ──────────────────────────────────────────────────────────────────────────────────────


def count_flops(config: dict, *, lora_rank: int | None, resolution: int, chunks: int) -> dict[str, float]:
    """FLOPs of one sample's forward and forward + backward, counted on the meta device."""
    unet = random_unet_loader(config)(None, device="meta")
    if lora_rank is not None:
        add_lora(unet, rank=lora_rank, alpha=float(lora_rank))
    else:
        unet.requires_grad_(True)
    b = make_batch(config, batch=1, resolution=resolution, chunks=chunks, device="meta")
    added = {"text_embeds": b["text_pooled"].float(), "time_ids": b["time_ids"]}
    t = torch.full((1,), 500, device="meta")

    def forward():
        return unet(b["latents"], t, encoder_hidden_states=b["text_hidden"].float(), added_cond_kwargs=added,
                    return_dict=False)[0]  # fmt: skip

    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    fwd = counter.get_total_flops()
    with counter:
        forward().float().pow(2).mean().backward()
    return {"forward": float(fwd), "forward_backward": float(counter.get_total_flops())}


def flops_by_kind(config: dict, *, resolution: int, chunks: int) -> dict[str, dict[str, float]]:
    """Per-sample FLOPs of a full finetune and of LoRA r16 (no weight gradients for the frozen base)."""
    return {kind: count_flops(config, lora_rank=rank, resolution=resolution, chunks=chunks)
            for kind, rank in (("full", None), ("lora", 16))}  # fmt: skip


def static_memory_gb(config: dict, *, lora_rank: int | None, optimizer: str) -> dict[str, float]:
    """What exists before any activation: fp32 weights (the trainer keeps fp32 masters, LoRA too),
    fp32 gradients and optimiser state of the trainable ones. An estimate, not a measurement."""
    unet = random_unet_loader(config)(None, device="meta")
    if lora_rank is not None:
        add_lora(unet, rank=lora_rank, alpha=float(lora_rank))
    params = list(unet.parameters())
    trainable = [p for p in params if lora_rank is None or p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    if optimizer == "adamw":
        state = 8 * n_train  # exp_avg + exp_avg_sq, fp32
    elif optimizer == "adamw8bit":
        state = 2 * n_train  # two 8-bit moments (block scales not counted)
    else:  # Adafactor without first moment: factored second moment for ≥ 2-D, full for vectors
        state = 4 * sum(p.shape[:-1].numel() + p.shape[:-2].numel() * p.shape[-1] if p.ndim >= 2 else p.numel()
                        for p in trainable)  # fmt: skip
    gb = 1e-9
    # loop.build_unet keeps a LoRA's frozen base in the bf16 autocast precision, the adapter in fp32
    frozen_bytes = 2 if lora_rank is not None else 4
    weights = 4 * n_train + frozen_bytes * (sum(p.numel() for p in params) - n_train)
    return {"weights": weights * gb, "gradients": 4 * n_train * gb,
            "optimizer_state": state * gb, "trainable_params_m": n_train / 1e6}  # fmt: skip


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# ── one measurement ───────────────────────────────────────────────────────────────────────────────


def build_run(config: dict, cfg: TrainConfig, device: torch.device):
    """The trainer's own pieces, in loop.run's order: UNet (LoRA, checkpointing), wrap/compile, optimiser, step."""
    with mock.patch.object(loop, "load_unet", random_unet_loader(config)):
        unet = loop.build_unet(cfg, device)
    model = loop.wrap_model(unet, cfg, DistInfo(), device)
    optimizer = loop.make_optimizer(cfg, unet)
    return model, optimizer, loop.make_step(cfg, device, DistInfo())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: dict, cfg: TrainConfig, *, device: torch.device, args: argparse.Namespace) -> dict:
    """Warm-up updates (compilation happens here), then ``--steps`` timed updates."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model, optimizer, step = build_run(config, cfg, device)
    batch = make_batch(config, batch=cfg.batch_size, resolution=args.resolution, chunks=args.chunks)
    generator, state = torch.Generator(device).manual_seed(0), TrainState()

    def update():
        return step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)

    for _ in range(args.warmup):
        update()
    _sync(device)
    warm = time.perf_counter() - t0
    start = time.perf_counter()
    for _ in range(args.steps):
        result = update()
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"batch": cfg.batch_size, "samples_per_s": args.steps * cfg.batch_size / seconds,
           "s_per_update": seconds / args.steps, "setup_and_warmup_s": warm, "skipped": state.skipped,
           "last_loss": float(result.loss)}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9  # what the allocator held
    return out


def measure_fitting(config: dict, name: str, *, ckpt: bool, comp: bool, device: torch.device,
                    args: argparse.Namespace) -> dict:  # fmt: skip
    """Full finetune starts at --batch and halves on out-of-memory; LoRA runs at batch 1."""
    batch = CONFIGS[name][2] or args.batch
    tried = []
    while True:
        cfg = train_config(name, batch=batch, checkpointing=ckpt, compile_=comp, args=args)
        try:
            return {**measure(config, cfg, device=device, args=args), "oom_at_batch": tried}
        except Exception as e:  # noqa: BLE001 — one failing configuration must not lose the others' figures
            if not _is_oom(e):
                return {"batch": batch, "oom_at_batch": tried, "error": f"{type(e).__name__}: {e}"[:500]}
            tried.append(batch)
        finally:
            torch._dynamo.reset()  # compiled graphs hold the model: drop them first
            gc.collect()  # then the run's model and optimiser state, before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if batch == 1:
            return {"batch": None, "oom_at_batch": tried}
        batch //= 2


def _is_oom(error: BaseException | None) -> bool:
    """Out of memory, also when torch.compile wraps it in its own exception."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


# ── driver ────────────────────────────────────────────────────────────────────────────────────────


def selected(args: argparse.Namespace) -> list[tuple[str, bool, bool]]:
    names = [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    if "full-adamw8bit" in names and importlib.util.find_spec("bitsandbytes") is None:
        print("full-adamw8bit left out: bitsandbytes is not importable")
        names.remove("full-adamw8bit")
    onoff = {"off": False, "on": True}
    ckpts = [onoff[v] for v in args.checkpointing.split(",")]
    comps = [onoff[v] for v in args.compile.split(",")]
    return [(n, c, k) for n in names for c in ckpts for k in comps]


def run_all(config: dict, *, device: torch.device, flops: dict, peak: float | None, args) -> list[dict]:
    runs = []
    for name, ckpt, comp in selected(args):
        got = measure_fitting(config, name, ckpt=ckpt, comp=comp, device=device, args=args)
        per_sample = flops["lora" if CONFIGS[name][1] else "full"]["forward_backward"]
        if got.get("samples_per_s"):
            got["achieved_tflops"] = per_sample * got["samples_per_s"] / 1e12
            got["flop_utilisation"] = got["achieved_tflops"] / peak if peak else None
        runs.append({"config": name, "checkpointing": ckpt, "compile": comp, **got})
        what = got.get("error") or f"{got.get('samples_per_s', 0):.2f} samples/s at batch {got['batch']}"
        oom = f" (out of memory at batch {got['oom_at_batch']})" if got["oom_at_batch"] else ""
        print(f"{name} checkpointing={ckpt} compile={comp}: {what}{oom}", flush=True)
    return runs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--checkpointing", default="off,on", choices=("off", "on", "off,on", "on,off"))
    ap.add_argument("--compile", default="off,on", choices=("off", "on", "off,on", "on,off"))
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))  # fmt: skip
    ap.add_argument("--batch", type=int, default=8, help="full finetune batch to start from (halved on OOM)")
    ap.add_argument("--chunks", type=int, default=1, choices=(1, 2, 3), help="77-token text chunks (3: 231 tokens)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--objective", default="v_ztsnr", choices=("eps", "v", "v_ztsnr", "flow"))
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates (compilation happens here)")
    ap.add_argument("--steps", type=int, default=10, help="timed updates")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, TFLOP/s")
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: FLOPs, memory estimate, tiny CPU pass")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or ROOT / "benchmarks/out" / ("train_gpu_dryrun.json" if args.dry_run else "train_gpu.json")
    return args


def main() -> None:
    args = parse_args()
    doc: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(["python", *sys.argv]), "platform": platform.platform(),
                           "versions": {"torch": torch.__version__}, "setup": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    if not args.dry_run and not torch.cuda.is_available():
        doc["status"] = "no CUDA device: nothing measured (--dry-run checks the CPU-side logic)"
        write(doc, args.out)
        print(f"train_gpu: no CUDA device, nothing measured → {args.out}")
        return
    full = read_part_config("unet")
    flops = flops_by_kind(full, resolution=args.resolution, chunks=args.chunks)
    doc["flops_per_sample"] = {**flops, "guide_tflop_fwd_bwd": GUIDE_TFLOP_FWD_BWD, "resolution": args.resolution}
    doc["static_memory_gb_estimate"] = {n: static_memory_gb(full, lora_rank=r, optimizer=o)
                                        for n, (o, r, _) in CONFIGS.items()}  # fmt: skip
    if args.dry_run:
        doc["status"] = "dry run: FLOPs and memory estimates at full size; timings are the tiny UNet on the CPU"
        if "on" in args.compile:
            print("dry run: compile off (inductor on the CPU takes minutes and measures nothing here)")
        args.resolution, args.warmup, args.steps, args.compile = tiny.TINY_RESOLUTION, 1, 2, "off"
        torch.set_num_threads(1)  # a tiny model gains nothing from more, and OpenMP teams thrash on busy cores
        small = tiny.unet_config()
        doc["tiny_flops_per_sample"] = flops_by_kind(small, resolution=args.resolution, chunks=args.chunks)
        doc["runs"] = run_all(small, device=torch.device("cpu"), flops=doc["tiny_flops_per_sample"], peak=None, args=args)
    else:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name, args.peak_tflops)
        doc.update(status="measured", device=name, peak_bf16_tflops=peak, cuda=torch.version.cuda)
        doc["runs"] = run_all(full, device=device, flops=flops, peak=peak, args=args)
    write(doc, args.out)
    report(doc, args=args)


def write(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def report(doc: dict, *, args: argparse.Namespace) -> None:
    f = doc["flops_per_sample"]
    print(f"FLOPs per {f['resolution']}² sample: full fwd {f['full']['forward'] / 1e12:.2f} T, fwd+bwd "
          f"{f['full']['forward_backward'] / 1e12:.2f} T (GUIDE.md {GUIDE_TFLOP_FWD_BWD}); LoRA r16 fwd+bwd "
          f"{f['lora']['forward_backward'] / 1e12:.2f} T")  # fmt: skip
    mem = [(n, f"{m['trainable_params_m']:,.1f}", f"{m['weights']:.2f}", f"{m['gradients']:.2f}",
            f"{m['optimizer_state']:.2f}", f"{m['weights'] + m['gradients'] + m['optimizer_state']:.2f}")
           for n, m in doc["static_memory_gb_estimate"].items()]  # fmt: skip
    console.table("static memory estimate (GB = 10⁹ B, before activations)", mem,
                  columns=("config", "trainable M", "weights fp32", "grads", "optimiser", "sum"))  # fmt: skip
    rows = []
    for r in doc["runs"]:
        util = r.get("flop_utilisation")
        rows.append((r["config"], "on" if r["checkpointing"] else "off", "on" if r["compile"] else "off",
                     str(r["batch"] or f"OOM {r['oom_at_batch']}") + (" error" if "error" in r else ""), f"{r.get('samples_per_s', 0):.2f}",
                     f"{r['achieved_tflops']:.3g}" if "achieved_tflops" in r else "–",
                     f"{100 * util:.1f} %" if util else "–",
                     f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "–"))  # fmt: skip
    where = doc.get("device", "CPU, tiny UNet (dry run: not GPU figures)")
    console.table(f"SDXL UNet training, {where}", rows, columns=("config", "ckpt", "compile", "batch", "samples/s",
                                                                   "TFLOP/s", "FLOP util", "peak GB"))  # fmt: skip
    print(f"targets: full finetune ≥ {TARGET_FULL_SAMPLES_S:.0f} samples/s on one H100; LoRA r16 batch 1 ≤ "
          f"{TARGET_LORA_GB:.0f} GB peak → {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
