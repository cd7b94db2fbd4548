"""The scan's process pool: probe files over worker processes and survive a decoder that crashes one.

The unit of work is :func:`sdxl_trainer.prep.images.probe_chunk` (several files per inter-process
round trip). Workers are spawned, not forked: fork is unsafe once torch or other threads run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

from sdxl_trainer.prep.images import probe_chunk


def worker_count(workers: int) -> int:
    """``workers``, or for 0 the cores this process may use (containers and taskset limit it)."""
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _chunks(tasks: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    chunk = []
    for t in tasks:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class WorkersUnavailable(RuntimeError):
    """Worker processes die before doing any work (e.g. a ``python -`` session: spawn cannot
    re-import its ``<stdin>`` main module), so no file can be blamed for it."""


def _pool_pass(chunks: Iterator[list], fn: Callable, workers: int, on_done: Callable, *, in_flight: int,
               check: bool = False):  # fmt: skip
    """Run chunks with at most ``in_flight`` queued. Returns (tasks that were in flight when a worker
    died, the chunks not yet submitted); ``([], …)`` when all went well. With ``check``, an empty
    chunk goes first: a pool that cannot run even that raises :class:`WorkersUnavailable`."""
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch or other threads run
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        if check:
            try:
                pool.submit(fn, []).result()
            except BrokenProcessPool as e:
                raise WorkersUnavailable(str(e)) from None
        pending: dict = {}
        for chunk in chunks:
            pending[pool.submit(fn, chunk)] = chunk
            while len(pending) >= in_flight:
                if lost := _collect(pending, on_done):
                    return lost, chunks
        while pending:
            if lost := _collect(pending, on_done):
                return lost, chunks
    return [], chunks


def _collect(pending: dict, on_done: Callable) -> list[tuple]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for fut in done:
        chunk = pending.pop(fut)
        try:
            result = fut.result()
        except BrokenProcessPool:
            lost = chunk + [t for c in pending.values() for t in c]
            pending.clear()
            return lost
        on_done(result)
    return []


def _crashed(task: tuple) -> dict:
    return {"key": task[0], "id": None, "status": "skipped", "image_flags": [],
            "reason": "corrupt: the decoder crashed the worker process"}


def probe_all(
    tasks: Iterable[tuple], *, options: dict[str, Any], workers: int, chunk: int,
    on_done: Callable[[list[dict]], None], worker_fn: Callable[..., list[dict]] = probe_chunk,
) -> None:
    """Probe every task (see :func:`probe_task`; ``options`` go to :func:`probe_bytes`) over
    ``workers`` processes, in this process when ``workers == 1``; results go to ``on_done``.
    (``worker_fn`` is there for tests: a module-level function with probe_chunk's signature.)

    A C decoder that crashes kills its worker and every chunk in flight: those tasks are retried one
    at a time in a one-worker pool, so the file that crashes it again is recorded, and the scan goes on.
    Raises :class:`WorkersUnavailable`, before taking any task, when no worker process can run.
    """
    if workers == 1:
        for c in _chunks(tasks, chunk):
            on_done(worker_fn(c, **options))
        return
    fn = partial(worker_fn, **options)
    remaining = _chunks(tasks, chunk)
    first = True
    while True:
        suspects, remaining = _pool_pass(remaining, fn, workers, on_done, in_flight=workers * 3, check=first)
        first = False
        if not suspects:
            return
        one_by_one: Iterator[list] = iter([[t] for t in suspects])
        while True:
            culprit, one_by_one = _pool_pass(one_by_one, fn, 1, on_done, in_flight=1)
            if not culprit:
                break
            on_done([_crashed(culprit[0])])
