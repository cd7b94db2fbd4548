"""Extending (or shortening) a run on resume: the one line that says how the LR schedule was re-planned.

``sdxl train --resume latest --num-steps N`` with another N than the checkpoint's run planned is
allowed without ``--force``: the data order, the noise and every other draw are functions of
(seed, epoch, step), not of the length, so the updates before the checkpoint are exactly those of a
run planned at N from the start. Only the LR schedule depends on the length; lr_schedule.LRSchedule
re-plans it over the new length (same formula, new total; the warm-up unchanged), and this module
states what that does to the rate.
"""

from __future__ import annotations

from sdxl_trainer import console
from sdxl_trainer.train.lr_schedule import LRSchedule, lr_at


def announce_replan(schedule: LRSchedule, *, global_batch: int) -> None:
    """Print :func:`replan_line` when the resume changed the run length."""
    line = replan_line(schedule, global_batch=global_batch)
    if line:
        console.info(line)


def replan_line(schedule: LRSchedule, *, global_batch: int) -> str | None:
    """One line describing a changed run length, or None when the length is the checkpoint's."""
    old_total = schedule.replanned_from
    if old_total is None or schedule.total_samples is None:
        return None
    old_n, new_n = -(-old_total // global_batch), -(-schedule.total_samples // global_batch)
    verb = "extending" if schedule.total_samples > old_total else "shortening"
    head = f"{verb} the run from {old_n} to {new_n} updates: the LR schedule is re-planned over {new_n} updates"
    if schedule.kind == "constant":
        return f"{head} (constant: the rate is unchanged)"
    before = lr_at(schedule.samples_seen, **(schedule.saved_config or schedule.config()))  # the old plan's rate
    after = schedule.factor
    return (f"{head} ({schedule.kind}: the rate now follows the {'longer' if verb == 'extending' else 'shorter'} "
            f"curve, {before:.3g} → {after:.3g} × the base rate at {schedule.samples_seen} samples; "
            "the warm-up is unchanged)")
