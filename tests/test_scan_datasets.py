"""`prep scan` with kohya habits: N_name folders, a datasets: list of sources, kohya's dataset TOML."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets as hf
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdxl_trainer.cli import app
from sdxl_trainer.config import ScanConfig
from sdxl_trainer.prep import images, scan
from sdxl_trainer.prep.datasets import repeat_folder
from sdxl_trainer.prep.hf_source import open_source
from sdxl_trainer.prep.images import content_id
from sdxl_trainer.prep.pixels import read_manifest
from sdxl_trainer.schema import read_table


def save(path: Path, seed: int = 0, caption: str | None = None, ext: str = ".txt", size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption)
    return path


def manifest(work: Path) -> tuple[dict[str, dict], dict]:
    table, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    return {r["path"]: r for r in table.to_pylist()}, meta


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["prep", "scan", *args, "--workers", "1", "--min-side", "32"])
    return result.exit_code, result.output


# ── N_name folders ───────────────────────────────────────────────────────────────────────────


def test_repeat_folder_names() -> None:
    assert repeat_folder("10_hopper") == (10, "hopper", None)
    assert repeat_folder("1_sks dog") == (1, "sks dog", None)
    assert repeat_folder("3_long_hair") == (3, "long_hair", None)
    assert repeat_folder("photos") == (None, None, None)
    assert repeat_folder("hopper_10") == (None, None, None)
    for name in ("2024_photos", "0_x", "01_intro", "1000_x"):
        n, caption, why = repeat_folder(name)
        assert n is None and caption is None and why


@pytest.fixture()
def kohya_folder(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    save(d / "top.png", seed=0, caption="solo")
    save(d / "10_hopper" / "x.png", seed=1)  # no sidecar: the folder's name is its caption
    save(d / "10_hopper" / "y.png", seed=2, caption="grin, smile")
    save(d / "10_hopper" / "deep" / "z.png", seed=3)  # deeper: still the 10_hopper subset
    save(d / "2024_photos" / "p.png", seed=4)
    save(d / "01_intro" / "i.png", seed=5, caption="intro")
    save(d / "plain" / "q.png", seed=6)
    return d


def test_numbered_folders_set_repeats_and_captions(kohya_folder: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    summary = scan.run(ScanConfig(data_dir=kohya_folder, out=work, workers=1, min_side=32))
    rows, meta = manifest(work)
    assert {p: r["repeats"] for p, r in rows.items()} == {
        "top.png": 1, "10_hopper/x.png": 10, "10_hopper/y.png": 10, "10_hopper/deep/z.png": 10,
        "2024_photos/p.png": 1, "01_intro/i.png": 1, "plain/q.png": 1}  # fmt: skip
    x = rows["10_hopper/x.png"]
    assert (x["caption"], x["tags"], x["caption_kind"]) == ("hopper", ["hopper"], "tags")
    assert "caption_from_folder" in x["flags"] and "caption_missing" not in x["flags"]
    assert rows["10_hopper/deep/z.png"]["caption"] == "hopper"
    assert rows["10_hopper/y.png"]["caption"] == "grin, smile"  # a sidecar wins over the folder
    assert rows["2024_photos/p.png"]["caption"] is None and "caption_missing" in rows["2024_photos/p.png"]["flags"]
    assert {r["dataset"] for r in rows.values()} == {None}  # a single source: paths unchanged, no prefix
    assert {(r["keep_tokens"], r["caption_dropout"]) for r in rows.values()} == {(None, None)}
    assert meta["source"]["kind"] == "folder"
    assert summary["samples_per_epoch"] == 4 * 1 + 3 * 10
    groups = {g["name"]: (g["ok"], g["repeats"], g["samples_per_epoch"]) for g in summary["datasets"]}
    assert groups == {"train": (4, 1, 4), "10_hopper": (3, 10, 30)}
    assert sorted(f["folder"] for f in summary["folders_not_repeats"]) == ["01_intro", "2024_photos"]


def test_no_folder_repeats_turns_it_off(kohya_folder: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    code, out = run_cli(str(kohya_folder), "--out", str(work), "--no-folder-repeats")
    assert code == 0, out
    rows, _ = manifest(work)
    assert {r["repeats"] for r in rows.values()} == {1}
    assert rows["10_hopper/x.png"]["caption"] is None and "caption_from_folder" not in rows["10_hopper/x.png"]["flags"]
    report = json.loads((work / "scan_report.json").read_text())
    assert report["samples_per_epoch"] == 7 and report["folders_not_repeats"] == []
    # turned back on: the same WORK re-reads the captions (the option changed) but not the images
    code, out = run_cli(str(kohya_folder), "--out", str(work))
    assert code == 0, out
    rows, _ = manifest(work)
    assert rows["10_hopper/x.png"]["caption"] == "hopper" and rows["10_hopper/x.png"]["repeats"] == 10
    assert json.loads((work / "scan_report.json").read_text())["read"] == 0
    assert "samples per epoch" in out and "2024_photos is not an N_name repeat folder" in " ".join(out.split())


# ── a datasets: list ─────────────────────────────────────────────────────────────────────────


@pytest.fixture()
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "src" / "alpha", tmp_path / "src" / "beta"
    save(a / "img.png", seed=1, caption="1girl, smile", ext=".caption")
    (a / "img.txt").write_text("not the caption: wrong extension")
    save(a / "b.png", seed=2, caption="ohwx, solo", ext=".caption")  # the token already first
    save(a / "c.png", seed=3, caption="A photo of a cat sitting on a mat.", ext=".caption")
    save(a / "d.png", seed=4, caption="ohwx sitting on a chair. A photo.", ext=".caption")
    save(a / "e.png", seed=5, caption="solo, ohwx", ext=".caption")  # the token later: moved first
    save(b / "img.png", seed=6, caption="landscape")  # the same relative name as in alpha
    save(b / "5_extra" / "q.png", seed=7)
    return a, b


def two_entries(a: Path, b: Path) -> list[dict]:
    return [
        {"path": str(a), "num_repeats": 3, "caption_extension": ".caption", "keep_tokens": 2,
         "activation_token": "ohwx", "caption_dropout_rate": 0.25},
        {"image_dir": str(b), "class_tokens": "sks dog"},
    ]  # fmt: skip


def test_datasets_list_fills_every_column(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_folders
    work = tmp_path / "work"
    summary = scan.run(ScanConfig(datasets=two_entries(a, b), out=work, workers=1, min_side=32))
    rows, meta = manifest(work)
    columns = {p: (r["dataset"], r["repeats"], r["keep_tokens"], r["caption_dropout"], r["caption"])
               for p, r in rows.items()}  # fmt: skip
    assert columns == {
        "alpha/img.png": ("alpha", 3, 2, 0.25, "ohwx, 1girl, smile"),
        "alpha/b.png": ("alpha", 3, 2, 0.25, "ohwx, solo"),
        "alpha/c.png": ("alpha", 3, 2, 0.25, "ohwx, A photo of a cat sitting on a mat."),
        "alpha/d.png": ("alpha", 3, 2, 0.25, "ohwx sitting on a chair. A photo."),
        "alpha/e.png": ("alpha", 3, 2, 0.25, "ohwx, solo"),
        "beta/img.png": ("beta", 1, 1, None, "sks dog, landscape"),  # a token without keep_tokens keeps 1
        "beta/5_extra/q.png": ("beta", 5, 1, None, "sks dog, extra"),
    }
    assert rows["alpha/img.png"]["tags"] == ["ohwx", "1girl", "smile"]
    assert rows["alpha/c.png"]["caption_kind"] == "caption"
    assert rows["beta/5_extra/q.png"]["tags"] == ["sks dog", "extra"]
    assert rows["beta/img.png"]["source"] == "beta/img.png"
    assert meta["source"]["kind"] == "datasets"
    assert [(d["name"], d["kind"], d["root"]) for d in meta["source"]["datasets"]] == [
        ("alpha", "folder", str(a.resolve())), ("beta", "folder", str(b.resolve()))]  # fmt: skip
    report = json.loads((work / "scan_report.json").read_text())
    assert report["samples_per_epoch"] == summary["samples_per_epoch"] == 5 * 3 + 1 + 5
    got = {g["name"]: {k: g[k] for k in ("ok", "repeats", "samples_per_epoch", "keep_tokens", "activation_token",
                                          "caption_dropout")} for g in report["datasets"]}  # fmt: skip
    assert got == {
        "alpha": {"ok": 5, "repeats": 3, "samples_per_epoch": 15, "keep_tokens": 2, "activation_token": "ohwx",
                  "caption_dropout": 0.25},
        "beta": {"ok": 1, "repeats": 1, "samples_per_epoch": 1, "keep_tokens": 1, "activation_token": "sks dog",
                 "caption_dropout": None},
        "beta/5_extra": {"ok": 1, "repeats": 5, "samples_per_epoch": 5, "keep_tokens": 1,
                         "activation_token": "sks dog", "caption_dropout": None},
    }  # fmt: skip


def test_rows_of_every_entry_read_back(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_folders
    work = tmp_path / "work"
    scan.run(ScanConfig(datasets=two_entries(a, b), out=work, workers=1, min_side=32))
    rows, pixels = read_manifest(work)
    assert len(rows) == 7
    for row in rows:
        image, why = pixels.try_open(row)
        assert why is None and image.size == (row["width"], row["height"])
    _, meta = manifest(work)
    assert open_source(meta["source"], "alpha/img.png").read() == (a / "img.png").read_bytes()
    assert open_source(meta["source"], "beta/img.png").read() == (b / "img.png").read_bytes()
    bad = dict(next(r for r in rows if r["path"] == "beta/img.png"), source="gamma/img.png")
    image, why = pixels.try_open(bad)
    assert image is None and "no dataset 'gamma'" in why


def test_duplicates_across_entries_and_default_names(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "photos", tmp_path / "y" / "photos"
    save(a / "one.png", seed=1)
    b.mkdir(parents=True)
    shutil.copy(a / "one.png", b / "copy.png")
    save(b / "two.png", seed=2)
    work = tmp_path / "work"
    cfg = ScanConfig(datasets=[{"path": str(a), "num_repeats": 2}, {"path": str(b)}], out=work, workers=1,
                     min_side=32)  # fmt: skip
    assert [d.name for d in cfg.datasets] == ["photos", "photos_2"]
    summary = scan.run(cfg)
    rows, _ = manifest(work)
    assert rows["photos/one.png"]["status"] == "ok"
    assert rows["photos_2/copy.png"]["status"] == "duplicate"
    assert rows["photos_2/copy.png"]["duplicate_of"] == rows["photos/one.png"]["id"]
    assert summary["samples_per_epoch"] == 2 + 1  # a duplicate is not a sample


def test_hf_dataset_entry_beside_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = []
    for i in range(3):
        path = save(tmp_path / "tmp" / f"{i}.png", seed=20 + i)
        cells.append({"bytes": path.read_bytes(), "path": None})
    features = hf.Features({"image": hf.Image(), "tags": hf.Sequence(hf.Value("string"))})
    hf.Dataset.from_dict({"image": cells, "tags": [["long_hair", "c"], ["c"], None]}, features=features) \
        .save_to_disk(str(tmp_path / "naruto"))  # fmt: skip
    folder = tmp_path / "mine"
    save(folder / "m.png", seed=30, caption="mine")
    work = tmp_path / "work"
    entries = [{"hf_dataset": str(tmp_path / "naruto"), "num_repeats": 4, "activation_token": "nrt",
                "underscores_to_spaces": True, "caption_dropout_rate": 0.5}, {"path": str(folder)}]  # fmt: skip
    scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))
    rows, meta = manifest(work)
    assert sorted(rows) == ["mine/m.png", "naruto/train/0", "naruto/train/1", "naruto/train/2"]
    assert [rows[f"naruto/train/{i}"]["caption"] for i in range(3)] == ["nrt, long hair, c", "nrt, c", "nrt"]
    assert {rows[f"naruto/train/{i}"]["repeats"] for i in range(3)} == {4}
    assert rows["naruto/train/0"]["caption_dropout"] == 0.5 and rows["naruto/train/0"]["keep_tokens"] == 1
    assert rows["naruto/train/0"]["source"].startswith("naruto/") and rows["naruto/train/0"]["source"].endswith("#0")
    assert rows["mine/m.png"]["repeats"] == 1 and rows["mine/m.png"]["keep_tokens"] is None
    assert [d["kind"] for d in meta["source"]["datasets"]] == ["hf_dataset", "folder"]
    ok, pixels = read_manifest(work)
    for row in ok:
        image, why = pixels.try_open(row)
        assert why is None and image is not None
    assert content_id(open_source(meta["source"], rows["naruto/train/2"]["source"]).read()) == \
        content_id(cells[2]["bytes"])  # fmt: skip
    seen: list[str] = []
    real = images.probe_task
    monkeypatch.setattr(images, "probe_task", lambda task, **kw: seen.append(task[0]) or real(task, **kw))
    again = scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))
    assert again["read"] == 0 and again["reused"] == 4 and seen == []


# ── rescans ──────────────────────────────────────────────────────────────────────────────────


def test_rescan_reuses_rows_and_rereads_changed_captions(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_folders
    work = tmp_path / "work"
    entries = two_entries(a, b)
    assert scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))["read"] == 7
    second = scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))
    assert (second["read"], second["reused"]) == (0, 7)

    entries[0]["caption_extension"] = ".txt"  # alpha's captions now come from .txt files
    entries[1]["class_tokens"] = "sks cat"
    save(b / "new.png", seed=40, caption="night")
    st = (b / "img.png").stat()
    os.utime(b / "img.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))
    assert (third["read"], third["reused"]) == (2, 6)
    rows, _ = manifest(work)
    assert rows["alpha/img.png"]["caption"] == "ohwx, not the caption: wrong extension"
    assert rows["alpha/b.png"]["caption"] == "ohwx" and "caption_missing" in rows["alpha/b.png"]["flags"]
    assert rows["beta/new.png"]["caption"] == "sks cat, night"
    assert rows["beta/5_extra/q.png"]["caption"] == "sks cat, extra"
    assert "caption_from_folder" in rows["beta/5_extra/q.png"]["flags"]

    entries[1]["path"] = str(a)  # beta now points elsewhere: its rows are not trusted
    del entries[1]["image_dir"]
    fourth = scan.run(ScanConfig(datasets=entries, out=work, workers=1, min_side=32))
    assert fourth["read"] == 5 and fourth["reused"] == 5


# ── the command line and dataset config files ────────────────────────────────────────────────


def test_datasets_and_data_dir_exclude_each_other(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_folders
    listing = tmp_path / "datasets.yaml"
    listing.write_text(json.dumps({"datasets": two_entries(a, b)}))
    code, out = run_cli(str(a), "--dataset-config", str(listing), "--out", str(tmp_path / "w"))
    assert code == 2 and "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "exactly one input" in lines[0]
    assert "DATA_DIR and a datasets: list" in lines[0]
    assert not (tmp_path / "w" / "manifest.parquet").exists()


def test_datasets_from_a_config_file_and_from_dataset_config(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_folders
    conf = tmp_path / "scan.yaml"
    conf.write_text(json.dumps({"datasets": two_entries(a, b), "out": str(tmp_path / "w1")}))
    code, out = run_cli("--config", str(conf))
    assert code == 0, out
    one, _ = manifest(tmp_path / "w1")
    assert "datasets (samples per epoch = ok × repeats)" in out and "21" in out
    listing = tmp_path / "datasets.toml"
    listing.write_text(f'[[datasets]]\npath = "{a}"\nnum_repeats = 3\ncaption_extension = ".caption"\n'
                       f'keep_tokens = 2\nactivation_token = "ohwx"\ncaption_dropout_rate = 0.25\n'
                       f'[[datasets]]\nimage_dir = "{b}"\nclass_tokens = "sks dog"\n')  # fmt: skip
    code, out = run_cli("--dataset-config", str(listing), "--out", str(tmp_path / "w2"))
    assert code == 0, out
    two, _ = manifest(tmp_path / "w2")
    strip = ("mtime_ns", "caption_mtime_ns")
    assert {p: {k: v for k, v in r.items() if k not in strip} for p, r in one.items()} == \
        {p: {k: v for k, v in r.items() if k not in strip} for p, r in two.items()}  # fmt: skip


def test_kohya_dataset_toml(tmp_path: Path) -> None:
    hoge, fuga = tmp_path / "hoge", tmp_path / "fuga"
    save(hoge / "a.png", seed=1, caption="smile")
    save(hoge / "b.png", seed=2)  # no caption: class_tokens becomes its caption
    save(fuga / "5_name" / "c.png", seed=3, caption="solo", ext=".caption")  # N_name ignored, as kohya does
    toml = tmp_path / "kohya.toml"
    toml.write_text(f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '{fuga}'
  caption_extension = '.caption'
  caption_dropout_rate = 0.5
""")
    work = tmp_path / "work"
    code, out = run_cli("--dataset-config", str(toml), "--out", str(work))
    assert code == 0, out
    rows, _ = manifest(work)
    got = {p: (r["repeats"], r["keep_tokens"], r["caption_dropout"], r["caption"]) for p, r in rows.items()}
    assert got == {"hoge/a.png": (10, 2, None, "hoge girl, smile"), "hoge/b.png": (10, 2, None, "hoge girl"),
                   "fuga/5_name/c.png": (1, 2, 0.5, "solo")}  # fmt: skip
    text = " ".join(out.split())
    assert "batch_size, resolution, shuffle_caption" in text


@pytest.mark.parametrize(("subset", "expected"), [
    ("is_reg = true", "is_reg is not supported"),
    ("metadata_file = 'md.json'", "metadata_file is not supported"),
    ("num_repeat = 3", "did you mean 'num_repeats'"),
    ("num_repeats = 0", "num_repeats"),
])  # fmt: skip
def test_kohya_toml_errors_are_one_line(tmp_path: Path, subset: str, expected: str) -> None:
    save(tmp_path / "img" / "a.png")
    toml = tmp_path / "kohya.toml"
    toml.write_text(f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n  {subset}\n")
    code, out = run_cli("--dataset-config", str(toml), "--out", str(tmp_path / "w"))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0] and str(toml) in lines[0], out


@pytest.mark.parametrize(("entries", "expected"), [
    ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], "named 'x'"),
    ([{"path": "a", "hf_dataset": "b"}], "exactly one of path"),
    ([{"path": "a", "image_dir": "b"}], "not both"),
    ([{"path": "a", "caption_extension": "txt"}], "must look like '.txt'"),
    ([{"path": "a", "name": "a/b"}], "one folder-like word"),
    ([{"hf_dataset": "a", "caption_extension": ".txt"}], "only applies to a folder"),
    ([{"path": "a", "num_repeat": 3}], "did you mean 'datasets.num_repeats'"),
])  # fmt: skip
def test_bad_entries_are_refused(tmp_path: Path, entries: list[dict], expected: str) -> None:
    conf = tmp_path / "scan.yaml"
    conf.write_text(json.dumps({"datasets": entries, "out": str(tmp_path / "w")}))
    code, out = run_cli("--config", str(conf))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], out


def test_dataset_config_names_the_entry_and_the_key(tmp_path: Path) -> None:
    listing = tmp_path / "datasets.yaml"
    listing.write_text("datasets:\n  - path: a\n  - path: b\n    keep_token: 1\n")
    code, out = run_cli("--dataset-config", str(listing), "--out", str(tmp_path / "w"))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert "datasets entry 2 (b): unknown key 'keep_token' — did you mean 'keep_tokens'?" in lines[0]
