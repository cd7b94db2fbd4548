"""Caption sidecars: tags vs free captions, whitespace, empty tags, underscores, encodings, missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_trainer.prep.captions import (
    parse_caption,
    parse_caption_bytes,
    parse_tag_list,
    read_sidecar,
    underscores_to_spaces,
)


def test_comma_separated_tags_are_split_and_stripped() -> None:
    c = parse_caption("1girl,  solo ,long hair,\tred eyes")
    assert c.kind == "tags"
    assert c.tags == ["1girl", "solo", "long hair", "red eyes"]
    assert c.text == "1girl, solo, long hair, red eyes"
    assert c.flags == []


def test_empty_and_repeated_tags_are_dropped_and_flagged() -> None:
    c = parse_caption(" solo,, smile , ,solo,\n")
    assert c.tags == ["solo", "smile"]
    assert c.flags == ["empty_tags_dropped", "duplicate_tags_dropped"]


def test_line_breaks_separate_tags() -> None:
    assert parse_caption("solo, smile\nlong hair\r\nred eyes").tags == ["solo", "smile", "long hair", "red eyes"]


def test_free_caption_is_kept_whole_with_whitespace_collapsed() -> None:
    c = parse_caption("  A photo of a cat sitting on a red mat,\n   at night.  ")
    assert c.kind == "caption"
    assert c.text == "A photo of a cat sitting on a red mat, at night."
    assert c.tags == []


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("cat", "tags"),
        ("a cat on mat", "tags"),  # four words: still a tag
        ("a cat on the mat", "caption"),  # five words
        ("a cat.", "caption"),  # sentence end
        ("smile, looking at viewer, hair between eyes", "tags"),
    ],
)
def test_tags_or_caption_rule(text: str, kind: str) -> None:
    assert parse_caption(text).kind == kind


def test_underscores_to_spaces_keeps_emoticons() -> None:
    assert underscores_to_spaces("long_hair") == "long hair"
    assert underscores_to_spaces("hatsune_miku_(cosplay)") == "hatsune miku (cosplay)"
    for emoticon in ("^_^", "o_o", ">_<", "0_0", "||_||"):
        assert underscores_to_spaces(emoticon) == emoticon
    c = parse_caption("long_hair, ^_^, long hair", underscores=True)
    assert c.tags == ["long hair", "^_^"]  # the rewrite can create a repeat, which is dropped
    assert parse_caption("long_hair").tags == ["long_hair"]  # off by default


def test_non_utf8_bytes_are_replaced_and_flagged() -> None:
    c = parse_caption_bytes(b"caf\xe9, solo")
    assert c.tags == ["caf\ufffd", "solo"]
    assert "caption_non_utf8" in c.flags


def test_utf8_bom_and_utf16_are_decoded() -> None:
    assert parse_caption_bytes("\ufeffsolo, smile".encode("utf-8")).tags == ["solo", "smile"]
    c = parse_caption_bytes("solo, café".encode("utf-16"))
    assert c.tags == ["solo", "café"] and c.flags == []


def test_missing_and_empty_captions_are_kept_and_flagged() -> None:
    missing = parse_caption_bytes(None)
    assert (missing.text, missing.kind, missing.flags) == (None, "none", ["caption_missing"])
    for raw in (b"", b"  \n\t ", b",, ,"):
        empty = parse_caption_bytes(raw)
        assert (empty.text, empty.kind, empty.tags, empty.flags) == ("", "none", [], ["caption_empty"])


def test_tag_list_column() -> None:
    c = parse_tag_list([" solo", "long_hair", None, "", "solo"], underscores=True)
    assert c.kind == "tags" and c.tags == ["solo", "long hair"]
    assert c.flags == ["empty_tags_dropped", "duplicate_tags_dropped"]
    assert parse_tag_list(None).flags == ["caption_missing"]
    assert parse_tag_list([]).flags == ["caption_empty"]


def test_read_sidecar(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes(b"solo,\xff smile")
    c = read_sidecar(p)
    assert c.tags == ["solo", "\ufffd smile"] and c.flags == ["caption_non_utf8"]
    assert read_sidecar(None).flags == ["caption_missing"]
    gone = read_sidecar(tmp_path / "gone.txt")
    assert gone.text is None and gone.flags == ["caption_missing", "caption_unreadable"]


def test_trailing_newline_is_not_an_empty_tag():
    from sdxl_trainer.prep.captions import parse_caption_bytes

    parsed = parse_caption_bytes(b"solid color, white background, no humans\n")
    assert parsed.tags == ["solid color", "white background", "no humans"]
    assert "empty_tags_dropped" not in parsed.flags
    assert "empty_tags_dropped" in parse_caption_bytes(b"a, , b\n").flags
