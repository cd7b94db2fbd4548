"""Per-sample loss weights and training noise: min-SNR-γ, external weights, offset noise, input perturbation.

Min-SNR-γ (Hang et al. 2023) weights the x0-space error by min(SNR, γ). An objective whose plain MSE
already weights the x0 error by λ (ε: λ = SNR, v: λ = SNR + 1, flow: λ = 1/t²) gets the loss weight
min(λ, γ)/λ — the "clamp the objective's own weight" form, finite for every SNR including 0. Hang's
literal v form min(SNR, γ)/(SNR + 1) is 0 at SNR = 0 and starves the zero-SNR terminal step; it is
kept as form="hang" for comparison. Written in σ (or t) so that no SNR is ever divided by
(docs/diffusion.md §5).
"""

from __future__ import annotations

import torch

from .objectives import LevelInfo, Objective, c_in, c_noise_share, real

WEIGHTINGS = ("none", "min_snr")
MIN_SNR_FORMS = ("objective", "hang")


def min_snr_eps(sigma: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """min(SNR, γ)/SNR = min(1, γ·σ²) (Hang et al. 2023, §3.4 and §4.2, ε form)."""
    return (gamma * real(sigma) ** 2).clamp(max=1.0)


def min_snr_v(sigma: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """min(SNR, γ)/(SNR + 1) = min(1, γ·σ²)/(1 + σ²) (Hang et al. 2023, §3.4 mapped to v); → 0 as σ → ∞."""
    return min_snr_eps(sigma, gamma=gamma) * c_in(sigma) ** 2


def min_snr_v_plus_one(sigma: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """min(SNR + 1, γ)/(SNR + 1) = min(1, γ·σ²/(1 + σ²)); = 1 at SNR = 0 (docs/diffusion.md eq. W3)."""
    return (gamma * c_noise_share(sigma) ** 2).clamp(max=1.0)


def min_snr_flow(t: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """min(1/t², γ)/(1/t²) = min(1, γ·t²): flow's MSE weights the x0 error by 1/t² (docs/diffusion.md eq. W4)."""
    return (gamma * real(t) ** 2).clamp(max=1.0)


def min_snr_flow_hang(t: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """min(SNR, γ)·t² = min((1 − t)², γ·t²), SNR = ((1−t)/t)²: Hang's form for flow; 0 at t = 1."""
    t = real(t)
    return torch.minimum((1 - t) ** 2, gamma * t**2)


def build_loss_weight(objective: Objective, *, kind: str = "none", gamma: float = 5.0, form: str = "objective"):
    """Per-sample loss weight callable `(info, external=None) -> (B,)`, external weights multiplied in."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}: choose one of {', '.join(WEIGHTINGS)}")
    if form not in MIN_SNR_FORMS:
        raise ValueError(f"unknown min-SNR form {form!r}: choose one of {', '.join(MIN_SNR_FORMS)}")
    if kind == "min_snr" and not gamma > 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")

    if kind == "none":

        def base(info: LevelInfo) -> torch.Tensor:
            return torch.ones_like(real(info.sigma))

    elif objective.prediction == "flow":
        flow_fn = min_snr_flow if form == "objective" else min_snr_flow_hang

        def base(info: LevelInfo) -> torch.Tensor:
            return flow_fn(info.level, gamma=gamma)

    else:
        sigma_fn = {
            ("eps", "objective"): min_snr_eps,
            ("eps", "hang"): min_snr_eps,
            ("v", "objective"): min_snr_v_plus_one,
            ("v", "hang"): min_snr_v,
        }[(objective.prediction, form)]

        def base(info: LevelInfo) -> torch.Tensor:
            return sigma_fn(info.sigma, gamma=gamma)

    def loss_weight(info: LevelInfo, external: torch.Tensor | None = None) -> torch.Tensor:
        w = base(info)
        return w if external is None else w * external.to(w.dtype)

    return loss_weight


# --- training noise ------------------------------------------------------------------------------


def offset_noise(noise: torch.Tensor, *, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ε + s·N(0, 1) per (sample, channel), broadcast over space (Guttenberg 2023, "offset noise")."""
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))
    return noise + strength * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


def perturb_input_noise(noise: torch.Tensor, *, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ε' = ε + γ·ξ for the UNet input only; the target keeps ε (Ning et al. 2023, input perturbation)."""
    return noise + strength * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def build_noise_sampler(*, offset: float = 0.0, perturbation: float = 0.0):
    """Callable `(x0, *, generator) -> (noise, input_noise or None)`; options fixed here, not per step."""
    if offset < 0 or perturbation < 0:
        raise ValueError(f"offset and perturbation strengths must be >= 0, got {offset}, {perturbation}")

    def sample(x0: torch.Tensor, *, generator: torch.Generator):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        if offset:
            noise = offset_noise(noise, strength=offset, generator=generator)
        input_noise = perturb_input_noise(noise, strength=perturbation, generator=generator) if perturbation else None
        return noise, input_noise

    return sample


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_b w_b·‖F_b − y_b‖²/D: the per-sample MSE in fp32, weighted, averaged over the batch."""
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * weight).mean()
