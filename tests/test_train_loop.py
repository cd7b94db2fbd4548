"""`train.loop.run` on the tiny model and a small cache built in the test: it trains, checkpoints, resumes."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_trainer.config import StatsConfig, TrainConfig, load_config
from sdxl_trainer.demo import demo_cache_config, demo_scan_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import cache, scan, stats
from sdxl_trainer.train import loop, sinks
from sdxl_trainer.train.step import TrainStep

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> Path:
    """scan → stats → cache of the synthetic set for the tiny model (read-only for the tests)."""
    root = tmp_path_factory.mktemp("train_work")
    data = Path(shutil.copytree(synthetic_data_dir, root / "data"))
    work = root / "work"
    scan.run(demo_scan_config(data, work, tiny_model_dir))
    stats.run(StatsConfig(work=work, model=tiny_model_dir, device="cpu", max_images=16))
    cache.run(demo_cache_config(work, tiny_model_dir))
    return work


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 4, "optimizer.learning_rate": 1e-4, "logging.every_steps": 1,
            "checkpoints.diffusers": False, "checkpoints.single_file": False, "data.workers": 1,
            "logging.tensorboard": False}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


def test_trains_logs_and_exports(tiny_model_dir, work, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, work, out, num_steps=3, gradient_accumulation_steps=2, **{
        "objective.name": "v_ztsnr", "latents.normalization": "per_channel", "loss.weighting": "min_snr",
        "ema.enabled": True, "ema.decay": 0.9, "checkpoints.diffusers": True, "checkpoints.single_file": True,
        "logging.tensorboard": TENSORBOARD})  # fmt: skip
    summary = loop.run(cfg)
    assert summary["steps"] == 3 and summary["samples"] == 3 * 2 * 2 and summary["skipped"] == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert not TENSORBOARD or list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert all(r["loss"] is not None and 0 < r["loss"] < 100 and r["grad_norm"] > 0 for r in lines)
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step-000003" and (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert (ckpt / "diffusers" / "model_index.json").is_file() and (ckpt / "model.safetensors").is_file()
    vae_cfg = json.loads((ckpt / "diffusers" / "vae" / "config.json").read_text())
    stats_doc = json.loads((work / "latent_stats.json").read_text())
    assert vae_cfg["latents_mean"] == pytest.approx(stats_doc["mean"], rel=1e-6)
    assert load_config(TrainConfig, out / "config.yaml") == cfg
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train"]["updates"] == 3 and state["ema"]["num_updates"] == 3
    # training moved the weights away from the base model
    trained = load_file(ckpt / "trainable.safetensors")
    from sdxl_trainer.models.loading import load_unet

    base = dict(load_unet(tiny_model_dir).named_parameters())
    assert not torch.equal(trained["conv_in.weight"], base["conv_in.weight"])


def test_resume_continues_bitwise(tiny_model_dir, work, tmp_path):
    kw = {"checkpoints.every_steps": 2, "validation.every_steps": 2, "validation.holdout_count": 6,
          "logging.every_steps": 4}  # fmt: skip
    full = loop.run(_cfg(tiny_model_dir, work, tmp_path / "a", **kw))
    assert full["steps"] == 4
    mid = tmp_path / "a" / "checkpoints" / "step-000002"
    resumed = loop.run(_cfg(tiny_model_dir, work, tmp_path / "b", resume=str(mid), **kw))
    assert resumed["steps"] == 4 and resumed["samples"] == full["samples"]
    logged = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"}
    assert [r["step"] for r in logged["a"]] == [1, 2, 4] and [r["step"] for r in logged["b"]] == [4]  # 1: the first
    val = {d: [r for r in lines if "val_loss" in r] for d, lines in logged.items()}
    assert [r["step"] for r in val["a"]] == [2, 4]
    assert val["b"][0]["val_loss_levels"] == val["a"][1]["val_loss_levels"]  # fixed levels and noise: comparable
    assert len(set(val["a"][1]["val_loss_levels"])) == 5 and val["a"][0]["val_loss"] != val["a"][1]["val_loss"]
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = load_file(mid / "trainable.safetensors")
    assert not torch.equal(m["conv_in.weight"], a["conv_in.weight"])  # steps 3–4 did change the weights


@pytest.mark.skipif(not BITSANDBYTES, reason="bitsandbytes is not installed (optional: the gpu extra)")
def test_adamw8bit_state_is_checkpointed_and_resumes_bitwise(tiny_model_dir, work, tmp_path):
    """8-bit AdamW through the trainer on the CPU (bitsandbytes ≥ 0.50): the quantised moments go into
    the checkpoint and a resume from step 2 ends where the uninterrupted run does, bit for bit."""
    import bitsandbytes.optim

    from sdxl_trainer.train.optim import _check_8bit_steps_on

    try:
        _check_8bit_steps_on(torch.device("cpu"), bitsandbytes.optim)
    except UserError as e:  # a release without CPU kernels: that error is the behaviour to have
        pytest.skip(str(e))
    kw = {"optimizer.name": "adamw8bit", "checkpoints.every_steps": 2}
    loop.run(_cfg(tiny_model_dir, work, tmp_path / "a", **kw))
    mid = tmp_path / "a" / "checkpoints" / "step-000002"
    saved = load_file(mid / "state.safetensors")
    moments = [k for k in saved if k.endswith("__bnb_optimizer_quant_state__.state1")]
    # bitsandbytes keeps tensors of 4096+ elements in 8 bits, smaller ones (biases, norms) in 32
    assert moments and all((saved[k].dtype == torch.uint8) == (saved[k].numel() >= 4096) for k in moments)
    assert any(saved[k].dtype == torch.uint8 for k in moments)
    loop.run(_cfg(tiny_model_dir, work, tmp_path / "b", resume=str(mid), **kw))
    for name in ("trainable.safetensors", "state.safetensors"):  # weights; optimiser, EMA, data position
        a, b = (load_file(tmp_path / d / "checkpoints" / "step-000004" / name) for d in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    w = load_file(tmp_path / "a" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert not torch.equal(w["conv_in.weight"], load_file(mid / "trainable.safetensors")["conv_in.weight"])


def test_resume_refuses_changed_batch_size(tiny_model_dir, work, tmp_path):
    loop.run(_cfg(tiny_model_dir, work, tmp_path / "a", num_steps=1))
    with pytest.raises(UserError, match="batch_size"):
        loop.run(_cfg(tiny_model_dir, work, tmp_path / "a", num_steps=2, batch_size=1, resume="latest"))


def test_stops_after_consecutive_skips_with_a_checkpoint(tiny_model_dir, work, tmp_path, monkeypatch):
    real = TrainStep.loss
    monkeypatch.setattr(TrainStep, "loss", lambda self, *a, **kw: real(self, *a, **kw) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="2 updates in a row"):
        loop.run(_cfg(tiny_model_dir, work, out, **{"max_consecutive_skips": 2, "lora.enabled": True}))
    ckpt = out / "checkpoints" / "step-000002"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train"]["skipped"] == 2 and state["train"]["updates"] == 0
    assert (ckpt / "lora_kohya.safetensors").is_file()


RUNNER = """
import json, sys
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.train import loop
loop.run(load_config(TrainConfig, None, json.loads(sys.argv[1])))
"""


# The DDP runner: plain SGD (an update proportional to the gradient, unlike AdamW's, which moves a
# weight by about the learning rate whatever its gradient's size, so that rounding noise in a
# near-zero gradient shows at the scale of the whole move), and a record per rank of the sample ids of
# every micro-batch and of the first update's gradient as the optimiser receives it (all-reduced,
# clipped). probe["drop_rank"] installs a DDP communication hook that drops that rank's gradient
# from the average: the desynchronisation the test must catch.
DDP_RUNNER = """
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.train import loop
from sdxl_trainer.train.step import TrainStep

settings, probe = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rank, out = int(os.environ.get("RANK", "0")), Path(probe["dir"])
loop.build_optimizer = lambda groups, *, lr, **kw: torch.optim.SGD([dict(g) for g in groups], lr=lr)

seen, real_update = [], TrainStep.update
def update(self, model, micro, *, optimizer, **kw):
    seen.append([list(b["ids"]) for b in micro])
    if len(seen) == 1:
        names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
        def save(opt, args, kwargs):
            grads = {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]}
            save_file(grads, str(out / f"grad-{rank}.safetensors"))
            handle.remove()
        handle = optimizer.register_step_pre_hook(save)
    return real_update(self, model, micro, optimizer=optimizer, **kw)
TrainStep.update = update

if probe.get("drop_rank") is not None:
    real_wrap = loop.wrap_model
    def wrap(unet, cfg, info, device):
        model = real_wrap(unet, cfg, info, device)
        def drop(state, bucket):
            buf = bucket.buffer()
            if rank == probe["drop_rank"]:
                buf.zero_()
            buf.div_(info.world_size)
            return torch.distributed.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])
        model.register_comm_hook(None, drop)
        return model
    loop.wrap_model = wrap

loop.run(load_config(TrainConfig, None, settings))
(out / f"ids-{rank}.json").write_text(json.dumps(seen))
"""

# Tolerances for DDP == one process, fp32 on CPU. The two runs differ only in summation order (a
# batch of 4 against two batches of 2 averaged by the all-reduce), so every compared quantity agrees
# to float32 rounding, ~1e-7 relative per operation; 1e-5 relative to the norm leaves two orders of
# magnitude for the UNet's depth. Dropping one rank's gradient changes the averaged gradient by half
# of that rank's share, O(1) relative to the norm: five orders of magnitude above the tolerance.
DDP_RTOL = 1e-5


def _rel(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖a‖ over all tensors: the relative difference of two flattened parameter sets."""
    assert a.keys() == b.keys()
    diff = torch.cat([(b[k].double() - a[k].double()).flatten() for k in a])
    return float(diff.norm() / torch.cat([a[k].double().flatten() for k in a]).norm())


def _ddp_compare(one: Path, two: Path, base: dict) -> dict[str, bool]:
    """Each property that one process of batch 4 and two ranks of batch 2 must share, checked."""
    runs = {"one0": (one, 0), "two0": (two, 0), "two1": (two, 1)}
    ids = {key: json.loads((d / f"ids-{r}.json").read_text()) for key, (d, r) in runs.items()}
    curves = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    grads = {key: load_file(d / f"grad-{r}.safetensors") for key, (d, r) in runs.items()}
    w = [load_file(d / "checkpoints" / "step-000003" / "trainable.safetensors") for d in (one, two)]
    moves = [{k: x[k] - base[k] for k in x} for x in w]
    # each run stores base + move rounded to float32, so two moves that agree exactly can still differ
    # by one unit in the last place of the weight wherever the roundings fall differently
    ulp = torch.cat([(torch.nextafter(x, torch.full_like(x, math.inf)) - x).double().flatten() for x in w[0].values()])
    ulp_share = float(ulp.norm() / torch.cat([m.double().flatten() for m in moves[0].values()]).norm())
    print(f"{two.name}: first gradient {_rel(grads['one0'], grads['two0']):.2e}, weight moves "
          f"{_rel(moves[0], moves[1]):.2e} (tolerance {DDP_RTOL:.0e} + {ulp_share:.2e} for float32 storage)")
    return {
        # the sampler splits each global micro-batch: rank r holds rows [2r, 2r+2) of the one-process batch
        "sample order": ids["one0"] == [[a + b for a, b in zip(u0, u1)] for u0, u1 in zip(ids["two0"], ids["two1"])],
        "loss curve": [r["samples"] for r in curves[1]] == [8, 16, 24]
        and all(abs(b["loss"] - a["loss"]) <= DDP_RTOL * abs(a["loss"]) for a, b in zip(*curves)),
        # the all-reduce leaves the same averaged gradient on every rank, bit for bit
        "ranks agree": all(torch.equal(grads["two0"][k], grads["two1"][k]) for k in grads["two0"]),
        "first gradient": _rel(grads["one0"], grads["two0"]) <= DDP_RTOL,
        "weights after 3 SGD updates": _rel(moves[0], moves[1]) <= DDP_RTOL + ulp_share,
    }


def test_two_gloo_ranks_match_one_process(tiny_model_dir, work, tmp_path):
    """Two DDP ranks of batch 2 train exactly like one process of batch 4 (the same samples, noise,
    gradient and weights), and the comparison catches a rank whose gradient is left out."""
    import os
    import subprocess
    import sys

    from sdxl_trainer.models.loading import load_unet

    common = {"model": str(tiny_model_dir), "work": str(work), "device": "cpu", "precision": "fp32", "num_steps": 3,
              "gradient_accumulation_steps": 2, "optimizer.learning_rate": 0.1, "optimizer.weight_decay": 0.0,
              "logging.every_steps": 1, "checkpoints.diffusers": False, "checkpoints.single_file": False,
              "data.workers": 1, "data.p_uncond": 0.2, "objective.name": "flow", "logging.tensorboard": False}  # fmt: skip
    script = tmp_path / "runner.py"
    script.write_text(DDP_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    runs = {"one": ([sys.executable, str(script)], 4, None), "two": (launch, 2, None), "broken": (launch, 2, 1)}
    for name, (cmd, batch, drop) in runs.items():
        (tmp_path / name).mkdir()
        settings = {**common, "out": str(tmp_path / name), "batch_size": batch}
        probe = {"dir": str(tmp_path / name), "drop_rank": drop}
        subprocess.run([*cmd, json.dumps(settings), json.dumps(probe)], check=True, env=env, timeout=300)

    base = {k: v.detach() for k, v in load_unet(tiny_model_dir).named_parameters()}
    w = load_file(tmp_path / "one" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert _rel(base, w) > 1e-4  # the three updates did move the weights
    good = _ddp_compare(tmp_path / "one", tmp_path / "two", base)
    assert all(good.values()), good
    broken = _ddp_compare(tmp_path / "one", tmp_path / "broken", base)
    # one rank's gradient left out: the same samples and first loss, ranks still in step with each
    # other, but a different gradient and so different weights, which the checks above must see
    assert broken == {**good, "first gradient": False, "weights after 3 SGD updates": False, "loss curve": False}, broken


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, work, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    n = 5
    settings = {"model": str(tiny_model_dir), "work": str(work), "device": "cpu", "precision": "fp32", "batch_size": 2,
                "num_steps": n, "optimizer.learning_rate": 1e-4, "checkpoints.every_steps": 1,
                "checkpoints.keep_last": 2,
                "checkpoints.diffusers": False, "checkpoints.single_file": False, "data.workers": 1,
                "ema.enabled": True, "ema.decay": 0.9, "schedule.kind": "cosine", "schedule.warmup_samples": 4,
                "logging.tensorboard": False}  # fmt: skip
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), json.dumps({**settings, "out": str(killed)})],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-000002":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = latest.read_text().strip()
    assert proc.returncode == -signal.SIGKILL and at_kill < f"step-{n:06d}", "the run finished before the kill"

    # the same process setup for all three (thread count changes float summation order)
    for extra in ({"out": str(killed), "resume": "latest"}, {"out": str(tmp_path / "straight")}):
        subprocess.run([sys.executable, str(script), json.dumps({**settings, **extra})], check=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)  # fmt: skip
    a = load_file(tmp_path / "straight" / "checkpoints" / f"step-{n:06d}" / "trainable.safetensors")
    b = load_file(killed / "checkpoints" / f"step-{n:06d}" / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema = [load_file(d / "checkpoints" / f"step-{n:06d}" / "state.safetensors")
           for d in (tmp_path / "straight", killed)]  # fmt: skip
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])


def test_lora_bf16_checkpointing_eager_attention(tiny_model_dir, work, tmp_path):
    out = tmp_path / "run"
    summary = loop.run(_cfg(tiny_model_dir, work, out, num_steps=2, precision="bf16", gradient_checkpointing=True,
                            attention="eager", **{"lora.enabled": True, "lora.rank": 4, "objective.name": "flow",
                                                  "optimizer.learning_rate": 1e-3}))  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["skipped"] == 0 and all(0 < r["loss"] < 100 for r in lines)
    ckpt = Path(summary["checkpoint"])
    kohya = load_file(ckpt / "lora_kohya.safetensors")
    peft = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    trained = load_file(ckpt / "trainable.safetensors")
    assert kohya and peft and all("lora_" in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at 0: it learned


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_missing_logging_package_is_a_clear_error(tiny_model_dir, work, tmp_path, sink, monkeypatch):
    import sys

    module = "torch.utils.tensorboard" if sink == "tensorboard" else "wandb"
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError, match=f"{sink} package is not installed"):
        loop.run(_cfg(tiny_model_dir, work, tmp_path / "run", **{f"logging.{sink}": True}))
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before training


def test_wandb_gets_the_config_every_logged_step_and_a_finish(tiny_model_dir, work, tmp_path, monkeypatch):
    """The W&B calls the loop makes, checked against a stand-in module: init once with the run's config,
    log per record at its step, finish (the real package, offline, is read back in test_train_samples.py)."""
    import sys
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "run"
    loop.run(_cfg(tiny_model_dir, work, out, num_steps=3, **{"logging.wandb": True, "logging.wandb_mode": "offline",
                                                               "logging.wandb_project": "p", "logging.wandb_run_name": "r"}))  # fmt: skip
    (init_kwargs,) = calls["init"]
    assert init_kwargs["mode"] == "offline" and init_kwargs["project"] == "p" and init_kwargs["name"] == "r"
    assert init_kwargs["dir"] == str(out) and init_kwargs["config"]["num_steps"] == 3
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in calls["log"]] == [r["step"] for r in jsonl] and len(jsonl) >= 3
    assert all(data["loss"] == pytest.approx(r["loss"]) for (_, data), r in zip(calls["log"], jsonl))
    assert calls["finish"] == [True]


def test_log_record_scalars():
    flat = sinks.scalars({"step": 3, "loss": 0.5, "lr": {"unet/decay": 1e-4}, "val_loss_levels": [0.1, 0.2],
                         "epoch": 0, "note": "x"})  # fmt: skip
    assert flat == {"loss": 0.5, "lr/unet/decay": 1e-4, "val_loss_levels/0": 0.1, "val_loss_levels/1": 0.2,
                    "epoch": 0.0}  # fmt: skip


def test_run_length_and_checkpoint_cadence():
    from sdxl_trainer.train.state import TrainState

    def cfg(**kw):
        return load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", **kw})

    assert loop.total_updates(cfg(num_steps=7), batches_per_epoch=10, global_batch=8) == 7
    assert loop.total_updates(cfg(num_samples=20), batches_per_epoch=10, global_batch=8) == 3  # rounded up
    assert loop.total_updates(cfg(num_epochs=1.5, gradient_accumulation_steps=4), batches_per_epoch=10,
                              global_batch=8) == 4  # ceil(15 batches / 4)  # fmt: skip
    by_samples, state = cfg(num_steps=9, **{"checkpoints.every_samples": 10}), TrainState()
    due = []
    for _ in range(6):
        before = state.samples_seen
        state.record(samples=4, skipped=False)
        due.append(loop.checkpoint_due(by_samples, state, before))
    assert due == [False, False, True, False, True, False]  # 12 ≥ 10, 20 ≥ 20
    assert not loop.checkpoint_due(cfg(num_steps=9), state, 0)  # no cadence: only the final checkpoint


def test_resume_config_check():
    from sdxl_trainer.train.checkpoint import check_resume_config

    def cfg(**kw):
        return load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 2, **kw})

    saved = cfg().model_dump(mode="json")
    check_resume_config(saved, cfg(num_steps=5, **{"optimizer.learning_rate": 1e-4}))  # length and lr may change
    with pytest.raises(UserError, match="objective"):
        check_resume_config(saved, cfg(**{"objective.name": "flow"}))
    with pytest.raises(UserError, match="lora"):
        check_resume_config(saved, cfg(**{"lora.enabled": True}))
    check_resume_config(saved, cfg(force=True, **{"objective.name": "flow"}))


def test_lora_under_bf16_keeps_the_frozen_base_in_bf16_and_the_adapter_in_fp32(tiny_model_dir, work, tmp_path):
    cfg = _cfg(tiny_model_dir, work, tmp_path / "run", precision="bf16", **{"lora.enabled": True, "lora.rank": 4})
    unet = loop.build_unet(cfg, torch.device("cpu"))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    full = loop.build_unet(_cfg(tiny_model_dir, work, tmp_path / "full", precision="bf16"), torch.device("cpu"))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in full.parameters())
