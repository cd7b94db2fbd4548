"""One in-training sampling round against one training update: time, peak tensor memory and FLOPs.

    python benchmarks/sample_round.py                           # tiny model on the CPU + the SDXL projection
    python benchmarks/sample_round.py --prompts 4 --seeds 1 --steps 28 --repeats 3
    python benchmarks/sample_round.py --sdxl-memory             # + fake-tensor peaks at full size (minutes)

Measured, CPU, the tiny demo model (random weights; 64 synthetic images cached at the demo's 128-px
buckets; fp32; one intra-op thread by default):

- **update**: ``TrainStep.update`` at the demo's batch 16, built by the trainer's own pieces
  (``loop.build_unet``, ``loop.make_optimizer``, ``loop.make_step``) on batches from
  the cache reader; median wall time of ``--repeats`` after one warm-up;
- **round**: ``SampleRounds.render`` as the trainer calls it (``build_sample_rounds`` on that UNet:
  prompts encoded once beforehand; per round the VAE loaded, ``--prompts`` × ``--seeds`` images of
  ``--steps`` steps with CFG (two UNet calls a step), the black-image check at two seeds, PNGs, grid
  and checks.json written, the VAE released); median wall time of ``--repeats``;
- **peak tensor bytes** of each (``MemTracker``, as benchmarks/memory_full.py: the model and optimiser
  registered beforehand, so the peak includes what is resident), split by category.

Counted (``torch.utils.flop_counter``, meta device): the UNet's forward per image at the sample size
and forward + backward per training sample, the VAE decoder per image — for the tiny model and for
SDXL base 1.0 at 1024² (77 text tokens). A round's FLOPs = UNet calls × forward + decodes × decoder.
The tiny model's measured time ratio (round ÷ update) is printed beside its FLOP ratio: on a CPU
with a 1.5 M-parameter UNet the two differ (per-call overhead dominates tiny inference at batch
1), so the SDXL projection is given in FLOPs and in training-sample equivalents, and as a time only
at a stated throughput.

``--sdxl-memory`` adds fake-tensor peaks (``FakeTensorMode`` + ``MemTracker``, no allocation) of the
round's two big parts at full size: a no-grad SDXL UNet forward at 1024² under bf16 autocast (without
its cast cache, as a round runs) with fp32 weights, and the VAE decode of one 1024² image in bf16 and
in fp32.

Writes benchmarks/out/sample_round.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout; reuse the others' helpers

import train_gpu  # noqa: E402
from memory_full import make_tracker  # noqa: E402
from sdxl_trainer.config import StatsConfig  # noqa: E402
from sdxl_trainer.demo import demo_cache_config, demo_scan_config, demo_train_config  # noqa: E402
from sdxl_trainer.dist import DistInfo  # noqa: E402
from sdxl_trainer.models import tiny  # noqa: E402
from sdxl_trainer.models.loading import read_part_config  # noqa: E402
from sdxl_trainer.prep import cache, scan, stats  # noqa: E402
from sdxl_trainer.synthetic import build_synthetic_dataset  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402
from sdxl_trainer.train.data import CacheDataset  # noqa: E402
from sdxl_trainer.train.loader import CacheLoader  # noqa: E402
from sdxl_trainer.train.samples import build_sample_rounds  # noqa: E402
from sdxl_trainer.train.state import TrainState  # noqa: E402

GB = 1e9
PROMPTS = ["red circle, blue background, simple shapes, no humans", "green square, white background, no humans",
           "blue triangle, black background, no humans", "yellow circle, red background, no humans"]  # fmt: skip
BLACK_SEEDS = 2  # the black-image check of a round: black and white prompts at two seeds


def build_kit(root: Path) -> tuple[Path, Path]:
    """The tiny model (random VAE: its pixels do not matter here) and a 64-image cache, built once."""
    model, work = root / "model", root / "work"
    if not (work / "cache" / "cache_meta.json").is_file():
        tiny.build_tiny_model(model, seed=0, fit_vae=False)
        data = build_synthetic_dataset(root / "data", n=64, seed=0)
        scan.run(demo_scan_config(data, work, model))
        stats.run(StatsConfig(work=work, model=model, device="cpu", max_images=16))
        cache.run(demo_cache_config(work, model))
    return model, work


def repeat_tracker():
    """A MemTracker for a round, which calls the same top-level module (the UNet) many times: each
    repeated top-level call starts a fresh set of per-module figures (MemTracker refuses repeated
    calls otherwise); the global peak, the only figure read here, is kept across them."""
    tracker = make_tracker()
    pre_fw = tracker._pre_fw_hook

    def hook(module, inputs):
        name = tracker._mod_tracker.get_known_fqn(module)
        if module in tracker.memory_tracking and set(tracker._mod_tracker.parents) - {name} <= {"Global"}:
            tracker.reset_mod_stats()
        return pre_fw(module, inputs)

    tracker._pre_fw_hook = hook
    return tracker


def peak(tracker) -> dict[str, float]:
    snap = dict(next(iter(tracker.get_tracker_snapshot("peak").values())))
    total = snap.pop("Total")
    return {"total_gb": total / GB, **{f"{str(k).split('.')[-1].lower()}_gb": v / GB for k, v in snap.items() if v}}


def measure_tiny(model: Path, work: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cfg = demo_train_config(model, work, out, "v_ztsnr", steps=1000)
    cfg.samples = {"prompts": PROMPTS[:args.prompts], "seeds": list(range(args.seeds)), "every_steps": 1,
                   "steps": args.steps, "cfg": 5.0, "checks": {"black": True, "black_seeds": list(range(BLACK_SEEDS))}}
    device, info = torch.device("cpu"), DistInfo()
    unet = loop.build_unet(cfg, device)
    optimizer = loop.make_optimizer(cfg, unet)
    step = loop.make_step(cfg, device, info)
    dataset = CacheDataset(work / "cache", seed=0)
    with CacheLoader(dataset, dataset.train_sampler(batch_size=cfg.batch_size), prefetch=2, workers=1) as loader:
        batches = list(loop.batch_stream(loader).__next__() for _ in range(args.repeats + 2))
    generator, state = torch.Generator(device).manual_seed(0), TrainState()

    def update(batch):
        t0 = time.perf_counter()
        step.update(unet, [batch], optimizer=optimizer, generator=generator, state=state)
        return time.perf_counter() - t0

    update(batches[0])  # warm-up; the optimiser state exists from here on
    update_s = [update(b) for b in batches[1:-1]]
    tracker = make_tracker()
    tracker.track_external(unet, optimizer, *[v for v in batches[-1].values() if isinstance(v, torch.Tensor)])
    with tracker:
        update(batches[-1])
    update_peak = peak(tracker)

    rounds = build_sample_rounds(cfg, unet=unet, step=step, dataset=dataset, ema=None, text=None, info=info, sinks=[],
                                 n_updates=1000)  # fmt: skip
    round_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rounds.render(state)
        round_s.append(time.perf_counter() - t0)
    tracker = repeat_tracker()
    tracker.track_external(unet, optimizer)
    with tracker:
        rounds.render(state)
    job = rounds.jobs[0]
    images = args.prompts * args.seeds + 2 * BLACK_SEEDS
    return {"update_s": statistics.median(update_s), "update_s_all": update_s, "round_s": statistics.median(round_s),
            "round_s_all": round_s, "update_peak": update_peak, "round_peak": peak(tracker),
            "batch": cfg.batch_size, "size": [job.width, job.height], "images": images,
            "unet_calls": images * args.steps * 2, "decodes": images}  # fmt: skip


def count_unet(config: dict, side: int) -> dict[str, float]:
    return train_gpu.count_flops(config, lora_rank=None, resolution=side, chunks=1)


def count_decode(vae_config: dict, side: int) -> float:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
        z = torch.randn(1, vae_config.get("latent_channels", 4), side // 8, side // 8)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.decode(z)
    return float(counter.get_total_flops())


def round_flops(*, images: int, steps: int, unet_forward: float, decode: float) -> float:
    return images * steps * 2 * unet_forward + images * decode  # CFG: a conditional and an unconditional call


def sdxl_memory() -> dict[str, Any]:
    """Fake-tensor peaks at full size: a no-grad UNet forward (1024², bf16 autocast, fp32 weights) and a VAE decode."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet_config, vae_config, out = read_part_config("unet"), read_part_config("vae"), {}
    with ExitStack() as stack:
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        unet = train_gpu.random_unet_loader(unet_config)(None).eval()
        b = train_gpu.make_batch(unet_config, batch=1, resolution=1024, chunks=1)
        tracker = make_tracker()
        tracker.track_external(unet)
        # as a round runs it (train/samples.py): autocast without its cast cache
        with tracker, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            unet(b["latents"], torch.full((1,), 500), encoder_hidden_states=b["text_hidden"].float(),
                 added_cond_kwargs={"text_embeds": b["text_pooled"].float(), "time_ids": b["time_ids"]})
        out["unet_forward_1024"] = peak(tracker)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            torch.set_default_dtype(dtype)
            try:
                vae = AutoencoderKL.from_config(vae_config).eval()
            finally:
                torch.set_default_dtype(torch.float32)
            tracker = make_tracker()
            tracker.track_external(vae)
            with tracker, torch.no_grad():
                vae.decode(torch.randn(1, 4, 128, 128, dtype=dtype))
            out[f"vae_decode_1024_{name}"] = peak(tracker)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1), help="prompts per round")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps (the demo's)")
    ap.add_argument("--sdxl-steps", type=int, default=28, help="sampling steps of the projected SDXL round")
    ap.add_argument("--sdxl-prompts", type=int, default=4, help="prompts × seeds of the projected SDXL round")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--sdxl-memory", action="store_true", help="fake-tensor peaks at full size (slow)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench-samples")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "sample_round.json")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, work = build_kit(args.dir)
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        tiny_m = measure_tiny(model, work, Path(run_dir), args)
    side = tiny_m["size"][0]
    tf = {"unet": count_unet(tiny.unet_config(), side), "decode": count_decode(tiny.vae_config(), side)}
    sf = {"unet": count_unet(read_part_config("unet"), 1024), "decode": count_decode(read_part_config("vae"), 1024)}
    tiny_round = round_flops(images=tiny_m["images"], steps=args.steps, unet_forward=tf["unet"]["forward"],
                             decode=tf["decode"])  # fmt: skip
    tiny_update = tiny_m["batch"] * tf["unet"]["forward_backward"]
    sdxl_images = args.sdxl_prompts + 2 * BLACK_SEEDS
    sdxl_round = round_flops(images=sdxl_images, steps=args.sdxl_steps, unet_forward=sf["unet"]["forward"],
                             decode=sf["decode"])  # fmt: skip
    target = 16 * sf["unet"]["forward_backward"]  # GUIDE.md's ≥ 16 samples/s full finetune, as model FLOP/s
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), {args.threads} thread(s)",
        "platform": platform.platform(), "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "load_average": os.getloadavg(), "tiny": tiny_m, "tiny_flops": tf, "sdxl_flops_1024": sf,
        "tiny_round_flops": tiny_round, "tiny_update_flops": tiny_update,
        "tiny_time_ratio": tiny_m["round_s"] / tiny_m["update_s"], "tiny_flop_ratio": tiny_round / tiny_update,
        "sdxl_round": {"images": sdxl_images, "steps": args.sdxl_steps, "flops": sdxl_round,
                       "training_samples_equivalent": sdxl_round / sf["unet"]["forward_backward"],
                       "seconds_at_16_samples_per_s_model_flops": sdxl_round / target},
    }  # fmt: skip
    if args.sdxl_memory:
        doc["sdxl_memory"] = sdxl_memory()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    t, r = tiny_m, doc["sdxl_round"]
    rows = [("tiny update (batch 16, 128²)", f"{t['update_s'] * 1e3:.0f} ms", f"{t['update_peak']['total_gb'] * 1e3:.1f} MB",
             f"{tiny_update / 1e9:.2f} GFLOP"),
            (f"tiny round ({t['images']} images × {args.steps} steps, CFG)", f"{t['round_s'] * 1e3:.0f} ms",
             f"{t['round_peak']['total_gb'] * 1e3:.1f} MB", f"{tiny_round / 1e9:.2f} GFLOP"),
            (f"SDXL round 1024² ({sdxl_images} images × {args.sdxl_steps} steps, CFG)",
             f"≥ {r['seconds_at_16_samples_per_s_model_flops']:.1f} s at 16 samples/s-equivalent", "—",
             f"{sdxl_round / 1e12:.0f} TFLOP = {r['training_samples_equivalent']:.0f} training samples")]  # fmt: skip
    width = max(len(x[0]) for x in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>12}  {row[2]:>10}  {row[3]}")
    print(f"tiny: round/update time {doc['tiny_time_ratio']:.2f}, FLOP ratio {doc['tiny_flop_ratio']:.2f}; "
          f"SDXL UNet forward {sf['unet']['forward'] / 1e12:.2f} T, VAE decode {sf['decode'] / 1e12:.2f} T per 1024² image")
    for key, value in doc.get("sdxl_memory", {}).items():
        print(f"{key}: peak {value['total_gb']:.2f} GB ({', '.join(f'{k} {v:.2f}' for k, v in value.items() if k != 'total_gb')})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
