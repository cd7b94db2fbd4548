"""torchrun / SLURM process groups for every stage: one place that initialises, waits and fails clearly.

A stage calls :func:`init` once; without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR) it is a single process and every call here is a no-op. Every collective runs with a
timeout: a rank that never arrives (crashed, or still busy caching) turns into an error naming the
place everyone was waiting at, instead of a hang that burns GPU hours.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from sdxl_trainer.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer", fix="check the launcher") from None


def init(*, device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)


def local_device(info: DistInfo, device: str) -> torch.device:
    """The device this rank works on: ``auto`` → its own GPU under torchrun, else cuda/cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank)
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA device is visible", fix="use --device cpu")
    if device == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


def barrier(info: DistInfo, where: str, *, timeout_s: float = 1800.0) -> None:
    """Wait for every rank; a rank missing after ``timeout_s`` is an error that names ``where``."""
    if not info.distributed:
        return
    try:
        if info.backend == "gloo":
            tdist.monitored_barrier(timeout=_dt.timedelta(seconds=timeout_s))
        else:
            tdist.barrier()
    except RuntimeError as e:
        raise UserError(
            f"rank {info.rank}: not every rank reached '{where}' within {timeout_s:.0f} s ({e})",
            fix="check the other ranks' logs; one of them crashed or is much slower",
        ) from None


def shutdown(info: DistInfo) -> None:
    if info.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
