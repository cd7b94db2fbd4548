"""Samplers in k-diffusion style: `sampler(model, x, sigmas, *, extra_args=None, callback=None, generator=None)`.

`model(x, sigma, **extra_args)` is a denoiser returning the x0 estimate (σ-space: x = x0 + σ·ε;
flow: x = (1−t)·x0 + t·ε with `sigmas` holding t). `callback` receives a dict with i, sigma,
sigma_next, x and denoised (the x0 preview) before each step. The state is kept in fp32 whatever the
dtype of `x` (a bf16 x at σ = 20000 has a rounding step of 128), and the result is returned in x's
dtype. Step sizes are read once from `sigmas` on the host: sampling is not the training path.
"""

from __future__ import annotations

import math

import torch


def prior_noise(
    shape, *, sigma_max: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """x_T = σ_max·ε, ε ~ N(0, I) in fp32 (EDM Algorithm 1, line 1); σ_max = 1 for flow (t = 1)."""
    gen_device = generator.device if generator is not None else device
    return (torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32) * sigma_max).to(device or gen_device)


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def _steps(sigmas):
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("a sampling schedule needs at least two entries (start and end)")
    return values


def _call(model, x, sigma: float, extra_args):
    return model(x, x.new_full((x.shape[0],), sigma), **extra_args).float()


def _report(callback, i, sigma, sigma_next, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """x_{i+1} = D + (σ_{i+1}/σ_i)·(x_i − D): Euler on dx/dσ = (x − D(x; σ))/σ (EDM eq. 3, Algorithm 1)."""
    extra_args, dtype, steps = extra_args or {}, x.dtype, _steps(sigmas)
    x = x.float()
    for i, (sigma, sigma_next) in enumerate(zip(steps[:-1], steps[1:])):
        denoised = _call(model, x, sigma, extra_args)
        _report(callback, i, sigma, sigma_next, x, denoised)
        x = denoised + (sigma_next / sigma) * (x - denoised)
    return x.to(dtype)


def ancestral_step(sigma_from: float, sigma_to: float, *, eta: float = 1.0) -> tuple[float, float]:
    """σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = √(σ_to² − σ_up²) (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, extra_args=None, callback=None, generator=None, eta: float = 1.0):
    """Euler to σ_down, then add σ_up·z: the ancestral (DDPM-like) step in σ-space (k-diffusion)."""
    extra_args, dtype, steps = extra_args or {}, x.dtype, _steps(sigmas)
    x = x.float()
    for i, (sigma, sigma_next) in enumerate(zip(steps[:-1], steps[1:])):
        denoised = _call(model, x, sigma, extra_args)
        _report(callback, i, sigma, sigma_next, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta=eta)
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if sigma_next > 0 and sigma_up > 0:
            x = x + _noise_like(x, generator) * sigma_up
    return x.to(dtype)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """DPM-Solver++(2M) in λ = −log σ (Lu et al. 2022, Algorithm 2; k-diffusion sample_dpmpp_2m)."""
    extra_args, dtype, steps = extra_args or {}, x.dtype, _steps(sigmas)
    x = x.float()
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(steps[:-1], steps[1:])):
        denoised = _call(model, x, sigma, extra_args)
        _report(callback, i, sigma, sigma_next, x, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        if old_denoised is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x.to(dtype)


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, *, extra_args=None, callback=None, generator=None):
    """x_{t'} = x_t + (t' − t)·v̂ with v̂ = (x_t − D)/t: Euler on the rectified-flow ODE (Liu et al. 2023).

    `sigmas` are flow times from 1 (pure noise) to 0, e.g. `flow_times(n, shift=3)`; `model(x, t)`
    returns the x0 estimate (see objectives.flow_denoiser).
    """
    extra_args, dtype, steps = extra_args or {}, x.dtype, _steps(sigmas)
    x = x.float()
    for i, (t, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        denoised = _call(model, x, t, extra_args)
        _report(callback, i, t, t_next, x, denoised)
        x = denoised + (t_next / t) * (x - denoised)
    return x.to(dtype)


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": sample_flow_euler,
}


def get_sampler(name: str):
    """The sampler for a plain name ("euler" | "euler_ancestral" | "dpmpp_2m" | "flow_euler")."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def preview_collector(*, every: int = 1):
    """A callback keeping every `every`-th step's (i, σ, x0 preview) on the CPU, and the list it fills."""
    previews: list[dict] = []

    def callback(info: dict) -> None:
        if info["i"] % every == 0:
            previews.append({"i": info["i"], "sigma": float(info["sigma"]), "denoised": info["denoised"].detach().cpu()})

    return callback, previews
