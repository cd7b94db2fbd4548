"""Classifier-free guidance, CFG rescale and perturbed-attention guidance (PAG), on tensors and as a denoiser
wrapper for the samplers."""

from __future__ import annotations

import torch

from .objectives import c_in, c_noise_share

GUIDANCE_SPACES = ("x0", "eps", "v", "flow")


def cfg(pos: torch.Tensor, neg: torch.Tensor, *, scale: float) -> torch.Tensor:
    """x = x_neg + w·(x_pos − x_neg) (Ho & Salimans 2022, eq. 6 with their w + 1 as our w)."""
    return neg + scale * (pos - neg)


def pag(guided: torch.Tensor, pos: torch.Tensor, perturbed: torch.Tensor, *, scale: float) -> torch.Tensor:
    """x + s·(x_pos − x_ptb): PAG's term added to a guided estimate (Ahn et al. 2024, eq. 13 with CFG).

    ``perturbed`` is the conditional prediction with the chosen self-attention maps replaced by the
    identity. With CFG: x_neg + w·(x_pos − x_neg) + s·(x_pos − x_ptb); without (w = 1): x_pos + s·(x_pos − x_ptb),
    as diffusers' PAG pipelines combine them. Affine with weights summing to 1, like CFG, so the same in
    x0, ε, v or flow space.
    """
    return guided + scale * (pos - perturbed)


def rescale_cfg(guided: torch.Tensor, pos: torch.Tensor, *, phi: float) -> torch.Tensor:
    """x_r = x·std(x_pos)/std(x); φ·x_r + (1 − φ)·x, std over non-batch dims (Lin et al. 2023, §3.4)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (pos.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_rescaled(pos: torch.Tensor, neg: torch.Tensor, *, scale: float, phi: float) -> torch.Tensor:
    """CFG followed by CFG rescale (Lin et al. 2023, Algorithm 2)."""
    return rescale_cfg(cfg(pos, neg, scale=scale), pos, phi=phi)


def _expand(level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return level.reshape(-1, *([1] * (like.ndim - 1))).float()


def _to_space(space: str, denoised, x, level):
    """Model-output space of a denoised estimate: ε = (x − D)/σ, v = (x/(σ²+1) − D)·√(σ²+1)/σ, flow (x − D)/t."""
    if space == "x0":
        return denoised
    if space == "v":
        return (_expand(c_in(level), x) ** 2 * x - denoised) / _expand(c_noise_share(level), x)
    return (x - denoised) / _expand(level, x)  # eps: σ, flow: t


def _from_space(space: str, out, x, level):
    if space == "x0":
        return out
    if space == "v":
        return _expand(c_in(level), x) ** 2 * x - _expand(c_noise_share(level), x) * out
    return x - _expand(level, x) * out


def guided_denoiser(model, *, scale: float, phi: float = 0.0, space: str = "v", pag_scale: float = 0.0,
                    perturbed=None):
    """D_cfg(x, σ, *, cond, uncond): CFG on two denoiser calls, CFG rescale applied in `space`.

    CFG is affine, so it is the same in x0, ε, v or flow space; the rescale is not: Lin et al. define
    it on the network output, so `space` names the model's prediction ("v" for v_ztsnr). Pass
    extra_args={"cond": {...}, "uncond": {...}} to the sampler; each dict goes to `model` as kwargs.

    PAG (``pag_scale`` > 0): ``perturbed`` is a third denoiser, called with ``cond``, whose chosen
    self-attention is the identity; its term is added before the rescale, which then rescales the
    whole guided estimate against the conditional one (as diffusers does). ``uncond`` None: no CFG
    (scale 1), two calls: D_pos + s·(D_pos − D_ptb). ``pag_scale`` 0 calls exactly what plain CFG calls.
    """
    if space not in GUIDANCE_SPACES:
        raise ValueError(f"unknown guidance space {space!r}: choose one of {', '.join(GUIDANCE_SPACES)}")
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"CFG rescale phi must lie in [0, 1], got {phi}")
    if pag_scale < 0:
        raise ValueError(f"PAG scale must be at least 0, got {pag_scale}")
    if pag_scale > 0 and perturbed is None:
        raise ValueError("PAG needs the perturbed denoiser (perturbed=...)")

    def denoise(x, sigma, *, cond: dict, uncond: dict | None = None):
        pos = model(x, sigma, **cond).float()
        neg = None if uncond is None else model(x, sigma, **uncond).float()
        if pag_scale > 0:
            ptb = perturbed(x, sigma, **cond).float()
            guided = pag(pos if neg is None else cfg(pos, neg, scale=scale), pos, ptb, scale=pag_scale)
            if phi == 0.0 or neg is None:
                return guided
            xf = x.float()
            return _from_space(space, rescale_cfg(_to_space(space, guided, xf, sigma), _to_space(space, pos, xf, sigma),
                                                  phi=phi), xf, sigma)  # fmt: skip
        if neg is None:
            return pos
        if phi == 0.0:
            return cfg(pos, neg, scale=scale)
        xf = x.float()
        pos_f, neg_f = _to_space(space, pos, xf, sigma), _to_space(space, neg, xf, sigma)
        return _from_space(space, cfg_rescaled(pos_f, neg_f, scale=scale, phi=phi), xf, sigma)

    return denoise
