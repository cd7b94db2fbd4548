"""`sdxl evaluate`: run the checks on one checkpoint and write REPORT/ (report.md, metrics.json, figures).

Each check returns its numbers and writes its PNGs beside CSVs of the same stem; this module ties
them into ``report.md`` (every figure embedded, one paragraph per check saying what it shows) and
``metrics.json`` (every number, with the checkpoint's settings and provenance). docs/evaluate.md
describes each check and how to read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdxl_trainer import console
from sdxl_trainer.evaluate.black import write_black_artifacts
from sdxl_trainer.evaluate.extras import extras_check
from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.evaluate.coherence import write_coherence_artifacts
from sdxl_trainer.evaluate.generate import options_from_config
from sdxl_trainer.evaluate.progressive import write_progressive_artifacts
from sdxl_trainer.evaluate.schedules import schedules_check, write_schedule_artifacts
from sdxl_trainer.sampling.black import TARGETS, black_image_check
from sdxl_trainer.sampling.coherence import coherence_check
from sdxl_trainer.sampling.generator import Generator
from sdxl_trainer.sampling.progressive import progressive_check
from sdxl_trainer.sampling.sample import SamplingOptions, pick_sampler, sampling_sigmas
from sdxl_trainer.schema import write_json

METRICS_ARTIFACT = "evaluate_metrics"


def _black(g: Generator, cfg: Any, out: Path, opts: SamplingOptions, base: int) -> tuple[dict, str, list[str]]:
    prompts = {"black": cfg.black_prompt, "white": cfg.white_prompt}
    metrics, rows, images = black_image_check(g, seeds=list(cfg.seeds), prompts=prompts, width=base, height=base,
                                              options=opts, negative=cfg.negative)  # fmt: skip
    figures = write_black_artifacts(out, metrics, rows, images, thumb=cfg.thumbnail)
    b, w = metrics["black"], metrics["white"]
    text = (
        f"**Black image (zero-terminal-SNR effectiveness).** Asked for a solid black image "
        f"(`{cfg.black_prompt}`) over {len(cfg.seeds)} seeds at {base}px, the decoded images have mean brightness "
        f"{b['mean']:.3f} (target {TARGETS['black']:g}; seeds range {b['min']:.3f}–{b['max']:.3f}, mean pixel std "
        f"{b['mean_pixel_std']:.3f}); asked for white, {w['mean']:.3f} (target {TARGETS['white']:g}). Separation "
        f"white − black = {metrics['separation']:.3f} (1 = both reached, 0 = the prompt cannot move the mean). "
        f"A model "
        f"that starts sampling at σ_max = 14.6 reads the noise's mean as the image's and tends to mid-grey "
        f"(docs/diffusion.md §7); this checkpoint started at level {g.objective.sigma_max:g} ({g.info['objective']})."
    )
    comfy = _black_at_comfyui_zsnr(g, cfg, opts, base, prompts, trained=metrics)
    if comfy is not None:
        metrics["comfyui_zsnr"] = comfy
        text += (f" Sampled as ComfyUI's `ModelSamplingDiscrete` zsnr mode samples it — from σ_max = "
                 f"{comfy['sigma_max']:.0f} instead of {g.objective.sigma_max:g} — black {comfy['black']:.3f} and white "
                 f"{comfy['white']:.3f} (difference to the trained start: black {comfy['black_difference']:+.3f}, "
                 f"white {comfy['white_difference']:+.3f}).")  # fmt: skip
    return metrics, text, figures


# ComfyUI's zero-SNR table (comfy_extras/nodes_model_advanced.py) sets the last ᾱ to 4.8973451890853435e-08
# instead of 0, so its sampling starts at σ = √((1 − ᾱ)/ᾱ) ≈ 4,519, not the 20,000 NovelAI train at.
COMFYUI_ZSNR_ALPHA_BAR = 4.8973451890853435e-08
COMFYUI_ZSNR_SIGMA_MAX = ((1 - COMFYUI_ZSNR_ALPHA_BAR) / COMFYUI_ZSNR_ALPHA_BAR) ** 0.5


def _black_at_comfyui_zsnr(g: Generator, cfg: Any, opts: SamplingOptions, base: int, prompts: dict, *,
                           trained: dict) -> dict | None:
    """For a v_ztsnr model on the Karras schedule: the black/white means when sampling starts at ComfyUI's
    zero-SNR σ_max, and their difference to the trained start (None for other models and schedules)."""
    import dataclasses

    if g.info.get("objective") != "v_ztsnr" or opts.schedule not in ("auto", "karras") or opts.sigma_max is not None:
        return None
    at = dataclasses.replace(opts, sigma_max=COMFYUI_ZSNR_SIGMA_MAX)
    m, _, _ = black_image_check(g, seeds=list(cfg.seeds), prompts=prompts, width=base, height=base, options=at,
                                negative=cfg.negative)  # fmt: skip
    return {"sigma_max": COMFYUI_ZSNR_SIGMA_MAX, "black": m["black"]["mean"], "white": m["white"]["mean"],
            "separation": m["separation"], "black_difference": m["black"]["mean"] - trained["black"]["mean"],
            "white_difference": m["white"]["mean"] - trained["white"]["mean"]}  # fmt: skip


def _coherence(g: Generator, cfg: Any, out: Path, opts: SamplingOptions, base: int) -> tuple[dict, str, list[str]]:
    metrics, rows, images = coherence_check(g, prompts=list(cfg.coherence_prompts), seeds=list(cfg.coherence_seeds),
                                            scales=list(cfg.coherence_scales), base=base, grid=cfg.coherence_grid,
                                            options=opts, negative=cfg.negative)  # fmt: skip
    figures = write_coherence_artifacts(out, metrics, rows, images, thumb=cfg.thumbnail)
    parts = [f"{s['scale']:g}× {s['mode']} {s['coherence']:.3f}" for s in metrics["summary"]]
    text = (
        f"**High-resolution coherence.** The same prompts and seeds at the training side ({base}px) and larger, "
        f"started from σ_max as trained and from σ_max scaled by √(area ratio) (flow: the shift). "
        f"Coherence = 1 − RMS "
        f"difference of each image's {cfg.coherence_grid}×{cfg.coherence_grid} area-averaged colours from the mean "
        f"base-resolution layout of its prompt (1× gives the seed-to-seed spread; a drop at larger sides means "
        f"tiling, duplicated objects or a colour drift): {'; '.join(parts)}."
    )
    return metrics, text, figures


def _schedules(g: Generator, cfg: Any, out: Path, opts: SamplingOptions, base: int) -> tuple[dict, str, list[str]]:
    metrics, tables = schedules_check(g, steps=cfg.steps, base=base, density_samples=cfg.density_samples)
    figures = write_schedule_artifacts(out, tables)
    d = metrics["density"]
    fractions = "; ".join(f"{k}: {v:.3g}" for k, v in metrics["mean_fraction_at_base"].items())
    text = (
        f"**Noise schedules.** σ and log-SNR against schedule position for SDXL's table (σ_max 14.6), Lin's zero-SNR "
        f"rescale (σ_T = ∞), the high-σ table (20000) and flow with shifts 1, 3 and 6, plus this checkpoint's own "
        f"schedule (`schedules.csv`). Training levels of the checkpoint's objective ({metrics['objective']}): median "
        f"{d['quantity'].replace('_', ' ')} {d['median_level']:.3g}; "
        f"{100 * d['fraction_above_sdxl_sigma_max']:.1f} % of training draws lie above SDXL's σ_max — the range "
        f"where the image mean is decided. The sampling plot shows the levels each sampler visits at {cfg.steps} "
        f"steps. Share of the image mean still readable from the starting noise at {metrics['mean_fraction_side']}px "
        f"(eq. M1): {fractions}."
    )
    return metrics, text, figures


def _progressive(g: Generator, cfg: Any, out: Path, opts: SamplingOptions, base: int) -> tuple[dict, str, list[str]]:
    prompts = list(cfg.progressive_prompts or [cfg.black_prompt, cfg.coherence_prompts[0]])
    metrics, rows, strips = progressive_check(g, prompts=prompts, seed=cfg.seeds[0], width=base, height=base,
                                              frames=cfg.progressive_frames, options=opts,
                                              negative=cfg.negative)  # fmt: skip
    figures = write_progressive_artifacts(out, rows, strips, thumb=cfg.thumbnail)
    first = "; ".join(f"`{p['prompt'][:40]}` {p['first_preview_brightness']:.3f} → {p['final_brightness']:.3f}"
                      for p in metrics["prompts"])  # fmt: skip
    text = (
        f"**Progressive denoising.** The x0 preview (the denoiser's estimate before each step), decoded by the VAE, "
        f"at {len(metrics['steps'])} evenly spaced steps of {cfg.steps}, final image last. Brightness of the first "
        f"preview → final image: {first}. With zero terminal SNR or flow the first preview already shows the "
        f"prompt's mean colour; later frames add structure, then detail."
    )
    return metrics, text, figures


CHECKS = {"black": _black, "coherence": _coherence, "schedules": _schedules, "progressive": _progressive,
          "extras": extras_check}
TITLES = {"black": "Black image", "coherence": "High-resolution coherence", "schedules": "Schedules",
          "progressive": "Progressive denoising", "extras": "Sampling extras (beta schedule, PAG)"}  # fmt: skip


def _header(g: Generator, cfg: Any, opts: SamplingOptions, base: int) -> dict[str, Any]:
    start = sampling_sigmas(g, steps=opts.steps, schedule=opts.schedule, sigma_max=opts.sigma_max,
                            flow_shift=opts.flow_shift)  # fmt: skip
    norm = g.info["latent_normalization"]
    return {
        "checkpoint": g.source, "objective": g.info["objective"], "settings_from": g.info.get("origin"),
        "sigma_max": g.objective.sigma_max if g.objective.prediction != "flow" else None,
        "flow_shift": g.flow_shift, "latent_normalization": norm, "base_resolution": base,
        "sampling": {"steps": opts.steps, "cfg_scale": opts.cfg_scale, "cfg_rescale": opts.cfg_rescale,
                     "sampler": pick_sampler(g, opts.sampler), "start_level": float(start[0]),
                     "schedule": "flow" if g.objective.prediction == "flow"
                     else opts.schedule.replace("auto", "karras")},
    }  # fmt: skip


def write_report(out: Path, header: dict[str, Any], sections: dict[str, tuple[dict, str, list[str]]]) -> Path:
    """report.md: what was evaluated, then one section per check (its paragraph, then its figures)."""
    s = header["sampling"]
    lines = [
        "# Evaluation report", "",
        f"Checkpoint `{header['checkpoint']['given']}` ({header['checkpoint']['kind']}): objective "
        f"**{header['objective']}**, start level {s['start_level']:g}, latent normalisation "
        f"{header['latent_normalization']['kind']}, base resolution {header['base_resolution']}px (settings read from "
        f"{header['settings_from']}). Sampling: {s['sampler']} sampler, {s['schedule']} schedule, {s['steps']} steps, "
        f"CFG {s['cfg_scale']:g} (rescale {s['cfg_rescale']:g}). Every number is in `metrics.json`; every figure "
        f"has its data in the CSV of the same name.", "",
    ]  # fmt: skip
    for name, (_, text, figures) in sections.items():
        lines += [f"## {TITLES[name]}", "", text, ""]
        lines += [f"![{f}]({f}) — data: `{f.removesuffix('.png')}.csv`" for f in figures] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(cfg: Any) -> dict[str, Any]:
    """`sdxl evaluate`: load ``cfg.checkpoint``, run ``cfg.checks`` and write ``cfg.out``; returns the metrics."""
    g = load_generator(cfg.checkpoint, config_dir=cfg.config_dir, lora=cfg.lora, lora_scale=cfg.lora_scale,
                       vae=cfg.vae, device=cfg.device, dtype=cfg.dtype)  # fmt: skip
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = options_from_config(cfg)
    base = cfg.base_resolution or g.base_resolution
    header = _header(g, cfg, opts, base)
    sections = {}
    for name in [c for c in CHECKS if c in cfg.checks]:
        console.info(f"evaluate: {TITLES[name].lower()}")
        sections[name] = CHECKS[name](g, cfg, out, opts, base)
    metrics = {**header, **{name: section[0] for name, section in sections.items()}}
    write_json(metrics, out / "metrics.json", artifact=METRICS_ARTIFACT, config=cfg)
    write_report(out, header, sections)
    _summary_table(metrics)
    return metrics


def _summary_table(metrics: dict[str, Any]) -> None:
    rows = [("objective", metrics["objective"])]
    if "black" in metrics:
        rows += [("black: mean brightness", f"{metrics['black']['black']['mean']:.3f}"),
                 ("white: mean brightness", f"{metrics['black']['white']['mean']:.3f}")]  # fmt: skip
    for s in metrics.get("coherence", {}).get("summary", []):
        rows.append((f"coherence {s['scale']:g}× {s['mode']}", f"{s['coherence']:.3f}"))
    console.table("evaluate", rows, columns=("check", "value"))
