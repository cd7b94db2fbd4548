"""`sdxl generate`: checkpoints of every form load with their own σ_max, shift and latent normalisation,
sampling is deterministic per seed, PNGs carry their parameters, LoRA files merge as W + s·(α/r)·up·down."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_trainer.config import GenerateConfig
from sdxl_trainer.diffusion import flow_times, karras_sigmas, sdxl_sigmas
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate import generate
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.sampling.generator import decode_latents
from sdxl_trainer.sampling.sample import SamplingOptions, sample_latents, sampling_sigmas
from sdxl_trainer.evaluate.source import resolve_checkpoint
from sdxl_trainer.models.export import save_diffusers_pipeline, save_single_file
from sdxl_trainer.models.lora import add_lora, merged_unet, save_lora_diffusers, save_lora_kohya
from sdxl_trainer.train.checkpoint_dir import write_checkpoint

SIDE = 32  # 4×4 latents: the tiny UNet's smallest canvas (two levels, VAE factor 8)
FAST = SamplingOptions(steps=3, cfg_scale=3.0)
MEAN, STD = [0.5, -0.2, 0.1, 0.3], [2.0, 3.0, 0.5, 1.5]




def _modules(parts, **extra):
    names = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    return {n: getattr(parts, n) for n in names} | extra


@pytest.fixture(scope="module")
def ckpts(parts, tmp_path_factory):
    """Diffusers exports of the tiny model: eps (per-channel latents), v_ztsnr (σ_max 5000), flow (shift 2)."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "eps": save_diffusers_pipeline(root / "eps", **_modules(parts), objective="eps", latents_mean=MEAN,
                                       latents_std=STD),  # fmt: skip
        "v_ztsnr": save_diffusers_pipeline(root / "vz", **_modules(parts), objective="v_ztsnr", sigma_max=5000.0),
        "flow": save_diffusers_pipeline(root / "flow", **_modules(parts), objective="flow", flow_shift=2.0),
    }


@pytest.fixture(scope="module")
def gens(ckpts):
    return {name: load_generator(path, device="cpu", dtype="fp32") for name, path in ckpts.items()}


def _first_levels(gen, options=FAST, **kw):
    seen = []
    sample_latents(gen, prompt="red circle", seed=0, width=SIDE, height=SIDE, options=options,
                   callback=lambda info: seen.append((info["sigma"], info["x"].clone())), **kw)  # fmt: skip
    return seen


def test_same_seed_same_image_other_seed_other_image(gens):
    g = gens["v_ztsnr"]
    a = sample_latents(g, prompt="red circle", seed=7, width=SIDE, height=SIDE, options=FAST)
    b = sample_latents(g, prompt="red circle", seed=7, width=SIDE, height=SIDE, options=FAST)
    c = sample_latents(g, prompt="red circle", seed=8, width=SIDE, height=SIDE, options=FAST)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    anc = SamplingOptions(steps=3, cfg_scale=3.0, sampler="euler_ancestral")  # draws noise at every step
    assert torch.equal(*(sample_latents(g, prompt="x", seed=1, width=SIDE, height=SIDE, options=anc) for _ in "ab"))


def test_v_ztsnr_starts_at_its_stored_sigma_max(gens):
    g = gens["v_ztsnr"]
    assert g.info["sigma_max"] == 5000.0 and g.objective.sigma_max == pytest.approx(5000.0, rel=1e-12)
    (sigma0, x0), *_ = _first_levels(g)
    assert sigma0 == pytest.approx(5000.0, rel=1e-9)
    assert float(x0.std()) == pytest.approx(5000.0, rel=0.25)  # σ_max·ε over 64 values
    ref = karras_sigmas(3, sigma_min=g.objective.sigma_min, sigma_max=5000.0)
    assert torch.allclose(sampling_sigmas(g, steps=3), ref)


def test_eps_starts_at_sdxl_sigma_max_and_trailing_at_the_table_end(gens):
    g = gens["eps"]
    assert _first_levels(g)[0][0] == pytest.approx(float(sdxl_sigmas()[-1]), rel=1e-9)
    assert float(sampling_sigmas(g, steps=4, schedule="trailing")[0]) == pytest.approx(14.6146412, rel=1e-6)
    override = _first_levels(g, SamplingOptions(steps=3, cfg_scale=3.0, sigma_max=29.0))
    assert override[0][0] == pytest.approx(29.0, rel=1e-9)


def test_flow_samples_on_its_stored_shift(gens):
    g = gens["flow"]
    assert g.flow_shift == 2.0 and g.objective.prediction == "flow"
    levels = [s for s, _ in _first_levels(g)]
    assert torch.allclose(torch.tensor(levels, dtype=torch.float64), flow_times(3, shift=2.0)[:-1])
    assert torch.allclose(sampling_sigmas(g, steps=3, flow_shift=6.0), flow_times(3, shift=6.0))
    with pytest.raises(UserError, match="flow model"):
        opts = SamplingOptions(steps=2, sampler="dpmpp_2m")
        sample_latents(g, prompt="x", seed=0, width=SIDE, height=SIDE, options=opts)


def test_per_channel_checkpoint_decodes_through_its_mean_and_std(gens, parts):
    g = gens["eps"]
    assert g.info["latent_normalization"] == {"kind": "per_channel", "mean": MEAN, "std": STD}
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    raw = z * torch.tensor(STD).view(1, 4, 1, 1) + torch.tensor(MEAN).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = ((parts.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
        scaled = ((parts.vae.decode(z / 0.13025).sample + 1) / 2).clamp(0, 1)
    got = decode_latents(g, z)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, scaled, atol=1e-2)  # the SDXL-factor decode would be another image


def test_foreign_diffusers_folder_reads_its_scheduler(tiny_model_dir):
    g = load_generator(tiny_model_dir, device="cpu", dtype="fp32")
    assert g.info["objective"] == "eps" and "no sdxl_trainer.json" in g.info["origin"]
    assert g.info["latent_normalization"] == {"kind": "scaling_factor", "scaling_factor": 0.13025}


def test_single_file_matches_the_diffusers_export(parts, tiny_model_dir, tmp_path):
    nets = {n: getattr(parts, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    path = save_single_file(tmp_path / "m.safetensors", **nets, dtype="fp32", objective="v_ztsnr")
    with pytest.raises(UserError, match="config-dir"):
        load_generator(path, device="cpu", dtype="fp32")
    g = load_generator(path, config_dir=tiny_model_dir, device="cpu", dtype="fp32")
    assert g.info["objective"] == "v_ztsnr" and g.objective.sigma_max == pytest.approx(20000.0)
    folder = save_diffusers_pipeline(tmp_path / "d", **_modules(parts), objective="v_ztsnr")
    ref = load_generator(folder, device="cpu", dtype="fp32")
    a, b = (sample_latents(x, prompt="red circle", seed=3, width=SIDE, height=SIDE, options=FAST) for x in (g, ref))
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(decode_latents(g, a), decode_latents(ref, a), atol=1e-5)


def test_run_and_checkpoint_folders_resolve_to_their_export(ckpts, tmp_path):
    import shutil

    run = tmp_path / "run"
    write_checkpoint(run, "step-000001", lambda f: shutil.copytree(ckpts["flow"], f / "diffusers"))
    assert resolve_checkpoint(run).path == run / "checkpoints" / "step-000001" / "diffusers"
    assert resolve_checkpoint(run / "checkpoints" / "step-000001").kind == "diffusers"
    with pytest.raises(UserError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint yet"):
        resolve_checkpoint(tmp_path / "empty")


@pytest.fixture(scope="module")
def lora_unet(parts):
    unet = add_lora(copy.deepcopy(parts.unet), rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet.eval()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_merges_like_the_peft_merge(fmt, lora_unet, ckpts, tmp_path):
    path = save_lora_diffusers(tmp_path / "lora", lora_unet) if fmt == "diffusers" else save_lora_kohya(
        tmp_path / "k.safetensors", lora_unet)  # fmt: skip
    with pytest.raises(UserError, match="LoRA adapter"):
        load_generator(path, device="cpu", dtype="fp32")
    g = load_generator(ckpts["v_ztsnr"], lora=path, lora_scale=0.5, device="cpu", dtype="fp32")
    base = load_generator(ckpts["v_ztsnr"], device="cpu", dtype="fp32").unet.state_dict()
    full = merged_unet(lora_unet).state_dict()
    got = g.unet.state_dict()
    changed = [k for k in full if not torch.equal(full[k], base[k])]
    assert changed and g.source["loras"] == {str(path): len(changed)}
    for k in changed:  # half the LoRA: halfway between the base and the fully merged weight
        assert torch.allclose(got[k], (base[k] + full[k]) / 2, atol=1e-6), k


def test_generate_run_writes_pngs_with_parameters_and_never_overwrites(ckpts, tmp_path):
    cfg = GenerateConfig(checkpoint=ckpts["v_ztsnr"], prompt=["red circle", "black background"], out=tmp_path / "out",
                         steps=2, width=SIDE, height=SIDE, seed=5, num_images=2, device="cpu")  # fmt: skip
    paths = generate.run(cfg)
    assert [p.name for p in paths] == ["0000-seed5.png", "0001-seed6.png", "0002-seed5.png", "0003-seed6.png"]
    image = Image.open(paths[1])
    assert image.size == (SIDE, SIDE)
    params = json.loads(image.text["sdxl_trainer"])
    assert params["seed"] == 6 and params["prompt"] == "red circle" and params["objective"] == "v_ztsnr"
    assert params["start_sigma"] == pytest.approx(5000.0) and params["sampler"] == "dpmpp_2m"
    assert "Seed: 6" in image.text["parameters"] and image.text["parameters"].startswith("red circle\nNegative prompt:")
    again = generate.run(cfg)
    assert again[0].name == "0004-seed5.png"
    assert np.array_equal(np.asarray(Image.open(again[1])), np.asarray(image))  # same seed, same pixels


def test_bad_sizes_and_pairs_are_user_errors(gens):
    g = gens["eps"]
    with pytest.raises(UserError, match="multiple of 16"):
        sample_latents(g, prompt="x", seed=0, width=40, height=SIDE, options=FAST)
    with pytest.raises(UserError, match="flow models"):
        sampling_sigmas(g, steps=3, flow_shift=3.0)
    with pytest.raises(UserError, match="karras"):
        sampling_sigmas(g, steps=3, schedule="trailing", sigma_max=20.0)


def test_lora_checkpoint_reads_base_model_and_settings_from_its_run_config(lora_unet, tiny_model_dir, tmp_path):
    from sdxl_trainer.schema import write_json

    work = tmp_path / "work"
    write_json({"mean": MEAN, "std": STD}, work / "latent_stats.json", artifact="latent_stats", config=None)
    config = {"model": str(tiny_model_dir), "work": str(work), "objective": {"name": "v_ztsnr", "sigma_max": 3000.0},
              "latents": {"normalization": "per_channel"}}  # fmt: skip

    def write(folder):
        save_lora_diffusers(folder / "lora", lora_unet)
        (folder / "state.json").write_text(json.dumps({"train": {}, "config": config}))

    write_checkpoint(tmp_path / "run", "step-000002", write)
    g = load_generator(tmp_path / "run", device="cpu", dtype="fp32")
    assert g.source["kind"] == "lora" and g.info["origin"] == "run config"
    assert g.objective.sigma_max == pytest.approx(3000.0) and _first_levels(g)[0][0] == pytest.approx(3000.0)
    assert g.info["latent_normalization"] == {"kind": "per_channel", "mean": MEAN, "std": STD}
    full = merged_unet(lora_unet).state_dict()
    assert all(torch.allclose(v, full[k], atol=1e-6) for k, v in g.unet.state_dict().items())
