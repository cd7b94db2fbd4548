"""The `extras` check of `sdxl evaluate`: what the beta schedule and PAG change in the black-image
and coherence numbers, against the report's own sampling settings (issue #16).

Three variants, each with the report's seeds, prompts and steps: **as configured** (the settings of
the run of `sdxl evaluate`), **beta** (`schedule beta`, Beta(0.6, 0.6) quantiles) and **PAG** (the
configured `pag_scale`, or 3 when it is 0, on the configured layers). Per variant: black and white
mean brightness, their separation, and the coherence at each scale and start mode. Written to
`sampling_extras.csv` and `metrics.json` → `extras`; the report states the differences.
Opt-in (`--checks …,extras`): it samples the black and coherence sets three times.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

from sdxl_trainer.sampling.black import black_image_check
from sdxl_trainer.sampling.coherence import coherence_check
from sdxl_trainer.sampling.generator import Generator
from sdxl_trainer.sampling.sample import SamplingOptions

PAG_COMPARE_SCALE = 3.0  # bigASP v2.5's advice: PAG 2–5


def variants(opts: SamplingOptions) -> dict[str, SamplingOptions]:
    pag = opts.pag_scale if opts.pag_scale > 0 else PAG_COMPARE_SCALE
    return {"configured": opts, "beta": dataclasses.replace(opts, schedule="beta", sigma_max=None),
            "pag": dataclasses.replace(opts, pag_scale=pag)}  # fmt: skip


def extras_check(g: Generator, cfg: Any, out: Path, opts: SamplingOptions, base: int) -> tuple[dict, str, list[str]]:
    rows, results = [], {}
    prompts = {"black": cfg.black_prompt, "white": cfg.white_prompt}
    for name, o in variants(opts).items():
        black, _, _ = black_image_check(g, seeds=list(cfg.seeds), prompts=prompts, width=base, height=base, options=o,
                                        negative=cfg.negative)  # fmt: skip
        coh, _, _ = coherence_check(g, prompts=list(cfg.coherence_prompts), seeds=list(cfg.coherence_seeds),
                                    scales=list(cfg.coherence_scales), base=base, grid=cfg.coherence_grid, options=o,
                                    negative=cfg.negative)  # fmt: skip
        coherence = {f"{s['scale']:g}x_{s['mode']}": s["coherence"] for s in coh["summary"]}
        results[name] = {"schedule": o.schedule, "pag_scale": o.pag_scale, "black": black["black"]["mean"],
                         "white": black["white"]["mean"], "separation": black["separation"], "coherence": coherence}
        rows.append({"variant": name, "schedule": o.schedule, "pag_scale": o.pag_scale,
                     "black": black["black"]["mean"], "white": black["white"]["mean"],
                     "separation": black["separation"], **{f"coherence_{k}": v for k, v in coherence.items()}})
    with (out / "sampling_extras.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ref = results["configured"]
    parts = []
    for name in ("beta", "pag"):
        r = results[name]
        worst = min(r["coherence"], key=lambda k: r["coherence"][k] - ref["coherence"][k])
        label = "the beta schedule" if name == "beta" else f"PAG {r['pag_scale']:g}"
        parts.append(f"{label}: black {r['black']:.3f} ({r['black'] - ref['black']:+.3f}), separation "
                     f"{r['separation']:.3f} ({r['separation'] - ref['separation']:+.3f}), coherence at {worst} "
                     f"{r['coherence'][worst]:.3f} ({r['coherence'][worst] - ref['coherence'][worst]:+.3f})")
    text = ("**Sampling extras.** The black-image and coherence sets sampled again with the beta schedule and with "
            f"perturbed-attention guidance, against the settings above (black {ref['black']:.3f}, separation "
            f"{ref['separation']:.3f}): " + "; ".join(parts) + ". `sampling_extras.csv` has every number.")  # fmt: skip
    return {"variants": results}, text, []
