"""The diffusers pipeline folder: loads in StableDiffusionXLPipeline, samples, and records the objective."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.export import read_export_info, save_diffusers_pipeline, scheduler_for
from sdxl_trainer.models.loading import load_clip_tokenizer, quiet_hf, read_part_config




def _save(parts, out_dir, **kw):
    return save_diffusers_pipeline(
        out_dir, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, **kw,
    )  # fmt: skip


def _load(folder, **kw):
    from diffusers import StableDiffusionXLPipeline

    with quiet_hf(warnings=True):
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, **kw):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, height=128, width=128, generator=generator, **kw).images


@pytest.mark.parametrize("objective", ["eps", "v", "v_ztsnr", "flow"])
def test_pipeline_loads_samples_and_records_objective(parts, tmp_path, objective):
    sigma_max = 20000.0 if objective == "v_ztsnr" else None
    folder = _save(parts, tmp_path / "model", objective=objective, sigma_max=sigma_max, flow_shift=4.0)
    pipe = _load(folder)
    sched = pipe.scheduler.config
    if objective == "flow":
        assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert (sched.use_flow_sigmas, sched.flow_shift, sched.solver_order) == (True, 4.0, 1)
        assert sched.prediction_type == "flow_prediction"
    else:
        sdxl = read_part_config("scheduler")
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert sched.prediction_type == {"eps": "epsilon", "v": "v_prediction", "v_ztsnr": "v_prediction"}[objective]
        assert [sched[k] for k in ("beta_start", "beta_end", "beta_schedule")] == [
            sdxl[k] for k in ("beta_start", "beta_end", "beta_schedule")
        ]
        assert sched.rescale_betas_zero_snr == (objective == "v_ztsnr")
        assert sched.timestep_spacing == ("trailing" if objective == "v_ztsnr" else sdxl["timestep_spacing"])
    image = _sample(pipe, output_type="pt")
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()
    info = read_export_info(folder)
    assert info["objective"] == objective
    assert info["sigma_max"] == sigma_max
    assert info["flow_shift"] == (4.0 if objective == "flow" else None)
    assert info["latent_normalization"] == {"kind": "scaling_factor", "scaling_factor": 0.13025}
    assert pipe.vae.config.latents_mean is None and pipe.vae.config.scaling_factor == 0.13025


def test_ztsnr_sampling_starts_at_the_terminal_step(parts, tmp_path):
    pipe = _load(_save(parts, tmp_path / "model", objective="v_ztsnr"))
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert float(pipe.scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (diffusers keeps 2⁻²⁴)


def test_flow_scheduler_takes_flow_match_euler_steps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    dpm = scheduler_for("flow", flow_shift=3.0)
    dpm.set_timesteps(6)
    sigmas = dpm.sigmas[:-1].double()
    unshifted = torch.linspace(0.999, 0.999 / 6, 6, dtype=torch.float64)
    assert torch.allclose(sigmas, 3 * unshifted / (1 + 2 * unshifted), atol=1e-6)  # t' = s·t/(1 + (s−1)·t)
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # sigmas below are already shifted
    euler.set_timesteps(sigmas=dpm.sigmas[:-1].numpy())
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 4, generator=g)
    x_a = x_b = torch.randn(1, 4, 8, 8, generator=g)

    def velocity(x, sigma):  # any deterministic stand-in for the UNet
        return torch.einsum("ij,bjhw->bihw", mix, x) * (1 + sigma)

    for i, t in enumerate(dpm.timesteps):
        x_a = dpm.step(velocity(x_a, float(dpm.sigmas[i])), t, x_a).prev_sample
    for i, t in enumerate(euler.timesteps):
        x_b = euler.step(velocity(x_b, float(euler.sigmas[i])), t, x_b).prev_sample
    assert torch.allclose(x_a, x_b, atol=1e-5)
    assert not torch.allclose(x_a, torch.zeros_like(x_a), atol=1e-2)


def test_per_channel_normalisation_round_trips_and_decodes(parts, tmp_path):
    mean, std = [4.8119, 0.1607, 1.3538, -1.7753], [9.9181, 6.2753, 7.5978, 5.9956]
    folder = _save(parts, tmp_path / "model", objective="v", latents_mean=mean, latents_std=std)
    pipe = _load(folder)
    assert list(pipe.vae.config.latents_mean) == mean
    assert list(pipe.vae.config.latents_std) == std
    assert pipe.vae.config.scaling_factor == 1.0
    assert read_export_info(folder)["latent_normalization"] == {"kind": "per_channel", "mean": mean, "std": std}
    # The pipeline must decode our z = (z_raw − mean)/std as z_raw = z·std + mean.
    latents = _sample(pipe, output_type="latent")
    image = _sample(pipe, output_type="pt")
    raw = latents * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = (pipe.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(image, expected, atol=1e-5)


def test_weights_round_trip_and_dtype(parts, tmp_path):
    pipe = _load(_save(parts, tmp_path / "fp32", objective="eps"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    pipe = _load(_save(parts, tmp_path / "fp16", objective="eps", dtype="fp16"), torch_dtype=torch.float16)
    for name in ("unet", "text_encoder_2"):
        a, b = getattr(parts, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(b[k].dtype == torch.float16 and torch.equal(a[k].half(), b[k]) for k in a), name
    assert pipe.text_encoder_2.text_model.embeddings.position_ids.device.type == "cpu"
    assert parts.unet.conv_in.weight.dtype == torch.float32  # the caller's modules are left as they were
    assert torch.isfinite(_sample(pipe.to(torch.float32), output_type="pt")).all()


def test_folder_has_slow_tokenizer_files(parts, tmp_path):
    folder = _save(parts, tmp_path / "model", objective="eps")
    for name, original in (("tokenizer", parts.tokenizer), ("tokenizer_2", parts.tokenizer_2)):
        slow = tmp_path / f"{name}-slow"
        slow.mkdir()
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(folder / name / f, slow / f)
        assert (slow / "merges.txt").read_text().startswith("#version")
        assert "local_files_only" not in json.loads((slow / "tokenizer_config.json").read_text())
        rebuilt = load_clip_tokenizer(slow)  # from vocab.json + merges.txt alone
        text = "a red cat sitting on a blue chair"
        assert rebuilt(text).input_ids == original(text).input_ids


def test_refuses_bad_arguments_and_existing_output(parts, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        _save(parts, tmp_path / "a", objective="x0")
    with pytest.raises(ValueError, match="v_ztsnr only"):
        _save(parts, tmp_path / "a", objective="eps", sigma_max=20000.0)
    with pytest.raises(ValueError, match="together"):
        _save(parts, tmp_path / "a", objective="v", latents_mean=[0.0] * 4)
    with pytest.raises(ValueError, match="4 finite"):
        _save(parts, tmp_path / "a", objective="v", latents_mean=[0.0] * 3, latents_std=[1.0] * 3)
    with pytest.raises(ValueError, match="positive"):
        _save(parts, tmp_path / "a", objective="v", latents_mean=[0.0] * 4, latents_std=[1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="flow_shift"):
        _save(parts, tmp_path / "a", objective="flow", flow_shift=0.0)
    assert not (tmp_path / "a").exists()
    _save(parts, tmp_path / "b", objective="eps")
    with pytest.raises(FileExistsError):
        _save(parts, tmp_path / "b", objective="eps")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left behind
    with pytest.raises(UserError, match="model_export not found"):
        read_export_info(tmp_path)


def test_text_encoders_in_the_sdxl_base_key_layout(parts, tmp_path):
    """Both text encoders are stored under the key names of the SDXL base repository (text_model.…):
    transformers 5 saves CLIP-L without the prefix, which transformers 4 would load as random weights."""
    from safetensors import safe_open

    folder = _save(parts, tmp_path / "p", objective="eps")
    for name, model in (("text_encoder", parts.text_encoder), ("text_encoder_2", parts.text_encoder_2)):
        with safe_open(str(folder / name / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys), name
        # transformers 4's CLIPTextModel / …WithProjection state-dict names: text_model.<module>, text_projection
        bare = {k.removeprefix("text_model.") for k in model.state_dict() if "position_ids" not in k}
        assert {k.removeprefix("text_model.") for k in keys} == bare, name
    pipe = _load(folder)  # and transformers 5 reads the layout back, bit for bit (test above)
    a, b = parts.text_encoder.state_dict(), pipe.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
