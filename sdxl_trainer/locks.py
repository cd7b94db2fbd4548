"""One writer per WORK stage and per RUN: a lock file that names its holder, taken over when it died.

``hold(folder, stage)`` creates ``folder/.sdxl-lock-<stage>`` and takes an OS advisory lock on it
(``fcntl.flock``), then writes who holds it (pid, host, since, command). The kernel drops a flock
when its process ends in any way, kill -9 included, so on one machine the flock alone decides:
acquired means nobody alive holds the lock, and a record left in the file by a killed process is
stale and is taken over. Without flock support (some network filesystems answer ENOLCK) the
record decides: same host and the pid gone (``os.kill(pid, 0)``) → stale.

Across machines (WORK or RUN on NFS, Lustre, …) a flock may or may not be seen by the other host,
so a record written by *another* host is never judged stale here: the stage is refused with the
holder named, and ``--force-unlock`` takes the lock over once the user knows that process is gone.
A process that ends normally empties the record, so this only asks after a crash on another host.

Under torchrun only rank 0 takes the lock (ranks of one job share the folder on purpose, and a
second job's rank 0 is refused, which ends that job). The lock file is deleted on release (and the
folder, when this call created it and nothing else was written): a process that flocked the file
just before it was deleted notices that the name now points elsewhere and starts over, so two
processes never hold two different files of the same name.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sdxl_trainer import console
from sdxl_trainer.errors import UserError

PREFIX = ".sdxl-lock-"
FORCE_FLAG = "--force-unlock"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.since} (`{self.command}`)"


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0  # dist.init names the bad variable


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read(fd: int) -> Holder | None:
    raw = os.pread(fd, 65536, 0)
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw)
        return Holder(int(doc["pid"]), str(doc["host"]), str(doc["since"]), str(doc.get("command", "?")))
    except (ValueError, KeyError, TypeError):
        return Holder(-1, "unknown", "unknown", "an unreadable lock record")


def _write(fd: int, stage: str) -> None:
    doc = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
           "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join(["sdxl", stage, *sys.argv[1:]])[:300]}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(doc) + "\n").encode(), 0)
    os.fsync(fd)


def _flock(fd: int) -> bool | None:
    """True: locked. False: another live process holds it. None: this filesystem has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _refuse_if_held(path: Path, stage: str, holder: Holder | None, flocked: bool | None, force: bool) -> str | None:
    """Raise when someone may still hold the lock; else the line to print about a stale record taken over."""
    what = f"{path.parent} is in use by another `sdxl {stage}`"
    if flocked is False:  # the OS says a live process holds it: --force-unlock cannot change that
        who = holder.describe() if holder else "a process that is just starting"
        raise UserError(f"{what}: {who}", where=str(path), fix="wait for it to finish, or stop that process first")
    if holder is None or (holder.pid == os.getpid() and holder.host == socket.gethostname()):
        return None
    if force:
        return f"{FORCE_FLAG}: taking over the lock of {holder.describe()}"
    if holder.host == socket.gethostname():
        if flocked or not _pid_alive(holder.pid):  # flock acquired: its holder has exited
            return f"taking over a stale lock: {holder.describe()} is no longer running"
        raise UserError(f"{what}: {holder.describe()}", where=str(path),
                        fix="wait for it to finish, or stop that process first")  # fmt: skip
    raise UserError(
        f"{what}: {holder.describe()}; this machine cannot tell whether it still runs",
        where=str(path),
        fix=f"if no sdxl process on {holder.host} uses this folder any more, re-run with {FORCE_FLAG}",
    )


def _make(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first), to remove again if left empty."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _open_locked(path: Path) -> tuple[int, bool | None]:
    """Open (create) the lock file and try its flock, until the flocked file is the one at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        flocked = _flock(fd)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same or flocked is False:
            return fd, flocked
        os.close(fd)  # its holder deleted it while releasing: take the new one


@contextmanager
def hold(folder: Path, stage: str, *, force: bool = False) -> Iterator[Path | None]:
    """Hold ``folder``'s lock for ``stage`` ("prep cache", "train", …) while the block runs.

    Yields the lock file (None on torchrun ranks other than 0, which take no lock). Refuses with a
    UserError naming the holder; ``force`` takes over a record the flock cannot vouch for.
    """
    if _rank() != 0:
        yield None
        return
    folder = Path(folder)
    created = _make(folder)
    path = folder / f"{PREFIX}{stage.split()[-1]}"
    fd, flocked = _open_locked(path)
    try:
        note = _refuse_if_held(path, stage, _read(fd), flocked, force)
        if note:
            console.info(f"[yellow]{note}[/]")
        _write(fd, stage)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # while still flocked; the flock goes with the close below
    finally:
        os.close(fd)
        for p in reversed(created):
            try:
                p.rmdir()  # only when empty: a refused or failed start leaves no folder behind
            except OSError:
                break
