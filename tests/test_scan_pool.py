"""The scan's process pool: every task answered once, and a worker killed by a decoder crash is survived."""

from __future__ import annotations

import os

import pytest

from sdxl_trainer.prep.images import probe_chunk
from sdxl_trainer.prep.pool import WorkersUnavailable, probe_all, worker_count

CRASH = "crash-me"


def crashing_chunk(tasks: list[tuple], **options) -> list[dict]:
    """probe_chunk, except that a task keyed CRASH kills the worker process as a segfault would."""
    if any(t[0] == CRASH for t in tasks):
        os._exit(11)
    return probe_chunk(tasks, **options)


OPTIONS = dict(full=True, max_pixels=10**6, min_side=1)


def tasks(n: int) -> list[tuple]:
    return [(f"t{i}", None, b"not an image" * (i + 1)) for i in range(n)]


def run(task_list: list[tuple], workers: int, chunk: int, fn=probe_chunk) -> dict[str, dict]:
    got: dict[str, dict] = {}

    def on_done(results: list[dict]) -> None:
        for r in results:
            assert r["key"] not in got, "a task was answered twice"
            got[r["key"]] = r

    probe_all(iter(task_list), options=OPTIONS, workers=workers, chunk=chunk, on_done=on_done, worker_fn=fn)
    return got


def test_every_task_is_answered_once_in_or_out_of_process() -> None:
    for workers in (1, 2):
        got = run(tasks(23), workers=workers, chunk=4)
        assert sorted(got) == sorted(f"t{i}" for i in range(23))
        assert all(r["reason"].startswith("not_an_image") for r in got.values())


def test_a_crashing_file_is_recorded_and_the_rest_still_probed() -> None:
    task_list = tasks(20)
    task_list.insert(7, (CRASH, None, b"boom"))
    got = run(task_list, workers=2, chunk=3, fn=crashing_chunk)
    assert len(got) == 21
    assert got[CRASH]["status"] == "skipped"
    assert got[CRASH]["reason"] == "corrupt: the decoder crashed the worker process"
    assert all(got[f"t{i}"]["reason"].startswith("not_an_image") for i in range(20))


def test_worker_count() -> None:
    assert worker_count(3) == 3
    assert 1 <= worker_count(0) <= (os.cpu_count() or 1)


def dead_on_arrival(tasks: list[tuple], **options) -> list[dict]:
    """A worker that dies whatever it is given, as when spawn cannot start the worker at all."""
    os._exit(3)


def test_workers_that_cannot_run_at_all_blame_no_file() -> None:
    consumed = []

    def task_source():
        for t in tasks(5):
            consumed.append(t)
            yield t

    with pytest.raises(WorkersUnavailable):
        probe_all(task_source(), options=OPTIONS, workers=2, chunk=2, on_done=lambda r: None,
                  worker_fn=dead_on_arrival)  # fmt: skip
    assert consumed == []  # nothing taken: the caller can check the same tasks in-process
