"""The trainer's counters: what a resume needs besides the model, optimiser, schedule, EMA, data and RNG.

One *update* consumes one global batch (device batch × accumulation × world size). An update whose
loss or gradient is not finite is *skipped*: the optimiser and the EMA do not move, but the batch
was read, so `step` and `samples_seen` still advance — the data position, the sample-based learning
rate and the resume all stay in step with what was consumed. `consecutive_skips` is what stops a
run that has diverged (the loop compares it with `max_consecutive_skips`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # updates attempted (global batches consumed)
    updates: int = 0  # updates taken (optimiser stepped): the EMA warm-up counts these
    samples_seen: int = 0  # samples consumed over all ranks: the LR schedule counts these
    skipped: int = 0  # updates skipped for a non-finite loss or gradient, in all
    consecutive_skips: int = 0  # skipped since the last update taken

    def record(self, *, samples: int, skipped: bool) -> None:
        """Count one attempted update of `samples` samples (all ranks), taken or skipped."""
        self.step += 1
        self.samples_seen += samples
        if skipped:
            self.skipped += 1
            self.consecutive_skips += 1
        else:
            self.updates += 1
            self.consecutive_skips = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        if set(state) != names:
            raise ValueError(f"train state keys {sorted(state)} differ from {sorted(names)}")
        for name in names:
            setattr(self, name, int(state[name]))
