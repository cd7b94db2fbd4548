"""torch.compile in training (train/compile.py) on the CPU: inductor through `loop.run`, DDP, recompiles.

The slow tests compile for real on the CPU (inductor needs a C++ compiler) and count compiled
graphs with dynamo's counter, ``counters["stats"]["unique_graphs"]``, as a delta over each test
(``torch._dynamo.reset()`` around every test drops the compiled code but not the counter).
Whole-UNet inductor compile costs minutes per shape on 2 cores (docs/benchmarks.md), so the
whole-model test uses the ``aot_eager`` backend: dynamo's capture, guards and recompiles and AOT
autograd's joint forward/backward graph are the same, only inductor's code generation is left out.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export import unwrap_model
from sdxl_trainer.models.loading import load_unet
from sdxl_trainer.train import loop
from sdxl_trainer.train.compile import compile_model, repeated_blocks
from sdxl_trainer.train.step import TrainStep

# fp32 on the CPU: compiled and eager differ only in the order fused kernels sum in, ~1e-7 relative
# per operation (measured: ≤ 3e-7 on the losses, ≤ 1e-6 on the gradients); a wrong graph is O(1) off.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "optimizer.learning_rate": 1e-4, "logging.every_steps": 1, "checkpoints.diffusers": False,
            "checkpoints.single_file": False, "data.workers": 1, "logging.tensorboard": False}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).double().flatten() for k in a])
    return float(diff.norm() / torch.cat([a[k].double().flatten() for k in a]).norm())


def _train(cfg: TrainConfig, monkeypatch) -> dict:
    """loop.run, recording per update the latent shape and the graphs compiled so far, and the first
    update's gradients as the optimiser receives them."""
    record: dict = {"shapes": [], "graphs": [], "grads": {}}
    start, real = graphs(), TrainStep.update

    def update(self, model, micro, *, optimizer, **kw):
        if not record["shapes"]:
            names = {id(p): n for n, p in unwrap_model(model).named_parameters()}

            def save(opt, args, kwargs):
                record["grads"] = {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]}
                handle.remove()

            handle = optimizer.register_step_pre_hook(save)
        result = real(self, model, micro, optimizer=optimizer, **kw)
        record["shapes"].append(tuple(micro[0]["latents"].shape))
        record["graphs"].append(graphs() - start)
        return result

    monkeypatch.setattr(TrainStep, "update", update)
    loop.run(cfg)
    monkeypatch.setattr(TrainStep, "update", real)
    record["losses"] = [json.loads(x)["loss"] for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return record


def _tokens(shape: tuple[int, ...]) -> int:
    """Tokens a transformer block of the tiny UNet sees: its attention runs at half the latent side."""
    return (shape[2] // 2) * (shape[3] // 2)


# ── fast: what compile_model does to the module ───────────────────────────────────────────────────


def test_blocks_scope_compiles_every_transformer_block_in_place(tiny_model_dir):
    unet = load_unet(tiny_model_dir)
    names = list(unet.state_dict())
    blocks = repeated_blocks(unet)
    assert len(blocks) == 6 and {type(b).__name__ for b in blocks} == {"BasicTransformerBlock"}
    assert compile_model(unet, scope="blocks") is unet  # nothing to unwrap: checkpoints keep their names
    assert list(unet.state_dict()) == names
    assert all(b._compiled_call_impl is not None for b in blocks)
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == len(blocks)  # resnets, convolutions and the UNet itself stay eager


def test_model_scope_wraps_the_whole_unet_and_bad_scopes_are_user_errors(tiny_model_dir):
    unet = load_unet(tiny_model_dir)
    model = compile_model(unet, scope="model")
    assert model is not unet and unwrap_model(model) is unet
    with pytest.raises(UserError, match="compile scope"):
        compile_model(unet, scope="layers")
    with pytest.raises(UserError, match="no repeated blocks"):
        compile_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), scope="blocks")


def test_compile_scope_config_and_flag(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sdxl_trainer.cli import app

    base = {"model": "m", "work": "w", "out": "o", "num_steps": 1}
    assert load_config(TrainConfig, None, base).compile_scope == "blocks"
    assert load_config(TrainConfig, None, {**base, "compile_scope": "model"}).compile_scope == "model"
    with pytest.raises(UserError, match="compile_scope"):
        load_config(TrainConfig, None, {**base, "compile_scope": "layers"})
    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg: seen.append(cfg) or {"steps": 0})
    args = ["train", "--model", "m", "--work", "w", "--out", str(tmp_path), "--num-steps", "1", "--enable-compile",
            "--compile-scope", "model"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[0].compile and seen[0].compile_scope == "model"


# ── slow: real compiles ──────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def eager_full(tiny_model_dir, tiny_work, tmp_path_factory):
    """The eager reference: 7 full-finetune updates, which cover the cache's three bucket shapes."""
    mp = pytest.MonkeyPatch()
    try:
        cfg = _cfg(tiny_model_dir, tiny_work, tmp_path_factory.mktemp("eager") / "run", num_steps=7)
        return _train(cfg, mp)
    finally:
        mp.undo()


@pytest.mark.slow
def test_blocks_compile_full_finetune_matches_eager_and_compiles_once_per_token_count(
    tiny_model_dir, tiny_work, tmp_path, monkeypatch, eager_full
):
    """Inductor, regional: one graph serves all six blocks; a second token count recompiles once with
    it symbolic (automatic dynamic), and no later bucket or step compiles again."""
    cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / "run", num_steps=7, compile=True, compile_scope="blocks")
    got = _train(cfg, monkeypatch)
    assert got["shapes"] == eager_full["shapes"] and len(set(got["shapes"])) == 3  # 12×20, 16×16, 20×12
    tokens = [_tokens(s) for s in got["shapes"]]
    first_new = [i for i, n in enumerate(tokens) if n not in tokens[:i]]  # updates that saw a new token count
    assert first_new == [0, 1] and got["graphs"][0] == 1 and got["graphs"][1] == 2
    assert got["graphs"][1:] == [2] * 6  # 20×12 has 12×20's token count; repeated steps compile nothing
    torch.testing.assert_close(got["losses"], eager_full["losses"], rtol=RTOL, atol=0)
    assert _rel(eager_full["grads"], got["grads"]) <= RTOL
    assert eager_full["losses"][0] != eager_full["losses"][1]  # the updates are not trivially equal


@pytest.mark.slow
def test_blocks_compile_composes_with_lora_and_gradient_checkpointing(tiny_model_dir, tiny_work, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """peft's LoRA layers inside the compiled blocks, each block re-run under torch.utils.checkpoint."""
    kw = {"num_steps": 1, "gradient_checkpointing": True, "lora.enabled": True, "lora.rank": 4}
    eager = _train(_cfg(tiny_model_dir, tiny_work, tmp_path / "eager", **kw), monkeypatch)
    got = _train(_cfg(tiny_model_dir, tiny_work, tmp_path / "run", compile=True, **kw), monkeypatch)
    # two graphs for one shape: the first block's input needs no gradient (only frozen layers lie
    # before it under LoRA), every later block's does, and requires_grad is part of the guard
    assert eager["graphs"] == [0] and got["graphs"] == [2]
    torch.testing.assert_close(got["losses"], eager["losses"], rtol=RTOL, atol=0)
    assert got["grads"] and all("lora_" in k for k in got["grads"])
    assert _rel(eager["grads"], got["grads"]) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_after_ddp_matches_eager_ddp_and_stops_recompiling(tiny_model_dir, tmp_path, monkeypatch, scope):
    """The trainer's order — DDP first, compile after — on a real one-process gloo group: gradients as
    eager DDP's, at most one graph per new shape class, none for a shape seen before."""
    from torch.nn.parallel import DistributedDataParallel

    if scope == "model":  # see the module docstring: whole-UNet inductor is minutes per shape here
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        unet = load_unet(tiny_model_dir).train().requires_grad_(True)
        eager = DistributedDataParallel(copy.deepcopy(unet))
        model = compile_model(DistributedDataParallel(unet), scope=scope)
        assert isinstance(unwrap_model(model), type(unet)) and (scope == "blocks") == isinstance(
            model, DistributedDataParallel
        )
        start, counts = graphs(), []
        shapes = [(12, 20), (16, 16), (20, 12), (16, 16), (12, 20)]
        for i, (h, w) in enumerate(shapes):
            g = torch.Generator().manual_seed(i)
            args = (torch.randn(2, 4, h, w, generator=g), torch.tensor([10.0, 700.0]))
            kwargs = {"encoder_hidden_states": torch.randn(2, 77, 96, generator=g),
                      "added_cond_kwargs": {"text_embeds": torch.randn(2, 64, generator=g),
                                            "time_ids": torch.randn(2, 6, generator=g)}}  # fmt: skip
            grads = []
            for m in (eager, model):
                m(*args, **kwargs, return_dict=False)[0].square().mean().backward()
                grads.append({n: p.grad.clone() for n, p in unwrap_model(m).named_parameters()})
                m.zero_grad(set_to_none=True)
            assert _rel(*grads) <= RTOL, (scope, (h, w))
            counts.append(graphs() - start)
    finally:
        torch.distributed.destroy_process_group()
    assert counts[0] >= 1 and counts[1] == counts[0] + 1  # the first change of shape: one dynamic recompile
    assert counts[-1] <= 3 and counts[3:] == [counts[2]] * 2  # bounded by the 3 shapes; repeats compile nothing
