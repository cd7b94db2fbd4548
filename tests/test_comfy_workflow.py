"""The ComfyUI workflow written beside each single-file checkpoint (issue #16): per objective the
right sampling node, every node and input valid against ComfyUI's node definitions
(models/comfy_workflow.NODES, cited there), and the flow shift / σ_max recorded in the file header."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sdxl_trainer.config import TrainConfig
from sdxl_trainer.models.comfy_workflow import build_workflow, validate, write_workflow
from sdxl_trainer.train.checkpoint import workflow_settings


@pytest.mark.parametrize("objective, node, inputs", [
    ("eps", None, None),
    ("v", "ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
    ("v_ztsnr", "ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}),
    ("flow", "ModelSamplingSD3", {"shift": 4.5}),
])  # fmt: skip
def test_each_objective_gets_its_sampling_node(objective, node, inputs):
    graph = build_workflow("run.safetensors", objective=objective, flow_shift=4.5, cfg=3.0, width=832, height=1216)
    assert validate(graph) == []
    sampler = graph["6"]["inputs"]
    assert graph["1"]["inputs"]["ckpt_name"] == "run.safetensors"
    assert sampler["sampler_name"] == "euler" and sampler["cfg"] == 3.0
    assert graph["5"]["inputs"] == {"width": 832, "height": 1216, "batch_size": 1}
    if node is None:
        assert "2" not in graph and sampler["model"] == ["1", 0]
    else:
        assert graph["2"]["class_type"] == node and sampler["model"] == ["2", 0]
        assert {k: v for k, v in graph["2"]["inputs"].items() if k != "model"} == inputs


def test_the_validator_catches_what_comfyui_would_refuse():
    good = build_workflow("m.safetensors", objective="flow")
    broken = json.loads(json.dumps(good))
    broken["6"]["inputs"]["model"] = ["3", 0]  # CONDITIONING where MODEL is needed
    broken["2"]["inputs"]["shift"] = 500.0  # beyond the node's max
    broken["5"]["inputs"].pop("batch_size")
    broken["7"]["class_type"] = "VAEDecoder"
    problems = " | ".join(validate(broken))
    for needle in ("model needs MODEL, gets CONDITIONING", "shift", "batch_size' missing", "unknown class_type"):
        assert needle in problems, problems


def test_train_checkpoint_writes_the_workflow_and_header(parts, tmp_path):
    from sdxl_trainer.models.export import save_single_file

    cfg = TrainConfig(model="m", work="w", out=str(tmp_path / "myrun"), num_steps=1, objective={"name": "flow",
                      "flow_shift": 3.5}, samples={"prompts": ["red circle --n blurry", "x"], "cfg": 4.0, "every_steps": 10})  # fmt: skip
    path = save_single_file(tmp_path / "model.safetensors", unet=parts.unet, vae=parts.vae,
                            text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2, dtype="fp32",
                            objective="flow", metadata={"sdxl_trainer.flow_shift": "3.5"})  # fmt: skip
    wf = json.loads(write_workflow(path, **workflow_settings(cfg)).read_text())
    assert (tmp_path / "model.workflow_api.json").is_file() and validate(wf) == []
    assert wf["2"]["inputs"]["shift"] == 3.5 and wf["3"]["inputs"]["text"] == "red circle"
    assert wf["6"]["inputs"]["cfg"] == 4.0 and wf["8"]["inputs"]["filename_prefix"] == "myrun"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["sdxl_trainer.objective"] == "flow" and meta["sdxl_trainer.flow_shift"] == "3.5"
