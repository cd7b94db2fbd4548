"""Capture and restore every random number generator a training run draws from, without pickle.

Covered: Python's ``random``, numpy's global (legacy) generator, torch's CPU generator, torch's
CUDA generators (every visible device, when CUDA is available), and the generators the trainer
owns (``torch.Generator`` or ``numpy.random.Generator``), passed in by name. The state is a dict
of tensors and plain values, so it is saved as safetensors + JSON like everything else.

Under DDP each rank has its own RNG streams: save one state per rank.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sdxl_trainer.errors import UserError

OwnedGenerator = torch.Generator | np.random.Generator


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and all CUDA devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def reseed(generator: torch.Generator, *, seed: int, rank: int, step: int) -> None:
    """Every update's randomness is a function of (seed, step) — and the rank for dropout — so a resume
    draws exactly what the uninterrupted run drew, without saving any generator state (`sdxl train`
    and `sdxl train-vae` alike)."""
    noise_seed = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    generator.manual_seed(int(noise_seed) >> 1)  # the same on every rank: see TrainStep.draw
    global_seed = np.random.SeedSequence([seed, step, rank, 1]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(global_seed) >> 1)  # dropout (LoRA dropout) draws from the global generators


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _set_python_state(state: Mapping[str, Any]) -> None:
    internal = tuple(int(x) for x in state["internal"].tolist())
    random.setstate((int(state["version"]), internal, state["gauss_next"]))


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _owned_state(gen: OwnedGenerator) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"type": "torch", "device": str(gen.device), "state": gen.get_state()}
    if isinstance(gen, np.random.Generator):
        # bit_generator.state is a JSON-able dict of ints (PCG64: 128-bit Python ints, exact in JSON)
        return {"type": "numpy", "state": gen.bit_generator.state}
    raise TypeError(f"cannot capture a {type(gen).__name__}: pass torch.Generator or numpy.random.Generator")


def _set_owned_state(name: str, gen: OwnedGenerator, state: Mapping[str, Any]) -> None:
    kind = "torch" if isinstance(gen, torch.Generator) else "numpy"
    if state["type"] != kind:
        raise UserError(f"generator {name!r} was a {state['type']} generator, now {kind}", where="rng")
    if kind == "torch":
        gen.set_state(state["state"])
    else:
        gen.bit_generator.state = dict(state["state"])


def capture_rng(generators: Mapping[str, OwnedGenerator] | None = None) -> dict[str, Any]:
    """The state of every global generator plus ``generators`` (by name), as tensors and plain values."""
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch_cpu": torch.get_rng_state(),
        # an empty list when CUDA is absent: restoring it on a CUDA machine is then refused
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: _owned_state(g) for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(
    state: Mapping[str, Any], generators: Mapping[str, OwnedGenerator] | None = None, *, strict: bool = True
) -> None:
    """Put every generator back where :func:`capture_rng` found it.

    ``strict`` refuses a state from a machine with a different number of CUDA devices (the run would
    continue, but not as it would have); without it the devices both have are restored.
    """
    generators = dict(generators or {})
    saved = state["generators"]
    if set(saved) != set(generators):
        raise UserError(
            f"the checkpoint has RNG states for generators {sorted(saved)}, this run owns {sorted(generators)}",
            where="rng",
            fix="resume with the same trainer version and configuration",
        )
    cuda_saved = list(state["torch_cuda"])
    cuda_now = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if strict and len(cuda_saved) != cuda_now:
        raise UserError(
            f"the checkpoint was written with {len(cuda_saved)} visible CUDA devices, this process sees {cuda_now}",
            where="rng",
            fix="resume on the same devices (same CUDA_VISIBLE_DEVICES), or pass --force to continue on these",
        )
    _set_python_state(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    for device, cuda_state in enumerate(cuda_saved[:cuda_now]):
        torch.cuda.set_rng_state(cuda_state, device)
    for name, gen in generators.items():
        _set_owned_state(name, gen, saved[name])


class RNGState:
    """torchtitan-style holder: the global generators plus the trainer's own, by name."""

    def __init__(self, generators: Mapping[str, OwnedGenerator] | None = None):
        self.generators = dict(generators or {})

    def state_dict(self) -> dict[str, Any]:
        return capture_rng(self.generators)

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        restore_rng(state, self.generators, strict=strict)
