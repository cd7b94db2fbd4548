"""Full-size SDXL training memory, measured: peak tensor bytes of real ``TrainStep.update`` calls.

    python benchmarks/memory_full.py                        # every configuration, 1024², 1 text chunk
    python benchmarks/memory_full.py --configs lora-r16-bf16,lora-r16-fp8 --checkpointing on
    python benchmarks/memory_full.py --resolution 768 --chunks 3 --real none
    python benchmarks/memory_full.py --validate             # the method's own checks (below)

The UNet is SDXL base 1.0's architecture from the shipped config with random weights. Every
configuration goes through the trainer's own pieces in ``loop.run``'s order — ``loop.build_unet``
(LoRA, frozen-base dtype, savers, checkpointing), ``loop.wrap_model``, ``loop.make_optimizer``,
``loop.make_step`` — and two ``TrainStep.update`` calls at batch 1 (the second
update is the steady state: the optimiser state exists while activations and gradients build up).

How memory is measured. ``torch.distributed._tools.mem_tracker.MemTracker`` (a TorchDispatchMode)
sees every tensor storage the update creates, plus the model's and optimiser's registered before
it starts, and keeps the peak of their total bytes — per category (parameters, gradients, optimiser
state, activations, temporaries). That is "peak bytes held by tensors"; it is what
``torch.cuda.max_memory_allocated`` reports on a GPU, minus the caching allocator's block rounding.
Each configuration runs in its own process, in one of two modes:

- ``real``: real tensors on the CPU. Also reports the process's peak resident set (VmHWM, reset
  just before the first update; ``rss_before_gb`` is the resident set at that moment, the model
  built) and the wall time of the second update.
- ``fake``: the same code under ``FakeTensorMode`` — tensors with shapes and dtypes but no data, so
  configurations that do not fit this machine's 24 GB (full finetune with fp32 AdamW, ≈ 41 GB
  before activations) are tracked without allocating. No RSS or time. Data-dependent reads cannot
  run on fake tensors, so the finiteness check of the update is stubbed to "finite" in this mode.

``--validate`` checks the method: (1) a known allocation sequence reports its known peak exactly;
(2) fake and real mode agree on the tiny demo UNet for a LoRA and a full-finetune configuration;
(3) the growth of tracked bytes over one steady-state update equals the growth the CPU allocator
itself reports (the profiler's memory events, which no dispatch mode sees) on the tiny UNet and on
the full-size UNet at 512². Real full-size records also carry the resident set (RSS), which exceeds
the tracked bytes by what the CPU side keeps besides tensors (see docs/benchmarks.md).

Results are merged into docs/results/memory_full.json (``--out``): ``records`` keyed by
configuration name (``-ckpt`` = gradient checkpointing; ``@R-cN`` for a resolution or chunk count
other than 1024/1), each with ``peak_tensor_gb`` (10⁹ bytes), ``by_category``, ``rss_gb``,
``step_s``, ``method``, ``resolution``, ``chunks``.
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
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout; reuse train_gpu's helpers

import train_gpu  # noqa: E402
from sdxl_trainer.config import TrainConfig, load_config  # noqa: E402
from sdxl_trainer.dist import DistInfo  # noqa: E402
from sdxl_trainer.models import tiny  # noqa: E402
from sdxl_trainer.models.loading import read_part_config  # noqa: E402
from sdxl_trainer.train import loop  # noqa: E402
from sdxl_trainer.train.state import TrainState  # noqa: E402

GB = 1e9
LORA = {"lora.enabled": True, "lora.rank": 16, "lora.alpha": 16.0}
CONFIGS: dict[str, dict[str, Any]] = {  # name → TrainConfig overrides (bf16 autocast, batch 1 for all)
    "lora-r16-bf16": LORA,
    "lora-r16-fp8": {**LORA, "lora.fp8_base": True},
    "full-adamw": {"optimizer.name": "adamw"},
    "full-adafactor": {"optimizer.name": "adafactor"},
    "full-adamw8bit": {"optimizer.name": "adamw8bit"},
    "full-adamw-fused": {"optimizer.name": "adamw", "optimizer.fused_backward_pass": True},
    "full-adafactor-fused": {"optimizer.name": "adafactor", "optimizer.fused_backward_pass": True},
    "full-adamw-bf16sr": {"optimizer.name": "adamw", "optimizer.bf16_weights": True},
    "full-adafactor-bf16sr": {"optimizer.name": "adafactor", "optimizer.bf16_weights": True},
    "full-adamw-fused-bf16sr": {"optimizer.name": "adamw", "optimizer.fused_backward_pass": True,
                                "optimizer.bf16_weights": True},  # fmt: skip
    "full-adafactor-fused-bf16sr": {"optimizer.name": "adafactor", "optimizer.fused_backward_pass": True,
                                    "optimizer.bf16_weights": True},  # fmt: skip
}
# Real (allocating) runs by default: what fits 24 GB of RAM with room to spare, from the fake figures.
REAL_BUDGET_GB = 17.0


def record_name(name: str, *, ckpt: bool, resolution: int, chunks: int) -> str:
    suffix = "" if (resolution, chunks) == (1024, 1) else f"@{resolution}-c{chunks}"
    return f"{name}{'-ckpt' if ckpt else ''}{suffix}"


def train_config(overrides: dict[str, Any], *, ckpt: bool) -> TrainConfig:
    base = {"model": "random-weights", "work": "unused", "out": "unused", "num_steps": 2, "batch_size": 1,
            "precision": "bf16", "gradient_checkpointing": ckpt, "device": "cpu", "objective.name": "v_ztsnr",
            "latents.scaling_factor": train_gpu.SCALING_FACTOR, "optimizer.learning_rate": 1e-5,
            "logging.tensorboard": False}  # fmt: skip
    return load_config(TrainConfig, None, {**base, **overrides})


# ── one configuration, in its own process ─────────────────────────────────────────────────────────


def _vm_gb(field: str = "VmHWM") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> None:
    try:  # Linux ≥ 4.0: "5" resets the peak resident set size to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class _NoHook:
    def remove(self) -> None:
        pass


def make_tracker():
    """A MemTracker that tolerates frozen parameters (a LoRA's base, an fp8 store): MemTracker hooks
    every parameter's gradient, and torch refuses a hook on a tensor that never gets one."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            # only the global peak: MemTracker also walks every module's statistics on every operator,
            # which is quadratic in practice (SDXL: ~2,000 modules × tens of thousands of operators)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker()


random_unet_loader = train_gpu.random_unet_loader  # one implementation, shared


def _fake_module_to():
    """fake mode: ``Module.to`` cannot swap fake parameters (torch refuses: they carry weak references),
    so parameters and buffers are converted by assigning ``.data`` — what ``Module.to`` did before
    tensor swapping, and what the trainer itself does for a LoRA adapter's fp32 copy."""

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)

        def convert(t):
            keep = dtype is None or not (t.is_floating_point() or t.is_complex())
            return t.to(device=device, dtype=None if keep else dtype, non_blocking=non_blocking)

        with torch.no_grad():
            for module in self.modules():
                for p in module._parameters.values():
                    if p is not None:
                        p.data = convert(p.data)
                for key, b in module._buffers.items():
                    if b is not None:
                        module._buffers[key] = convert(b)
        return self

    return mock.patch.object(torch.nn.Module, "to", to)


class _AllFinite:
    """What ``torch.isfinite`` answers for a fake tensor: true, however it is combined or reduced.

    Used as a condition (``bool``, ``&``, ``.all()``) it is True; handed to a torch function (the
    fused optimiser's ``torch.where(finite, new, old)``) it is an all-True bool tensor of the input's
    shape, a fake one, so the function allocates what it would on real data.
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.mask = torch.ones_like(like, dtype=torch.bool)

    def all(self):
        return _AllFinite(self.mask.new_ones(()))

    def __and__(self, other):
        return self

    __rand__ = __and__

    def __bool__(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.mask if isinstance(a, _AllFinite) else a  # noqa: E731
        args, kwargs = torch.utils._pytree.tree_map(unwrap, (args, kwargs or {}))
        return func(*args, **kwargs)


def _finite_stub():
    """fake mode: a fake tensor has no values to test, so ``torch.isfinite`` calls it finite (the
    trainer's checks — the update's skip decision, the fp8 store's input check — then pass); real
    tensors are still tested."""
    from torch._subclasses.fake_tensor import FakeTensor

    real = torch.isfinite
    return mock.patch.object(torch, "isfinite", lambda x: _AllFinite(x) if isinstance(x, FakeTensor) else real(x))


def profiler_growth(prof) -> int:
    """The highest net bytes the CPU allocator handed out during a profiled region (its [memory] events)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure(unet_config: dict, cfg: TrainConfig, *, resolution: int, chunks: int, fake: bool,
            profile: bool = False) -> dict[str, Any]:  # fmt: skip
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.fake_tensor import unset_fake_temporarily as unset_fake

    device = torch.device("cpu")
    with ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(_finite_stub())
            stack.enter_context(_fake_module_to())
        t0 = time.perf_counter()
        with mock.patch.object(loop, "load_unet", random_unet_loader(unet_config)):
            unet = loop.build_unet(cfg, device)
        model = loop.wrap_model(unet, cfg, DistInfo(), device)
        optimizer = loop.make_optimizer(cfg, unet)
        with unset_fake() if fake else nullcontext():  # small real tables: schedule, normalisation
            step = loop.make_step(cfg, device, DistInfo())
        batch = train_gpu.make_batch(unet_config, batch=1, resolution=resolution, chunks=chunks)
        build_s = time.perf_counter() - t0
        tracker = make_tracker()
        tracker.track_external(unet, *batch.values())
        if isinstance(optimizer, torch.optim.Optimizer):  # a fused-backward wrapper's states are created inside
            tracker.track_external(optimizer)
        generator, state, times = torch.Generator(device).manual_seed(0), TrainState(), []
        _reset_vm_hwm()
        rss_before = _vm_gb("VmRSS")
        if profile:  # the check of the method: the second update seen by the tracker and the CPU allocator
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)
            if isinstance(optimizer, torch.optim.Optimizer):
                tracker.track_external(optimizer)  # its state exists now: count it before the update starts
            with tracker:
                start = tracker.get_tracker_snapshot("current")
                with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)
            before = next(iter(start.values()))["Total"]
            after = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
            return {"tracker_growth_gb": (after - before) / GB, "allocator_growth_gb": profiler_growth(prof) / GB}
        with tracker:
            for _ in range(2):
                tracker.reset_mod_stats()  # per-module figures are per iteration; the peak is kept
                t1 = time.perf_counter()
                step.update(model, [batch], optimizer=optimizer, generator=generator, state=state)
                times.append(time.perf_counter() - t1)
                if isinstance(optimizer, torch.optim.Optimizer):  # a fused optimiser makes its state inside
                    tracker.track_external(optimizer)  # backward, not in step(): file it as optimiser state
        peak = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(peak.values())) if peak else {}
    total = per_device.pop("Total", sum(per_device.values()))
    return {"method": "fake" if fake else "real", "peak_tensor_gb": total / GB,
            "by_category": {k: v / GB for k, v in per_device.items() if v},
            "rss_gb": None if fake else _vm_gb("VmHWM"), "rss_before_gb": None if fake else rss_before, "step_s": None if fake else times[-1],
            "first_update_s": None if fake else times[0], "build_s": build_s,
            "trainable_params_m": sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """Measure one configuration and print its record as one JSON line (the parent collects it)."""
    torch.set_num_threads(args.threads)
    unet_config = tiny.unet_config() if args.tiny else read_part_config("unet")
    cfg = train_config(CONFIGS[args.child], ckpt=args.child_ckpt)
    out = measure(unet_config, cfg, resolution=args.resolution, chunks=args.chunks, fake=args.child_mode == "fake",
                  profile=args.child_mode == "profile")  # fmt: skip
    print("RECORD " + json.dumps(out), flush=True)


def run_child(name: str, *, ckpt: bool, mode: str, args: argparse.Namespace, tiny_model: bool = False,
              resolution: int | None = None) -> dict:  # fmt: skip
    resolution = resolution or (tiny.TINY_RESOLUTION if tiny_model else args.resolution)
    cmd = [sys.executable, __file__, "--child", name, "--child-mode", mode, "--resolution", str(resolution),
           "--chunks", str(args.chunks), "--threads", str(args.threads)] + (["--child-ckpt"] if ckpt else []) \
        + (["--tiny"] if tiny_model else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RECORD ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": mode, "error": f"exit {done.returncode}: {tail}"[:400]}
    return json.loads(lines[-1].removeprefix("RECORD "))


# ── the method's checks ──────────────────────────────────────────────────────────────────────────


def validate_known_sequence() -> dict[str, Any]:
    """Allocate 1 GiB, then 0.5 GiB, free the first, allocate 0.25 GiB: the peak is 1.5 GiB exactly."""
    from torch.distributed._tools.mem_tracker import MemTracker

    gib = 2**30
    tracker = MemTracker()
    with tracker:
        a = torch.empty(gib // 4, dtype=torch.float32)
        b = torch.empty(gib // 2, dtype=torch.uint8)
        del a
        c = torch.empty(gib // 8, dtype=torch.float16)
        del b, c
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    return {"expected_bytes": gib + gib // 2, "tracked_bytes": peak, "exact": peak == gib + gib // 2}


def validate_fake_vs_real(args: argparse.Namespace) -> dict[str, Any]:
    """The same configurations on the tiny UNet, real and fake: the tracked peaks must agree."""
    out = {}
    for name in ("lora-r16-bf16", "full-adamw"):
        pair = {mode: run_child(name, ckpt=False, mode=mode, args=args, tiny_model=True) for mode in ("real", "fake")}
        real, fake = pair["real"].get("peak_tensor_gb"), pair["fake"].get("peak_tensor_gb")
        out[name] = {"real_gb": real, "fake_gb": fake,
                     "relative_difference": None if not (real and fake) else abs(fake - real) / real}  # fmt: skip
    return out


def validate_against_allocator(args: argparse.Namespace) -> dict[str, Any]:
    """One steady-state update seen by the tracker and by the CPU allocator's own events (the
    profiler's [memory] records, which no dispatch mode sees): their growth over the update must agree."""
    cases = [(n, False, True, None) for n in ("lora-r16-bf16", "lora-r16-fp8", "full-adamw", "full-adafactor")]
    cases.append(("lora-r16-fp8", True, False, 512))  # full size, checkpointing, 512²
    out = {}
    for name, ckpt, tiny_model, res in cases:
        key = record_name(name, ckpt=ckpt, resolution=res or 1024, chunks=1) + (" (tiny UNet)" if tiny_model else "")
        got = run_child(name, ckpt=ckpt, mode="profile", args=args, tiny_model=tiny_model, resolution=res)
        if "error" not in got:
            got["relative_difference"] = abs(got["tracker_growth_gb"] - got["allocator_growth_gb"]) / got["allocator_growth_gb"]
        out[key] = got
        print(f"{key}: {got}", flush=True)
    return out


# ── driver ────────────────────────────────────────────────────────────────────────────────────────


def selected(args: argparse.Namespace) -> list[tuple[str, bool]]:
    names = list(CONFIGS) if args.configs == "all" else [n.strip() for n in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    return [(n, c) for n in names for c in ckpts]


NO_FAKE_8BIT = ("not measured here: bitsandbytes' 8-bit kernels read tensor values, so they cannot run on fake tensors, "
                "and a real run needs ≈ 26 GB before activations (weights 10.3 + gradients 10.3 + 8-bit moments "
                "5.1), more than this machine's RAM; train_gpu.py measures it on a GPU")  # fmt: skip


def available(name: str) -> str | None:
    """Why a configuration cannot run in this checkout (a key not built yet, a package missing), or None."""
    try:
        train_config(CONFIGS[name], ckpt=False)
    except Exception as e:  # noqa: BLE001 — reported, not raised: the other configurations still run
        return f"not available: {str(e).splitlines()[0][:200]}"
    return None


def wants_real(args: argparse.Namespace, name: str, fake: dict) -> bool:
    if args.real == "none":
        return False
    if args.real != "fit":
        return name in args.real.split(",")
    return fake.get("peak_tensor_gb") is not None and fake["peak_tensor_gb"] < REAL_BUDGET_GB


def _commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it), or None outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def measure_all(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    for name, ckpt in selected(args):
        key = record_name(name, ckpt=ckpt, resolution=args.resolution, chunks=args.chunks)
        setup = {"config": name, "overrides": CONFIGS[name], "gradient_checkpointing": ckpt,
                 "resolution": args.resolution, "chunks": args.chunks, "batch": 1, "precision": "bf16"}  # fmt: skip
        why = available(name)
        if why:
            doc["records"][key] = {**setup, "error": why}
            print(f"{key}: {why}", flush=True)
            continue
        if CONFIGS[name].get("optimizer.name") == "adamw8bit" and not wants_real(args, key, {}):
            doc["records"][key] = {**setup, "error": NO_FAKE_8BIT}
            print(f"{key}: {NO_FAKE_8BIT}", flush=True)
            continue
        fake = run_child(name, ckpt=ckpt, mode="fake", args=args) if "adamw8bit" not in name else {"method": "fake"}
        rec = {**setup, **fake, "fake_peak_tensor_gb": fake.get("peak_tensor_gb")}
        if "error" not in fake and wants_real(args, key, fake):
            real = run_child(name, ckpt=ckpt, mode="real", args=args)
            rec.update(real if "error" not in real else {"real_error": real["error"]})
        rec["measured"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(["python", *sys.argv]), "commit": _commit()}  # fmt: skip
        doc["records"][key] = rec
        shown = rec.get("error") or f"{rec['peak_tensor_gb']:.2f} GB ({rec['method']})" + (
            f", RSS {rec['rss_gb']:.2f} GB, {rec['step_s']:.0f} s/update" if rec.get("step_s") else "")
        print(f"{key}: {shown}", flush=True)
        write(doc, args.out)  # after each: a long run interrupted keeps what it measured


def markdown_table(doc: dict[str, Any]) -> str:
    """The records as the table in docs/benchmarks.md (GB = 10⁹ bytes)."""
    lines = ["| configuration | ckpt | res | chunks | peak tensor GB | weights | grads | optimiser | activations + temps "
             "| method | RSS GB | s/update |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in doc["records"].items():
        if "error" in r:
            lines.append(f"| {key} | | | | {r['error']} | | | | | | | |")
            continue
        c = r.get("by_category", {})
        act = c.get("Activation", 0) + c.get("Temp", 0) + c.get("Other", 0)
        rss = f"{r['rss_gb']:.2f}" if r.get("rss_gb") else "–"
        step = f"{r['step_s']:.0f}" if r.get("step_s") else "–"
        lines.append(f"| {r['config']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['resolution']} | "
                     f"{r['chunks']} | **{r['peak_tensor_gb']:.2f}** | {c.get('Parameter', 0) + c.get('Buffer', 0):.2f} | "
                     f"{c.get('Gradient', 0):.2f} | {c.get('Optstate', 0):.2f} | {act:.2f} | {r['method']} | {rss} | {step} |")  # fmt: skip
    return "\n".join(lines)


def write(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="all", help=f"comma list of {', '.join(CONFIGS)} (or all)")
    ap.add_argument("--checkpointing", default="both", choices=("off", "on", "both"))
    ap.add_argument("--resolution", type=int, default=1024, help="512 | 768 | 1024 (or any multiple of 8)")
    ap.add_argument("--chunks", type=int, default=1, choices=(1, 2, 3), help="77-token text chunks")
    ap.add_argument("--real", default="fit",
                    help=f"configurations also run with real tensors: fit (fake peak < {REAL_BUDGET_GB} GB), none, "
                         "or a comma list of record names")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the real runs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration and mode")
    ap.add_argument("--validate", action="store_true", help="check the method (see the module docstring)")
    ap.add_argument("--table", action="store_true", help="print --out's records as a markdown table, measure nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/memory_full.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", choices=("real", "fake", "profile"), help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"records": {}}
    if args.table:
        print(markdown_table(doc))
        return
    doc.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
               command=" ".join(["python", *sys.argv]), torch=torch.__version__, platform=platform.platform(),
               method=__doc__.split("How memory is measured. ")[1].split("\n\n")[0].replace("\n", " "))  # fmt: skip
    if args.validate:
        doc["validation"] = {"known_sequence": validate_known_sequence(), "fake_vs_real_tiny": validate_fake_vs_real(args),
                             "tracker_vs_allocator": validate_against_allocator(args)}  # fmt: skip
        print(json.dumps(doc["validation"], indent=2))
    else:
        measure_all(args, doc)
    write(doc, args.out)


if __name__ == "__main__":
    main()
