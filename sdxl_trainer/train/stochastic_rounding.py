"""Stochastic rounding of fp32 values to bf16, and the seed that makes it reproducible.

bf16 keeps fp32's exponent and the top 7 of its 23 mantissa bits, so a bf16 weight near 1.0 moves
in steps of 2⁻⁷ ≈ 0.0078. Round-to-nearest turns every update smaller than half a step into no
update at all: at the learning rates of a finetune (1e-6–1e-4) most of them. Stochastic rounding
rounds up with probability equal to the dropped fraction of a step, so the expected result is the
fp32 value and small updates add up on average instead of vanishing (Gupta et al. 2015; the same
trick as OneTrainer's bf16 stochastic rounding).

It works on the bit pattern: add 16 uniformly random bits to the 16 bits bf16 drops and truncate.
The sum carries into the kept bits exactly when the random number is at least 2¹⁶ minus the dropped
bits, i.e. with probability dropped/2¹⁶. fp32 is sign-magnitude, so for a negative value the carry
grows the magnitude: the rounding is unbiased for either sign, and zero and values bf16 holds
exactly come back unchanged.

The random bits come from a generator seeded by :func:`rounding_seed` from (run seed, parameter
index, that parameter's update count): the optimiser state holds the count, so a resumed run
rounds exactly as the uninterrupted one did, with no generator state to save.
"""

from __future__ import annotations

import torch

_DROPPED = 1 << 16  # fp32 mantissa bits bf16 drops: 23 − 7 = 16
_KEEP = -_DROPPED  # int32 mask 0xFFFF0000: sign, exponent and the 7 kept mantissa bits
_MASK64 = (1 << 64) - 1


def stochastic_round_bf16(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 → bf16 rounded up with probability (x − lower)/(upper − lower): E[result] = x.

    ``x`` must be finite (a NaN whose payload sits in the top bits could wrap to −0); the optimiser
    only rounds finite values. ``generator`` must live on ``x``'s device.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes fp32 values, got {x.dtype}")
    noise = torch.randint(0, _DROPPED, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.contiguous().view(torch.int32) + noise
    # the low 16 bits are now zero, so the conversion below is exact (no second rounding)
    return (bits & _KEEP).view(torch.float32).to(torch.bfloat16)


def _splitmix64(x: int) -> int:
    """One step of Steele et al.'s SplitMix64 finaliser: a cheap, well-mixed 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rounding_seed(seed: int, index: int, step: int) -> int:
    """The generator seed for parameter ``index``'s ``step``-th update: distinct streams per (index, step).

    A pure-Python hash (about a microsecond) because it runs once per parameter per update, inside
    backward when the optimiser step is fused into it. Shifted to 63 bits like ``loop.reseed``.
    """
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ index) ^ step) >> 1
