"""RNG capture/restore: every generator continues exactly, also through safetensors + JSON files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.train.checkpoint_dir import load_state, save_state
from sdxl_trainer.train.rng import RNGState, capture_rng, restore_rng, seed_everything


def _draw(gens: dict) -> list:
    """One draw from every generator, including the cached-Gaussian paths of random and numpy."""
    out = [
        random.random(), random.gauss(0, 1), random.getrandbits(64),
        np.random.rand(3).tolist(), np.random.randn(3).tolist(),
        torch.rand(4).tolist(), torch.randn(3).tolist(),
        torch.randn(2, generator=gens["noise"]).tolist(),
        gens["numpy"].random(2).tolist(), int(gens["numpy"].integers(0, 2**62)),
    ]
    if torch.cuda.is_available():
        out.append(torch.randn(3, device="cuda").tolist())
    return out


def _gens() -> dict:
    return {"noise": torch.Generator().manual_seed(3), "numpy": np.random.default_rng(4)}


def test_capture_draw_restore_draw_is_identical() -> None:
    seed_everything(11)
    gens = _gens()
    _draw(gens)  # leave every generator mid-stream, with cached Gaussians pending
    random.gauss(0, 1)
    np.random.randn(1)
    state = capture_rng(gens)
    first = _draw(gens)
    restore_rng(state, gens)
    assert _draw(gens) == first


def test_restore_through_files_into_fresh_generators(tmp_path) -> None:
    seed_everything(5)
    gens = _gens()
    _draw(gens)
    save_state(tmp_path, "rng", RNGState(gens).state_dict())
    first = _draw(gens)
    seed_everything(999)  # scramble everything: only the files can bring the streams back
    fresh = {"noise": torch.Generator().manual_seed(0), "numpy": np.random.default_rng(0)}
    _draw(fresh)
    RNGState(fresh).load_state_dict(load_state(tmp_path, "rng"))
    assert _draw(fresh) == first
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_seed_everything_is_reproducible() -> None:
    seed_everything(7)
    a = _draw(_gens())
    seed_everything(7)
    assert _draw(_gens()) == a
    seed_everything(8)
    assert _draw(_gens()) != a


def test_generator_names_must_match() -> None:
    state = capture_rng(_gens())
    with pytest.raises(UserError, match="generators"):
        restore_rng(state, {"noise": torch.Generator()})
    with pytest.raises(UserError, match="numpy generator, now torch"):
        restore_rng(state, {"noise": torch.Generator(), "numpy": torch.Generator()})
    with pytest.raises(TypeError):
        capture_rng({"bad": random.Random()})


def test_a_different_cuda_device_count_is_refused_unless_forced() -> None:
    state = capture_rng()
    n = len(state["torch_cuda"])
    state["torch_cuda"] = list(state["torch_cuda"]) + [torch.cuda.get_rng_state() if n else torch.get_rng_state()]
    with pytest.raises(UserError, match="CUDA devices"):
        restore_rng(state)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    state = capture_rng() | {"torch_cuda": state["torch_cuda"]}
    restore_rng(state, strict=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_are_captured() -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    state = capture_rng({"cuda_noise": gen})
    assert len(state["torch_cuda"]) == torch.cuda.device_count()
    a = (torch.randn(4, device="cuda").tolist(), torch.randn(4, device="cuda", generator=gen).tolist())
    restore_rng(state, {"cuda_noise": gen})
    assert (torch.randn(4, device="cuda").tolist(), torch.randn(4, device="cuda", generator=gen).tolist()) == a
