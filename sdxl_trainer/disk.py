"""Disk full, over quota, read-only and permission errors → one line naming the file and what to do.

Every artifact is written to a temporary file (or folder) beside its target and ``os.replace``d
into place, and the writers delete the temporary on any exception; so when one of these errors
reaches the user, the previous artifact is intact and no half-written one exists. What is left to
do is to say so in one line: which file, what went wrong, how much room there is and — where a
stage estimated it (:func:`expect`) — how much it needs.

The CLI runs each stage inside :func:`writing_to` (which knows the stage's output folder, for errors
that name no file: pyarrow's do not) and passes anything else that escapes through :func:`explain`.
"""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdxl_trainer.console import format_bytes
from sdxl_trainer.errors import UserError
from sdxl_trainer.locks import PREFIX as LOCK_PREFIX
from sdxl_trainer.locks import hold

NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
NOT_WRITABLE = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}  # fmt: skip
# Rust libraries (safetensors, tokenizers) raise their own types with the OS error in the text.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)(?: at path \"([^\"]+)\")?")

_expected: dict[Path, int] = {}


def expect(folder: Path, nbytes: int) -> None:
    """Record that the running stage will write about ``nbytes`` under ``folder`` (for a disk-full message)."""
    _expected[Path(folder).resolve()] = int(nbytes)


def _os_error(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file) of the first write-related OS error in ``exc``'s chain of causes, or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno in NO_SPACE or e.errno in NOT_WRITABLE:
                return e.errno, e.filename if isinstance(e.filename, str) else None
        elif not isinstance(e, UserError) and (m := _RUST_OS_ERROR.search(str(e))):
            code = int(m[1])
            if code in NO_SPACE or code in NOT_WRITABLE:
                return code, m[2]
        e = e.__cause__ or e.__context__
    return None


def _free(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _needed(path: Path) -> int | None:
    path = path.resolve()
    for folder, nbytes in _expected.items():
        if path == folder or path.is_relative_to(folder) or folder.is_relative_to(path):
            return nbytes
    return None


def _where(file: str | None, folder: Path | None) -> Path | None:
    """The path to name: the file; for a lock file its folder; with no file, the stage's folder (or
    the part of it the stage said it fills, e.g. WORK/cache)."""
    if file:
        path = Path(file)
        return path.parent if path.name.startswith(LOCK_PREFIX) else path
    if folder is None:
        return None
    inside = [f for f in _expected if f.is_relative_to(Path(folder).resolve())]
    return inside[0] if len(inside) == 1 else folder


def explain(exc: BaseException, folder: Path | None = None) -> UserError | None:
    """The one-line UserError for a disk-full / read-only / permission error in ``exc``, else None."""
    found = _os_error(exc)
    if found is None:
        return None
    code, file = found
    where = _where(file, folder)
    if code in NO_SPACE:
        facts = [NO_SPACE[code]]
        free = _free(where) if where is not None else None
        if free is not None:
            facts.append(f"{format_bytes(free)} free there")
        need = _needed(where) if where is not None else None
        if need is not None:
            facts.append(f"this stage needs about {format_bytes(need)} in all")
        return UserError(
            f"disk full while writing ({'; '.join(facts)}); the unfinished file was removed",
            where=str(where) if where is not None else None,
            fix="free space (or move the folder to a bigger disk) and run the command again: finished work is kept "
            "(train: add --resume latest)",
        )
    if code == errno.EROFS:
        return UserError("read-only filesystem: nothing can be written here", where=str(where) if where else None,
                         fix="write to a folder on a writable disk (--out / WORK)")
    return UserError(
        NOT_WRITABLE[code],
        where=str(where) if where is not None else None,
        fix="give this user access to that path (a folder must be writable), or write to another folder (--out / WORK)",
    )


@contextmanager
def writing_to(folder: Path) -> Iterator[None]:
    """Turn a disk-full / read-only / permission error inside the block into a one-line UserError."""
    _expected.clear()  # estimates belong to one stage
    try:
        yield
    except Exception as e:
        err = explain(e, Path(folder))
        if err is None:
            raise
        raise err from e


@contextmanager
def one_writer(folder: Path, stage: str, force_unlock: bool = False) -> Iterator[None]:
    """A writing stage's lock on its folder (locks.hold, docs/reliability.md) inside :func:`writing_to`:
    what the staged commands (cli.py) and the one-command path (pipeline.py) run each stage in."""
    with writing_to(folder), hold(folder, stage, force=force_unlock):
        yield
