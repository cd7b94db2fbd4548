"""A ComfyUI workflow (API format) beside each single-file checkpoint: load it and sample it right.

ComfyUI reads an SDXL single file as eps unless told otherwise (a ``v_pred`` key makes it v; nothing
makes it zero-SNR or flow). So next to ``model.safetensors`` the trainer writes
``model.workflow_api.json``, a graph ComfyUI's "Load" (API format) / ``/prompt`` endpoint runs:

    CheckpointLoaderSimple → [ModelSamplingDiscrete | ModelSamplingSD3] → KSampler (Euler) → VAEDecode → SaveImage
                           ↘ CLIPTextEncode (prompt), CLIPTextEncode (negative) ↗   EmptyLatentImage ↗

- eps: no sampling node (ComfyUI's default for SDXL);
- v: ``ModelSamplingDiscrete`` sampling ``v_prediction``, ``zsnr`` false;
- v_ztsnr: the same with ``zsnr`` true — ComfyUI then rescales SDXL's table to zero terminal SNR with
  its last ᾱ = 4.9·10⁻⁸, i.e. σ_max ≈ 4,519 rather than our 20,000 (docs/evaluate.md compares both);
- flow: ``ModelSamplingSD3`` with the trained shift (the node bigASP v2.5's instructions use).

Every node and input is checked against :data:`NODES`, written from ComfyUI's own node definitions:
``nodes.py`` (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage;
comfyanonymous/ComfyUI at 0109431) and ``comfy_extras/nodes_model_advanced.py`` (ModelSamplingDiscrete,
ModelSamplingSD3; at 002aefa and the current file). An input is a link ``[node id, output index]`` of
the named type, or a literal: ``("INT", min, max)``, ``("FLOAT", min, max)``, ``"STRING"``,
``"BOOLEAN"`` or a list of choices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LINK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE"}
U64 = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 8192  # nodes.py MAX_RESOLUTION (16384 in later versions; 8192 is the smaller bound)
NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": {"inputs": {"ckpt_name": "STRING"}, "outputs": ["MODEL", "CLIP", "VAE"]},
    "ModelSamplingDiscrete": {"inputs": {"model": "MODEL", "sampling": ["eps", "v_prediction", "lcm"], "zsnr": "BOOLEAN"},
                              "outputs": ["MODEL"]},
    "ModelSamplingSD3": {"inputs": {"model": "MODEL", "shift": ("FLOAT", 0.0, 100.0)}, "outputs": ["MODEL"]},
    "CLIPTextEncode": {"inputs": {"text": "STRING", "clip": "CLIP"}, "outputs": ["CONDITIONING"]},
    "EmptyLatentImage": {"inputs": {"width": ("INT", 16, MAX_RESOLUTION), "height": ("INT", 16, MAX_RESOLUTION),
                                    "batch_size": ("INT", 1, 64)}, "outputs": ["LATENT"]},
    "KSampler": {"inputs": {"model": "MODEL", "seed": ("INT", 0, U64), "steps": ("INT", 1, 10000),
                            "cfg": ("FLOAT", 0.0, 100.0),
                            "sampler_name": ["euler", "euler_ancestral", "dpmpp_2m"],  # the ones we write
                            "scheduler": ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform",
                                          "beta"],
                            "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT",
                            "denoise": ("FLOAT", 0.0, 1.0)}, "outputs": ["LATENT"]},
    "VAEDecode": {"inputs": {"samples": "LATENT", "vae": "VAE"}, "outputs": ["IMAGE"]},
    "SaveImage": {"inputs": {"images": "IMAGE", "filename_prefix": "STRING"}, "outputs": []},
}  # fmt: skip


def sampling_node(objective: str, *, flow_shift: float = 3.0) -> dict[str, Any] | None:
    """The node that tells ComfyUI how the model was trained (None for eps, ComfyUI's default)."""
    if objective == "eps":
        return None
    if objective in ("v", "v_ztsnr"):
        inputs = {"model": ["1", 0], "sampling": "v_prediction", "zsnr": objective == "v_ztsnr"}
        return {"class_type": "ModelSamplingDiscrete", "inputs": inputs}
    if objective == "flow":
        return {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": float(flow_shift)}}
    raise ValueError(f"unknown objective {objective!r}")


def build_workflow(
    ckpt_name: str, *, objective: str, flow_shift: float = 3.0, prompt: str = "a photo", negative: str = "",
    width: int = 1024, height: int = 1024, steps: int = 28, cfg: float = 5.0, seed: int = 0,
    filename_prefix: str = "sdxl_trainer",
) -> dict[str, Any]:  # fmt: skip
    """The API-format graph for one checkpoint file (in ComfyUI's models/checkpoints folder)."""
    graph: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    model = ["1", 0]
    node = sampling_node(objective, flow_shift=flow_shift)
    if node is not None:
        graph["2"], model = node, ["2", 0]
    graph.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": float(cfg), "sampler_name": "euler",
            "scheduler": "simple" if objective == "flow" else "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": filename_prefix}},
    })  # fmt: skip
    problems = validate(graph)
    if problems:
        raise ValueError(f"workflow does not fit ComfyUI's node definitions: {problems}")
    return graph


def _check_literal(spec: Any, value: Any) -> str | None:
    if isinstance(spec, list):
        return None if value in spec else f"{value!r} is not one of {spec}"
    if spec == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if spec == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    kind, lo, hi = spec
    ok = isinstance(value, int) and not isinstance(value, bool) if kind == "INT" else \
        isinstance(value, (int, float)) and not isinstance(value, bool)  # fmt: skip
    return None if ok and lo <= value <= hi else f"{value!r} is not a {kind} in [{lo}, {hi}]"


def validate(graph: dict[str, Any]) -> list[str]:
    """Every problem of ``graph`` against :data:`NODES` (unknown node, missing/extra input, a link to a
    missing node or of the wrong type, a literal out of range); empty when ComfyUI would accept it."""
    problems = []
    for nid, node in graph.items():
        spec = NODES.get(node.get("class_type"))
        if spec is None:
            problems.append(f"node {nid}: unknown class_type {node.get('class_type')!r}")
            continue
        inputs = node.get("inputs", {})
        for name in sorted(set(spec["inputs"]) ^ set(inputs)):
            problems.append(f"node {nid}: input {name!r} {'missing' if name in spec['inputs'] else 'unknown'}")
        for name, want in spec["inputs"].items():
            if name not in inputs:
                continue
            value = inputs[name]
            if isinstance(want, str) and want in LINK_TYPES:
                src = graph.get(str(value[0])) if isinstance(value, list) and len(value) == 2 else None
                outs = NODES.get(src["class_type"], {}).get("outputs", []) if src else []
                if src is None or not isinstance(value[1], int) or not 0 <= value[1] < len(outs):
                    problems.append(f"node {nid}: {name} = {value!r} is not a link to an existing output")
                elif outs[value[1]] != want:
                    problems.append(f"node {nid}: {name} needs {want}, gets {outs[value[1]]}")
            elif (err := _check_literal(want, value)) is not None:
                problems.append(f"node {nid}: {name}: {err}")
    return problems


def write_workflow(single_file: Path, **kwargs: Any) -> Path:
    """``<stem>.workflow_api.json`` beside ``single_file`` (the ckpt_name is its file name)."""
    single_file = Path(single_file)
    path = single_file.with_name(single_file.stem + ".workflow_api.json")
    path.write_text(json.dumps(build_workflow(single_file.name, **kwargs), indent=2) + "\n")
    return path
