"""The trainer's read-ahead: a :class:`CacheDataset`'s batches on reader threads, in sampler order.

Bounded memory (at most ``prefetch`` batches in flight), a reader's exception re-raised in the
consumer, and the position of what has been handed out kept for exact resume. docs/data-loading.md
has the performance figures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import islice
from typing import Any

import torch

from sdxl_trainer.train.data import CacheDataset
from sdxl_trainer.train.sampler import BatchSpec, BucketBatchSampler, FixedBatches


def _one_intra_op_thread() -> None:
    """Reader threads run torch ops on one core each (the setting is per thread; the caller's is kept):
    a per-sample op is too small to split, and OpenMP teams per reader would oversubscribe the cores."""
    torch.set_num_threads(1)



class CacheLoader:
    """Iterates a dataset's batches in the order of ``batches`` with ``workers`` reader threads
    keeping up to ``prefetch`` batches ready (bounded memory: at most ``prefetch`` in flight).

    ``for batch in loader`` yields the rest of the current epoch (the position lives in
    ``batches`` and moves as each batch is handed out, so ``state_dict()`` taken between steps
    names the next batch to train on; prefetched but undelivered batches are simply re-read after
    a resume). Leaving a loop early cancels its read-ahead; :meth:`close` (or ``with``) also joins
    the threads. An exception in a reader is raised here, in the consumer.
    """

    def __init__(
        self,
        dataset: CacheDataset,
        batches: BucketBatchSampler | FixedBatches,
        *,
        prefetch: int = 4,
        workers: int = 1,
        augment: bool = True,
    ):
        if prefetch < 1 or workers < 1:
            raise ValueError(f"prefetch={prefetch} and workers={workers} must be ≥ 1")
        self.dataset, self.batches, self.augment = dataset, batches, augment
        self.prefetch, self.workers = prefetch, workers
        self._active: Iterator[dict[str, Any]] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._stop()  # one read-ahead at a time: a new loop starts from the delivered position
        if self._pool is None:  # kept across epochs, so each thread's open shards stay open
            self._pool = ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="sdxl-cache-reader", initializer=_one_intra_op_thread
            )
        self._active = self._run(self._pool, self.batches.batches(self.batches.epoch)[self.batches.step :])
        return self._active

    def _run(self, pool: ThreadPoolExecutor, specs: list[BatchSpec]) -> Iterator[dict[str, Any]]:
        todo = iter(specs)
        pending: deque[Future] = deque()
        try:
            for spec in islice(todo, self.prefetch):
                pending.append(pool.submit(self.dataset.load, spec, augment=self.augment))
            while pending:
                batch = pending.popleft().result()  # re-raises a reader's exception here
                for spec in islice(todo, 1):
                    pending.append(pool.submit(self.dataset.load, spec, augment=self.augment))
                self.batches.advance()
                yield batch
        finally:
            for f in pending:
                f.cancel()
            wait(pending)  # nothing keeps running for a loop that has ended

    def _stop(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop reading ahead and join the reader threads; iterating again starts new ones."""
        self._stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CacheLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        self._stop()
        self.batches.load_state_dict(state, strict=strict)
