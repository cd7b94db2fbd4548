"""`sdxl prep weights`: tag-frequency loss weights (docs/tag-weights.md)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sdxl_trainer.config import WeightsConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.prep import weights
from sdxl_trainer.schema import (
    MANIFEST_SCHEMA,
    TAG_STATS_SCHEMA,
    TAG_WEIGHTS_SCHEMA,
    read_table,
    write_table,
)


def write_manifest(work: Path, rows: list[dict]) -> Path:
    """A manifest with the given id/status/tags; every other column null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in MANIFEST_SCHEMA}
    work.mkdir(parents=True, exist_ok=True)
    write_table(pa.table(cols, schema=MANIFEST_SCHEMA), work / "manifest.parquet", artifact="manifest", config={})
    return work


def ok(i: int, tags: list[str] | None, status: str = "ok") -> dict:
    return {"id": f"img{i:05d}", "status": status, "tags": tags}


def zipf_rows(n: int = 600, seed: int = 0) -> list[dict]:
    """Images with a few tags drawn from a long-tailed vocabulary, some untagged, some skipped."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(0, 8)
        tags = [f"t{min(int(rng.paretovariate(0.9)), 80)}" for _ in range(k)]
        rows.append(ok(i, tags, "ok" if i % 40 else "skipped"))
    return rows


def run(work: Path, **kw) -> dict:
    return weights.run(WeightsConfig(work=work, **kw))


def load_weights(work: Path) -> dict[str, float]:
    table, _ = read_table(work / "tag_weights.parquet", artifact="tag_weights", produced_by="sdxl prep weights")
    return dict(zip(table["id"].to_pylist(), table["weight"].to_pylist()))


def load_stats(work: Path) -> dict[str, dict]:
    table, _ = read_table(work / "tag_stats.parquet", artifact="tag_stats", produced_by="sdxl prep weights")
    return {r["tag"]: r for r in table.to_pylist()}


def common_and_rare(work: Path, extra: list[dict] = ()) -> Path:
    """90 images tagged only 'common', 10 only 'rare': reference count 90, w_rare = 3 at alpha 0.5."""
    rows = [ok(i, ["common"]) for i in range(90)] + [ok(100 + i, ["rare"]) for i in range(10)]
    return write_manifest(work, rows + list(extra))


@pytest.mark.parametrize("combine", ["geometric", "arithmetic", "max"])
def test_mean_is_one(tmp_path: Path, combine: str) -> None:
    run(write_manifest(tmp_path, zipf_rows()), min_count=3, combine=combine)
    w = np.array(list(load_weights(tmp_path).values()))
    assert abs(math.fsum(w) / len(w) - 1.0) < 1e-12
    assert w.min() < 0.95 and w.max() > 1.05  # the weights are not all 1, so the mean test has teeth


def test_rare_tags_weigh_more_closed_form(tmp_path: Path) -> None:
    summary = run(common_and_rare(tmp_path), min_count=5)
    w = load_weights(tmp_path)
    common, rare = w["img00000"], w["img00100"]
    assert rare > common
    assert rare / common == pytest.approx(3.0, rel=1e-12)  # (10 / 90) ** -0.5
    assert common == pytest.approx(1.0 / 1.2, rel=1e-12)  # raw mean (90·1 + 10·3) / 100 = 1.2
    assert summary["reference_count"] == 90
    stats = load_stats(tmp_path)
    assert stats["rare"]["weight"] == pytest.approx(3.0) and stats["common"]["weight"] == pytest.approx(1.0)
    assert stats["rare"]["effective_count"] == pytest.approx(10 * rare)


R = math.sqrt(91 / 11)  # w_rare / w_common once one image carries both (counts 91 and 11)


@pytest.mark.parametrize(
    ("combine", "expected"), [("geometric", math.sqrt(R)), ("arithmetic", (1 + R) / 2), ("max", R)]
)
def test_combine_modes(tmp_path: Path, combine: str, expected: float) -> None:
    run(common_and_rare(tmp_path, [ok(500, ["common", "rare"])]), min_count=5, combine=combine)
    w = load_weights(tmp_path)
    assert w["img00500"] / w["img00000"] == pytest.approx(expected, rel=1e-12)
    assert w["img00100"] / w["img00000"] == pytest.approx(R, rel=1e-12)


def test_clipping(tmp_path: Path) -> None:
    run(write_manifest(tmp_path, zipf_rows()), min_count=2, alpha=2.0, clip_min=0.5, clip_max=2.0)
    stats = [r for r in load_stats(tmp_path).values() if r["role"] == "counted"]
    tag_w = [r["weight"] for r in stats]
    assert min(tag_w) == pytest.approx(0.5) and max(tag_w) == pytest.approx(2.0)  # alpha 2 saturates both ends
    w = [v for v in load_weights(tmp_path).values() if v != 1.0]
    assert max(w) / min(w) <= 2.0 / 0.5 + 1e-9  # image weights are means of clipped tag weights

    common_and_rare(tmp_path / "b")
    run(tmp_path / "b", min_count=5, alpha=2.0, clip_max=4.0)  # unclipped ratio would be 81
    w = load_weights(tmp_path / "b")
    assert w["img00100"] / w["img00000"] == pytest.approx(4.0, rel=1e-12)


def test_deterministic_and_independent_of_row_order(tmp_path: Path) -> None:
    rows = zipf_rows(seed=3)
    run(write_manifest(tmp_path / "a", rows), min_count=3)
    run(write_manifest(tmp_path / "b", rows), min_count=3)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    run(write_manifest(tmp_path / "c", shuffled), min_count=3)
    a, b, c = (load_weights(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] == pytest.approx(c[k], rel=1e-12) for k in a)
    assert load_stats(tmp_path / "a") == load_stats(tmp_path / "b")


def test_untagged_ignored_and_rare_only_images_are_neutral(tmp_path: Path) -> None:
    extra = [ok(900, []), ok(901, None), ok(902, ["masterpiece", "rating:explicit"]), ok(903, ["once"])]
    extra += [ok(904, ["Best_Quality", "   ", "common"])]
    run(common_and_rare(tmp_path, extra), min_count=5)
    w = load_weights(tmp_path)
    for i in (900, 901, 902, 903):
        assert w[f"img{i:05d}"] == 1.0
    assert w["img00904"] == w["img00000"] != 1.0  # quality tag and blank tag leave it a common-only image
    assert abs(math.fsum(w.values()) / len(w) - 1.0) < 1e-12
    stats = load_stats(tmp_path)
    assert stats["masterpiece"]["role"] == "ignored" and stats["rating:explicit"]["role"] == "ignored"
    assert stats["Best_Quality"]["role"] == "ignored" and stats["once"]["role"] == "rare"
    assert stats["once"]["weight"] is None and "   " not in stats and "" not in stats


def test_ignore_list_is_configurable(tmp_path: Path) -> None:
    run(common_and_rare(tmp_path), min_count=5, ignore_tags=["rare"])
    w = load_weights(tmp_path)
    assert w["img00100"] == 1.0 and w["img00000"] == 1.0  # only 'common' counts: every weighed image equal


def test_all_neutral_dataset(tmp_path: Path) -> None:
    summary = run(write_manifest(tmp_path, [ok(i, ["a"] if i % 2 else []) for i in range(6)]), min_count=5)
    assert set(load_weights(tmp_path).values()) == {1.0}
    assert summary["images_weighed"] == 0 and summary["reference_count"] is None


def test_parquet_round_trip(tmp_path: Path) -> None:
    rows = zipf_rows() + [ok(9000, ["t1", "t1", " t1 "])]  # repeats in one caption count once
    write_manifest(tmp_path, rows)
    summary = run(tmp_path, min_count=3, alpha=0.7)
    table, meta = read_table(tmp_path / "tag_weights.parquet", artifact="tag_weights", produced_by="x")
    assert table.schema.remove_metadata() == TAG_WEIGHTS_SCHEMA
    assert table["id"].to_pylist() == [r["id"] for r in rows if r["status"] == "ok"]
    assert meta["config"]["alpha"] == 0.7 and meta["config"]["min_count"] == 3
    assert meta["scale"] == pytest.approx(summary["scale"])
    stats, _ = read_table(tmp_path / "tag_stats.parquet", artifact="tag_stats", produced_by="x")
    assert stats.schema.remove_metadata() == TAG_STATS_SCHEMA
    expected = sum(1 for r in rows if r["status"] == "ok" and "t1" in [t.strip() for t in r["tags"] or []])
    assert load_stats(tmp_path)["t1"]["count"] == expected
    assert set(stats["role"].to_pylist()) <= {"counted", "ignored", "rare"}
    counts = stats["count"].to_pylist()
    assert counts == sorted(counts, reverse=True)
    n_counted = dict(zip(table["id"].to_pylist(), table["n_counted"].to_pylist()))
    assert n_counted["img09000"] == 1


def test_png_written(tmp_path: Path) -> None:
    summary = run(write_manifest(tmp_path, zipf_rows()), min_count=3)
    png = Path(summary["paths"]["tag_weights.png"])
    assert png == tmp_path / "tag_weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_lists_lifted_tag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run(common_and_rare(tmp_path), min_count=5, show=1)
    err = capsys.readouterr().err
    assert "most lifted tags" in err and "most attenuated tags" in err
    lifted = err.split("most lifted tags")[1].split("tag weights")[0]
    assert "rare" in lifted and "common" not in lifted


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest not found"):
        run(tmp_path)


def test_no_ok_rows(tmp_path: Path) -> None:
    write_manifest(tmp_path, [ok(i, ["a"], "skipped") for i in range(3)])
    with pytest.raises(UserError, match="no images with status ok"):
        run(tmp_path)


def test_repeated_ok_ids(tmp_path: Path) -> None:
    write_manifest(tmp_path, [ok(1, ["a"]), ok(1, ["b"])])
    with pytest.raises(UserError, match="repeated ids"):
        run(tmp_path)


def test_config_rejects_inverted_clip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clip_min"):
        WeightsConfig(work=tmp_path, clip_min=2.0, clip_max=1.0)
