"""Where a sampling round goes: RUN/samples/step-NNNNNN/, metrics.jsonl, TensorBoard and W&B.

A round's folder holds one PNG per prompt × seed (``00-seed0.png``; ``-ema`` for the EMA weights),
each carrying its generation parameters as `sdxl generate` writes them; ``grid.png`` (a row per
prompt); one strip per check that ran (``black.png``, ``coherence.png``, ``progressive.png``); and
``checks.json`` with every check's numbers. The folder is written beside its final name and renamed
into place, so a folder that exists is a finished round. The checks' headline numbers become
scalars named ``check/<check>/<number>`` (``check_ema/…`` for the EMA weights) in metrics.jsonl,
TensorBoard and W&B; the images go to TensorBoard (``add_image``) and W&B (``wandb.Image``, the prompt
as caption) at the round's step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdxl_trainer.sampling.images import image_grid, save_png, thumbnail, to_pil
from sdxl_trainer.schema import write_json
from sdxl_trainer.train.state import TrainState

ROUND_ARTIFACT = "sample_round"
THUMB = 256  # the longest side of an image in a round's grids


@dataclass(frozen=True)
class RoundImage:
    job: int  # the prompt's position in samples.prompts
    seed: int
    weights: str  # "raw" | "ema"
    image: torch.Tensor  # (3, H, W) in [0, 1], on the CPU
    params: dict[str, Any]  # what sdxl generate writes into its PNGs, plus step, samples_seen, weights

    @property
    def name(self) -> str:
        return f"{self.job:02d}-seed{self.seed}{'-ema' if self.weights == 'ema' else ''}"


def round_grid(images: list[RoundImage]) -> Image.Image:
    """A row per prompt: its seeds with the trained weights, then (EMA on) the same seeds with the EMA."""
    jobs = sorted({i.job for i in images})
    weights = list(dict.fromkeys(i.weights for i in images))  # "raw", then "ema"
    rows = {(j, w): [i for i in images if i.job == j and i.weights == w] for j in jobs for w in weights}
    width = max(len(r) for r in rows.values())  # seeds per block of columns
    seeds = {tuple(i.seed for i in r) for r in rows.values()}
    same = len(seeds) == 1  # every prompt at the run's seeds: label the columns with them
    labels = [f"{'' if w == 'raw' else w + ' '}{f'seed {next(iter(seeds))[k]}' if same else f'#{k + 1}'}"
              for w in weights for k in range(width)]  # fmt: skip
    cell = min(THUMB, max(max(i.image.shape[1:]) for i in images))
    cells, row_labels = [], []
    for j in jobs:
        block = [rows[(j, w)] + [None] * (width - len(rows[(j, w)])) for w in weights]
        cells.append([None if i is None else thumbnail(i.image, cell) for b in block for i in b])
        first = rows[(j, weights[0])]
        listed = "" if same else f" (seeds {', '.join(str(i.seed) for i in first)})"
        row_labels.append(first[0].params["prompt"][:60] + listed)
    return image_grid(cells, row_labels=row_labels, col_labels=labels, cell=cell)


def check_strip(name: str, check: dict[str, Any]) -> Image.Image:
    """One check's images with their numbers as labels (black: a row per prompt; the others: one row)."""
    images, m = check["images"], check["metrics"]
    cell = min(THUMB, max(max(i.shape[1:]) for i in images))
    if name == "black":
        kinds = [k for k in ("black", "white") if k in m]
        per = len(images) // len(kinds)
        cells = [[thumbnail(i, cell) for i in images[r * per:(r + 1) * per]] for r in range(len(kinds))]
        return image_grid(cells, row_labels=[f"{k}: mean {m[k]['mean']:.3f}" for k in kinds],
                          col_labels=[f"seed {s}" for s in m["seeds"]], cell=cell)  # fmt: skip
    if name == "coherence":
        labels = [f"{s['scale']:g}x {s['mode']} {s['coherence']:.3f}" for s in m["summary"]]
    else:
        labels = [f"step {s}" for s in m["steps"]] + ["final"]
    return image_grid([[thumbnail(i, cell) for i in images]], row_labels=[m["prompts"][0] if name == "coherence"
                      else m["prompts"][0]["prompt"]], col_labels=labels, cell=cell)  # fmt: skip


def check_scalars(checks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The checks' headline numbers, flat: check/black/black_mean, check_ema/coherence/1.5x_scaled, …"""
    flat: dict[str, float] = {}
    for label, by_check in checks.items():
        prefix = "check" if label == "raw" else f"check_{label}"
        for name, check in by_check.items():
            m = check["metrics"]
            if name == "black":
                values = {f"{k}_mean": m[k]["mean"] for k in ("black", "white") if k in m}
                values.update({"separation": m["separation"]} if "separation" in m else {})
            elif name == "coherence":
                values = {f"{s['scale']:g}x_{s['mode']}": s["coherence"] for s in m["summary"]}
            else:
                p = m["prompts"][0]
                values = {"first_preview_brightness": p["first_preview_brightness"],
                          "final_brightness": p["final_brightness"]}  # fmt: skip
            flat.update({f"{prefix}/{name}/{k}": float(v) for k, v in values.items()})
    return flat


def write_round(root: Path, state: TrainState, images: list[RoundImage], checks: dict[str, dict[str, Any]], *,
                seconds: float, config: Any) -> Path:  # fmt: skip
    """RUN/samples/step-NNNNNN/ with the PNGs, grid.png, the check strips and checks.json; returns it."""
    final = root / f"step-{state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a round killed half-way
    tmp.mkdir(parents=True)
    for image in images:
        save_png(image.image, tmp / f"{image.name}.png", image.params)
    round_grid(images).save(tmp / "grid.png")
    for label, by_check in checks.items():
        for name, check in by_check.items():
            check_strip(name, check).save(tmp / f"{name}{'' if label == 'raw' else '-' + label}.png")
    numbers = {label: {name: c["metrics"] for name, c in by_check.items()} for label, by_check in checks.items()}
    write_json({"step": state.step, "samples_seen": state.samples_seen, "seconds": seconds, "checks": numbers,
                "scalars": check_scalars(checks), "images": [f"{i.name}.png" for i in images]},
               tmp / "checks.json", artifact=ROUND_ARTIFACT, config=config)  # fmt: skip
    if final.exists():  # rendered before by a run killed between this round and its checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def publish_round(sinks: list[tuple[str, Any]], metrics: Path, state: TrainState, images: list[RoundImage],
                  checks: dict[str, dict[str, Any]], *, seconds: float) -> dict[str, Any]:  # fmt: skip
    """The round's scalars as one metrics.jsonl record; images and scalars to TensorBoard and W&B."""
    scalars = check_scalars(checks)
    record = {"step": state.step, "samples": state.samples_seen, "sample_round_s": seconds, **scalars}
    with metrics.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    grid = round_grid(images)
    for kind, sink in sinks:
        if kind == "tensorboard":
            for image in images:
                group = "samples" if image.weights == "raw" else f"samples_{image.weights}"
                # as uint8, rounded like the PNG (TensorBoard would truncate floats): the same pixels as on disk
                sink.add_image(f"{group}/{image.name.removesuffix('-ema')}", np.asarray(to_pil(image.image)),
                               global_step=state.step, dataformats="HWC")  # fmt: skip
            sink.add_image("samples/grid", np.asarray(grid), global_step=state.step, dataformats="HWC")
            for name, value in scalars.items():
                sink.add_scalar(name, value, global_step=state.step)
            sink.flush()
        else:
            import wandb  # the sink exists only when the package imported (loop.open_sinks)

            logged: dict[str, Any] = {"samples_grid": wandb.Image(grid, caption=f"step {state.step}"), **scalars}
            for weights in dict.fromkeys(i.weights for i in images):
                logged["samples" if weights == "raw" else f"samples_{weights}"] = [
                    wandb.Image(to_pil(i.image), caption=i.params["prompt"]) for i in images if i.weights == weights
                ]
            sink.log(logged, step=state.step)
    return record
