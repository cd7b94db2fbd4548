"""On-the-fly text mode: prompts built per step from the manifest, encoders frozen or trained, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_trainer.config import TrainConfig, load_config
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.loading import load_text_encoders
from sdxl_trainer.train import loop
from sdxl_trainer.train.text_mode import TextMode, load_captions, variant_indices


def _cfg(model: Path, work: Path, out: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "work": str(work), "out": str(out), "device": "cpu", "precision": "fp32",
            "batch_size": 2, "num_steps": 3, "optimizer.learning_rate": 1e-4, "logging.every_steps": 1,
            "checkpoints.diffusers": False, "checkpoints.single_file": False, "data.workers": 1,
            "logging.tensorboard": False, "text.mode": "on_the_fly", "text.variants.max_dropout": 0.5,
            "data.p_uncond": 0.3}  # fmt: skip
    base.update(overrides)
    return load_config(TrainConfig, None, base)


@pytest.fixture
def captured(monkeypatch) -> list[tuple[int, list[str], list[str]]]:
    """(step, ids, prompts) of every micro-batch the loop prepared."""
    seen: list[tuple[int, list[str], list[str]]] = []
    original = TextMode.set_prompts

    def spy(self, micro_batches, *, seed, step):
        original(self, micro_batches, seed=seed, step=step)
        seen.extend((step, list(b["ids"]), list(b["prompts"])) for b in micro_batches)

    monkeypatch.setattr(TextMode, "set_prompts", spy)
    return seen


def test_variant_indices_are_a_function_of_seed_step_and_global_row():
    one = variant_indices(seed=3, step=7, micro_batches=2, batch_size=4)
    assert one == variant_indices(seed=3, step=7, micro_batches=2, batch_size=4)
    assert one != variant_indices(seed=3, step=8, micro_batches=2, batch_size=4)
    halves = [variant_indices(seed=3, step=7, micro_batches=2, batch_size=2, world_size=2, rank=r) for r in (0, 1)]
    assert [halves[0][m] + halves[1][m] for m in range(2)] == one  # rank r keeps rows [r·b, (r+1)·b)


def test_config_refuses_encoder_training_without_its_needs():
    def cfg(**kw):
        return load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_steps": 1, **kw})

    with pytest.raises(UserError, match="on_the_fly"):
        cfg(**{"text.train_encoders": True, "optimizer.text_encoder_lr": 1e-5})
    with pytest.raises(UserError, match="text_encoder_lr"):
        cfg(**{"text.mode": "on_the_fly", "text.train_encoders": True})
    cfg(**{"text.mode": "on_the_fly", "text.train_encoders": True, "optimizer.text_encoder_lr": 1e-5})


def test_frozen_encoders_train_with_prompts_that_vary_per_step(tiny_model_dir, tiny_work, tmp_path, captured):
    cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / "run", num_steps=4, gradient_accumulation_steps=2)
    summary = loop.run(cfg)
    assert summary["steps"] == 4 and summary["skipped"] == 0 and 0 < summary["last"]["loss"] < 100
    assert [s for s, _, _ in captured] == [0, 0, 1, 1, 2, 2, 3, 3]
    captions = load_captions(tiny_work)
    prompts: dict[str, set[str]] = {}
    for _, ids, texts in captured:
        for image_id, text in zip(ids, texts):
            prompts.setdefault(image_id, set()).add(text)
            tags = captions[image_id][0]
            assert text == "" or set(text.split(", ")) <= set(tags)  # built from this image's own tags
    assert any(text == "" for _, _, texts in captured for text in texts)  # p_uncond: the empty prompt
    all_prompts = [t for _, _, texts in captured for t in texts if t]
    assert len(set(all_prompts)) > len(all_prompts) // 2  # shuffle / dropout: mostly distinct prompts
    # the frozen encoders were not touched and are not in the checkpoint
    ckpt = Path(summary["checkpoint"])
    assert not (ckpt / "text_encoders.safetensors").exists()


def test_prompts_differ_between_steps_for_the_same_image(tiny_work):
    from sdxl_trainer.config.train import TextSection

    text = TextMode(tokenizers=(None, None), encoders=(None, None), captions=load_captions(tiny_work),
                    cfg=TextSection(mode="on_the_fly"), device=torch.device("cpu"))  # fmt: skip
    image_id = max(text.captions, key=lambda i: len(text.captions[i][0]))  # the image with most tags
    per_step = []
    for step in range(6):
        batch = {"ids": [image_id, image_id], "uncond": torch.zeros(2, dtype=torch.bool)}
        text.set_prompts([batch], seed=0, step=step)
        per_step.append(tuple(batch["prompts"]))
    assert len(set(per_step)) == 6  # each step draws new variants
    again = {"ids": [image_id, image_id], "uncond": torch.tensor([False, True])}
    text.set_prompts([again], seed=0, step=2)
    assert again["prompts"] == [per_step[2][0], ""]  # deterministic; dropped rows get the empty prompt


def test_trained_encoders_change_checkpoint_and_export(tiny_model_dir, tiny_work, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_work, tmp_path / "run", num_steps=2, **{
        "text.train_encoders": True, "optimizer.text_encoder_lr": 1e-3, "checkpoints.diffusers": True,
        "checkpoints.single_file": True, "checkpoints.dtype": "fp32"})  # fmt: skip
    summary = loop.run(cfg)
    ckpt = Path(summary["checkpoint"])
    trained = load_file(ckpt / "text_encoders.safetensors")
    bases = load_text_encoders(tiny_model_dir)
    exported = load_text_encoders(ckpt / "diffusers")  # the diffusers folder carries the trained encoders
    for part, base, exp in zip(("text_encoder", "text_encoder_2"), bases, exported):
        names = [n for n, _ in base.named_parameters()]
        assert {k for k in trained if k.startswith(part + ".")} == {f"{part}.{n}" for n in names}
        q = next(n for n in names if n.endswith("layers.0.self_attn.q_proj.weight"))
        assert not torch.equal(trained[f"{part}.{q}"], dict(base.named_parameters())[q])  # training moved it
        assert all(torch.equal(p, trained[f"{part}.{n}"]) for n, p in exp.named_parameters())
    single = load_file(ckpt / "model.safetensors")
    ldm = export_ldm.clip_l_to_ldm(exported[0].state_dict())
    base_ldm = export_ldm.clip_l_to_ldm(bases[0].state_dict())
    assert all(torch.equal(single[k], v) for k, v in ldm.items())
    assert any(not torch.equal(single[k], base_ldm[k]) for k in ldm)
    groups = {g["name"] for g in _groups(ckpt)}
    assert {"text_encoder_1/decay", "text_encoder_2/decay"} <= groups


def test_one_trainable_list_per_run_holds_the_unet_and_the_trained_encoders(tiny_model_dir, tiny_work, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    """The loop builds the list the update clips once (not per update), with the encoders' weights in it."""
    from sdxl_trainer.models.loading import load_unet
    from sdxl_trainer.train.step import TrainStep

    built, real = [], TrainStep.trainable_parameters
    monkeypatch.setattr(TrainStep, "trainable_parameters", lambda self, model: built.append(real(self, model)) or built[-1])
    loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "run", num_steps=3,
                  **{"text.train_encoders": True, "optimizer.text_encoder_lr": 1e-3}))  # fmt: skip
    (params,) = built
    counts = [sum(1 for _ in m.parameters()) for m in (load_unet(tiny_model_dir), *load_text_encoders(tiny_model_dir))]
    assert len(params) == len({id(p) for p in params}) == sum(counts) and counts[1] > 0 and counts[2] > 0


def _groups(ckpt: Path) -> list[dict]:
    import json

    return json.loads((ckpt / "state.json").read_text())["optimizer"]["param_groups"]


def test_resume_is_bitwise_on_the_fly(tiny_model_dir, tiny_work, tmp_path):
    train_encoders = True  # the harder case: the encoders' weights and optimiser state must resume too
    kw = {"num_steps": 4, "checkpoints.every_steps": 2, "text.train_encoders": train_encoders,
          "optimizer.text_encoder_lr": 1e-3}  # fmt: skip
    full = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "a", **kw))
    mid = tmp_path / "a" / "checkpoints" / "step-000002"
    resumed = loop.run(_cfg(tiny_model_dir, tiny_work, tmp_path / "b", resume=str(mid), **kw))
    assert resumed["steps"] == full["steps"] == 4 and resumed["last"]["loss"] == full["last"]["loss"]
    files = ["trainable.safetensors"] + (["text_encoders.safetensors"] if train_encoders else [])
    for name in files:
        a = load_file(tmp_path / "a" / "checkpoints" / "step-000004" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        m = load_file(mid / name)
        assert any(not torch.equal(m[k], a[k]) for k in a)  # steps 3–4 changed these weights
