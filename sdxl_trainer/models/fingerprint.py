"""Model fingerprints: which VAE, text encoders, tokenizers and UNet an artifact was made with.

Every artifact that depends on model parts records their fingerprints (the cache: VAE, text
encoders and tokenizers; latent_stats.json: the VAE; a checkpoint: every part), and the stage that
consumes it compares them with the model it runs with (:func:`check`). A deliberate change is
accepted with ``--allow-model-change`` (config key ``allow_model_change``).

A part's fingerprint is SHA-256 (first 16 bytes, hex) over, file by file in name order (hidden
files skipped; the folder's name and path do not count, so a moved or copied model keeps it):

- ``config.json``: its keys except the ``_``-prefixed ones (``_name_or_path``, ``_diffusers_version``
  change when the same weights are saved again);
- ``*.safetensors``: the file size, the whole header (every tensor's name, dtype, shape and byte
  offsets) and 4 KiB from the middle of every tensor. A finetune changes (nearly) every element of
  the tensors it trains, a merged LoRA every element of the layers it adapts, so one block per
  tensor sees any trained tensor; what it cannot see is an edit confined to bytes it does not read.
- any other file up to 64 MiB (tokenizer vocabularies, merges, configs): every byte;
- any larger file (pickled ``.bin`` weights): its size and 64 blocks of 64 KiB spread evenly.

Cost for real SDXL (≈2,650 tensors in four weight files, ~7 GB in fp16): the headers (~0.5 MB) plus
~2,650 reads of 4 KiB (~11 MB), well under a second from the page cache, a few seconds cold from a
disk that seeks. docs/reliability.md has the measured figures.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sdxl_trainer.errors import UserError

VERSION = 1
FLAG = "--allow-model-change"
SAMPLE = 4096
WHOLE_FILE_MAX = 64 << 20
SPREAD_BLOCKS, SPREAD_SIZE = 64, 64 << 10
CACHE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
ALL_PARTS = ("unet", *CACHE_PARTS)


def _config_bytes(path: Path) -> bytes:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path.name} ({e})", where=str(path), fix="copy the model folder again") from e
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if not str(k).startswith("_")}
    return json.dumps(doc, sort_keys=True).encode()


def _safetensors(f: Any, size: int, h: "hashlib._Hash", path: Path) -> None:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= size - 8:
        raise UserError("not a valid safetensors file (bad header length)", where=str(path),
                        fix="the file is damaged or truncated: copy or download the model again")  # fmt: skip
    header = f.read(n)
    try:
        tensors = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError("not a valid safetensors file (its header is not JSON)", where=str(path),
                        fix="the file is damaged: copy or download the model again") from e  # fmt: skip
    h.update(head + header)
    base = 8 + n
    spans = sorted(tuple(t["data_offsets"]) for k, t in tensors.items() if k != "__metadata__")
    for begin, end in spans:
        start = base + max(begin, (begin + end) // 2 - SAMPLE // 2)
        length = min(SAMPLE, end - begin)
        h.update(os.pread(f.fileno(), length, start) if length > 0 else b"")


def _spread(f: Any, size: int, h: "hashlib._Hash") -> None:
    step = max(1, (size - SPREAD_SIZE) // max(1, SPREAD_BLOCKS - 1))
    for i in range(SPREAD_BLOCKS):
        h.update(os.pread(f.fileno(), SPREAD_SIZE, min(i * step, max(0, size - SPREAD_SIZE))))


def part_fingerprint(folder: Path) -> str:
    """The fingerprint of one part folder (``vae/``, ``unet/``, ``tokenizer/``, …, or a separate VAE)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("model part folder not found", where=str(folder), fix="pass a complete SDXL diffusers folder")
    h = hashlib.sha256(f"sdxl-trainer fingerprint v{VERSION}".encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        h.update(f"\0{path.name}\0{size}\0".encode())
        if path.name == "config.json":
            h.update(_config_bytes(path))
            continue
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                _safetensors(f, size, h, path)
            elif size <= WHOLE_FILE_MAX:
                h.update(f.read())
            else:
                _spread(f, size, h)
    return h.hexdigest()[:32]


def model_fingerprint(model: Path, *, vae: Path | None = None, parts: tuple[str, ...] = ALL_PARTS) -> dict[str, Any]:
    """``{"version": 1, "parts": {part: hex}}`` of a diffusers SDXL folder (``vae`` replaces its VAE)."""
    from sdxl_trainer.models.loading import check_sdxl_folder

    root = check_sdxl_folder(model)
    folders = {p: (Path(vae) if p == "vae" and vae is not None else root / p) for p in parts}
    return {"version": VERSION, "parts": {p: part_fingerprint(f) for p, f in folders.items()}}


def differing_parts(recorded: dict[str, Any] | None, current: dict[str, Any], parts: tuple[str, ...]) -> list[str] | None:
    """The parts (of ``parts``) whose fingerprints differ; None when ``recorded`` has none to compare."""
    if not recorded or recorded.get("version") != current.get("version"):
        return None
    old, new = recorded.get("parts", {}), current["parts"]
    if not all(p in old and p in new for p in parts):
        return None
    return [p for p in parts if old[p] != new[p]]


def check(recorded: dict[str, Any] | None, current: dict[str, Any], *, parts: tuple[str, ...], what: str,
          where: str, model: str, allow: bool, fix: str) -> str | None:  # fmt: skip
    """Refuse when ``what`` (an artifact) was made with other ``parts`` than ``model``, unless ``allow``.

    Returns a warning line for the caller to print (an artifact from before fingerprints, or an
    allowed change), else None.
    """
    diff = differing_parts(recorded, current, parts)
    if diff is None:
        return f"{where}: {what} records no model fingerprint (written before fingerprints): not checked against {model}"
    if not diff:
        return None
    message = f"{what} was made with another {', '.join(diff)} than {model}"
    if allow:
        return f"{where}: {message}; continuing because of {FLAG}"
    raise UserError(message, where=where, fix=f"{fix}, or pass {FLAG} if the change is deliberate")
