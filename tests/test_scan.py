"""`prep scan` on folders: one row per image file, bad files with reasons, duplicates, outputs, rescans."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdxl_trainer.config import BucketConfig, ScanConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import images, scan
from sdxl_trainer.prep.hf_source import open_source
from sdxl_trainer.prep.images import content_id, open_rgb
from sdxl_trainer.schema import MANIFEST_SCHEMA, read_json, read_table


def save(path: Path, size=(96, 64), seed=0, fmt=None, caption: str | bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    if caption is not None:
        side = path.with_suffix(".txt")
        side.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return path


def config(data: Path, work: Path, **kw) -> ScanConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("min_side", 32)
    return ScanConfig(data_dir=data, out=work, **kw)


def manifest(work: Path) -> dict[str, dict]:
    table, _ = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    return {r["path"]: r for r in table.to_pylist()}


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """A folder with good images and one of every bad kind."""
    d = tmp_path / "data"
    save(d / "a.jpg", caption="1girl, solo, long_hair")
    save(d / "B.PNG", size=(64, 96), seed=1, caption=b"caf\xe9, smile")
    save(d / "sub" / "c.webp", seed=2, caption="A photo of a cat sitting on a mat.")
    save(d / "sub" / "deep" / "d.bmp", seed=3, caption="   ")
    save(d / "e.tiff", seed=4)  # no sidecar
    shutil.copy(d / "a.jpg", d / "z_copy.jpg")  # same bytes, later path
    shutil.copy(d / "a.jpg", d / "sub" / "a_again.jpeg")
    (d / "empty.png").write_bytes(b"")
    (d / "text.gif").write_text("this is not an image\n" * 10)
    data = (d / "a.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    save(d / "tiny.png", size=(20, 10), seed=5)
    (d / "dangling.jpg").symlink_to(d / "nowhere.jpg")
    os.mkfifo(d / "pipe.png")
    (d / "notes.md").write_text("not an image")
    (d / "orphan.txt").write_text("a caption without an image")
    (d / ".hidden.jpg").write_bytes(data)
    (d / ".git").mkdir()
    save(d / ".git" / "x.png")
    return d


def test_scan_records_every_image_file_with_a_status(messy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    summary = scan.run(config(messy, work))
    rows = manifest(work)
    expected = {"a.jpg", "B.PNG", "sub/c.webp", "sub/deep/d.bmp", "e.tiff", "z_copy.jpg", "sub/a_again.jpeg",
                "empty.png", "text.gif", "cut.jpg", "tiny.png", "dangling.jpg", "pipe.png"}  # fmt: skip
    assert set(rows) == expected  # no .md, no orphan .txt, nothing hidden
    status = {p: r["status"] for p, r in rows.items()}
    assert [p for p, s in sorted(status.items()) if s == "ok"] == ["B.PNG", "a.jpg", "e.tiff", "sub/c.webp",
                                                                     "sub/deep/d.bmp"]  # fmt: skip
    code = {p: r["reason"].split(":")[0] for p, r in rows.items() if r["status"] == "skipped"}
    assert code == {"empty.png": "empty_file", "text.gif": "not_an_image", "cut.jpg": "truncated",
                    "tiny.png": "too_small", "dangling.jpg": "unreadable", "pipe.png": "not_a_file"}  # fmt: skip
    assert summary["files_found"] == len(expected) == summary["ok"] + summary["skipped"] + summary["duplicate"]
    assert (summary["ok"], summary["skipped"], summary["duplicate"]) == (5, 6, 2)
    assert summary["skipped_by_reason"]["truncated"] == 1


def test_duplicates_point_at_the_first_path(messy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    scan.run(config(messy, work))
    rows = manifest(work)
    kept = rows["a.jpg"]
    assert kept["status"] == "ok" and kept["duplicate_of"] is None
    for p in ("sub/a_again.jpeg", "z_copy.jpg"):
        assert rows[p]["status"] == "duplicate"
        assert rows[p]["duplicate_of"] == kept["id"] == rows[p]["id"]
        assert rows[p]["reason"] == "duplicate: same bytes as a.jpg"
        assert rows[p]["bucket_width"] is None
    ok_ids = [r["id"] for r in rows.values() if r["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids))


def test_manifest_columns_captions_and_buckets(messy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    scan.run(config(messy, work, underscores_to_spaces=True))
    table = pq.read_table(work / "manifest.parquet")
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    rows = manifest(work)
    a = rows["a.jpg"]
    assert a["id"] == content_id((messy / "a.jpg").read_bytes())
    assert (a["width"], a["height"], a["format"], a["checked"]) == (96, 64, "JPEG", "decoded")
    assert a["tags"] == ["1girl", "solo", "long hair"] and a["caption_kind"] == "tags"
    assert (a["bucket_width"], a["bucket_height"]) == (1216, 832)  # 1.5 → nearest log aspect 1.46
    assert "upscale_needed" in a["flags"]
    assert rows["B.PNG"]["flags"] == ["caption_non_utf8", "upscale_needed"]
    assert rows["B.PNG"]["tags"] == ["caf\ufffd", "smile"]
    assert rows["sub/c.webp"]["caption_kind"] == "caption"
    assert rows["sub/c.webp"]["caption"] == "A photo of a cat sitting on a mat."
    assert rows["sub/deep/d.bmp"]["caption"] == "" and "caption_empty" in rows["sub/deep/d.bmp"]["flags"]
    assert rows["e.tiff"]["caption"] is None and "caption_missing" in rows["e.tiff"]["flags"]
    assert a["n_chunks"] is None  # no --model


def test_outputs_carry_provenance_source_and_buckets(messy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    summary = scan.run(config(messy, work))
    _, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    assert meta["source"] == {"kind": "folder", "root": str(messy.resolve())}
    assert len(meta["buckets"]) == 33 and [832, 1216] in meta["buckets"]
    assert meta["config"]["min_side"] == 32 and meta["schema_version"] >= 1
    tags, _ = read_table(work / "tags.parquet", artifact="tags", produced_by="sdxl prep scan")
    counts = dict(zip(tags.column("tag").to_pylist(), tags.column("count").to_pylist()))
    assert counts == {"1girl": 1, "solo": 1, "long_hair": 1, "caf\ufffd": 1, "smile": 1}  # ok rows only
    report = read_json(work / "scan_report.json", artifact="scan_report", produced_by="sdxl prep scan")
    assert report["files_found"] == summary["files_found"] == 13
    assert sum(report["buckets"].values()) == report["ok"] == 5


def test_pixels_of_a_row_can_be_opened_from_its_source(messy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    scan.run(config(messy, work))
    _, meta = read_table(work / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    row = manifest(work)["B.PNG"]
    data = open_source(meta["source"], row["source"]).read()
    assert content_id(data) == row["id"]
    assert open_rgb(io.BytesIO(data)).size == (row["width"], row["height"])


def test_fold_buckets_option(tmp_path: Path) -> None:
    d = tmp_path / "data"
    for i in range(4):
        save(d / f"sq{i}.png", size=(64, 64), seed=i)
    save(d / "wide.png", size=(128, 64), seed=9)
    work = tmp_path / "work"
    s = scan.run(config(d, work, buckets=BucketConfig(fold_below=2)))
    assert s["buckets"] == {"1024x1024": 5} and s["folded"] == {"1408x704": "1024x1024"}
    s = scan.run(config(d, work))
    assert s["buckets"] == {"1024x1024": 4, "1408x704": 1} and s["folded"] == {}


def test_work_folder_inside_the_data_folder_is_not_scanned(tmp_path: Path) -> None:
    d = tmp_path / "data"
    save(d / "a.png")
    save(d / "work" / "stray.png", seed=1)  # e.g. a preview someone saved there
    s = scan.run(config(d, d / "work"))
    assert s["files_found"] == 1


def test_bad_data_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data dir not found"):
        scan.run(config(tmp_path / "nope", tmp_path / "work"))
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        scan.run(config(tmp_path / "file.jpg", tmp_path / "work"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files"):
        scan.run(config(tmp_path / "empty", tmp_path / "work"))
    assert not (tmp_path / "work" / "manifest.parquet").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_file(tmp_path: Path) -> None:
    d = tmp_path / "data"
    save(d / "locked.png").chmod(0)
    s = scan.run(config(d, tmp_path / "work"))
    assert manifest(tmp_path / "work")["locked.png"]["reason"] == "unreadable: Permission denied"
    assert s["skipped"] == 1


def test_process_pool_gives_the_same_rows(messy: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "w1", tmp_path / "w2"
    scan.run(config(messy, one))
    s = scan.run(config(messy, two, workers=2))
    assert s["workers"] == 2
    drop = ("mtime_ns",)
    a = {p: {k: v for k, v in r.items() if k not in drop} for p, r in manifest(one).items()}
    b = {p: {k: v for k, v in r.items() if k not in drop} for p, r in manifest(two).items()}
    assert a == b


# ── incremental rescans ───────────────────────────────────────────────────────────────────────


def count_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = images.probe_task

    def spy(task, **options):
        seen.append(task[0])
        return real(task, **options)

    monkeypatch.setattr(images, "probe_task", spy)
    return seen


def test_rescan_reads_only_new_or_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, work = tmp_path / "data", tmp_path / "work"
    for i in range(5):
        save(d / f"{i}.png", seed=i, caption=f"tag{i}")
    first = scan.run(config(d, work))
    ids = {p: r["id"] for p, r in manifest(work).items()}
    assert first["read"] == 5

    seen = count_probes(monkeypatch)
    save(d / "new.png", seed=10)  # added
    st = (d / "1.png").stat()
    os.utime(d / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    (d / "2.txt").write_text("edited, tags")  # caption edited: no image re-read
    os.utime(d / "2.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    second = scan.run(config(d, work))
    assert sorted(seen) == ["1.png", "new.png"]
    assert (second["read"], second["reused"], second["files_found"]) == (2, 4, 6)
    rows = manifest(work)
    assert all(rows[p]["id"] == i for p, i in ids.items())  # ids stable, the touched file's too
    assert rows["2.png"]["tags"] == ["edited", "tags"]
    assert rows["1.png"]["mtime_ns"] == st.st_mtime_ns + 10**9

    seen.clear()
    (d / "3.png").unlink()
    third = scan.run(config(d, work))
    assert seen == [] and third["files_found"] == 5 and "3.png" not in manifest(work)


def test_rescan_keeps_every_flag(messy: Path, tmp_path: Path) -> None:
    save(messy / "dup_tags.png", seed=20, caption="solo,, solo")
    work = tmp_path / "work"
    scan.run(config(messy, work))
    before = {p: r["flags"] for p, r in manifest(work).items()}
    assert before["dup_tags.png"] == ["empty_tags_dropped", "duplicate_tags_dropped", "upscale_needed"]
    assert scan.run(config(messy, work))["read"] == 0
    assert {p: r["flags"] for p, r in manifest(work).items()} == before


def test_a_damaged_previous_manifest_means_a_full_rescan(tmp_path: Path) -> None:
    d, work = tmp_path / "data", tmp_path / "work"
    save(d / "a.png")
    work.mkdir()
    (work / "manifest.parquet").write_bytes(b"PAR1 this is not parquet")
    assert scan.run(config(d, work))["read"] == 1
    assert manifest(work)["a.png"]["status"] == "ok"


def test_rescan_changed_content_gets_a_new_id(tmp_path: Path) -> None:
    d, work = tmp_path / "data", tmp_path / "work"
    save(d / "a.png", seed=0)
    scan.run(config(d, work))
    old = manifest(work)["a.png"]["id"]
    save(d / "a.png", seed=1, size=(100, 64))
    s = scan.run(config(d, work))
    assert s["read"] == 1 and manifest(work)["a.png"]["id"] != old


def test_full_scan_after_fast_scan_rereads_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, work = tmp_path / "data", tmp_path / "work"
    for i in range(3):
        save(d / f"{i}.jpg", seed=i)
    assert scan.run(config(d, work, fast=True))["read"] == 3
    assert {r["checked"] for r in manifest(work).values()} == {"header"}
    assert scan.run(config(d, work, fast=True))["read"] == 0
    assert scan.run(config(d, work))["read"] == 3  # a header check is not a full decode
    assert scan.run(config(d, work, fast=True))["read"] == 0  # a full decode covers --fast
    assert scan.run(config(d, work, min_side=40))["read"] == 3  # a probe option changed


def test_rescan_of_duplicates_is_decided_afresh(tmp_path: Path) -> None:
    d, work = tmp_path / "data", tmp_path / "work"
    save(d / "b.png")
    shutil.copy(d / "b.png", d / "c.png")
    scan.run(config(d, work))
    assert manifest(work)["c.png"]["status"] == "duplicate"
    (d / "b.png").unlink()
    s = scan.run(config(d, work))
    assert manifest(work)["c.png"]["status"] == "ok" and s["read"] == 0
