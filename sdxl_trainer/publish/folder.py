"""`sdxl publish`: the exact folder a Hub repository receives, assembled in ``RUN/publish/``.

From a run (its ``latest`` checkpoint) or one checkpoint folder:

- ``full``: the checkpoint's ``diffusers/`` pipeline at the top of the folder (``model_index.json``,
  ``unet/``, …: ``DiffusionPipeline.from_pretrained(REPO)`` loads it), the single file as
  ``<name>.safetensors`` and its ComfyUI workflow as ``<name>.workflow_api.json``;
- ``lora``: ``pytorch_lora_weights.safetensors`` (diffusers) and ``<name>_kohya.safetensors``;
- ``both``: both sets; ``auto`` (default): what the checkpoint has;
- ``samples/``: the last round of images rendered while training (``RUN/samples/step-N/``), if any;
- ``README.md``: the model card (:mod:`.card`).

Files are hard-linked where the file system allows (a full SDXL is ~7 GB), else copied. The folder is
built beside as ``publish.partial`` and renamed into place, so it is complete or absent; an upload
that fails leaves it for a retry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxl_trainer.errors import UserError
from sdxl_trainer.evaluate.source import STATE_JSON
from sdxl_trainer.models.lora import DIFFUSERS_WEIGHT_NAME
from sdxl_trainer.schema import normal_permissions, read_json_file
from sdxl_trainer.train.checkpoint_dir import CHECKPOINTS, MARKER, read_latest, verify_checkpoint

WHAT = ("auto", "full", "lora", "both")


@dataclass
class Published:
    """What was assembled: the folder, the checkpoint it came from, the run config and the parts."""

    folder: Path
    checkpoint: Path
    config: dict[str, Any]
    parts: list[str] = field(default_factory=list)  # "full", "lora"
    files: list[str] = field(default_factory=list)  # relative to folder
    samples: list[str] = field(default_factory=list)


def checkpoint_of(path: Path) -> Path:
    """A run folder → its latest checkpoint; a checkpoint folder → itself (verified)."""
    path = Path(path).expanduser()
    if (path / CHECKPOINTS).is_dir():
        name = read_latest(path)
        if name is None:
            raise UserError("this run has no checkpoint yet", where=str(path / CHECKPOINTS),
                            fix="publish after the first checkpoint is written")  # fmt: skip
        path = path / CHECKPOINTS / name
    if not (path / MARKER).is_file():
        raise UserError("not a run or training checkpoint folder", where=str(path),
                        fix="give RUN or RUN/checkpoints/step-N")  # fmt: skip
    verify_checkpoint(path)
    return path


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for item in sorted(src.rglob("*")):
            if item.is_file():
                _link(item, dst / item.relative_to(src))
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _parts(checkpoint: Path, what: str) -> list[str]:
    has = {"full": (checkpoint / "diffusers" / "model_index.json").is_file() or
                   (checkpoint / "model.safetensors").is_file(),
           "lora": (checkpoint / "lora" / DIFFUSERS_WEIGHT_NAME).is_file()}  # fmt: skip
    wanted = [p for p in ("full", "lora") if has[p]] if what == "auto" else \
        (["full", "lora"] if what == "both" else [what])  # fmt: skip
    missing = [p for p in wanted if not has[p]]
    if missing or not wanted:
        raise UserError(f"the checkpoint has no {' or '.join(missing or ['model'])} export", where=str(checkpoint),
                        fix="train with checkpoints.diffusers/single_file (full) or --lora, or pick --what")  # fmt: skip
    return wanted


def last_samples(run: Path) -> list[Path]:
    """The PNGs of the last sample round of the run (grid first), or none."""
    rounds = sorted(p for p in (run / "samples").glob("step-*") if p.is_dir())
    if not rounds:
        return []
    pngs = sorted(rounds[-1].glob("*.png"))
    return sorted(pngs, key=lambda p: (p.name != "grid.png", p.name))


def _training_images(config: dict[str, Any]) -> int | None:
    """The number of cached training images, from the run's WORK (None when it is not there)."""
    try:
        return int(read_json_file(Path(config["work"]) / "cache" / "cache_meta.json", fix="").get("rows"))
    except (KeyError, TypeError, ValueError, UserError, OSError):
        return None


def assemble(source: Path, *, name: str, what: str = "auto") -> Published:
    """Build ``RUN/publish/`` from a run or checkpoint folder (replacing a previous one)."""
    if what not in WHAT:
        raise UserError(f"--what {what!r} is not one of {', '.join(WHAT)}")
    checkpoint = checkpoint_of(source)
    run = checkpoint.parent.parent
    config = read_json_file(checkpoint / STATE_JSON, fix="publish another checkpoint").get("config") or {}
    out, partial = run / "publish", run / "publish.partial"
    shutil.rmtree(partial, ignore_errors=True)
    pub = Published(out, checkpoint, config, _parts(checkpoint, what))
    if "full" in pub.parts:
        if (checkpoint / "diffusers").is_dir():
            _link(checkpoint / "diffusers", partial)
        for suffix in (".safetensors", ".workflow_api.json"):
            if (checkpoint / f"model{suffix}").is_file():
                _link(checkpoint / f"model{suffix}", partial / f"{name}{suffix}")
    if "lora" in pub.parts:
        _link(checkpoint / "lora" / DIFFUSERS_WEIGHT_NAME, partial / DIFFUSERS_WEIGHT_NAME)
        if (checkpoint / "lora_kohya.safetensors").is_file():
            _link(checkpoint / "lora_kohya.safetensors", partial / f"{name}_kohya.safetensors")
    for png in last_samples(run):
        _link(png, partial / "samples" / png.name)
        pub.samples.append(f"samples/{png.name}")
    partial.mkdir(parents=True, exist_ok=True)
    from sdxl_trainer.publish.card import model_card

    (partial / "README.md").write_text(model_card(pub, name=name, images=_training_images(config)))
    normal_permissions(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    pub.files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return pub
