"""A small but real CLIP BPE vocabulary, built offline for the tiny demo model.

CLIP's tokenizer is byte-level BPE with an end-of-word marker: a word is split into its bytes
(mapped to printable characters by :func:`bytes_to_unicode`), the last one carries ``</w>``, and
ranked merges join adjacent symbols. The full CLIP vocabulary (49,408 entries) is a download; this
module builds a few-hundred-entry one with the same layout:

    ids 0–255      the byte alphabet, in CLIP's order ("!" is id 0, as in SDXL's tokenizer_2 pad)
    ids 256–511    the same alphabet with ``</w>``
    then           one entry per merge, in merge order
    last two       ``<|startoftext|>`` (BOS) and ``<|endoftext|>`` (EOS, the highest id, like CLIP)

The merges are learned with plain BPE (most frequent pair first) on :data:`DEMO_WORDS` until every
word is one symbol, so every word of the synthetic captions is one token, while any other text
still tokenizes, character by character, through the byte alphabet.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

# Every word the synthetic captions (sdxl_trainer.synthetic) use, plus common prompt words, so a
# demo prompt is as short in tokens as it is in words. A test checks the captions stay covered.
DEMO_WORDS: tuple[str, ...] = tuple(
    """
    solid color colour black white red green blue yellow orange purple pink cyan magenta gray grey
    brown dark light bright pure plain empty background simple shape shapes no humans circle square
    triangle stripes striped horizontal vertical monochrome image picture photo illustration drawing
    a an the of on with and in masterpiece best quality high low worst highres
    """.split()
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(word: str) -> tuple[str, ...]:
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + EOW)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties: smallest pair) until each word is one symbol."""
    corpus = {w: _symbols(w) for w in sorted({w.lower() for w in words if w})}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms in corpus.values():
            pairs.update(zip(syms, syms[1:]))
        if not pairs:
            return merges
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        merges.append(best)
        for w, syms in corpus.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            corpus[w] = tuple(out)


def build_vocab(words: Iterable[str] = DEMO_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP-layout vocabulary (token → id) and ranked merges for ``words``."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + EOW for c in alphabet]
    merges = learn_merges(words)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:  # two merge paths can spell the same token; it keeps its first id
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out_dir: Path, words: Iterable[str] = DEMO_WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's file formats) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def write_tokenizer_config(out_dir: Path, *, pad_token: str = EOS) -> None:
    """Write ``tokenizer_config.json`` and ``special_tokens_map.json`` as SDXL's tokenizer folders have them.

    SDXL's ``tokenizer`` pads with EOS; its ``tokenizer_2`` pads with "!" (id 0), kept here.
    """
    out_dir = Path(out_dir)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def write_tokenizer_folder(out_dir: Path, *, pad_token: str = EOS) -> Path:
    """A complete CLIP tokenizer folder for the demo vocabulary (files and configs); returns it."""
    write_tokenizer_files(out_dir)
    write_tokenizer_config(out_dir, pad_token=pad_token)
    return Path(out_dir)
