"""`prep scan --hf-dataset`: save_to_disk folders and Parquet files built with `datasets` in the test."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.config import ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import scan
from sdxl_trainer.prep.hf_source import open_hf_dataset, open_source
from sdxl_trainer.prep.images import content_id
from sdxl_trainer.schema import read_table

N = 6


def png(seed: int, size=(80, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def build(text_name: str = "text", image_name: str = "image", tag_lists: bool = False) -> datasets.Dataset:
    """N rows like lambdalabs/naruto-blip-captions (image + text), one broken image and one duplicate."""
    cells = [{"bytes": png(i), "path": None} for i in range(N - 2)]
    cells.append({"bytes": b"not an image at all" * 4, "path": None})
    cells.append({"bytes": png(0), "path": None})  # same bytes as row 0
    texts: list = [f"a drawing of a ninja number {i}, smiling" for i in range(N)]
    if tag_lists:
        texts = [["ninja", f"number_{i}", "smile"] for i in range(N)]
        texts[1] = None
    features = datasets.Features({image_name: datasets.Image(),
                                  text_name: datasets.Sequence(datasets.Value("string")) if tag_lists
                                  else datasets.Value("string")})  # fmt: skip
    return datasets.Dataset.from_dict({image_name: cells, text_name: texts}, features=features)


def manifest(work: Path) -> tuple[dict[str, dict], dict]:
    table, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    return {r["path"]: r for r in table.to_pylist()}, meta


def cfg(path: Path, work: Path, **kw) -> ScanConfig:
    return ScanConfig(hf_dataset=path, out=work, workers=1, min_side=16, **kw)


def check_rows(work: Path, split: str = "train") -> dict[str, dict]:
    rows, meta = manifest(work)
    assert sorted(rows) == sorted(f"{split}/{i}" for i in range(N))
    statuses = [rows[f"{split}/{i}"]["status"] for i in range(N)]
    assert statuses == ["ok"] * (N - 2) + ["skipped", "duplicate"]
    assert rows[f"{split}/{N - 2}"]["reason"].startswith("not_an_image")
    assert rows[f"{split}/{N - 1}"]["duplicate_of"] == rows[f"{split}/0"]["id"]
    r0 = rows[f"{split}/0"]
    assert (r0["width"], r0["height"], r0["format"]) == (80, 48, "PNG")
    assert r0["id"] == content_id(png(0))
    # a later stage can find the bytes again from the manifest alone
    assert open_source(meta["source"], r0["source"]).read() == png(0)
    return rows


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    build().save_to_disk(tmp_path / "ds")
    s = scan.run(cfg(tmp_path / "ds", tmp_path / "work"))
    assert (s["files_found"], s["ok"], s["skipped"], s["duplicate"]) == (N, N - 2, 1, 1)
    rows = check_rows(tmp_path / "work")
    assert rows["train/3"]["caption"] == "a drawing of a ninja number 3, smiling"
    assert rows["train/3"]["caption_kind"] == "caption"
    _, meta = manifest(tmp_path / "work")
    assert meta["source"]["kind"] == "hf_dataset" and meta["source"]["format"] == "arrow"
    assert (meta["source"]["image_column"], meta["source"]["caption_column"]) == ("image", "text")


def test_dataset_dict_picks_train_or_the_named_split(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": build(), "test": build()}).save_to_disk(tmp_path / "dd")
    scan.run(cfg(tmp_path / "dd", tmp_path / "w1"))
    check_rows(tmp_path / "w1", "train")
    scan.run(cfg(tmp_path / "dd", tmp_path / "w2", hf_split="test"))
    check_rows(tmp_path / "w2", "test")
    with pytest.raises(UserError, match="no split 'valid'"):
        scan.run(cfg(tmp_path / "dd", tmp_path / "w3", hf_split="valid"))


def test_parquet_files_with_hub_names(tmp_path: Path) -> None:
    data = tmp_path / "pq" / "data"
    data.mkdir(parents=True)
    ds = build()
    ds.select(range(3)).to_parquet(data / "train-00000-of-00002.parquet")
    ds.select(range(3, N)).to_parquet(data / "train-00001-of-00002.parquet")
    s = scan.run(cfg(tmp_path / "pq", tmp_path / "work"))
    assert s["files_found"] == N
    rows = check_rows(tmp_path / "work")
    assert rows["train/4"]["source"] == "data/train-00001-of-00002.parquet#1"
    _, meta = manifest(tmp_path / "work")
    assert open_source(meta["source"], rows["train/4"]["source"]).read() == b"not an image at all" * 4
    assert content_id(open_source(meta["source"], rows["train/3"]["source"]).read()) == rows["train/3"]["id"]


def test_single_parquet_file_and_tag_list_column(tmp_path: Path) -> None:
    build(text_name="tags", tag_lists=True).to_parquet(tmp_path / "one.parquet")
    scan.run(cfg(tmp_path / "one.parquet", tmp_path / "work", underscores_to_spaces=True))
    rows = check_rows(tmp_path / "work")
    assert rows["train/2"]["tags"] == ["ninja", "number 2", "smile"] and rows["train/2"]["caption_kind"] == "tags"
    assert rows["train/1"]["caption"] is None and "caption_missing" in rows["train/1"]["flags"]


def test_columns_are_auto_detected_or_named(tmp_path: Path) -> None:
    ds = build(text_name="prompt", image_name="picture").add_column("notes", ["x"] * N)
    ds.save_to_disk(tmp_path / "ds")
    src = open_hf_dataset(tmp_path / "ds")
    assert (src.image_column, src.caption_column) == ("picture", "prompt")  # known caption name wins
    src = open_hf_dataset(tmp_path / "ds", caption_column="notes")
    assert src.caption_column == "notes"
    with pytest.raises(UserError, match="no column 'promt'; did you mean 'prompt'"):
        open_hf_dataset(tmp_path / "ds", caption_column="promt")
    with pytest.raises(UserError, match="not usable as the image"):
        open_hf_dataset(tmp_path / "ds", image_column="notes")


def test_ambiguous_caption_column_is_a_clear_error(tmp_path: Path) -> None:
    build(text_name="alpha").add_column("beta", ["x"] * N).save_to_disk(tmp_path / "ds")
    with pytest.raises(UserError, match="--caption-column"):
        open_hf_dataset(tmp_path / "ds")


def test_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face dataset"):
        open_hf_dataset(tmp_path / "empty")
    with pytest.raises(UserError, match="dataset not found"):
        open_hf_dataset(tmp_path / "missing")


def test_rescan_of_a_dataset_reuses_rows_by_content(tmp_path: Path) -> None:
    build().save_to_disk(tmp_path / "ds")
    work = tmp_path / "work"
    assert scan.run(cfg(tmp_path / "ds", work))["read"] == N
    ids = {p: r["id"] for p, r in manifest(work)[0].items()}
    s = scan.run(cfg(tmp_path / "ds", work))
    assert (s["read"], s["reused"]) == (0, N)
    assert {p: r["id"] for p, r in manifest(work)[0].items()} == ids
