"""Perturbed-attention guidance: the combination (diffusion/guidance.py), the scoped identity-attention pass
(sampling/pag.py), the sampler against diffusers' StableDiffusionXLPAGPipeline, and the CLI's refusals."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.diffusion import cfg, guided_denoiser, pag, rescale_cfg, sample_euler
from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.sampling import pag as pag_mod
from sdxl_trainer.sampling.generator import encode_text, unet_kwargs
from sdxl_trainer.sampling.sample import SamplingOptions, guided_model, sample_latents
from sdxl_trainer.sampling.pag import layer_regex, perturbed_attention, resolve_layers, self_attention_modules

SIDE = 64  # 8×8 latents: the tiny UNet's middle block sees 4×4 = 16 tokens (at 1 token identity = attention)
CFG = SamplingOptions(steps=3, cfg_scale=3.0)


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return load_generator(tiny_model_dir, device="cpu", dtype="fp32")  # eps, from its scheduler config


def _sample(g, options, seed=0):
    return sample_latents(g, prompt="red circle", seed=seed, width=SIDE, height=SIDE, options=options)


def test_combination_reference_vector_and_diffusers_rescale():
    pos, neg, ptb = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 1.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    # neg + 3·(pos − neg) + 2·(pos − ptb)
    assert pag(cfg(pos, neg, scale=3.0), pos, ptb, scale=2.0).tolist() == [[3.0, 8.0, 9.0, 6.0]]
    assert pag(pos, pos, ptb, scale=2.0).tolist() == [[1.0, 6.0, 5.0, 2.0]]  # without CFG: pos + 2·(pos − ptb)

    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    e_pos, e_neg, e_ptb = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    x, sigma = torch.randn(1, 4, 8, 8, generator=g) * 3.0, torch.full((1,), 3.0)
    preds = {"pos": e_pos, "neg": e_neg}

    def eps_model(which):  # an ε-prediction as the x0 denoiser D = x − σ·ε
        return lambda x_, s, **kw: x_ - s.view(-1, 1, 1, 1) * (preds[kw["which"]] if which is None else e_ptb)

    model = guided_denoiser(eps_model(None), scale=4.0, phi=0.7, space="eps", pag_scale=2.5, perturbed=eps_model("ptb"))
    got = model(x, sigma, cond={"which": "pos"}, uncond={"which": "neg"})
    expected_eps = rescale_noise_cfg(e_neg + 4.0 * (e_pos - e_neg) + 2.5 * (e_pos - e_ptb), e_pos, guidance_rescale=0.7)
    torch.testing.assert_close(got, x - 3.0 * expected_eps, rtol=1e-5, atol=1e-5)
    # our rescale helper on the whole guided estimate is the same thing
    torch.testing.assert_close(rescale_cfg(e_neg + 4.0 * (e_pos - e_neg) + 2.5 * (e_pos - e_ptb), e_pos, phi=0.7),
                               expected_eps)  # fmt: skip
    with pytest.raises(ValueError, match="perturbed denoiser"):
        guided_denoiser(eps_model(None), scale=4.0, pag_scale=1.0)


def test_scale_zero_is_bitwise_plain_cfg_and_never_perturbs(gen, monkeypatch):
    calls = []
    real = pag_mod.identity_attention
    monkeypatch.setattr(pag_mod, "identity_attention", lambda attn, h, temb=None: calls.append(attn) or real(attn, h, temb))
    plain = _sample(gen, CFG)
    zero = _sample(gen, SamplingOptions(steps=3, cfg_scale=3.0, pag_scale=0.0, pag_layers=("up_blocks.0",)))
    assert torch.equal(plain, zero) and calls == []


def test_positive_scale_perturbs_exactly_the_chosen_layers_once_per_step(gen, monkeypatch):
    processors = {n: m.processor for n, m in self_attention_modules(gen.unet)}
    calls = []
    real = pag_mod.identity_attention
    monkeypatch.setattr(pag_mod, "identity_attention", lambda attn, h, temb=None: calls.append(attn) or real(attn, h, temb))
    plain = _sample(gen, CFG)
    guided = _sample(gen, SamplingOptions(steps=3, cfg_scale=3.0, pag_scale=3.0))
    names = {id(m): n for n, m in self_attention_modules(gen.unet)}
    assert [names[id(a)] for a in calls] == ["mid_block.attentions.0.transformer_blocks.0.attn1"] * 3  # 3 steps, 1 pass
    assert float((guided - plain).abs().max()) > 0.1  # a real change (latents of scale ~15)
    calls.clear()
    _sample(gen, SamplingOptions(steps=2, cfg_scale=1.0, pag_scale=3.0, pag_layers=("up.block_0",)))
    assert sorted({names[id(a)] for a in calls}) == [f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(3)]
    assert len(calls) == 2 * 3
    # no lasting change: every self-attention has its very own processor back
    assert {n: m.processor for n, m in self_attention_modules(gen.unet)} == processors


def test_short_layer_names_and_unknown_layers(gen):
    assert layer_regex("up.block_0") == r"up_blocks\.0\." and layer_regex("mid") == "mid"
    assert resolve_layers(gen.unet, ["up.block_0.attentions_1"]) == resolve_layers(gen.unet, [r"up_blocks\.0\.attentions\.1"])
    assert len(resolve_layers(gen.unet, ["mid", "mid_block"])) == 1
    with pytest.raises(UserError, match="names no self-attention") as err:
        resolve_layers(gen.unet, ["down_blocks.0"])  # the tiny UNet's first block has no attention
    assert "down_blocks.1, mid_block, up_blocks.0" in err.value.fix
    with pytest.raises(UserError, match="pag_scale must be at least 0"):
        _sample(gen, SamplingOptions(steps=1, pag_scale=-1.0))


def test_perturbation_is_seen_only_by_its_own_thread(gen):
    unet = gen.unet
    (h, p), _ = encode_text(gen, ["red circle"], [""])
    kw = unet_kwargs(h, p, height=SIDE, width=SIDE)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    with torch.no_grad():
        normal = unet(x, t, **kw).sample
        other = {}
        with perturbed_attention(resolve_layers(unet, ["mid"])):
            perturbed = unet(x, t, **kw).sample
            thread = threading.Thread(target=lambda: other.setdefault("out", unet(x, t, **kw).sample))
            thread.start()
            thread.join()
        after = unet(x, t, **kw).sample
    assert torch.equal(other["out"], normal) and torch.equal(after, normal)
    assert not torch.allclose(perturbed, normal, atol=1e-3)


@pytest.mark.parametrize(("cfg_scale", "pag_scale", "rescale", "layers"),
                         [(3.0, 2.0, 0.0, ["mid"]), (1.0, 2.0, 0.0, ["mid"]), (4.0, 3.0, 0.7, ["up_blocks.0", "mid"])])  # fmt: skip
def test_matches_diffusers_pag_pipeline(gen, tiny_model_dir, cfg_scale, pag_scale, rescale, layers):
    """Our Euler + PAG against StableDiffusionXLPAGPipeline (Euler, 4 steps), with the pipeline's own σ's and start.

    Both get the same text embeddings (ours) and start noise; the pipeline runs the three branches as
    one batch of 3, we as three calls of 1, so they agree to float rounding: 1e-4 on latents of scale ~15.
    """
    from diffusers import StableDiffusionXLPAGPipeline

    pipe = StableDiffusionXLPAGPipeline.from_pretrained(tiny_model_dir, local_files_only=True, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    (h, p), (nh, np_) = encode_text(gen, ["red circle"], [""])
    eps = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(0))

    def reference(scale):
        return pipe(prompt_embeds=h, pooled_prompt_embeds=p, negative_prompt_embeds=nh, negative_pooled_prompt_embeds=np_,
                    num_inference_steps=4, guidance_scale=cfg_scale, guidance_rescale=rescale, pag_scale=scale,
                    height=SIDE, width=SIDE, latents=eps.clone(), output_type="latent").images  # fmt: skip

    ref = reference(pag_scale)
    pipe.scheduler.set_timesteps(4)
    sigmas, start = pipe.scheduler.sigmas.double(), eps * pipe.scheduler.init_noise_sigma
    options = SamplingOptions(steps=4, cfg_scale=cfg_scale, cfg_rescale=rescale, pag_scale=pag_scale, pag_layers=tuple(layers))
    model, extra = guided_model(gen, options, cond=unet_kwargs(h, p, height=SIDE, width=SIDE),
                                uncond=unet_kwargs(nh, np_, height=SIDE, width=SIDE))  # fmt: skip
    with torch.no_grad():
        ours = sample_euler(model, start, sigmas, extra_args=extra)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert float((reference(0.0) - ref).abs().max()) > 100 * 1e-4  # PAG's effect is far above the tolerance


def _cli_generate(tmp_path, model, *extra):
    return CliRunner().invoke(app, ["generate", str(model), "-p", "red circle", "--steps", "2", "--width", str(SIDE),
                                    "--height", str(SIDE), "--device", "cpu", "--out", str(tmp_path), *extra])  # fmt: skip


def _one_error_line(result) -> str:
    """The one error line of an exit-2 refusal (a refusal after loading follows the "loaded …" note)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output and "generating" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == errors[0], result.output
    return errors[0]


def test_cli_records_pag_and_refuses_bad_values(tmp_path, tiny_model_dir):
    ok = _cli_generate(tmp_path / "a", tiny_model_dir, "--pag-scale", "2.5", "--pag-layers", "mid", "--pag-layers", "up.block_0")
    assert ok.exit_code == 0, ok.output
    png = Image.open(next((tmp_path / "a").glob("*.png")))
    params = json.loads(png.text["sdxl_trainer"])
    assert params["pag_scale"] == 2.5 and params["pag_layers"] == ["mid", "up.block_0"]
    assert "PAG scale: 2.5, PAG layers: mid up.block_0" in png.text["parameters"]
    assert "pag_scale" in _one_error_line(_cli_generate(tmp_path / "b", tiny_model_dir, "--pag-scale", "-1"))
    line = _one_error_line(_cli_generate(tmp_path / "c", tiny_model_dir, "--pag-scale", "2", "--pag-layers", "nowhere"))
    assert "'nowhere' names no self-attention" in line
    assert "not a regular expression" in _one_error_line(_cli_generate(tmp_path / "d", tiny_model_dir, "--pag-layers", "up("))


def test_in_training_samples_carry_pag_and_configs_refuse_bad_layers():
    from pydantic import ValidationError

    from sdxl_trainer.config import GenerateConfig
    from sdxl_trainer.config.samples import SamplesSection
    from sdxl_trainer.train.samples import plan_jobs

    s = SamplesSection(prompts=["red circle", "blue square --l 2"], every_steps=10, pag_scale=2.5, pag_layers=["up.block_0"])
    jobs = plan_jobs(s, size=(64, 64))
    assert [(j.options.pag_scale, j.options.pag_layers, j.options.cfg_scale) for j in jobs] == [
        (2.5, ("up.block_0",), 5.0), (2.5, ("up.block_0",), 2.0)]  # fmt: skip
    assert plan_jobs(SamplesSection(prompts=["x"], every_steps=1), size=(64, 64))[0].options.pag_scale == 0.0
    for bad in ({"pag_layers": ["("]}, {"pag_layers": [" "]}, {"pag_layers": []}, {"pag_scale": -0.5}):
        with pytest.raises(ValidationError):
            GenerateConfig(checkpoint="m", prompt=["x"], **bad)
        with pytest.raises(ValidationError):
            SamplesSection(prompts=["x"], every_steps=1, **bad)


def test_blocks_compiled_as_the_trainer_does_sample_pag_alike(gen):
    """Regional compilation (train/compile.py: each transformer block, fullgraph=True) traces the wrapped
    processor: no graph break (fullgraph would raise on one), and the latents of the eager UNet (backend
    "eager": dynamo's tracing only, no inductor)."""
    import copy
    import dataclasses

    from diffusers.models.attention import BasicTransformerBlock

    compiled = dataclasses.replace(gen, unet=copy.deepcopy(gen.unet))
    for block in compiled.unet.modules():
        if isinstance(block, BasicTransformerBlock):
            block.compile(backend="eager", fullgraph=True, dynamic=None)
    out = {}
    for scale in (0.0, 3.0):
        options = SamplingOptions(steps=2, cfg_scale=3.0, pag_scale=scale)
        out[scale] = _sample(compiled, options)
        # compiled vs eager kernels round differently (measured: 6e-5 at scale 0, 1e-4 at 3)
        torch.testing.assert_close(out[scale], _sample(gen, options), rtol=0, atol=1e-3)
    assert float((out[3.0] - out[0.0]).abs().max()) > 0.1  # the perturbation took effect inside the compiled blocks
