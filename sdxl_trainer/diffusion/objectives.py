"""Training objectives: ε, v (σ-space preconditioning, σ_data = 1) and rectified flow.

Every function works on per-sample levels of shape (B,) — σ for the diffusion objectives, t ∈ [0, 1]
for flow — and never reads a tensor value on the host, so the training step never synchronises.
`build_objective(name)` turns the plain string once into an `Objective` whose fields are the
callables the trainer and the samplers use (docs/diffusion.md §3).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .schedules import NOVELAI_SIGMA_MAX, check_sigma_table, sdxl_sigmas, sigma_to_t, with_terminal_sigma, zero_snr_sigmas

OBJECTIVES = ("eps", "v", "v_ztsnr", "flow")
FLOW_TIMESTEP_SCALE = 1000.0
"""The UNet timestep of flow time t is 1000·t (bigASP v2.5; Esser et al. 2024 train SD3 the same way)."""


class LevelInfo(NamedTuple):
    """Per-sample noise level: σ (σ-space; flow: t/(1−t)), SNR = 1/σ² and the sampled level; shapes (B,)."""

    sigma: torch.Tensor
    snr: torch.Tensor
    level: torch.Tensor  # the sampled level itself: σ for eps/v, flow time t for flow


class TrainingInputs(NamedTuple):
    """What one training step feeds the UNet and compares against."""

    noisy: torch.Tensor  # UNet input: √ᾱ·x0 + √(1−ᾱ)·ε = c_in·(x0 + σε), or (1−t)·x0 + t·ε for flow
    timestep: torch.Tensor  # UNet timestep, float, shape (B,)
    target: torch.Tensor
    info: LevelInfo


def _expand(level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return level.reshape(-1, *([1] * (like.ndim - 1)))


def real(level: torch.Tensor) -> torch.Tensor:
    """A level in at least fp32 (bf16/fp16 σ² overflows or rounds badly; fp64 stays fp64)."""
    return level.to(torch.promote_types(level.dtype, torch.float32))


# --- σ-space scalings (Karras et al. 2022, Table 1; k-diffusion VDenoiser / DiscreteEpsDDPMDenoiser) ---


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """c_in = 1/√(σ² + 1) = √ᾱ (EDM Table 1, σ_data = 1); 0 at σ = ∞."""
    return torch.rsqrt(1.0 + real(sigma) ** 2)


def c_noise_share(sigma: torch.Tensor) -> torch.Tensor:
    """σ/√(σ² + 1) = √(1 − ᾱ), computed as 1/√(1 + σ⁻²) so that σ = ∞ gives 1, not ∞/∞."""
    return torch.rsqrt(1.0 + real(sigma) ** -2)


def c_skip_v(sigma: torch.Tensor) -> torch.Tensor:
    """c_skip = 1/(σ² + 1) (EDM Table 1, σ_data = 1)."""
    return c_in(sigma) ** 2


def c_out_v(sigma: torch.Tensor) -> torch.Tensor:
    """c_out = −σ/√(σ² + 1) for a v-prediction network (k-diffusion VDenoiser, σ_data = 1)."""
    return -c_noise_share(sigma)


def c_skip_eps(sigma: torch.Tensor) -> torch.Tensor:
    """c_skip = 1 for an ε-prediction network (EDM Table 1, VP column)."""
    return torch.ones_like(real(sigma))


def c_out_eps(sigma: torch.Tensor) -> torch.Tensor:
    """c_out = −σ for an ε-prediction network (EDM Table 1, VP column)."""
    return -real(sigma)


# --- training inputs ----------------------------------------------------------------------------


def _sigma_info(sigma: torch.Tensor) -> LevelInfo:
    sigma = real(sigma)
    return LevelInfo(sigma=sigma, snr=sigma.pow(-2), level=sigma)


def eps_training_inputs(x0, noise, sigma, *, sigmas, input_noise=None) -> TrainingInputs:
    """noisy = √ᾱ·x0 + √(1−ᾱ)·ε, target ε (Ho et al. 2020, eq. 14)."""
    a, s = _expand(c_in(sigma), x0), _expand(c_noise_share(sigma), x0)
    noisy = a * x0 + s * (noise if input_noise is None else input_noise)
    return TrainingInputs(noisy, sigma_to_t(sigma, sigmas=sigmas), noise, _sigma_info(sigma))


def v_training_inputs(x0, noise, sigma, *, sigmas, input_noise=None) -> TrainingInputs:
    """noisy = √ᾱ·x0 + √(1−ᾱ)·ε, target v = √ᾱ·ε − √(1−ᾱ)·x0 = (ε − σ·x0)/√(σ²+1) (Salimans & Ho 2022, §4)."""
    a, s = _expand(c_in(sigma), x0), _expand(c_noise_share(sigma), x0)
    noisy = a * x0 + s * (noise if input_noise is None else input_noise)
    return TrainingInputs(noisy, sigma_to_t(sigma, sigmas=sigmas), a * noise - s * x0, _sigma_info(sigma))


def flow_training_inputs(x0, noise, t, *, sigmas=None, input_noise=None) -> TrainingInputs:
    """x_t = (1 − t)·x0 + t·ε, target ε − x0, UNet timestep 1000·t (Liu et al. 2023; Esser et al. 2024, §2)."""
    t = real(t)
    te = _expand(t, x0)
    noisy = (1 - te) * x0 + te * (noise if input_noise is None else input_noise)
    info = LevelInfo(sigma=t / (1 - t), snr=((1 - t) / t) ** 2, level=t)
    return TrainingInputs(noisy, FLOW_TIMESTEP_SCALE * t, noise - x0, info)


# --- model output → (x0, ε), from the UNet's own input -------------------------------------------


def eps_to_x0_eps(output, noisy, sigma):
    """x0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ (Ho et al. 2020, eq. 15); ill-conditioned as ᾱ → 0 (why ZTSNR needs v)."""
    a, s = _expand(c_in(sigma), noisy), _expand(c_noise_share(sigma), noisy)
    return (noisy - s * output) / a, output


def v_to_x0_eps(output, noisy, sigma):
    """x0 = √ᾱ·x_t − √(1−ᾱ)·v̂, ε = √(1−ᾱ)·x_t + √ᾱ·v̂ (Salimans & Ho 2022, §4); exact at σ = ∞ too."""
    a, s = _expand(c_in(sigma), noisy), _expand(c_noise_share(sigma), noisy)
    return a * noisy - s * output, s * noisy + a * output


def flow_to_x0_eps(output, noisy, t):
    """x0 = x_t − t·v̂, ε = x_t + (1 − t)·v̂ (from x_t = (1−t)·x0 + t·ε and v = ε − x0)."""
    te = _expand(real(t), noisy)
    return noisy - te * output, noisy + (1 - te) * output


# --- σ-space denoisers for the samplers -----------------------------------------------------------


def discrete_denoiser(unet, *, prediction: str, sigmas: torch.Tensor, dtype: torch.dtype | None = None):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, t(σ)) (EDM eq. 7) for a discrete ε- or v-prediction UNet.

    `unet(noisy, timestep, **extra)` returns the raw network output; the scalings are computed in fp32
    and the UNet input is cast to `dtype` (e.g. bf16) when given.
    """
    c_skip, c_out = {"eps": (c_skip_eps, c_out_eps), "v": (c_skip_v, c_out_v)}[prediction]

    def denoise(x, sigma, **extra):
        xf = x.float()
        inp = _expand(c_in(sigma), xf) * xf
        out = unet(inp if dtype is None else inp.to(dtype), sigma_to_t(real(sigma), sigmas=sigmas), **extra)
        return _expand(c_skip(sigma), xf) * xf + _expand(c_out(sigma), xf) * out.float()

    return denoise


def flow_denoiser(unet, *, dtype: torch.dtype | None = None):
    """D(x, t) = x − t·v̂(x, 1000·t): the x0 estimate of a velocity-prediction flow UNet."""

    def denoise(x, t, **extra):
        xf = x.float()
        out = unet(xf if dtype is None else xf.to(dtype), FLOW_TIMESTEP_SCALE * real(t), **extra)
        return xf - _expand(real(t), xf) * out.float()

    return denoise


# --- the objective bundle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """An objective chosen once by name; its fields are the callables used inside the step.

    make_training_inputs(x0, noise, level, *, input_noise=None) -> TrainingInputs
    output_to_x0_eps(output, noisy, level) -> (x0, eps)
    denoiser(unet, *, dtype=None) -> D(x, level, **extra), the sampler-facing x0 predictor
    `level` is σ for eps/v/v_ztsnr (from `sigmas`) and t ∈ [0, 1] for flow.
    """

    name: str
    prediction: str  # "eps" | "v" | "flow"
    sigmas: torch.Tensor | None  # the discrete training table (float64, ascending); None for flow
    make_training_inputs: Callable[..., TrainingInputs] = field(repr=False)
    output_to_x0_eps: Callable = field(repr=False)
    denoiser: Callable = field(repr=False)

    @property
    def sigma_min(self) -> float:
        """Smallest training σ (flow: 0)."""
        return 0.0 if self.sigmas is None else float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest training σ, where sampling starts (flow: t = 1)."""
        return 1.0 if self.sigmas is None else float(self.sigmas[-1])

    def to(self, device: torch.device | str) -> "Objective":
        """The same objective with its table on `device` (call once, before the loop)."""
        return _assemble(self.name, self.prediction, None if self.sigmas is None else self.sigmas.to(device))


def _assemble(name: str, prediction: str, sigmas: torch.Tensor | None) -> Objective:
    if prediction == "flow":
        return Objective(name, prediction, None, flow_training_inputs, flow_to_x0_eps, flow_denoiser)
    make = {"eps": eps_training_inputs, "v": v_training_inputs}[prediction]
    to_x0 = {"eps": eps_to_x0_eps, "v": v_to_x0_eps}[prediction]
    return Objective(
        name,
        prediction,
        sigmas,
        functools.partial(make, sigmas=sigmas),
        to_x0,
        functools.partial(discrete_denoiser, prediction=prediction, sigmas=sigmas),
    )


def build_objective(name: str, *, sigma_max: float | None = None, ztsnr_rescale: bool = True) -> Objective:
    """"eps" | "v" (SDXL's table, σ_max 14.6) | "v_ztsnr" (zero terminal SNR, σ_max 20000) | "flow".

    sigma_max: for "v_ztsnr" the finite terminal σ (default 20000); for "eps"/"v" an optional larger
    terminal σ replacing 14.6 (e.g. from sigma_max_for_resolution). ztsnr_rescale: "v_ztsnr" uses the
    Lin-rescaled table (default) or SDXL's own table with only its last entry raised.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    if name == "flow":
        if sigma_max is not None:
            raise ValueError("flow has no sigma_max (its terminal step t = 1 is pure noise); leave it unset")
        return _assemble(name, "flow", None)
    if name == "v_ztsnr":
        table = zero_snr_sigmas(sigma_max=NOVELAI_SIGMA_MAX if sigma_max is None else sigma_max, rescale=ztsnr_rescale)
    else:
        table = sdxl_sigmas() if sigma_max is None else with_terminal_sigma(sdxl_sigmas(), sigma_max)
    return _assemble(name, "eps" if name == "eps" else "v", check_sigma_table(table))


def make_training_inputs(x0, noise, level, *, objective: Objective, input_noise=None) -> TrainingInputs:
    """(x0, ε, σ or t) → (UNet input, UNet timestep, target, per-sample σ/SNR) for `objective`."""
    return objective.make_training_inputs(x0, noise, level, input_noise=input_noise)


def output_to_x0_eps(output, noisy, level, *, objective: Objective):
    """Any model output of `objective` → (x0, ε), from the UNet input `noisy` (eq. O6 in docs/diffusion.md)."""
    return objective.output_to_x0_eps(output, noisy, level)
