"""In-training samples (train/samples.py) on the tiny model: cadence, equality with `sdxl generate`,
resume, the sinks (metrics.jsonl, TensorBoard, real W&B offline), torchrun, start-up errors, progress lines."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdxl_trainer import console
from sdxl_trainer.config import GenerateConfig, TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate import generate
from sdxl_trainer.sampling.prompts import PromptLine, read_prompt_lines
from sdxl_trainer.train import loop, sample_output
from sdxl_trainer.train.data import CacheDataset
from sdxl_trainer.train.samples import SampleRounds, most_common_bucket
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.train.step import TrainStep

PROMPTS = ["red circle, blue background", "solid color, black background --n blue --d 7 --s 3 --l 2.5"]


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 2, "optimizer.learning_rate": 1e-3, "logging.every_steps": 1,
            "checkpoints.diffusers": False, "checkpoints.single_file": False, "data.workers": 1,
            "logging.tensorboard": False, "objective.name": "v_ztsnr", "samples.prompts": PROMPTS,
            "samples.every_steps": 1, "samples.steps": 2, "samples.cfg": 3.0, "samples.seeds": [0, 1],
            "samples.width": 64, "samples.height": 64, "samples.checks.black_seeds": [0]}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


def _round_records(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "sample_round_s" in r]


def _params(png: Path) -> dict:
    return json.loads(Image.open(png).text["sdxl_trainer"])


# ── prompts and settings ─────────────────────────────────────────────────────────────────────────


def test_prompt_file_lines_overrides_and_errors(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\n1girl, red dress --n lowres, bad hands --w 832 --h 1216 --d 7 --s 20 --l 4.5\n"
                    "a cat--not an option\n")  # fmt: skip
    first, second = read_prompt_lines(path)
    assert first == PromptLine("1girl, red dress", negative="lowres, bad hands", width=832, height=1216, seed=7,
                               steps=20, cfg=4.5)  # fmt: skip
    assert second == PromptLine("a cat--not an option")
    assert read_prompt_lines(["x --seed 3 --steps 4 --cfg 1"]) == [PromptLine("x", seed=3, steps=4, cfg=1.0)]
    for bad, message in [(["a --q 1"], r"samples.prompts\[0\]: unknown prompt option --q"),
                         (["a --w wide"], "--w needs a whole number"), (["a --d 1 --seed 2"], "given twice"),
                         (["# only a comment", "  "], "sample prompt list is empty")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            read_prompt_lines(bad)
    path.write_text("fine\nbad --h 0\n")
    with pytest.raises(UserError, match=rf"{path}:2: --h 0 is out of range"):
        read_prompt_lines(path)
    with pytest.raises(UserError, match="cannot read the sample prompt file"):
        read_prompt_lines(tmp_path / "missing.txt")
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UserError, match="cannot read the sample prompt file"):
        read_prompt_lines(path)


def test_config_refuses_what_it_can_see():
    def cfg(**kw):
        return load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, **kw})

    assert not cfg().samples.enabled and cfg(**{"samples.prompts": "p.txt", "samples.every_steps": 5}).samples.enabled
    for kw, message in [({"samples.every_steps": 5}, "samples.prompts is empty"),
                        ({"samples.prompts": ["a"]}, "no cadence"),
                        ({"samples.prompts": ["a"], "samples.every_steps": 2, "samples.every_samples": 8}, "not both"),
                        ({"samples.prompts": ["a"], "samples.every_steps": 2, "samples.width": 100,
                          "samples.height": 96}, "not a multiple of 8"),
                        ({"samples.prompts": ["a"], "samples.every_steps": 2, "samples.width": 64}, "together"),
                        ({"samples.prompts": ["a"], "samples.every_steps": 2, "samples.sampler": "ddim"},
                         "samples.sampler")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            cfg(**kw)


@pytest.mark.parametrize("bad, message", [
    ({"samples.prompts": "/nonexistent/prompts.txt"}, "cannot read the sample prompt file"),
    ({"samples.prompts": ["a --w 72 --h 64"]}, "72x64 is not a positive multiple of 16"),
    ({"samples.sampler": "flow_euler"}, "flow_euler is for flow models"),
])  # fmt: skip
def test_bad_sample_settings_stop_before_the_first_update(tiny_model_dir, tiny_work, tmp_path, bad, message):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        loop.run(_cfg(tiny_model_dir, tiny_work, out, **bad))
    assert not (out / "metrics.jsonl").exists() and not (out / "samples").exists()


def test_cadence_in_steps_and_samples_and_the_last_update():
    def rounds(**kw):
        cfg = load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 9,
                                              "samples.prompts": ["a"], **kw})  # fmt: skip
        r = SampleRounds(cfg, jobs=[], generator=None, ema=None, precision=None, info=None, sinks=[], n_updates=9,
                         black=False)  # fmt: skip
        state, due = TrainState(), []
        for _ in range(9):
            before = state.samples_seen
            state.record(samples=4, skipped=False)
            due.append(state.step if r.due(state, before) else None)
        return [s for s in due if s is not None]

    assert rounds(**{"samples.every_steps": 3}) == [3, 6, 9]
    assert rounds(**{"samples.every_steps": 4}) == [4, 8, 9]  # and after the last update
    assert rounds(**{"samples.every_samples": 10}) == [3, 5, 8, 9]  # 12 ≥ 10, 20, 32 ≥ 30, the end


# ── a run with samples ───────────────────────────────────────────────────────────────────────────


def test_rounds_at_cadence_with_their_settings_in_the_metadata(tiny_model_dir, tiny_work, tmp_path, capsys):
    """Rounds at 0 (baseline), 2 and 3 (the end); one PNG per prompt × seed with the run's settings; the
    default size is the most common bucket; check numbers in checks.json and metrics.jsonl; images
    and scalars in TensorBoard's event files; progress as plain lines when stdout is not a terminal."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, tiny_work, out, num_steps=3, **{"samples.every_steps": 2, "samples.width": None,
               "samples.height": None, "logging.tensorboard": True, "logging.every_steps": 2})  # fmt: skip
    loop.run(cfg)
    folders = sorted(p.name for p in (out / "samples").iterdir())
    assert folders == ["step-000000", "step-000002", "step-000003"]
    width, height = most_common_bucket(CacheDataset(tiny_work / "cache"))
    last = out / "samples" / "step-000003"
    assert sorted(p.name for p in last.glob("0*.png")) == ["00-seed0.png", "00-seed1.png", "01-seed7.png"]
    p = _params(last / "00-seed1.png")
    assert (p["seed"], p["steps"], p["cfg_scale"], p["sampler"], p["objective"]) == (1, 2, 3.0, "dpmpp_2m", "v_ztsnr")
    assert (p["width"], p["height"], p["step"], p["weights"]) == (width, height, 3, "raw")
    assert p["start_sigma"] == pytest.approx(20000.0)
    assert Image.open(last / "00-seed1.png").size == (width, height)
    q = _params(last / "01-seed7.png")  # the prompt line's own overrides
    assert (q["prompt"], q["negative"], q["seed"], q["steps"], q["cfg_scale"]) == (
        "solid color, black background", "blue", 7, 3, 2.5)
    assert "Steps: 2, Sampler: dpmpp_2m" in Image.open(last / "00-seed1.png").text["parameters"]
    assert {"grid.png", "black.png", "checks.json"} <= {p.name for p in last.iterdir()}
    doc = json.loads((last / "checks.json").read_text())
    black = doc["checks"]["raw"]["black"]  # on by default for v_ztsnr
    records = _round_records(out)
    assert [r["step"] for r in records] == [0, 2, 3]
    assert records[-1]["check/black/black_mean"] == black["black"]["mean"] == doc["scalars"]["check/black/black_mean"]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"samples/00-seed0", "samples/00-seed1", "samples/01-seed7", "samples/grid"} <= set(tags["images"])
    shown = acc.Images("samples/00-seed1")
    assert [e.step for e in shown] == [0, 2, 3] and (shown[-1].width, shown[-1].height) == (width, height)
    on_disk = np.asarray(Image.open(last / "00-seed1.png"))
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown[-1].encoded_image_string))), on_disk)
    assert [e.value for e in acc.Scalars("check/black/black_mean")] == pytest.approx([r["check/black/black_mean"]
                                                                                      for r in records])  # fmt: skip
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split("/")[0] for x in lines] == ["step 1", "step 2", "step 3"]  # step 1, then every 2, the end
    assert all("loss " in x and "lr 1.00e-03" in x and "samples/s" in x for x in lines)


@pytest.mark.parametrize("objective, norm", [("v_ztsnr", "per_channel"), ("flow", "scaling_factor")])
def test_a_training_image_equals_sdxl_generate_on_the_checkpoint_of_its_step(tiny_model_dir, tiny_work, tmp_path,
                                                                             monkeypatch, objective, norm):  # fmt: skip
    """CPU fp32, the same seed: the round's image (EMA weights, which the checkpoint exports) and `sdxl
    generate` on that checkpoint are equal to the bit, as tensors and as PNG pixels."""
    rendered = {}
    real_save = sample_output.save_png
    monkeypatch.setattr(sample_output, "save_png",
                        lambda image, path, params: rendered.setdefault((path.parent.name, path.name), image) is not None
                        and real_save(image, path, params))  # fmt: skip
    out = tmp_path / "run"
    loop.run(_cfg(tiny_model_dir, tiny_work, out, **{
        "objective.name": objective, "latents.normalization": norm, "ema.enabled": True, "ema.decay": 0.5,
        "checkpoints.diffusers": True, "checkpoints.dtype": "fp32", "samples.every_steps": 2,
        "samples.prompts": [PROMPTS[0]], "samples.seeds": [3]}))  # fmt: skip
    ckpt = out / "checkpoints" / "step-000002"
    gen_out = tmp_path / "generated"
    (png,) = generate.run(GenerateConfig(checkpoint=ckpt, prompt=[PROMPTS[0]], out=gen_out, steps=2, cfg_scale=3.0,
                                         width=64, height=64, seed=3, device="cpu", dtype="fp32"))  # fmt: skip
    trained = np.asarray(Image.open(out / "samples" / "step-000002" / "00-seed3-ema.png"))
    assert np.array_equal(np.asarray(Image.open(png)), trained)
    from sdxl_trainer.evaluate.checkpoint import load_generator
    from sdxl_trainer.sampling.sample import SamplingOptions, generate_images

    g = load_generator(ckpt, device="cpu", dtype="fp32")
    ((image, _),) = generate_images(g, prompts=[PROMPTS[0]], seeds=[3], width=64, height=64,
                                    options=SamplingOptions(steps=2, cfg_scale=3.0))  # fmt: skip
    assert torch.equal(image, rendered[(".step-000002.tmp", "00-seed3-ema.png")])
    assert not torch.equal(image, rendered[(".step-000002.tmp", "00-seed3.png")])  # raw ≠ EMA: a real check


def test_resume_neither_repeats_nor_skips_a_round_and_sampling_does_not_change_training(tiny_model_dir, tiny_work,
                                                                                        tmp_path, monkeypatch):  # fmt: skip
    kw = {"num_steps": 5, "samples.every_steps": 2, "checkpoints.every_steps": 1, "ema.enabled": True,
          "ema.decay": 0.5, "samples.prompts": [PROMPTS[0]], "samples.seeds": [0]}  # fmt: skip
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "straight", **kw))
    real_update = TrainStep.update

    def crash_before_update_4(self, *args, state, **kwargs):
        if state.step == 3:
            raise RuntimeError("killed")
        return real_update(self, *args, state=state, **kwargs)

    monkeypatch.setattr(TrainStep, "update", crash_before_update_4)
    with pytest.raises(RuntimeError, match="killed"):
        loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "resumed", **kw))
    monkeypatch.setattr(TrainStep, "update", real_update)
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "resumed", resume="latest", **kw))
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "plain", **{**kw, "samples.every_steps": None,
                                                                     "samples.prompts": []}))  # fmt: skip
    for run in ("straight", "resumed"):
        assert [r["step"] for r in _round_records(tmp_path / run)] == [0, 2, 4, 5]  # each round once
        assert sorted(p.name for p in (tmp_path / run / "samples").iterdir()) == [
            "step-000000", "step-000002", "step-000004", "step-000005"]  # no half-written folder left
    for name in ("00-seed0.png", "00-seed0-ema.png"):  # the resumed run renders what the straight one did
        a, b = (np.asarray(Image.open(tmp_path / r / "samples" / "step-000004" / name)) for r in ("straight", "resumed"))
        assert np.array_equal(a, b)
    weights = [load_file(tmp_path / r / "checkpoints" / "step-000005" / "trainable.safetensors")
               for r in ("straight", "resumed", "plain")]  # fmt: skip
    states = [load_file(tmp_path / r / "checkpoints" / "step-000005" / "state.safetensors")
              for r in ("straight", "plain")]  # fmt: skip
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])  # EMA swap restored bitwise
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # optimiser and EMA state too


# ── W&B, for real, offline ───────────────────────────────────────────────────────────────────────

WANDB_BLOCK = 32768  # the .wandb transaction log is LevelDB's log format: 32 KiB blocks of framed records


def _wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a 7-byte W&B header, then LevelDB log records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_images_and_the_check_scalars(tiny_model_dir, tiny_work, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb-dir",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    loop.run(_cfg(tiny_model_dir, tiny_work, out, **{"logging.wandb": True, "logging.wandb_mode": "offline",
                                                     "samples.every_steps": 2}))  # fmt: skip
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    log = next(run_dir.glob("run-*.wandb"))
    # the W&B service process writes the log; on a loaded machine it may still be flushing after
    # finish() returns: wait for its closing record before reading
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(log)) and time.monotonic() < deadline:
        time.sleep(0.5)
    history = {}
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    rounds = {r["step"]: r for r in _round_records(out)}
    logged_rounds = sorted(s for s, h in history.items() if "samples/captions" in h)
    assert logged_rounds == sorted(rounds) == [0, 2], {s: sorted(h) for s, h in history.items()}
    for step, logged in history.items():
        if step in rounds:
            assert logged["samples/captions"] == [PROMPTS[0]] * 2 + ["solid color, black background"]
            assert logged["check/black/black_mean"] == pytest.approx(rounds[step]["check/black/black_mean"])
            files = [run_dir / "files" / f for f in logged["samples/filenames"]]
            assert len(files) == 3 and all(Image.open(f).size == (64, 64) for f in files)
    assert history[1]["loss"] > 0  # the training record of step 1 beside them


# ── torchrun ─────────────────────────────────────────────────────────────────────────────────────

DDP_RUNNER = """
import json, os, sys
from safetensors.torch import save_file
from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.train import loop, samples

rank, rendered_on, waited_at, unets = int(os.environ["RANK"]), [], [], []
real_render, real_build, real_barrier = samples.SampleRounds.render, loop.build_unet, samples.dist.barrier
def render(self, state):
    rendered_on.append((rank, state.step))
    return real_render(self, state)
def barrier(info, where, **kw):  # dist is one module: the loop's own barriers pass here too
    waited_at.append(where)
    return real_barrier(info, where, **kw)
samples.SampleRounds.render, samples.dist.barrier = render, barrier
loop.build_unet = lambda *a, **kw: unets.append(real_build(*a, **kw)) or unets[-1]
summary = loop.run(load_config(TrainConfig, None, json.loads(sys.argv[1])))
save_file({k: v.detach().contiguous() for k, v in unets[0].state_dict().items()}, sys.argv[2] + f"-{rank}.safetensors")
with open(sys.argv[2] + f"-{rank}.json", "w") as f:
    json.dump({"rendered": rendered_on, "waited": waited_at, "steps": summary["steps"]}, f)
"""


def test_two_gloo_ranks_render_on_rank_0_and_stay_in_step(tiny_model_dir, tiny_work, tmp_path):
    """Rank 0 renders every round once (raw and EMA weights) while rank 1 waits at the barrier: both finish
    every update, and their weights after the last one are equal to the bit (a round that left rank 0's
    UNet changed — EMA weights not swapped back — would show here)."""
    settings = _cfg(tiny_model_dir, tiny_work, tmp_path / "two", num_steps=2, **{"samples.prompts": [PROMPTS[0]],
                    "samples.seeds": [0], "ema.enabled": True, "ema.decay": 0.5}).model_dump(mode="json")  # fmt: skip
    script = tmp_path / "runner.py"
    script.write_text(DDP_RUNNER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([*launch, json.dumps(settings), str(tmp_path / "probe")], check=True, env=env, timeout=300,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    probes = [json.loads((tmp_path / f"probe-{r}.json").read_text()) for r in (0, 1)]
    for probe in probes:
        probe["waited"] = [w for w in probe["waited"] if w.startswith("samples")]
    waited = [f"samples at step {s}" for s in (0, 1, 2)]
    assert probes[0] == {"rendered": [[0, 0], [0, 1], [0, 2]], "waited": waited, "steps": 2}
    assert probes[1] == {"rendered": [], "waited": waited, "steps": 2}
    assert [r["step"] for r in _round_records(tmp_path / "two")] == [0, 1, 2]
    assert len(list((tmp_path / "two" / "samples" / "step-000002").glob("00-seed0*.png"))) == 2  # raw and EMA
    a, b = (load_file(tmp_path / f"probe-{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = {k: v for k, v in load_file(tmp_path / "two" / "checkpoints" / "step-000002" / "trainable.safetensors").items()}
    assert all(torch.equal(a[k], base[k]) for k in base)  # what rank 0 checkpointed is what both hold


# ── the progress display ─────────────────────────────────────────────────────────────────────────


def test_plain_progress_lines_and_a_silent_nested_bar(capsys):
    record = {"step": 10, "loss": 0.12345, "lr": {"unet/decay": 1e-4, "unet/no_decay": 1e-4}, "samples_per_s": 3.5}
    with console.training_progress(100, plain_lines=True) as bar:
        bar.advance(10)
        with console.progress("inner", 3) as advance:  # a sampling round's bar under the training bar
            advance()
        bar.report(record)
        bar.report({**record, "step": 20, "loss": None})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step  10/100 · loss 0.1235 · lr 1.00e-04 · 3.50 samples/s · elapsed 0:00:00 · eta ")
    assert out[1].startswith("step  20/100 · loss – (skipped)")
    with console.training_progress(100, plain_lines=False) as bar:
        bar.report(record)
    with console.training_progress(100, plain_lines=True, enabled=False) as bar:  # another rank
        bar.report(record)
    assert capsys.readouterr().out == ""


# ── the command line ─────────────────────────────────────────────────────────────────────────────


def test_cli_flags_in_kohyas_spelling_and_a_bad_prompt_file_is_one_line(tiny_model_dir, tiny_work, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from sdxl_trainer.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle, blue background --w 64 --h 64\n")
    out = tmp_path / "run"
    args = ["--quiet", "train", "--model", str(tiny_model_dir), "--work", str(tiny_work), "--out", str(out),
            "--device", "cpu", "--precision", "fp32", "--batch_size", "2", "--num_steps", "1", "--objective", "flow",
            "--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--sample-sampler", "euler",
            "--set", "samples.steps=2", "--set", "checkpoints.diffusers=false", "--set", "checkpoints.single_file=false",
            "--set", "logging.tensorboard=false", "--set", "data.workers=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())["samples"]
    assert (saved["prompts"], saved["every_steps"], saved["sampler"]) == (str(prompts), 1, "euler")
    assert _params(out / "samples" / "step-000001" / "00-seed0.png")["sampler"] == "euler"
    prompts.write_text("red circle --size 64\n")
    result = CliRunner().invoke(app, [a if a != str(out) else str(tmp_path / "other") for a in args])
    assert result.exit_code == 2 and not (tmp_path / "other" / "samples").exists()
    assert result.output.strip().splitlines() == [f"error: {prompts}:1: unknown prompt option --size — use --n "
                                                  "(negative), --w, --h, --d (seed), --s (steps) or --l (cfg)"]  # fmt: skip
