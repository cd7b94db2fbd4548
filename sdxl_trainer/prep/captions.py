"""Caption sidecars: comma-separated tags or a free caption, normalised, with what was odd flagged.

The rules (docs/scan.md):
- bytes are decoded as UTF-8 (a UTF-8 BOM is dropped; a UTF-16 BOM selects UTF-16); bytes that are
  not valid are replaced with U+FFFD and the row is flagged ``caption_non_utf8``;
- a missing sidecar gives ``caption=None`` and ``caption_missing``; one with no text gives ``""``
  and ``caption_empty``; both rows are kept;
- the text is *tags* when every piece between commas (or line breaks) has at most
  ``MAX_TAG_WORDS`` words and none ends like a sentence; otherwise it is a free *caption*;
- tags are stripped, inner whitespace collapsed, empty ones dropped (``empty_tags_dropped``) and
  repeats dropped (``duplicate_tags_dropped``), first occurrence kept; the caption of a tag list
  is the tags re-joined with ", ";
- ``underscores_to_spaces`` rewrites ``long_hair`` as ``long hair`` but leaves emoticon tags such
  as ``^_^`` or ``o_o`` alone (a tag is rewritten only if it holds two letters in a row).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_TAG_WORDS = 4
FLAGS = ("caption_missing", "caption_empty", "caption_non_utf8", "caption_unreadable", "empty_tags_dropped",
         "duplicate_tags_dropped", "caption_from_folder")  # fmt: skip
_SPLIT = re.compile(r"[,\n]")
_SPACES = re.compile(r"\s+")
_SENTENCE_END = (".", "!", "?")
_TWO_LETTERS = re.compile(r"[^\W\d_]{2}")


@dataclass(frozen=True)
class Caption:
    """A parsed sidecar. ``kind`` is ``tags``, ``caption`` or ``none`` (missing or empty)."""

    text: str | None
    tags: list[str] = field(default_factory=list)
    kind: str = "none"
    flags: list[str] = field(default_factory=list)


def decode_caption(raw: bytes) -> tuple[str, list[str]]:
    """Bytes → text, flagging (never refusing) bytes that are not valid in the detected encoding."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding, body = "utf-16", raw
    else:
        encoding, body = "utf-8", raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return body.decode(encoding), []
    except UnicodeDecodeError:
        return body.decode(encoding, errors="replace"), ["caption_non_utf8"]


def caption_flags(flags: list[str]) -> list[str]:
    """The flags a caption parse sets (as opposed to image or bucket flags), for reuse on a rescan."""
    return [f for f in flags if f in FLAGS]


def _is_tag_like(piece: str) -> bool:
    return len(piece.split()) <= MAX_TAG_WORDS and not piece.endswith(_SENTENCE_END)


def underscores_to_spaces(tag: str) -> str:
    """``long_hair`` → ``long hair``; emoticons (no two letters in a row, e.g. ``^_^``) unchanged."""
    return tag.replace("_", " ") if _TWO_LETTERS.search(tag) else tag


def _tag_caption(pieces: list[str], *, underscores: bool, flags: list[str]) -> Caption:
    kept = [p for p in pieces if p]
    if len(kept) < len(pieces):
        flags.append("empty_tags_dropped")
    if underscores:
        kept = [underscores_to_spaces(t) for t in kept]
    tags = list(dict.fromkeys(kept))
    if len(tags) < len(kept):
        flags.append("duplicate_tags_dropped")
    return Caption(text=", ".join(tags), tags=tags, kind="tags", flags=flags)


def _pieces(text: str) -> list[str]:
    return [_SPACES.sub(" ", p).strip() for p in _SPLIT.split(text)]


def parse_caption(text: str | None, *, underscores: bool = False, flags: list[str] | None = None) -> Caption:
    """Classify and normalise caption text; ``None`` means there was no sidecar at all."""
    flags = list(flags or [])
    if text is None:
        return Caption(text=None, kind="none", flags=flags + ["caption_missing"])
    # A file's closing newline is not an empty tag.
    text = text.replace("\r", "\n").replace("\x00", "").strip()
    pieces = _pieces(text)
    if not any(pieces):
        return Caption(text="", kind="none", flags=flags + ["caption_empty"])
    if not all(_is_tag_like(p) for p in pieces if p):
        return Caption(text=_SPACES.sub(" ", text).strip(), kind="caption", flags=flags)
    return _tag_caption(pieces, underscores=underscores, flags=flags)


def parse_caption_bytes(raw: bytes | None, *, underscores: bool = False) -> Caption:
    """Parse sidecar bytes (``None`` = no sidecar)."""
    if raw is None:
        return parse_caption(None, underscores=underscores)
    text, flags = decode_caption(raw)
    return parse_caption(text, underscores=underscores, flags=flags)


def parse_tag_list(tags: list[str | None] | None, *, underscores: bool = False) -> Caption:
    """Tags given as a list (a HF dataset list column): always tags, normalised like a sidecar's."""
    if tags is None:
        return parse_caption(None, underscores=underscores)
    pieces = [_SPACES.sub(" ", t).strip() for t in tags if t is not None]
    if not any(pieces):
        return Caption(text="", kind="none", flags=["caption_empty"])
    return _tag_caption(pieces, underscores=underscores, flags=[])


def read_sidecar(path: Path | None, *, underscores: bool = False) -> Caption:
    """Read and parse a sidecar (``None`` = none exists); an unreadable one is flagged, kept as missing."""
    if path is None:
        return parse_caption(None, underscores=underscores)
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return Caption(text=None, kind="none", flags=["caption_missing", "caption_unreadable"])
    return parse_caption_bytes(raw, underscores=underscores)


def count_caption_chunks(
    texts: list[str | None], *, model: Path, max_chunks: int, known: dict[str, tuple[int, bool]] | None = None,
    advance: Callable[[], None] | None = None,
) -> list[tuple[int, bool]]:
    """``(n_chunks, truncated)`` per caption: the 75-token chunks it will be encoded with (at most
    ``max_chunks``; the larger count of SDXL's two tokenizers) and whether tokens are cut off.
    Identical captions are counted once; ``known`` seeds the memo (from a previous scan)."""
    from sdxl_trainer.models.loading import load_tokenizers
    from sdxl_trainer.models.text import count_chunks

    tokenizers = load_tokenizers(model)
    memo = dict(known or {})
    out = []
    for text in texts:
        text = text or ""
        if text not in memo:
            n = max(count_chunks(t, text, max_chunks=max_chunks + 1) for t in tokenizers)
            memo[text] = (min(n, max_chunks), n > max_chunks)
        out.append(memo[text])
        if advance is not None:
            advance()
    return out
