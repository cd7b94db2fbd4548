"""The model card (``README.md`` with the Hub's YAML metadata) of a published checkpoint.

It says what a user needs to sample the model correctly — above all its objective: eps, v, v with
zero terminal SNR at σ_max, or rectified flow with its shift — with a diffusers snippet that loads
the repository and the ComfyUI nodes and settings, then the training settings, the data size and the
images rendered while training. The metadata block (``base_model``, ``license``, ``tags``,
``library_name``) is written with ``huggingface_hub.ModelCardData`` and parses back with
``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import re
from typing import Any

from sdxl_trainer.diffusion.schedules import NOVELAI_SIGMA_MAX

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LICENSE = "openrail++"  # SDXL 1.0's CreativeML Open RAIL++-M: a finetune inherits it
OBJECTIVE_TEXT = {
    "eps": "ε-prediction on SDXL's noise schedule (like SDXL itself): any SDXL sampler works.",
    "v": "v-prediction on SDXL's noise schedule. Samplers must be told: `prediction_type=\"v_prediction\"`.",
    "v_ztsnr": "v-prediction with zero terminal SNR (NovelAI Diffusion V3): sampling starts from pure noise at "
               "σ_max = {sigma_max:g}. Use `prediction_type=\"v_prediction\"`, `rescale_betas_zero_snr=True` and "
               "trailing timesteps; CFG rescale ≈ 0.7 helps at high CFG.",
    "flow": "rectified flow (flow matching, velocity prediction) with timestep shift {shift:g}. Sample with Euler "
            "on flow times (diffusers' FlowMatchEulerDiscreteScheduler / ComfyUI's ModelSamplingSD3).",
}  # fmt: skip
COMFY_TEXT = {
    "eps": "Load the `.safetensors` with **Load Checkpoint**; no sampling node is needed. KSampler: Euler, "
           "scheduler normal or karras.",
    "v": "Load Checkpoint → **ModelSamplingDiscrete** (sampling `v_prediction`, zsnr off) → KSampler (Euler).",
    "v_ztsnr": "Load Checkpoint → **ModelSamplingDiscrete** (sampling `v_prediction`, **zsnr on**) → KSampler "
               "(Euler, scheduler normal). ComfyUI's zero-SNR starts at σ ≈ 4,519 rather than the trained "
               "{sigma_max:g}.",
    "flow": "Load Checkpoint → **ModelSamplingSD3** (shift {shift:g}) → KSampler (Euler, scheduler simple or "
            "beta).",
}  # fmt: skip


def _objective(config: dict[str, Any]) -> tuple[str, dict[str, float]]:
    o = config.get("objective") or {}
    name = o.get("name", "eps")
    return name, {"sigma_max": float(o.get("sigma_max") or NOVELAI_SIGMA_MAX), "shift": float(o.get("flow_shift", 3.0))}


def base_model_id(config: dict[str, Any]) -> str | None:
    """The run's --model as a Hub repo id when it is one (a local folder is not)."""
    model = str(config.get("model") or "")
    return model if REPO_ID.match(model) and not model.startswith(("/", ".", "~")) else None


def _diffusers_snippet(name: str, objective: str, values: dict[str, float], parts: list[str]) -> str:
    lines = ["```python", "import torch", "from diffusers import DiffusionPipeline", ""]
    if "full" in parts:
        lines.append('pipe = DiffusionPipeline.from_pretrained("REPO_ID", torch_dtype=torch.float16).to("cuda")')
    else:
        lines += ['pipe = DiffusionPipeline.from_pretrained("BASE_MODEL", torch_dtype=torch.float16).to("cuda")',
                  'pipe.load_lora_weights("REPO_ID")']  # fmt: skip
    if objective == "v_ztsnr" and "full" not in parts:
        lines += ["from diffusers import EulerDiscreteScheduler",
                  "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                  'prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")']  # fmt: skip
    kwargs = ', guidance_rescale=0.7' if objective == "v_ztsnr" else ""
    lines += [f'image = pipe("your prompt", num_inference_steps=28, guidance_scale=5.0{kwargs}).images[0]', "```"]
    note = ("The repository's own `scheduler/` is already the right one for this objective."
            if "full" in parts else "")
    return "\n".join(lines) + ("\n\n" + note if note else "")


def _settings(config: dict[str, Any]) -> list[tuple[str, Any]]:
    opt, lora = config.get("optimizer") or {}, config.get("lora") or {}
    length = next((f"{config[k]} {k.removeprefix('num_')}" for k in ("num_steps", "num_epochs", "num_samples")
                   if config.get(k) is not None), "?")  # fmt: skip
    rows = [("training", f"LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')}" if lora.get("enabled")
             else "full UNet finetune"),
            ("length", length), ("batch", f"{config.get('batch_size')} × {config.get('gradient_accumulation_steps', 1)}"
                                          " accumulation per device"),
            ("optimizer", f"{opt.get('name')}, peak learning rate {opt.get('learning_rate')}"),
            ("precision", config.get("precision")), ("latent normalisation", (config.get("latents") or {}).get(
                "normalization")), ("EMA", (config.get("ema") or {}).get("enabled"))]  # fmt: skip
    return [(k, v) for k, v in rows if v is not None]


def model_card(pub: Any, *, name: str, images: int | None = None) -> str:
    """The README.md text for a :class:`~sdxl_trainer.publish.folder.Published`."""
    from huggingface_hub import ModelCardData

    objective, values = _objective(pub.config)
    tags = ["stable-diffusion-xl", "text-to-image", "diffusers", "sdxl-trainer", f"objective-{objective}"]
    if "lora" in pub.parts:
        tags.append("lora")
    data = ModelCardData(base_model=base_model_id(pub.config), license=LICENSE, library_name="diffusers",
                         tags=tags, pipeline_tag="text-to-image")  # fmt: skip
    body = [f"# {name}", "", f"An SDXL {'LoRA' if pub.parts == ['lora'] else 'model'} trained with sdxl-trainer "
            f"(checkpoint `{pub.checkpoint.name}`).", "", "## How it was trained to be sampled", "",
            OBJECTIVE_TEXT[objective].format(**values), "", "### diffusers", "",
            _diffusers_snippet(name, objective, values, pub.parts), "", "### ComfyUI", "",
            COMFY_TEXT[objective].format(**values)]  # fmt: skip
    if "full" in pub.parts:
        body += ["", f"`{name}.workflow_api.json` is that graph in ComfyUI's API format (put `{name}.safetensors` "
                 "in `models/checkpoints`)."]  # fmt: skip
    body += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in _settings(pub.config)]
    if images is not None:
        body.append(f"| training images | {images:,} |")
    if pub.samples:
        body += ["", "## Samples rendered while training", ""] + [f"![{s}]({s})" for s in pub.samples[:8]]
    return "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n"
