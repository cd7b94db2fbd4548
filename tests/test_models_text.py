"""Chunked CLIP text encoding (NovelAI context extension) on the tiny kit's real CLIP classes."""

from __future__ import annotations

import logging

import pytest
import torch

from sdxl_trainer.models import text
from sdxl_trainer.models.loading import load_text_encoders, load_tokenizers

SHORT = "solid color, black background, no humans"


@pytest.fixture(scope="module")
def kit(tiny_model_dir):
    tok1, tok2 = load_tokenizers(tiny_model_dir)
    te1, te2 = load_text_encoders(tiny_model_dir)
    return tok1, tok2, te1, te2


def _prompt_of(tok, n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens ("red" and "," are one token each)."""
    words = ["red"] * n_tokens
    prompt = " ".join(words)
    assert text.count_tokens(tok, prompt) == n_tokens
    return prompt


@torch.no_grad()
def _direct(tok1, tok2, te1, te2, prompt: str):
    """The plain single-chunk call: tokenizer(padding="max_length", max_length=77) → both encoders."""
    ids1 = tok1(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    o1, o2 = te1(ids1, output_hidden_states=True), te2(ids2, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1), o2.text_embeds


@pytest.mark.parametrize("prompt", [SHORT, "", "Zebra xylophone, 12 purple stripes!"])
def test_short_prompt_equals_a_direct_encoder_call_exactly(kit, prompt):
    with torch.no_grad():
        hidden, pooled = text.encode_prompts(*kit, [prompt])
    ref_hidden, ref_pooled = _direct(*kit, prompt)
    assert hidden.shape == (1, 77, kit[2].config.hidden_size + kit[3].config.hidden_size)
    assert torch.equal(hidden, ref_hidden)
    assert torch.equal(pooled, ref_pooled)


def test_75_tokens_is_one_chunk_and_76_is_two(kit):
    tok1, tok2, te1, te2 = kit
    p75, p76 = _prompt_of(tok1, 75), _prompt_of(tok1, 76)
    assert text.count_chunks(tok1, p75) == 1 and text.count_chunks(tok1, p76) == 2
    with torch.no_grad():
        hidden, pooled = text.encode_prompts(tok1, tok2, te1, te2, [p75])
    ref_hidden, ref_pooled = _direct(tok1, tok2, te1, te2, p75)
    assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)
    ids = text.chunk_ids(tok1, [p76])
    assert ids.shape == (1, 2, 77)
    assert ids[0, 1, :3].tolist() == [tok1.bos_token_id, tok1.encode("red", add_special_tokens=False)[0], tok1.eos_token_id]


def test_chunk_layout_bos_eos_per_chunk_and_each_tokenizers_pad(kit):
    tok1, tok2, _, _ = kit
    prompt = _prompt_of(tok1, 160)  # 75 + 75 + 10
    for tok in (tok1, tok2):
        ids = text.chunk_ids(tok, [prompt])
        assert ids.shape == (1, 3, 77)
        assert (ids[0, :, 0] == tok.bos_token_id).all()
        assert ids[0, 0, 76] == ids[0, 1, 76] == tok.eos_token_id  # full chunks: BOS + 75 + EOS
        assert ids[0, 2, 11] == tok.eos_token_id
        assert (ids[0, 2, 12:] == tok.pad_token_id).all()
        flat = torch.cat([ids[0, c, 1:76] for c in range(2)] + [ids[0, 2, 1:11]]).tolist()
        assert flat == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok2.pad_token_id == 0 and tok1.pad_token_id == tok1.eos_token_id


def test_long_prompts_give_two_and_three_chunks(kit):
    tok1, tok2, te1, te2 = kit
    with torch.no_grad():
        h2, _ = text.encode_prompts(tok1, tok2, te1, te2, [_prompt_of(tok1, 100)])
        h3, _ = text.encode_prompts(tok1, tok2, te1, te2, [_prompt_of(tok1, 200)])
    assert h2.shape[1] == 2 * 77 and h3.shape[1] == 3 * 77


def test_each_chunk_is_encoded_on_its_own_and_pooled_comes_from_chunk_0(kit):
    tok1, tok2, te1, te2 = kit
    prompt = SHORT + ", " + ", ".join(["blue square"] * 40)  # > 75 tokens, chunk 0 differs from chunk 1
    ids1, ids2 = text.chunk_ids(tok1, [prompt]), text.chunk_ids(tok2, [prompt])
    n = ids1.shape[1]
    assert n == 2
    with torch.no_grad():
        hidden, pooled = text.encode_prompts(tok1, tok2, te1, te2, [prompt])
        for c in range(n):
            o1 = te1(ids1[:, c], output_hidden_states=True)
            o2 = te2(ids2[:, c], output_hidden_states=True)
            ref = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            torch.testing.assert_close(hidden[:, c * 77 : (c + 1) * 77], ref, rtol=0, atol=1e-6)
            if c == 0:
                torch.testing.assert_close(pooled, o2.text_embeds, rtol=0, atol=1e-6)
            else:
                assert not torch.allclose(pooled, o2.text_embeds)


def test_too_long_prompts_are_cut_and_reported(kit, caplog):
    tok1, tok2, te1, te2 = kit
    prompt = _prompt_of(tok1, 240)
    assert text.count_chunks(tok1, prompt) == 3
    assert text.count_chunks(tok1, prompt, max_chunks=4) == 4
    with caplog.at_level(logging.WARNING, logger="sdxl_trainer.models.text"):
        ids = text.chunk_ids(tok1, [prompt, SHORT])
    assert ids.shape == (2, 3, 77)
    assert "1 of 2 prompts exceed 225 tokens" in caplog.text and "15 tokens dropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_trainer.models.text"):
        hidden, _ = text.encode_prompts(tok1, tok2, te1, te2, [prompt], max_chunks=2)
    assert hidden.shape[1] == 2 * 77
    assert caplog.text.count("tokens dropped") == 1  # once per call, not once per tokenizer


def test_batch_is_padded_with_empty_chunks(kit):
    tok1, tok2, te1, te2 = kit
    long = _prompt_of(tok1, 100)
    ids = text.chunk_ids(tok2, [SHORT, long, ""])
    assert ids.shape == (3, 2, 77)
    empty = text.chunk_ids(tok2, [""])[0, 0]
    assert torch.equal(ids[0, 1], empty) and torch.equal(ids[2, 1], empty)
    assert text.chunk_ids(tok2, [SHORT], n_chunks=3).shape == (1, 3, 77)
    with torch.no_grad():
        batch, pooled = text.encode_prompts(tok1, tok2, te1, te2, [SHORT, long], n_chunks=3)
        alone, alone_pooled = text.encode_prompts(tok1, tok2, te1, te2, [SHORT])
    assert batch.shape == (2, 3 * 77, alone.shape[-1])
    torch.testing.assert_close(batch[:1, :77], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled[:1], alone_pooled, rtol=0, atol=1e-5)


def test_n_chunks_out_of_range_is_an_error(kit):
    tok1 = kit[0]
    with pytest.raises(ValueError, match="need 2 chunks"):
        text.chunk_ids(tok1, [_prompt_of(tok1, 100)], n_chunks=1)
    with pytest.raises(ValueError, match="at most 3"):
        text.chunk_ids(tok1, [SHORT], n_chunks=4)
    with pytest.raises(TypeError):
        text.chunk_ids(tok1, SHORT)


def test_count_chunks_matches_the_tokenizers_own_count(kit):
    tok1, tok2, _, _ = kit
    prompts = ["", SHORT, _prompt_of(tok1, 75), _prompt_of(tok1, 151), "ÜNICODE ünïcode, émoji 🙂 \n  tabs\tand  spaces"]
    for p in prompts:
        n_tokens = len(tok1(p, add_special_tokens=False)["input_ids"])
        assert text.count_tokens(tok1, p) == text.count_tokens(tok2, p) == n_tokens
        assert text.count_chunks(tok1, p) == text.chunk_ids(tok1, [p]).shape[1] == max(1, -(-n_tokens // 75))


def test_device_argument_moves_outputs(kit):
    with torch.no_grad():
        hidden, pooled = text.encode_prompts(*kit, [SHORT], device="meta")
    assert hidden.device.type == pooled.device.type == "meta"
