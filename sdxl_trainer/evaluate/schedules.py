"""Schedule plots with their numbers, all computed by the diffusion core (no model needed).

* ``schedules.csv`` — σ(u) and log-SNR(u) for SDXL's table, Lin's zero-SNR rescale, the high-σ
  table, flow with shifts 1/3/6 (`schedule_curves`) and the checkpoint's own training schedule;
  u ∈ [0, 1] is the table position t/(N−1), or flow time before the shift. Columns: schedule, t (= u),
  level (table index, or shifted flow time), sigma, log_snr.
* ``density.csv`` — the training-time distribution of log σ (flow: t) of the checkpoint's objective,
  from its own level sampler and options.
* ``sampling_sigmas.csv`` — the levels each sampler visits at the report's step count.
* ``mean_fraction.csv`` — f(σ_max; h, w) = 1/(1 + σ²/(h·w)) (eq. M1, s = 1), the share of the image
  mean still readable from the starting noise, against the canvas side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.diffusion import (
    SDXL_NUM_TIMESTEPS,
    ancestral_step,
    build_level_sampler,
    flow_log_snr,
    flow_shift,
    flow_sigma,
    log_snr_from_sigma,
    mean_signal_fraction,
    schedule_curves,
    sdxl_sigmas,
    sigma_max_for_resolution,
)
from sdxl_trainer.evaluate.artifacts import finite, new_figure, save_figure, write_csv
from sdxl_trainer.sampling.generator import Generator
from sdxl_trainer.sampling.sample import sampling_sigmas

FLOW_SHIFTS = (1.0, 3.0, 6.0)
SCHEDULE_COLUMNS = ("schedule", "t", "level", "sigma", "log_snr")
DENSITY_COLUMNS = ("quantity", "bin_lo", "bin_hi", "count", "density")
SAMPLING_COLUMNS = ("sampler", "schedule", "step", "level", "sigma", "sigma_down")
FRACTION_COLUMNS = ("curve", "side", "latent_side", "sigma", "fraction")
SDXL_SIGMA_MAX = float(sdxl_sigmas()[-1])


def schedule_rows(generator: Generator) -> list[dict[str, Any]]:
    """The rows of schedules.csv: the core's comparison curves, then the checkpoint's own schedule."""
    rows = []
    for curve in schedule_curves(flow_shifts=FLOW_SHIFTS):
        levels = curve.u * (SDXL_NUM_TIMESTEPS - 1) if not curve.name.startswith("flow") else None
        if levels is None:
            levels = flow_shift(curve.u, shift=float(curve.name.removeprefix("flow_shift_")))
        rows += _rows(curve.name, curve.u, levels, curve.sigma, curve.log_snr)
    obj = generator.objective
    name = f"checkpoint_{generator.info['objective']}"
    if obj.prediction == "flow":
        u = torch.linspace(0, 1, SDXL_NUM_TIMESTEPS, dtype=torch.float64)
        t = flow_shift(u, shift=float(generator.flow_shift))
        return rows + _rows(name, u, t, flow_sigma(t), flow_log_snr(t))
    table = obj.sigmas.double().cpu()
    index = torch.arange(table.numel(), dtype=torch.float64)
    return rows + _rows(name, index / (table.numel() - 1), index, table, log_snr_from_sigma(table))


def _rows(name, u, level, sigma, log_snr) -> list[dict[str, Any]]:
    return [{"schedule": name, "t": a, "level": b, "sigma": c, "log_snr": d}
            for a, b, c, d in zip(u.tolist(), level.tolist(), sigma.tolist(), log_snr.tolist())]  # fmt: skip


def level_sampler(generator: Generator):
    """The checkpoint's training-level sampler, with the run's level options when its config is known."""
    trained = ((generator.info.get("config") or {}).get("objective")) or {}
    kwargs: dict[str, Any] = {"t_min": trained.get("t_min"), "t_max": trained.get("t_max")}
    if generator.objective.prediction == "flow":
        kwargs.update(shift=float(generator.flow_shift), logit_std=float(trained.get("logit_std", 1.0)))
    else:
        kwargs["terminal_oversample"] = float(trained.get("terminal_oversample", 0.0))
    return build_level_sampler(generator.objective.to("cpu"), **kwargs)


def density(generator: Generator, *, samples: int, bins: int = 60, seed: int = 0) -> tuple[dict, list[dict]]:
    """(metrics, histogram rows) of the training levels: log σ for the σ-space objectives, t for flow."""
    levels = level_sampler(generator)(samples, generator=torch.Generator("cpu").manual_seed(seed)).double()
    flow = generator.objective.prediction == "flow"
    sigma = flow_sigma(levels) if flow else levels
    values, quantity = (levels, "t") if flow else (levels.log(), "log_sigma")
    lo, hi = (0.0, 1.0) if flow else (float(values.min()), float(values.max()))
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    rows = [{"quantity": quantity, "bin_lo": lo + i * width, "bin_hi": lo + (i + 1) * width, "count": int(c),
             "density": float(c) / (samples * width)} for i, c in enumerate(counts.tolist())]  # fmt: skip
    top = generator.objective.sigma_max
    metrics = {
        "quantity": quantity, "samples": samples, "median_level": float(levels.median()),
        "median_sigma": finite(float(sigma.median())),
        "fraction_above_sdxl_sigma_max": float((sigma > SDXL_SIGMA_MAX * (1 + 1e-6)).double().mean()),
        "terminal_fraction": None if flow else float((levels >= top * (1 - 1e-6)).double().mean()),
    }  # fmt: skip
    return metrics, rows


def sampling_rows(generator: Generator, *, steps: int) -> list[dict[str, Any]]:
    """Every sampler's levels at ``steps`` steps; Euler ancestral also its σ_down (η = 1)."""
    rows = []
    if generator.objective.prediction == "flow":
        trained = float(generator.flow_shift)
        for shift in dict.fromkeys((trained, *FLOW_SHIFTS)):
            t = sampling_sigmas(generator, steps=steps, flow_shift=shift)
            label = f"flow shift {shift:g}" + (" (trained)" if shift == trained else "")
            rows += [{"sampler": "flow_euler", "schedule": label, "step": i, "level": v, "sigma": finite(v / (1 - v))
                      if v < 1 else None, "sigma_down": None} for i, v in enumerate(t.tolist())]  # fmt: skip
        return rows
    for schedule in ("karras", "trailing", "uniform"):
        sig = sampling_sigmas(generator, steps=steps, schedule=schedule).tolist()
        for sampler in ("euler", "dpmpp_2m", "euler_ancestral"):
            for i, s in enumerate(sig):
                down = ancestral_step(s, sig[i + 1])[0] if sampler == "euler_ancestral" and i + 1 < len(sig) else None
                rows.append({"sampler": sampler, "schedule": schedule, "step": i, "level": s, "sigma": s,
                             "sigma_down": down})  # fmt: skip
    return rows


def mean_fraction_rows(generator: Generator, *, base: int) -> list[dict[str, Any]]:
    """f(σ; side) for the checkpoint's start σ, SDXL's 14.6 (fixed and scaled by eq. M2) and 20000."""
    flow = generator.objective.prediction == "flow"
    start = math.inf if flow else generator.objective.sigma_max  # flow starts at t = 1: σ = ∞
    label = "checkpoint (flow, t = 1)" if flow else f"checkpoint (σ_max {start:g})"
    rows = []
    for side in sorted({*range(256, 4096 + 1, 128), base, 2 * base}):
        latent = side // generator.vae_factor
        curves = {
            label: start,
            "SDXL σ_max 14.6": SDXL_SIGMA_MAX,
            f"SDXL σ_max scaled with side (M2, base {base}px)": sigma_max_for_resolution(
                SDXL_SIGMA_MAX, height=side, width=side, base_height=base, base_width=base),
            "NovelAI σ_max 20000": 20000.0,
        }  # fmt: skip
        for curve, sigma in curves.items():
            fraction = float(mean_signal_fraction(sigma, latent_height=latent, latent_width=latent))
            rows.append({"curve": curve, "side": side, "latent_side": latent, "sigma": sigma, "fraction": fraction})
    return rows


def schedules_check(generator: Generator, *, steps: int, base: int, density_samples: int) -> tuple[dict, dict]:
    """(metrics, tables) of the four schedule views; tables maps CSV stem → rows."""
    dens_metrics, dens_rows = density(generator, samples=density_samples)
    fractions = mean_fraction_rows(generator, base=base)
    near = min({r["side"] for r in fractions}, key=lambda side: abs(side - base))
    at = {r["curve"]: r["fraction"] for r in fractions if r["side"] == near}
    sampling = sampling_rows(generator, steps=steps)
    metrics = {
        "objective": generator.info["objective"], "trained_sigma_max": finite(generator.objective.sigma_max)
        if generator.objective.prediction != "flow" else None, "trained_flow_shift": generator.flow_shift,
        "density": dens_metrics, "sampling_start_level": sampling[0]["level"], "mean_fraction_side": near,
        "mean_fraction_at_base": at,
    }  # fmt: skip
    tables = {"schedules": schedule_rows(generator), "density": dens_rows, "sampling_sigmas": sampling,
              "mean_fraction": fractions}  # fmt: skip
    return metrics, tables


def write_schedule_artifacts(out: Path, tables: dict[str, list[dict]]) -> list[str]:
    """Four figures, each beside its CSV."""
    columns = {"schedules": SCHEDULE_COLUMNS, "density": DENSITY_COLUMNS, "sampling_sigmas": SAMPLING_COLUMNS,
               "mean_fraction": FRACTION_COLUMNS}  # fmt: skip
    for stem, rows in tables.items():
        write_csv(out / f"{stem}.csv", rows, columns[stem])
    _plot_schedules(out, tables["schedules"])
    _plot_density(out, tables["density"])
    _plot_sampling(out, tables["sampling_sigmas"])
    _plot_fraction(out, tables["mean_fraction"])
    return [f"{stem}.png" for stem in tables]


def _series(rows, key, x, y, *, positive: bool = False):
    """{rows[key]: (xs, ys)} over rows whose y is finite (and > 0 for a log axis)."""
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if r[y] is not None and math.isfinite(r[y]) and (r[y] > 0 or not positive):
            out.setdefault(r[key], ([], []))[0].append(r[x])
            out[r[key]][1].append(r[y])
    return out


def _plot_schedules(out: Path, rows) -> None:
    fig, (a, b) = new_figure(2)
    for name, (u, s) in _series(rows, "schedule", "t", "sigma", positive=True).items():
        a.semilogy(u, s, label=name)
    for name, (u, v) in _series(rows, "schedule", "t", "log_snr").items():
        b.plot(u, v, label=name)
    a.set(xlabel="u (timestep / 999, or flow time before shift)", ylabel="σ", title="σ(u)")
    b.set(xlabel="u", ylabel="log SNR = −2 log σ", title="log-SNR(u)", ylim=(-25, 12))
    b.legend(fontsize=7)
    save_figure(fig, out / "schedules.png")


def _plot_density(out: Path, rows) -> None:
    fig, (ax,) = new_figure()
    ax.stairs([r["density"] for r in rows], [rows[0]["bin_lo"]] + [r["bin_hi"] for r in rows])
    ax.set(xlabel=rows[0]["quantity"].replace("_", " "), ylabel="density",
           title="training-level density of the checkpoint")  # fmt: skip
    save_figure(fig, out / "density.png")


def _plot_sampling(out: Path, rows) -> None:
    fig, (ax,) = new_figure()
    shown = [r for r in rows if r["sampler"] != "euler_ancestral"]
    for name, (i, s) in _series(shown, "schedule", "step", "sigma", positive=True).items():
        ax.semilogy(i, s, marker="o", label=f"{name} (σ)")
    ancestral = [r for r in rows if r["sampler"] == "euler_ancestral"]
    for name, (i, s) in _series(ancestral, "schedule", "step", "sigma_down", positive=True).items():
        ax.semilogy(i, s, ls=":", marker=".", label=f"{name}: euler_ancestral σ_down")
    ax.set(xlabel="step", ylabel="σ (flow: t/(1−t))", title="sampling levels per sampler and schedule")
    ax.legend(fontsize=7)
    save_figure(fig, out / "sampling_sigmas.png")


def _plot_fraction(out: Path, rows) -> None:
    fig, (ax,) = new_figure()
    for name, (side, f) in _series(rows, "curve", "side", "fraction").items():
        ax.semilogy(side, [max(v, 1e-12) for v in f], label=name)
    ax.set(xlabel="canvas side (px)", ylabel="share of the image mean surviving at σ_max (M1)",
           title="what the first step can still read")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, out / "mean_fraction.png")
