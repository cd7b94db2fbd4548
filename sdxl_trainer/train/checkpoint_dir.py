"""Atomic checkpoint directories under ``RUN/checkpoints/`` and the state files inside them.

A checkpoint is written into ``checkpoints/.tmp-<name>-<random>/``, every file and folder in it is
fsynced, a ``checkpoint.json`` marker (every file's size and SHA-256, read back from disk; checked
before a resume by train/integrity.py) is written last, and only then is the folder renamed to
``checkpoints/<name>/``; the ``latest`` file (one line: the name) is then replaced atomically. A
kill at any moment therefore leaves ``latest`` naming a complete checkpoint:

- before the rename: only a ``.tmp-*`` folder is left, removed by :func:`prepare_checkpoints`;
- between the rename and the ``latest`` update: ``latest`` still names the previous checkpoint;
- when a name is re-used (a run resumed from an older checkpoint reaches a step saved before), the
  old folder is first renamed to ``.old-<name>-<random>``; if the kill comes before the new one takes
  its place, :func:`prepare_checkpoints` renames it back.

Only one process (rank 0) writes, prunes and prepares; any rank may :func:`resolve_resume`.

State files: :func:`save_state` splits a nested state (``state_dict()`` of the model, optimiser,
EMA, schedule, RNG, counters) into ``<stem>.safetensors`` (every tensor) and ``<stem>.json`` (the
rest, tensors replaced by ``{"__tensor__": key}``). No pickle anywhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdxl_trainer import __version__
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import load_safetensors, normal_permissions, read_json_file
from sdxl_trainer.train.checksums import ALGORITHM, digests

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "checkpoint.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
RESUME_ANOTHER = "resume from another checkpoint (--resume RUN/checkpoints/<name>)"


# ── directories ─────────────────────────────────────────────────────────────────────────────
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _check_name(name: str) -> None:
    if not name or name in (LATEST, ".", "..") or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"invalid checkpoint name {name!r}: a plain folder name not starting with '.'")


def _write_marker(tmp: Path, name: str, serial: int) -> None:
    files = {
        str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    doc = {
        "name": name,
        "serial": serial,  # write order, used by keep_last (names need not sort)
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "files": files,
        # read back from disk after writing: what a resume compares with (train/integrity.py)
        "checksums": {"algorithm": ALGORITHM, "files": digests(tmp, files)},
    }
    (tmp / MARKER).write_text(json.dumps(doc, indent=2) + "\n")


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in write order (oldest first)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (marker := _read_marker(p)) is not None:
            found.append((int(marker.get("serial", 0)), p.name, p))
    return [p for *_, p in sorted(found)]


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished temporary folder to its final name, moving an older namesake aside first."""
    old = None
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def read_latest(run_dir: Path) -> str | None:
    """The name in ``checkpoints/latest``, or None when there is none yet."""
    path = Path(run_dir) / CHECKPOINTS / LATEST
    return path.read_text().strip() if path.is_file() else None


def latest_checkpoint(path: Path) -> Path:
    """A run folder (one with ``checkpoints/``) → its latest checkpoint folder; any other path as given."""
    path = Path(path).expanduser()
    if not (path.is_dir() and (path / CHECKPOINTS).is_dir()):
        return path
    name = read_latest(path)
    if name is None:
        raise UserError("this run has no checkpoint yet", where=str(path / CHECKPOINTS),
                        fix="wait for the first checkpoint, or pass a checkpoint folder")  # fmt: skip
    return path / CHECKPOINTS / name


def write_checkpoint(run_dir: Path, name: str, writer_fn: Callable[[Path], None]) -> Path:
    """Run ``writer_fn(folder)`` into a temporary folder, then publish it atomically as ``name``.

    Returns the final folder. ``latest`` points at it once this returns; a failure or kill before
    then leaves the previous checkpoint and ``latest`` untouched.
    """
    _check_name(name)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        writer_fn(tmp)
        normal_permissions(tmp)  # safetensors writes 0600: a ComfyUI running as another user must read it
        serials = [int((_read_marker(p) or {}).get("serial", 0)) for p in list_checkpoints(run_dir)]
        _write_marker(tmp, name, serial=max(serials, default=0) + 1)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    _publish(tmp, final)
    _write_latest(root, name)
    return final


def prepare_checkpoints(run_dir: Path) -> list[str]:
    """Finish what a killed writer left: restore moved-aside namesakes, delete temporaries.

    Call once at start, on the writing rank, before :func:`resolve_resume`. Returns what it did.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(OLD_PREFIX):
            name = p.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
            if (root / name).exists():
                shutil.rmtree(p)
                done.append(f"removed {p.name}")
            else:
                os.rename(p, root / name)
                done.append(f"restored {name} from {p.name}")
    for p in sorted(root.iterdir()):
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            done.append(f"removed {p.name}")
    if done:
        _fsync_dir(root)
    return done


def keep_last(run_dir: Path, n: int) -> list[Path]:
    """Delete all but the ``n`` most recently written checkpoints; never the one ``latest`` names."""
    if n < 1:
        raise UserError(f"keep_last={n} must be ≥ 1", where="checkpoint.keep", fix="keep at least one checkpoint")
    latest = read_latest(run_dir)
    ckpts = list_checkpoints(run_dir)
    doomed = [p for p in ckpts[: max(0, len(ckpts) - n)] if p.name != latest]
    for p in doomed:
        # rename first: a kill during rmtree must not leave a half-deleted folder that looks complete
        aside = p.with_name(f"{TMP_PREFIX}delete-{p.name}-{secrets.token_hex(4)}")
        os.rename(p, aside)
        shutil.rmtree(aside)
    return doomed


def verify_checkpoint(path: Path) -> dict:
    """The marker of a complete checkpoint folder; a UserError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise UserError("checkpoint folder not found", where=str(path), fix="give a folder under RUN/checkpoints/")
    marker = _read_marker(path)
    if marker is None:
        raise UserError(
            f"not a complete checkpoint (no readable {MARKER})",
            where=str(path),
            fix="give a checkpoint folder written by `sdxl train`, or resume from 'latest'",
        )
    for rel, size in marker["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(
                f"checkpoint file {rel} is missing or truncated", where=str(path), fix="resume from another checkpoint"
            )
    return marker


def resolve_resume(run_dir: Path, spec: str | Path) -> Path:
    """The checkpoint folder ``--resume`` means: ``latest`` in ``run_dir``, a run folder, or a folder."""
    if str(spec) == LATEST:
        name = read_latest(run_dir)
        if name is None:
            raise UserError(
                "no checkpoint to resume from",
                where=str(Path(run_dir) / CHECKPOINTS),
                fix="start without --resume, or give the checkpoint folder to resume from",
            )
        path = Path(run_dir) / CHECKPOINTS / name
        if not path.is_dir():
            raise UserError(
                f"'latest' names checkpoint {name!r}, which is not found",
                where=str(path.parent),
                fix="it was moved or deleted: resume from another checkpoint folder (--resume PATH)",
            )
    else:
        path = Path(spec)
        if read_latest(path) is not None:  # a run folder: its latest checkpoint
            path = path / CHECKPOINTS / read_latest(path)
    verify_checkpoint(path)
    return path


# ── state files: safetensors for tensors, JSON for the rest ─────────────────────────────────
_TENSOR, _INT_KEYS, _TUPLE = "__tensor__", "__int_keys__", "__tuple__"
# A dict holding one of these keys would decode as the marker: refused. Other dunder keys are plain
# keys (bitsandbytes' 8-bit optimisers keep their quantisation state under "__bnb_optimizer_quant_state__").
_MARKERS = frozenset((_TENSOR, _INT_KEYS, _TUPLE))


def _join(key: str, part: object) -> str:
    return f"{key}.{part}" if key else str(part)


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if key in tensors:  # {"a.b": x, "a": {"b": y}} would otherwise overwrite silently
            raise ValueError(f"two tensors of the state flatten to the same key {key!r}")
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_KEYS: {str(k): _encode(v, _join(key, k), tensors) for k, v in obj.items()}}
        for k in obj:
            if not isinstance(k, str) or k in _MARKERS:
                raise TypeError(f"cannot save state key {k!r} at {key!r}: use str keys (or all-int keys), "
                                f"none of {sorted(_MARKERS)}")  # fmt: skip
        return {k: _encode(v, _join(key, k), tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} at {key!r}: only tensors and plain values")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _INT_KEYS in obj:
            return {int(k): _decode(v, tensors) for k, v in obj[_INT_KEYS].items()}
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def flatten_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested state into a flat ``{dotted.key: tensor}`` dict and a JSON-able document."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, "", tensors)
    return tensors, doc


def unflatten_state(tensors: Mapping[str, torch.Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_state`."""
    return _decode(doc, tensors)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors as safetensors (copies made contiguous and unshared)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.device.index or 0) if t.numel() else None
        # safetensors refuses tensors sharing memory (e.g. tied weights): store a private copy
        if not t.is_contiguous() or (ident is not None and ident in seen):
            t = t.contiguous().clone()
        elif ident is not None:
            seen.add(ident)
        out[k] = t
    save_file(out, str(path))


def load_tensors(path: Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors; a missing, truncated or damaged file is a one-line UserError."""
    return load_safetensors(path, device=device, fix=RESUME_ANOTHER)


def save_state(folder: Path, stem: str, state: Mapping[str, Any]) -> None:
    """``folder/<stem>.safetensors`` + ``folder/<stem>.json`` holding ``state`` (see module doc)."""
    tensors, doc = flatten_state(state)
    save_tensors(Path(folder) / f"{stem}.safetensors", tensors)
    (Path(folder) / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")


def load_state(folder: Path, stem: str, *, device: str = "cpu") -> dict[str, Any]:
    """Read back what :func:`save_state` wrote."""
    doc = read_json_file(Path(folder) / f"{stem}.json", fix=RESUME_ANOTHER)
    return unflatten_state(load_tensors(Path(folder) / f"{stem}.safetensors", device=device), doc)
