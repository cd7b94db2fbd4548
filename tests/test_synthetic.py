"""The synthetic tagged dataset: deterministic, varied, and its tags describe its pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import load_tokenizers
from sdxl_trainer import synthetic
from sdxl_trainer.synthetic import PALETTE, build_synthetic_dataset, synthetic_items


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _load(folder, item) -> np.ndarray:
    return np.asarray(Image.open(folder / item.filename).convert("RGB")).astype(int)


def test_deterministic_by_seed(tmp_path):
    a = _files(build_synthetic_dataset(tmp_path / "a", n=40, seed=3))
    b = _files(build_synthetic_dataset(tmp_path / "b", n=40, seed=3))
    c = _files(build_synthetic_dataset(tmp_path / "c", n=40, seed=4))
    assert a == b
    assert a != c
    assert len(a) == 80  # an image and a .txt per item


def test_sizes_aspects_formats_and_mix():
    items = synthetic_items(300, seed=0)
    assert len(items) == 300 and len({i.stem for i in items}) == 300
    for i in items:
        assert 64 <= min(i.width, i.height) and max(i.width, i.height) <= 384
        assert 0.5 <= i.width / i.height <= 2.0
    assert {i.ext for i in items} == {"png", "jpg"}
    black = sum(i.shape is None and i.background == "black" for i in items)
    white = sum(i.shape is None and i.background == "white" for i in items)
    assert black >= 0.15 * 300 and white >= 0.15 * 300
    assert {i.shape for i in items} == {None, *synthetic.SHAPES}
    assert len({(i.width, i.height) for i in items}) > 100  # varied sizes, not a handful
    ratios = [i.width / i.height for i in items]
    assert min(ratios) < 0.6 and max(ratios) > 1.7  # the whole 1:2 … 2:1 range is used


def test_tags_describe_the_pixels(synthetic_data_dir):
    items = synthetic_items(len(list(synthetic_data_dir.glob("*.txt"))), seed=0)
    for item in items:
        px = _load(synthetic_data_dir, item)
        assert px.shape == (item.height, item.width, 3)
        tags = (synthetic_data_dir / f"{item.stem}.txt").read_text().strip().split(", ")
        assert tags == item.tags
        bg = np.array(PALETTE[item.background])
        if item.shape is None:
            assert tags[0] == "solid color" and tags[1] == f"{item.background} background"
            if item.background == "black":
                assert px.max() <= 4
            elif item.background == "white":
                assert px.min() >= 251
            else:
                assert np.abs(px - bg).max() <= 6
            continue
        fg = np.array(PALETTE[item.foreground])
        assert tags[0] == f"{item.foreground} {item.shape}" and f"{item.background} background" in tags
        near = lambda p, c: np.abs(p - c).max() <= 12  # noqa: E731  (JPEG leaves a few levels of error)
        if item.shape == "stripes":
            assert near(px[0, 0], fg)  # the first band is foreground, at the top or left edge
            assert near(px[-1, -1], fg) or near(px[-1, -1], bg)
            flat = px.reshape(-1, 3)
            share_fg = np.mean(np.abs(flat - fg).max(axis=1) <= 12)
            assert 0.3 < share_fg < 0.7
        else:
            assert near(px[item.height // 2, item.width // 2], fg)
            for corner in (px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]):
                assert near(corner, bg)


def test_shape_backgrounds_are_never_black_or_white():
    for item in synthetic_items(300, seed=1):
        if item.shape is not None:
            assert item.background not in ("black", "white") and item.foreground != item.background


def test_caption_words_are_single_tokens_of_the_demo_tokenizer(tiny_model_dir):
    tok1, tok2 = load_tokenizers(tiny_model_dir)
    words = {w for item in synthetic_items(300, seed=0) for tag in item.tags for w in tag.split()}
    for word in sorted(words):
        assert len(tok1(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(tok2(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_n_must_be_positive(tmp_path):
    with pytest.raises(UserError):
        build_synthetic_dataset(tmp_path, n=0)
