"""Chunked CLIP text encoding for SDXL: NovelAI's context extension (also A1111's and bigASP's).

CLIP reads 77 positions: BOS, 75 tokens, EOS. A longer prompt is tokenized without truncation and its
tokens (no BOS/EOS) are cut into chunks of 75; each chunk becomes its own 77-position sequence,
``BOS + chunk + EOS`` padded with the tokenizer's pad id (SDXL's first tokenizer pads with EOS, the
second with "!"). At most ``max_chunks`` chunks (default 3, 225 tokens); tokens beyond that are
dropped and reported. The empty prompt is one chunk (``BOS EOS pad…``).

Each chunk goes through both text encoders separately; the penultimate hidden states
(``hidden_states[-2]``, as SDXL was trained) of CLIP ViT-L (768) and OpenCLIP bigG (1280) are
concatenated per position (2048), and the chunks are concatenated along the sequence: ``n·77 × 2048``.
The pooled embedding (SDXL's ``text_embeds`` added conditioning) is text_encoder_2's projection of
chunk 0 only. A prompt of ≤ 75 tokens therefore gives exactly what diffusers' SDXL pipeline gives.

kohya's sd-scripts keeps one BOS and one EOS for the whole prompt (227 positions for 3 chunks): a
different convention, so embeddings from one do not match a model trained with the other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
CHUNK_LEN = CHUNK_TOKENS + 2  # CLIP's 77 positions

log = logging.getLogger(__name__)


def _token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without BOS/EOS and without truncation."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if len(texts) == 0:
        return []
    # Through the tokenizer's own call, not its Rust backend: a fast tokenizer leaves the padding and
    # truncation of its last call set on the backend (e.g. pad to 77), and the call resets them.
    out = tokenizer(list(texts), add_special_tokens=False, padding=False, truncation=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def count_tokens(tokenizer, text: str) -> int:
    """How many tokens ``text`` has, without BOS/EOS."""
    return len(_token_ids(tokenizer, [text])[0])


def chunks_needed(n_tokens: int) -> int:
    """Chunks of 75 needed for ``n_tokens`` tokens (the empty prompt still takes one)."""
    return max(1, -(-n_tokens // CHUNK_TOKENS))


def count_chunks(tokenizer, text: str, *, max_chunks: int = 3) -> int:
    """Chunks ``text`` will be encoded with: ``min(ceil(tokens / 75), max_chunks)``, at least 1."""
    return min(chunks_needed(count_tokens(tokenizer, text)), max_chunks)


def _truncated(all_ids: list[list[int]], max_chunks: int) -> list[list[int]]:
    """Cut every id list to ``max_chunks`` chunks, with one warning for the whole batch."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks={max_chunks} must be ≥ 1")
    limit = max_chunks * CHUNK_TOKENS
    too_long = [(i, len(ids) - limit) for i, ids in enumerate(all_ids) if len(ids) > limit]
    if too_long:
        log.warning(
            "%d of %d prompts exceed %d tokens (%d chunks of %d): %d tokens dropped (first: prompt %d, %d dropped)",
            len(too_long), len(all_ids), limit, max_chunks, CHUNK_TOKENS,
            sum(d for _, d in too_long), too_long[0][0], too_long[0][1],
        )  # fmt: skip
    return [ids[:limit] for ids in all_ids]


def _pack(tokenizer, all_ids: list[list[int]], n: int) -> torch.Tensor:
    """``[B, n, 77]``: chunk c of text b is ``BOS + its ids[75c : 75c+75] + EOS + pad…``."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if None in (bos, eos, pad):
        raise ValueError("the tokenizer needs BOS, EOS and pad tokens (a CLIP tokenizer has them)")
    out = torch.full((len(all_ids), n, CHUNK_LEN), pad, dtype=torch.long)
    out[:, :, 0] = bos
    for b, ids in enumerate(all_ids):
        for c in range(n):
            part = ids[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS]
            out[b, c, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.long)
            out[b, c, 1 + len(part)] = eos
    return out


def _n_chunks(all_ids: list[list[int]], max_chunks: int, n_chunks: int | None) -> int:
    needed = max((chunks_needed(len(ids)) for ids in all_ids), default=1)
    if n_chunks is None:
        return needed
    if not needed <= n_chunks <= max_chunks:
        raise ValueError(f"n_chunks={n_chunks}: the prompts need {needed} chunks and at most {max_chunks} are allowed")
    return n_chunks


def chunk_ids(tokenizer, texts: Sequence[str], *, max_chunks: int = 3, n_chunks: int | None = None) -> torch.Tensor:
    """Token ids ``[B, n, 77]``, each chunk ``BOS + ≤75 tokens + EOS + pad``.

    ``n`` is the most chunks any text needs (capped at ``max_chunks``), or ``n_chunks`` when given
    (at least that many, at most ``max_chunks``); shorter texts get empty chunks (``BOS EOS pad…``)
    appended, as A1111 does. Tokens past ``max_chunks`` chunks are dropped, with one logged warning
    per call saying how many.
    """
    all_ids = _truncated(_token_ids(tokenizer, texts), max_chunks)
    return _pack(tokenizer, all_ids, _n_chunks(all_ids, max_chunks, n_chunks))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def encode_chunks(
    te1: torch.nn.Module, te2: torch.nn.Module, ids1: torch.Tensor, ids2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode chunked ids ``[B, n, 77]`` of both tokenizers → (hidden ``[B, n·77, D1+D2]``, pooled ``[B, P]``)."""
    if ids1.shape != ids2.shape or ids1.ndim != 3 or ids1.shape[-1] != CHUNK_LEN:
        shapes = f"{tuple(ids1.shape)} and {tuple(ids2.shape)}"
        raise ValueError(f"expected two [B, n, {CHUNK_LEN}] id tensors, got {shapes}")
    b, n, _ = ids1.shape
    flat1 = ids1.reshape(b * n, CHUNK_LEN).to(_device_of(te1))
    flat2 = ids2.reshape(b * n, CHUNK_LEN).to(_device_of(te2))
    # No attention mask, as in SDXL's training and diffusers' pipeline: CLIP is causal, so the
    # padding after EOS changes neither EOS nor anything before it.
    out1 = te1(flat1, output_hidden_states=True)
    out2 = te2(flat2, output_hidden_states=True)
    h1, h2 = out1.hidden_states[-2], out2.hidden_states[-2]
    hidden = torch.cat([h1, h2.to(h1.device, h1.dtype)], dim=-1).reshape(b, n * CHUNK_LEN, -1)
    pooled = out2.text_embeds.reshape(b, n, -1)[:, 0]
    return hidden, pooled.to(hidden.device)


def encode_prompts(
    tok1,
    tok2,
    te1: torch.nn.Module,
    te2: torch.nn.Module,
    texts: Sequence[str],
    *,
    max_chunks: int = 3,
    n_chunks: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning for ``texts``: (hidden ``[B, n·77, D]``, pooled ``[B, P]``).

    ``D`` = 2048 and ``P`` = 1280 for SDXL. Both tokenizers chunk the same way; if their token counts
    differ (they do not for SDXL's identical vocabularies), both use the larger chunk count. Outputs
    are moved to ``device`` when given. Gradients flow when the encoders are trainable; wrap the call
    in ``torch.no_grad()`` when they are not.
    """
    ids_a = _truncated(_token_ids(tok1, texts), max_chunks)
    ids_b = [ids[: max_chunks * CHUNK_TOKENS] for ids in _token_ids(tok2, texts)]  # warned once, above
    n = max(_n_chunks(ids_a, max_chunks, n_chunks), _n_chunks(ids_b, max_chunks, n_chunks))
    ids1, ids2 = _pack(tok1, ids_a, n), _pack(tok2, ids_b, n)
    hidden, pooled = encode_chunks(te1, te2, ids1, ids2)
    if device is not None:
        hidden, pooled = hidden.to(device), pooled.to(device)
    return hidden, pooled
