"""The training update on the tiny SDXL UNet: objectives, skipping, accumulation, normalisation, weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import load_unet
from sdxl_trainer.schema import write_json
from sdxl_trainer.train.ema import EMA
from sdxl_trainer.train.state import TrainState
from sdxl_trainer.train.step import (
    build_latent_norm,
    build_train_step,
    per_channel_norm,
    read_latent_stats,
    scaling_factor_norm,
)

LATENT_HW = 16


@pytest.fixture(scope="module")
def unet_template(tiny_model_dir):
    return load_unet(tiny_model_dir)


@pytest.fixture
def unet(unet_template):
    model = _copy(unet_template)
    model.train()
    return model


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _dims(unet):
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return cfg.cross_attention_dim, pooled


def make_batch(unet, n: int = 2, *, seed: int = 0, mean=(0.0,) * 4, std=(1.0,) * 4) -> dict:
    """Raw latents (per-channel mean/std), fp16 text like the cache, SDXL time ids, tag weight 1."""
    g = torch.Generator().manual_seed(seed)
    text_dim, pooled_dim = _dims(unet)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    return {
        "latents": torch.randn(n, 4, LATENT_HW, LATENT_HW, generator=g) * s + m,
        "text_hidden": torch.randn(n, 77, text_dim, generator=g).half(),
        "text_pooled": torch.randn(n, pooled_dim, generator=g).half(),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(n, 1),
        "tag_weight": torch.ones(n),
    }


def _step(**kw):
    kw.setdefault("objective", "v_ztsnr")
    kw.setdefault("normalize", scaling_factor_norm(1.0))
    return build_train_step(**kw)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["eps", "v", "v_ztsnr", "flow"])
def test_update_has_finite_loss_and_moves_weights(unet, objective):
    step = _step(objective=objective, weighting="min_snr")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    before, state = _weights(unet), TrainState()
    gen = torch.Generator().manual_seed(0)
    result = step.update(unet, [make_batch(unet)], optimizer=opt, generator=gen, state=state)
    assert not result.skipped and torch.isfinite(result.loss) and result.loss > 0
    assert torch.isfinite(result.grad_norm) and result.grad_norm > 0
    assert state.state_dict() == {"step": 1, "updates": 1, "samples_seen": 2, "skipped": 0, "consecutive_skips": 0}
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)


def test_parameter_list_built_once_updates_like_the_default(unet):
    """The loop builds the trainable list once and passes it in: same update, bit for bit; and the
    list is what gets clipped (a frozen-since parameter left out of it keeps its raw gradient)."""
    runs = []
    for given in (False, True):
        model = _copy(unet)
        step, state = _step(max_grad_norm=1e-3), TrainState()  # a tiny norm: clipping surely acts
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        kw = {"params": step.trainable_parameters(model)} if given else {}
        assert not given or [id(p) for p in kw["params"]] == [id(p) for p in model.parameters()]
        for i in range(2):
            result = step.update(model, [make_batch(model, seed=i)], optimizer=opt,
                                 generator=torch.Generator().manual_seed(i), state=state, **kw)  # fmt: skip
        runs.append((_weights(model), result.grad_norm))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(v, runs[0][0][k]) for k, v in runs[1][0].items())

    step, model = _step(max_grad_norm=1e-3), _copy(unet)
    params = step.trainable_parameters(model)
    left_out = params.pop()  # not in the given list: not clipped, so the optimiser sees its raw gradient
    seen = {}

    def probe(opt, args, kwargs):
        seen.update(listed=torch.nn.utils.get_total_norm([p.grad for p in params]), left_out=left_out.grad.norm())

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.register_step_pre_hook(probe)
    step.update(model, [make_batch(model)], optimizer=opt, generator=torch.Generator().manual_seed(0),
                state=TrainState(), params=params)  # fmt: skip
    assert seen["listed"] <= 1e-3 * (1 + 1e-5) < seen["left_out"]


def test_gradient_reaches_every_block(unet):
    step = _step()
    loss = step.loss(unet, make_batch(unet), generator=torch.Generator().manual_seed(1))
    loss.backward()
    no_grad = [n for n, p in unet.named_parameters() if p.grad is None]
    assert no_grad == []
    for prefix in ("conv_in", "down_blocks.1.attentions", "add_embedding", "up_blocks.0", "conv_out"):
        norms = [p.grad.norm() for n, p in unet.named_parameters() if n.startswith(prefix)]
        assert norms and sum(norms) > 0, prefix


def test_nan_in_batch_skips_the_update(unet):
    step = _step(max_grad_norm=1.0)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMA(unet, decay=0.9)
    state, gen = TrainState(), torch.Generator().manual_seed(0)
    bad = make_batch(unet)
    bad["latents"][1, 2, 3, 4] = float("nan")
    before, shadow = _weights(unet), [s.clone() for s in ema.shadow]
    result = step.update(unet, [bad], optimizer=opt, generator=gen, state=state, ema=ema)
    assert result.skipped and not torch.isfinite(result.loss)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, shadow)) and ema.num_updates == 0
    assert opt.state_dict()["state"] == {}  # AdamW never stepped: no moments, no step count
    assert all(p.grad is None for p in unet.parameters())  # the poisoned gradient is not carried over
    assert (state.step, state.updates, state.skipped, state.consecutive_skips, state.samples_seen) == (1, 0, 1, 1, 2)

    step.update(unet, [bad], optimizer=opt, generator=gen, state=state, ema=ema)
    assert state.consecutive_skips == 2
    result = step.update(unet, [make_batch(unet)], optimizer=opt, generator=gen, state=state, ema=ema)
    assert not result.skipped and state.consecutive_skips == 0 and state.skipped == 2 and state.updates == 1
    assert ema.num_updates == 1 and ema.last_step == 1


def test_nan_in_text_skips_too(unet):
    step = _step()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-2)
    bad = make_batch(unet)
    bad["text_hidden"][0, 5, 7] = float("inf")
    before = _weights(unet)
    result = step.update(unet, [bad], optimizer=opt, generator=torch.Generator().manual_seed(0), state=TrainState())
    assert result.skipped
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


class _Fixed:
    """Level and noise samplers that hand out precomputed draws in order, for any batch split."""

    def __init__(self, level: torch.Tensor, noise: torch.Tensor):
        self.level, self.noise, self.i, self.j = level, noise, 0, 0

    def sample_level(self, n, *, generator):
        out = self.level[self.i : self.i + n]
        self.i += n
        return out

    def sample_noise(self, x0, *, generator):
        out = self.noise[self.j : self.j + x0.shape[0]]
        self.j += x0.shape[0]
        return out, None


@pytest.mark.parametrize("objective", ["v_ztsnr", "flow"])
def test_accumulation_equals_one_big_batch(unet_template, objective):
    k, b = 2, 2
    big = make_batch(unet_template, n=k * b, seed=3)
    big["tag_weight"] = torch.linspace(0.5, 2.0, k * b)
    micro = [{key: v[i * b : (i + 1) * b] for key, v in big.items()} for i in range(k)]
    g = torch.Generator().manual_seed(7)
    level = torch.rand(k * b, generator=g) * 0.9 + 0.05 if objective == "flow" else torch.logspace(-1, 1, k * b)
    noise = torch.randn(k * b, 4, LATENT_HW, LATENT_HW, generator=g)
    finals = []
    for accum, batches in ((1, [big]), (k, micro)):
        model = _copy(unet_template).train()
        fixed = _Fixed(level, noise)
        built = _step(objective=objective, grad_accum=accum, max_grad_norm=None, weighting="min_snr")
        step = dataclasses.replace(built, sample_level=fixed.sample_level, sample_noise=fixed.sample_noise)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        result = step.update(model, batches, optimizer=opt, generator=g, state=TrainState())
        finals.append((result, _weights(model)))
    (r1, w1), (rk, wk) = finals
    torch.testing.assert_close(rk.loss, r1.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rk.grad_norm, r1.grad_norm, rtol=1e-4, atol=1e-7)
    for name in w1:
        torch.testing.assert_close(wk[name], w1[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(w1["conv_in.weight"], unet_template.state_dict()["conv_in.weight"])


def test_per_channel_normalisation_reaches_the_unet(unet, tmp_path):
    mean, std = [4.8, 0.16, 1.35, -1.78], [9.9, 6.3, 7.6, 6.0]
    write_json({"mean": mean, "std": std}, tmp_path / "latent_stats.json", artifact="latent_stats", config=None)
    norm = build_latent_norm("per_channel", stats_path=tmp_path / "latent_stats.json")
    # t_max=0: σ = 0.029, so the UNet input is √ᾱ·x0 + 0.029·ε ≈ the normalised latents
    step = _step(objective="eps", normalize=norm, level_options={"t_max": 0})
    seen = []
    hook = unet.conv_in.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    batch = make_batch(unet, n=4)
    z = batch["latents"]
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True)  # exactly 0 / 1 per channel
    batch["latents"] = z * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    step.loss(unet, batch, generator=torch.Generator().manual_seed(0))
    hook.remove()
    x = seen[0].transpose(0, 1).flatten(1)  # (C, B·h·w)
    torch.testing.assert_close(x.mean(1), torch.zeros(4), atol=0.01, rtol=0)
    torch.testing.assert_close(x.std(1), torch.ones(4), atol=0.01, rtol=0)
    # the scaling_factor normalisation would leave these latents far off: mean ≠ 0, std ≠ 1 per channel
    other = scaling_factor_norm(0.13025)(batch["latents"]).transpose(0, 1).flatten(1)
    assert (other.mean(1) - torch.zeros(4)).abs().max() > 0.1 and (other.std(1) - 1).abs().max() > 0.1


def test_latent_norm_formulas():
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    z = per_channel_norm(mean=[1, 1, 1, 1], std=[1, 2, 4, 8])(raw)
    torch.testing.assert_close(z[0, :, 0, 0], torch.tensor([0.0, 0.5, 0.5, 0.375]))
    torch.testing.assert_close(scaling_factor_norm(0.13025)(raw)[1, :, 2, 2], raw[0, :, 0, 0] * 0.13025)


def test_latent_stats_refusals(tmp_path):
    with pytest.raises(UserError, match="latent_stats not found"):
        read_latent_stats(tmp_path / "latent_stats.json")
    write_json({"mean": [0, 0, 0, 0], "std": [1, 0, 1, 1]}, tmp_path / "s.json", artifact="latent_stats", config=None)
    with pytest.raises(UserError, match="std > 0"):
        read_latent_stats(tmp_path / "s.json")
    write_json({"mean": [0] * 3, "std": [1] * 3}, tmp_path / "c.json", artifact="latent_stats", config=None)
    with pytest.raises(UserError, match="3 channels"):
        build_latent_norm("per_channel", stats_path=tmp_path / "c.json")
    with pytest.raises(UserError, match="unknown latent normalisation"):
        build_latent_norm("mean_only")
    assert json.loads((tmp_path / "c.json").read_text())["artifact"] == "latent_stats"


def test_tag_weights_scale_the_loss(unet):
    batch = make_batch(unet, n=3)
    losses = {}
    for name, weights, use in (("one", [1.0, 1, 1], True), ("two", [2.0, 2, 2], True), ("off", [2.0, 2, 2], False),
                               ("first", [3.0, 0, 0], True)):  # fmt: skip
        batch["tag_weight"] = torch.tensor(weights)
        step = _step(use_tag_weights=use)
        with torch.no_grad():
            losses[name] = step.loss(unet, batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(losses["two"], 2 * losses["one"])
    torch.testing.assert_close(losses["off"], losses["one"])
    assert not torch.allclose(losses["first"], losses["one"])  # per sample, not a batch-wide factor


def test_bf16_autocast_keeps_fp32_master_weights(unet):
    step = _step(precision="bf16")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    result = step.update(unet, [make_batch(unet)], optimizer=opt, generator=torch.Generator().manual_seed(0),
                         state=TrainState())  # fmt: skip
    assert not result.skipped and torch.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in unet.parameters())


def test_build_refuses_bad_options():
    norm = scaling_factor_norm(0.13025)
    with pytest.raises(UserError, match="precision"):
        build_train_step(objective="v", normalize=norm, precision="fp8")
    with pytest.raises(UserError, match="objective"):
        build_train_step(objective="x0", normalize=norm)
    with pytest.raises(UserError, match="shift"):
        build_train_step(objective="v", normalize=norm, level_options={"shift": 3.0})
    with pytest.raises(UserError, match="max_grad_norm"):
        build_train_step(objective="v", normalize=norm, max_grad_norm=0.0)


def test_train_state_round_trip():
    s = TrainState()
    s.record(samples=8, skipped=False)
    s.record(samples=8, skipped=True)
    t = TrainState()
    t.load_state_dict(s.state_dict())
    assert t == s and t.samples_seen == 16 and t.consecutive_skips == 1
    with pytest.raises(ValueError):
        t.load_state_dict({"step": 1})


def test_train_config_round_trip_and_refusals(tmp_path):
    from sdxl_trainer.config import TrainConfig, dump_config, load_config

    cfg = load_config(TrainConfig, None, {"model": "m", "work": "w", "out": "o", "num_epochs": 2,
                                          "objective.name": "v_ztsnr", "optimizer.betas": [0.9, 0.99]})  # fmt: skip
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg
    assert cfg.optimizer.betas == (0.9, 0.99) and cfg.objective.sigma_max is None
    base = {"model": "m", "work": "w", "out": "o"}
    with pytest.raises(UserError, match="exactly one run length"):
        load_config(TrainConfig, None, {**base, "num_steps": 1, "num_samples": 8})
    with pytest.raises(UserError, match="do not apply to flow"):
        load_config(TrainConfig, None, {**base, "num_steps": 1, "objective.name": "flow", "objective.sigma_max": 5.0})
    with pytest.raises(UserError, match="held-out split"):
        load_config(TrainConfig, None, {**base, "num_steps": 1, "validation.every_steps": 5})
    with pytest.raises(UserError, match="learning_rate"):
        load_config(TrainConfig, None, {**base, "num_steps": 1, "optimizer.learnig_rate": 1e-4})


@pytest.mark.parametrize("objective", ["v_ztsnr", "flow"])
def test_ranks_draw_their_rows_of_the_single_process_draws(objective):
    x0 = torch.randn(6, 4, 8, 8)
    kw = {"objective": objective, "offset_noise": 0.1, "input_perturbation": 0.05}
    one = _step(**kw).draw(x0, generator=torch.Generator().manual_seed(11))
    parts = [_step(world_size=3, rank=r, **kw).draw(x0[2 * r : 2 * r + 2], generator=torch.Generator().manual_seed(11))
             for r in range(3)]  # fmt: skip
    for j in range(3):
        torch.testing.assert_close(torch.cat([p[j] for p in parts]), one[j], rtol=0, atol=0)
    assert not torch.equal(parts[0][1], parts[1][1])  # the ranks' rows differ
    with pytest.raises(UserError, match="rank"):
        _step(world_size=2, rank=2)


def test_validation_levels_and_losses(unet):
    from sdxl_trainer.diffusion import build_objective
    from sdxl_trainer.train.step import validation_levels

    ztsnr = build_objective("v_ztsnr")
    levels = validation_levels(ztsnr, [0.0, 0.5, 1.0], device="cpu")
    torch.testing.assert_close(levels, ztsnr.sigmas[[0, 500, 999]].float())
    assert levels[-1] == 20000
    torch.testing.assert_close(validation_levels(build_objective("flow"), [0.25], device="cpu"), torch.tensor([0.25]))
    with pytest.raises(UserError, match="inside"):
        validation_levels(build_objective("flow"), [1.0], device="cpu")
    step, batch = _step(), make_batch(unet, n=3)
    a = step.validation_losses(unet, batch, levels=levels, generator=torch.Generator().manual_seed(2))
    b = step.validation_losses(unet, batch, levels=levels, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3,) and torch.equal(a, b) and len(set(a.tolist())) == 3


def test_fp16_uses_a_grad_scaler_and_skips_with_it(unet):
    step = _step(precision="fp16")
    assert step.scaler is not None and step.scaler.is_enabled()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    state, gen = TrainState(), torch.Generator().manual_seed(0)
    bad = make_batch(unet)
    bad["latents"][0] = float("nan")
    before, scale = _weights(unet), step.scaler.get_scale()
    assert step.update(unet, [bad], optimizer=opt, generator=gen, state=state).skipped
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert step.scaler.get_scale() == scale / 2  # the scaler backs off as on any overflow
    for _ in range(20):  # an fp16 overflow at a too-high scale is skipped too, until the scale fits
        if not step.update(unet, [make_batch(unet)], optimizer=opt, generator=gen, state=state).skipped:
            break
    assert state.updates == 1 and all(p.dtype == torch.float32 for p in unet.parameters())
    assert not torch.equal(unet.state_dict()["conv_in.weight"], before["conv_in.weight"])


class _ToyUNet(torch.nn.Module):
    """The UNet's call signature on a single conv: lets a test see the step's own host reads."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.text = torch.nn.Linear(8, 4)

    def forward(self, x, t, *, encoder_hidden_states, added_cond_kwargs, return_dict):
        bias = self.text(encoder_hidden_states.mean(1) + added_cond_kwargs["text_embeds"][:, :8])
        return (self.conv(x) + bias[:, :, None, None] + 1e-3 * t[:, None, None, None],)


def test_one_host_read_per_update_whatever_the_accumulation(monkeypatch):
    model = _ToyUNet()
    batch = {"latents": torch.randn(2, 4, 8, 8), "text_hidden": torch.randn(2, 77, 8).half(),
             "text_pooled": torch.randn(2, 8).half(), "time_ids": torch.ones(2, 6),
             "tag_weight": torch.ones(2)}  # fmt: skip
    step = _step(grad_accum=3, weighting="min_snr")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    gen = torch.Generator().manual_seed(0)
    result = step.update(model, [batch] * 3, optimizer=opt, generator=gen, state=TrainState())
    monkeypatch.undo()
    assert not result.skipped and reads == ["__bool__"]
