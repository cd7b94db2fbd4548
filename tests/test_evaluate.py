"""`sdxl evaluate`: a shortened run on tiny checkpoints writes every artifact with finite numbers, and the
schedule data, the coherence measure and the brightness metric agree with the math they stand for."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sdxl_trainer.config import EvaluateConfig
from sdxl_trainer.diffusion import (
    build_objective,
    flow_shift,
    karras_sigmas,
    mean_signal_fraction,
    schedule_curves,
    trailing_sigmas,
)
from sdxl_trainer.evaluate import report
from sdxl_trainer.evaluate.artifacts import read_csv
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.sampling.black import black_image_metrics, brightness
from sdxl_trainer.sampling.coherence import canvas_side, layout_error, low_frequency, start_options
from sdxl_trainer.sampling.progressive import frame_steps
from sdxl_trainer.sampling.sample import SamplingOptions
from sdxl_trainer.evaluate.schedules import density, mean_fraction_rows, sampling_rows
from sdxl_trainer.models.export import save_diffusers_pipeline
from sdxl_trainer.models.loading import load_pipeline_parts

SIDE = 32



@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    parts = load_pipeline_parts(tiny_model_dir)
    mods = {n: getattr(parts, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    root = tmp_path_factory.mktemp("eval-ckpts")
    return {
        "v_ztsnr": save_diffusers_pipeline(root / "vz", **mods, objective="v_ztsnr"),
        "flow": save_diffusers_pipeline(root / "flow", **mods, objective="flow", flow_shift=3.0),
    }


def _short(ckpt, out, **kw) -> EvaluateConfig:
    short = dict(steps=3, seeds=[0, 1], coherence_seeds=[0, 1], coherence_scales=[1.0, 2.0], base_resolution=SIDE,
                 density_samples=2000, thumbnail=32, progressive_frames=3, device="cpu", dtype="fp32")  # fmt: skip
    return EvaluateConfig(checkpoint=ckpt, out=out, **short | kw)


@pytest.fixture(scope="module")
def evaluated(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return report.run(_short(ckpts["v_ztsnr"], out)), out


def _numbers(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_short_evaluate_writes_every_artifact_with_finite_numbers(evaluated):
    metrics, out = evaluated
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["black.png", "black_brightness.png", "coherence.png", "coherence_plot.png", "schedules.png",
                           "density.png", "sampling_sigmas.png", "mean_fraction.png", "progressive.png"])  # fmt: skip
    for png in pngs:  # every picture has its numbers beside it
        assert (out / png.replace(".png", ".csv")).stat().st_size > 0, png
    doc = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert doc["artifact"] == "evaluate_metrics" and {"black", "coherence", "schedules", "progressive"} <= set(doc)
    numbers = list(_numbers({k: v for k, v in doc.items() if k != "config"}))
    assert len(numbers) > 30 and all(math.isfinite(x) for x in numbers)
    text = (out / "report.md").read_text()
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)) == set(pngs)  # every figure embedded, each exists
    assert text.count("## ") == 4 and metrics["objective"] == "v_ztsnr" and metrics["sampling"]["start_level"] > 19000


def test_black_and_coherence_tables_agree_with_metrics(evaluated):
    metrics, out = evaluated
    rows = read_csv(out / "black.csv")
    assert [(r["kind"], int(r["seed"])) for r in rows] == [("black", 0), ("black", 1), ("white", 0), ("white", 1)]
    black = [float(r["mean"]) for r in rows if r["kind"] == "black"]
    assert metrics["black"]["black"]["mean"] == pytest.approx(sum(black) / 2)
    b = metrics["black"]
    assert b["separation"] == pytest.approx(b["white"]["mean"] - b["black"]["mean"])
    # v_ztsnr: the black check again from ComfyUI's zero-SNR start (last ᾱ 4.897e-8 → σ ≈ 4,519)
    comfy = b["comfyui_zsnr"]
    assert comfy["sigma_max"] == pytest.approx(4518.8, abs=0.5)
    assert comfy["black_difference"] == pytest.approx(comfy["black"] - b["black"]["mean"])
    assert 0.0 <= comfy["black"] <= 1.0 and 0.0 <= comfy["white"] <= 1.0
    coh = read_csv(out / "coherence.csv")
    canvases = {(float(r["scale"]), r["mode"], int(r["width"])) for r in coh}
    assert canvases == {(1.0, "trained", 32), (2.0, "trained", 64), (2.0, "scaled", 64)}
    scaled = [float(r["start_sigma"]) for r in coh if r["mode"] == "scaled"]
    assert scaled == pytest.approx([40000.0] * 2, rel=1e-9)  # σ_max · √(area ratio) = 20000 · 2
    for s in metrics["coherence"]["summary"]:
        sel = [float(r["layout_rmse"]) for r in coh if float(r["scale"]) == s["scale"] and r["mode"] == s["mode"]]
        assert s["coherence"] == pytest.approx(1 - sum(sel) / len(sel))


def test_schedules_csv_matches_the_diffusion_core(evaluated):
    _, out = evaluated
    rows = read_csv(out / "schedules.csv")
    assert list(rows[0]) == ["schedule", "t", "level", "sigma", "log_snr"]
    for curve in schedule_curves():
        mine = [r for r in rows if r["schedule"] == curve.name]
        assert len(mine) == len(curve.u) > 0, curve.name
        for col, ref in (("t", curve.u), ("sigma", curve.sigma), ("log_snr", curve.log_snr)):
            got = torch.tensor([float(r[col]) for r in mine], dtype=torch.float64)
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), (curve.name, col)
            fin = torch.isfinite(ref)
            assert torch.allclose(got[fin], ref[fin], rtol=1e-12, atol=0), (curve.name, col)
    own = [r for r in rows if r["schedule"] == "checkpoint_v_ztsnr"]
    table = build_objective("v_ztsnr").sigmas
    assert torch.allclose(torch.tensor([float(r["sigma"]) for r in own], dtype=torch.float64), table, rtol=1e-12)


def test_flow_evaluate_uses_the_trained_shift(ckpts, tmp_path):
    metrics = report.run(_short(ckpts["flow"], tmp_path, checks=["schedules", "progressive"]))
    assert metrics["flow_shift"] == 3.0 and metrics["sampling"]["sampler"] == "flow_euler"
    own = [r for r in read_csv(tmp_path / "schedules.csv") if r["schedule"] == "checkpoint_flow"]
    u = torch.tensor([float(r["t"]) for r in own], dtype=torch.float64)
    assert torch.allclose(torch.tensor([float(r["level"]) for r in own], dtype=torch.float64), flow_shift(u, shift=3.0))
    sampling = [r for r in read_csv(tmp_path / "sampling_sigmas.csv") if r["schedule"] == "flow shift 3 (trained)"]
    assert [float(r["level"]) for r in sampling] == pytest.approx([1.0, 0.857142857, 0.6, 0.0])  # shift(1, 2/3, 1/3, 0)
    prog = read_csv(tmp_path / "progressive.csv")
    assert [int(r["step"]) for r in prog] == [0, 1, 2, 3] * 2 and float(prog[0]["sigma"]) == 1.0
    assert not (tmp_path / "black.png").exists()  # checks left out are not run


def test_brightness_and_layout_measures():
    black, white = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    assert brightness(black) == {"mean": 0.0, "std": 0.0} and brightness(white)["mean"] == 1.0
    half = torch.cat([black[:, :8], white[:, 8:]], dim=1)  # top black, bottom white
    assert brightness(half) == {"mean": 0.5, "std": 0.5}
    assert layout_error(half, low_frequency(half, 4), grid=4) == (0.0, 0.0)
    flipped = half.flip(1)  # same mean colour, opposite layout
    rmse, shift = layout_error(flipped, low_frequency(half, 4), grid=4)
    assert rmse == pytest.approx(1.0) and shift == pytest.approx(0.0)
    assert layout_error(white, low_frequency(black, 2), grid=2) == pytest.approx((1.0, 1.0))
    assert low_frequency(torch.rand(3, 24, 40), 8).shape == (3, 8, 8)
    assert [canvas_side(1024, s, 32) for s in (1.0, 1.5, 2.0, 1.3)] == [1024, 1536, 2048, 1344]


def test_scaled_start_and_schedule_tables(ckpts):
    g = load_generator(ckpts["v_ztsnr"], device="cpu", dtype="fp32")
    opts = SamplingOptions(steps=4)
    assert start_options(g, opts, mode="trained", side=64, base=32) is opts
    assert start_options(g, opts, mode="scaled", side=64, base=32).sigma_max == pytest.approx(2 * g.objective.sigma_max)
    flow = load_generator(ckpts["flow"], device="cpu", dtype="fp32")  # σ = t/(1−t): the shift scales every σ
    assert start_options(flow, opts, mode="scaled", side=64, base=32).flow_shift == pytest.approx(6.0)
    rows = sampling_rows(g, steps=4)
    karras = [r["sigma"] for r in rows if r["sampler"] == "dpmpp_2m" and r["schedule"] == "karras"]
    ref = karras_sigmas(4, sigma_min=g.objective.sigma_min, sigma_max=g.objective.sigma_max)
    assert karras == pytest.approx(ref.tolist(), rel=1e-12)
    trailing = [r["sigma"] for r in rows if r["sampler"] == "euler" and r["schedule"] == "trailing"]
    assert trailing == pytest.approx(trailing_sigmas(4, sigmas=g.objective.sigmas).tolist(), rel=1e-12)
    fractions = mean_fraction_rows(g, base=32)
    for r in fractions[:8]:
        ref = float(mean_signal_fraction(r["sigma"], latent_height=r["latent_side"], latent_width=r["latent_side"]))
        assert r["fraction"] == pytest.approx(ref, rel=1e-12)
    metrics, hist = density(g, samples=20_000)
    assert metrics["quantity"] == "log_sigma" and 0 < metrics["terminal_fraction"] < 0.005  # 1 in 1000 draws
    assert sum(r["count"] for r in hist) == 20_000
    assert metrics["fraction_above_sdxl_sigma_max"] == pytest.approx(0.12, abs=0.02)  # 120 of 1000 timesteps


def test_black_image_metrics_for_the_demo(ckpts):
    g = load_generator(ckpts["v_ztsnr"], device="cpu", dtype="fp32")
    m = black_image_metrics(g, seeds=[0], width=SIDE, height=SIDE, options=SamplingOptions(steps=2))
    assert m["black"]["target"] == 0.0 and m["white"]["target"] == 1.0 and m["black"]["n"] == 1
    assert all(math.isfinite(m[k][f]) for k in ("black", "white") for f in ("mean", "abs_error", "mean_pixel_std"))
    assert 0 <= m["black"]["mean"] <= 1 and m["separation"] == m["white"]["mean"] - m["black"]["mean"]


def test_frame_steps_are_even_and_include_both_ends():
    assert frame_steps(28, 8) == [0, 4, 8, 12, 15, 19, 23, 27]
    assert frame_steps(3, 8) == [0, 1, 2]
    assert frame_steps(10, 2) == [0, 9]


@pytest.fixture(scope="module")
def trained_runs(tiny_model_dir, tmp_path_factory):
    """Two runs of the real trainer on a 16-image cache: full v_ztsnr (per-channel latents, single file only)
    and a flow LoRA (shift 2)."""
    from sdxl_trainer.config import StatsConfig, TrainConfig, load_config
    from sdxl_trainer.demo import demo_cache_config, demo_scan_config
    from sdxl_trainer.prep import cache, scan, stats
    from sdxl_trainer.synthetic import build_synthetic_dataset
    from sdxl_trainer.train import loop

    root = tmp_path_factory.mktemp("trained")
    work = root / "work"
    scan.run(demo_scan_config(build_synthetic_dataset(root / "data", n=16, seed=0), work, tiny_model_dir))
    stats.run(StatsConfig(work=work, model=tiny_model_dir, device="cpu", max_images=8))
    cache.run(demo_cache_config(work, tiny_model_dir))
    base = {"model": str(tiny_model_dir), "work": str(work), "device": "cpu", "precision": "fp32", "batch_size": 2,
            "num_steps": 2, "data.workers": 1, "logging.tensorboard": False}  # fmt: skip
    runs = {
        "full": {"objective.name": "v_ztsnr", "latents.normalization": "per_channel", "checkpoints.diffusers": False},
        "lora": {"objective.name": "flow", "objective.flow_shift": 2.0, "lora.enabled": True, "lora.rank": 4},
    }
    for name, extra in runs.items():
        loop.run(load_config(TrainConfig, None, base | extra | {"out": str(root / name)}))
    return root, work


def test_evaluate_a_run_of_the_trainer(trained_runs, tmp_path):
    root, work = trained_runs
    metrics = report.run(_short(root / "full", tmp_path, checks=["black", "progressive"], steps=2))
    assert metrics["checkpoint"]["kind"] == "single_file" and metrics["settings_from"] == "run config"
    stats_doc = json.loads((work / "latent_stats.json").read_text())
    assert metrics["latent_normalization"]["mean"] == pytest.approx(stats_doc["mean"])
    assert metrics["sigma_max"] == pytest.approx(20000.0) and (tmp_path / "progressive.csv").is_file()
    assert all(math.isfinite(x) for x in _numbers(metrics["black"]))
    g = load_generator(root / "lora", device="cpu", dtype="fp32")
    assert g.source["kind"] == "lora" and g.flow_shift == 2.0 and len(g.source["loras"]) == 1


def test_extras_report_what_beta_and_pag_change(ckpts, tmp_path):
    """`--checks extras`: the black and coherence sets again with the beta schedule and with PAG, the
    differences in report.md, every number in sampling_extras.csv (issue #16)."""
    out = tmp_path / "extras"
    metrics = report.run(_short(ckpts["flow"], out, checks=["black", "extras"], coherence_seeds=[0],
                                coherence_scales=[1.0]))  # fmt: skip
    v = metrics["extras"]["variants"]
    assert set(v) == {"configured", "beta", "pag"}
    assert v["beta"]["schedule"] == "beta" and v["pag"]["pag_scale"] == 3.0 and v["configured"]["pag_scale"] == 0
    assert v["configured"]["black"] == pytest.approx(metrics["black"]["black"]["mean"])  # same settings, same images
    assert v["beta"]["black"] != v["configured"]["black"] and v["pag"]["black"] != v["configured"]["black"]
    rows = read_csv(out / "sampling_extras.csv")
    assert [r["variant"] for r in rows] == ["configured", "beta", "pag"] and "coherence_1x_trained" in rows[0]
    assert "Sampling extras" in (out / "report.md").read_text() and "PAG 3" in (out / "report.md").read_text()
