"""Nothing silent in a run (issue #13): checkpoints checked before a resume, never written with
non-finite weights, and a run that skipped too many updates ends with an error naming their samples.

- :func:`check_resume` — the checkpoint ``--resume`` means, its files' SHA-256 compared with those
  recorded when it was written (checkpoint.json) and its settings with this run's, before anything
  is loaded or written: a refused start leaves RUN/ as it was.
- :func:`refuse_non_finite` — before every checkpoint, on every rank: the trained weights, EMA
  shadows and optimiser state are all finite, or the run stops naming the last good checkpoint.
- :func:`log_skip` / :func:`check_skipped_fraction` — every skipped update's sample ids go to
  RUN/skipped.jsonl; a run that skipped more than ``max_skipped_fraction`` of its updates ends with
  exit 2 (after its last checkpoint is written: nothing is lost).

docs/reliability.md lists each fault, how it is handled, what the checks cost and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console, dist
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import read_json_file
from sdxl_trainer.train.checkpoint import RESUME_FIXED, check_resume_config, trainable_state
from sdxl_trainer.train.checkpoint_dir import (
    CHECKPOINTS,
    flatten_state,
    list_checkpoints,
    read_latest,
    resolve_resume,
    verify_checkpoint,
)
from sdxl_trainer.train.checksums import mismatches
from sdxl_trainer.train.state import TrainState

# What a resume reads; the exports (diffusers/, model.safetensors, lora/) are hashed when written
# but not read back here: a resume does not load them.
RESUME_FILES = ("trainable.safetensors", "text_encoders.safetensors", "state.safetensors", "state.json")
SKIP_LOG = "skipped.jsonl"


# ── resume: checksums and settings before anything is loaded ──────────────────────────────────
def damaged_files(folder: Path, files: Iterable[str] = RESUME_FILES) -> list[str] | None:
    """The files of ``folder`` among ``files`` whose SHA-256 differs from checkpoint.json's record;
    None for a checkpoint written before checksums were recorded (nothing to compare with)."""
    recorded = (verify_checkpoint(folder).get("checksums") or {}).get("files")
    if recorded is None:
        return None
    wanted = set(files)
    return mismatches(folder, {rel: digest for rel, digest in recorded.items() if rel in wanted})


def intact_other(folder: Path) -> tuple[Path, bool] | None:
    """The newest other checkpoint of ``folder``'s run a resume can use, and whether its checksums
    were verified (False: written before checksums); None when there is none."""
    folder = Path(folder)
    for other in reversed(list_checkpoints(folder.parent.parent)):
        if other.resolve() == folder.resolve():
            continue
        try:
            bad = damaged_files(other)
        except UserError:  # incomplete (a file missing or truncated): not a candidate
            continue
        if not bad:
            return other, bad is not None
    return None


def verify_resume_files(folder: Path) -> None:
    """Refuse a checkpoint whose resume files changed since they were written; warn (one console
    line) for one written before checksums were recorded, which is accepted unverified."""
    bad = damaged_files(folder)
    if bad is None:
        console.info(f"warning: {folder} was written before checkpoints recorded checksums: its files are "
                     "not verified (sizes only); the next checkpoint records them")  # fmt: skip
        return
    if not bad:
        return
    other = intact_other(folder)
    if other is None:
        fix = "no intact checkpoint is left in this run: restore the file from a copy, or start without --resume"
    else:
        fix = f"resume from the last intact checkpoint instead: --resume {other[0]}"
        fix += "" if other[1] else " (written before checksums: sizes checked only)"
    more = f" (and {', '.join(bad[1:])})" if len(bad) > 1 else ""
    raise UserError(f"checksum mismatch{more}: the file changed after the checkpoint was written "
                    "(damaged on disk or in a copy)", where=str(Path(folder) / bad[0]), fix=fix)  # fmt: skip


def check_resume(cfg: Any, *, fixed: tuple[str, ...] = RESUME_FIXED) -> Path:
    """The checkpoint folder ``cfg.resume`` means, verified: complete, checksums, compatible settings
    (``fixed``: those a resume may not change; `sdxl train-vae` passes its own)."""
    folder = resolve_resume(Path(cfg.out), cfg.resume)
    verify_resume_files(folder)
    config = read_json_file(folder / "state.json", fix="resume from another checkpoint").get("config")
    check_resume_config(config if isinstance(config, dict) else {}, cfg, fixed=fixed)
    return folder


# ── finite weights before every checkpoint ────────────────────────────────────────────────────
def _floats(tensors: Iterable[Any]) -> list[torch.Tensor]:
    return [t.detach() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


@torch.no_grad()
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when no value is NaN or ±inf: one max-|x| per tensor (a foreach kernel; max-|x|, unlike a
    sum of squares, cannot overflow for finite values) and one host read per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in _floats(tensors):
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        peaks = torch._foreach_norm(group, float("inf"))
        if not bool(torch.stack([p.float() for p in peaks]).isfinite().all()):
            return False
    return True


def _checked_parts(cfg: TrainConfig, parts: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What a checkpoint stores that training changes, by name: weights, text encoders, EMA, optimiser."""
    found = {"trained weights": trainable_state(parts["unet"], cfg)}
    if parts.get("text") is not None and parts["text"].train:
        found["text encoders"] = parts["text"].state()
    if parts.get("ema") is not None:
        found["EMA weights"] = flatten_state(parts["ema"].state_dict())[0]
    # the moments are read by memory bandwidth alone (SDXL AdamW: 20 GB, ~10 ms on an H100) and a
    # non-finite moment turns every later update into NaN: checked too
    found["optimizer state"] = flatten_state(parts["optimizer"].state_dict())[0]
    return found


def last_good(out: Path) -> str:
    name = read_latest(out)
    if name is None:
        return "no checkpoint was written yet: start again with a lower learning rate or bf16 instead of fp16"
    path = Path(out) / CHECKPOINTS / name
    return f"nothing was written; the last good checkpoint is {path}: resume from it (--resume {path}) with a " \
           "lower learning rate or bf16 instead of fp16"  # fmt: skip


def refuse_non_finite(cfg: TrainConfig, parts: Mapping[str, Any]) -> None:
    """Stop (every rank alike: DDP keeps them equal) before a checkpoint of non-finite values is written."""
    refuse_non_finite_tensors(_checked_parts(cfg, parts), step=parts["state"].step, out=Path(cfg.out))


def refuse_non_finite_tensors(checked: Mapping[str, Mapping[str, torch.Tensor]], *, step: int, out: Path) -> None:
    """The check itself, on ``{what: {name: tensor}}`` (what a checkpoint stores that training changed);
    `sdxl train-vae` passes its decoder, EMA and optimiser state."""
    for what, tensors in checked.items():
        if all_finite(tensors.values()):
            continue
        first = next(name for name, t in tensors.items() if not all_finite([t]))
        raise UserError(f"non-finite values in the {what} (first: {first}); the checkpoint was not written "
                        "and 'latest' not moved", where=f"step {step}", fix=last_good(out))  # fmt: skip


# ── skipped updates: their sample ids, and a limit on their share ─────────────────────────────
def log_skip(out: Path, state: TrainState, micro: list[Mapping[str, Any]], info: dist.DistInfo) -> None:
    """Append the skipped update's step and sample ids (every rank's) to RUN/skipped.jsonl."""
    ids = [str(i) for batch in micro for i in batch.get("ids", [])]
    if info.distributed:  # a skip is decided alike on every rank (the all-reduced gradient)
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, ids)
        ids = [i for rank_ids in gathered for i in rank_ids]
    if info.is_main:
        with (Path(out) / SKIP_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.step, "ids": ids}) + "\n")


def check_skipped_fraction(cfg: TrainConfig, state: TrainState) -> None:
    """At the end of the run: more than ``max_skipped_fraction`` of the updates skipped is an error."""
    if not state.step or state.skipped / state.step <= cfg.max_skipped_fraction:
        return
    log = Path(cfg.out) / SKIP_LOG
    raise UserError(f"{state.skipped} of {state.step} updates ({state.skipped / state.step:.1%}) were skipped for a "
                    f"non-finite loss or gradient, more than max_skipped_fraction {cfg.max_skipped_fraction:g}",
                    where=str(log), fix=f"the sample ids of every skipped batch are in {log}: check those samples "
                    "(sdxl prep cache --verify) or raise --max-skipped-fraction; the final checkpoint is written")  # fmt: skip
