"""NovelAI's bucket algorithm (diffusion-facts.md), nearest-log-aspect assignment and folding."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from sdxl_trainer.config import BucketConfig
from sdxl_trainer.prep.buckets import assign_buckets, bucket_rows, fold_buckets, make_buckets, nearest_bucket

SD1 = dict(max_area=768 * 512, step=64, min_side=256, max_side=1024, base=512)  # NovelAI's SD1 parameters
SDXL = dict(max_area=1024 * 1024, step=64, min_side=512, max_side=2048, base=1024)


def test_novelai_sd1_parameters_give_19_buckets() -> None:
    b = make_buckets(**SD1)
    assert len(b) == 19
    assert (512, 512) in b and (768, 512) in b and (512, 768) in b and (256, 1024) in b and (1024, 256) in b


def test_sdxl_analogue_gives_33_buckets() -> None:
    b = make_buckets(**SDXL)
    assert len(b) == 33
    for must in [(832, 1216), (1216, 832), (512, 2048), (2048, 512), (1024, 1024)]:
        assert must in b


def test_default_bucket_config_is_the_sdxl_analogue() -> None:
    c = BucketConfig()
    assert make_buckets(max_area=c.max_area, step=c.step, min_side=c.min_side, max_side=c.max_side,
                        base=c.base) == make_buckets(**SDXL)  # fmt: skip


@pytest.mark.parametrize("params", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_every_bucket_obeys_the_rules(params: dict) -> None:
    buckets = make_buckets(**params)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % params["step"] == 0 and h % params["step"] == 0
        assert params["min_side"] <= min(w, h) and max(w, h) <= params["max_side"]
        assert w * h <= params["max_area"]
        assert (h, w) in buckets  # the swapped pair is always there
        # one side is the largest multiple of step that fits beside the other (or the side limit)
        def maximal(a: int, b: int) -> bool:
            return b == params["max_side"] or a * (b + params["step"]) > params["max_area"]

        assert maximal(w, h) or maximal(h, w) or w == h == params["base"]
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)


def test_nearest_log_aspect_assignment() -> None:
    b = make_buckets(**SDXL)
    assert nearest_bucket(1920, 1080, b) == (1344, 768)  # 16:9 = 1.778, nearest is 1.75
    assert nearest_bucket(1080, 1920, b) == (768, 1344)
    assert nearest_bucket(300, 300, b) == (1024, 1024)
    assert nearest_bucket(100, 1000, b) == (512, 2048)  # beyond the most extreme bucket: clamp to it
    assert nearest_bucket(4000, 1000, b) == (2048, 512)
    # against a brute-force search in log-aspect space
    for w, h in [(1000, 1500), (1234, 567), (640, 480), (5000, 3000)]:
        la = math.log(w / h)
        best = min(abs(math.log(bw / bh) - la) for bw, bh in b)
        bw, bh = nearest_bucket(w, h, b)
        assert abs(math.log(bw / bh) - la) == pytest.approx(best)


def test_ties_go_to_the_larger_bucket() -> None:
    # (1280, 768) and (1344, 768) are 1.667 and 1.75; an image between them at equal log distance
    buckets = [(1280, 768), (1344, 768)]
    r = math.sqrt((1280 / 768) * (1344 / 768))
    assert nearest_bucket(int(round(r * 100000)), 100000, buckets) == (1344, 768)


def test_assign_buckets_matches_nearest_bucket() -> None:
    b = make_buckets(**SD1)
    sizes = [(512, 512), (800, 400), (800, 400), (300, 900)]
    assert assign_buckets(sizes, b) == [nearest_bucket(w, h, b) for w, h in sizes]


def test_fold_small_buckets_into_nearest_used_neighbour() -> None:
    counts = Counter({(1024, 1024): 50, (1088, 960): 1, (1216, 832): 30, (2048, 512): 2})
    fold = fold_buckets(counts, fold_below=5)
    assert fold[(1088, 960)] == (1024, 1024)  # nearest used neighbour by log aspect
    assert fold[(2048, 512)] == (1216, 832)  # the only wider used bucket
    assert fold[(1024, 1024)] == (1024, 1024) and fold[(1216, 832)] == (1216, 832)
    assert fold_buckets(counts, fold_below=0) == {b: b for b in counts}


def test_fold_cascades_until_every_bucket_is_big_enough() -> None:
    counts = Counter({(512, 2048): 1, (576, 1792): 1, (640, 1600): 1, (1024, 1024): 10})
    fold = fold_buckets(counts, fold_below=3)
    final = Counter()
    for b, n in counts.items():
        final[fold[b]] += n
    assert all(n >= 3 for n in final.values())
    assert sum(final.values()) == 13
    assert len(final) == 2  # the three tall ones (3 images together) merge, then stay


def test_fold_keeps_a_single_bucket_even_when_small() -> None:
    assert fold_buckets(Counter({(1024, 1024): 2}), fold_below=10) == {(1024, 1024): (1024, 1024)}


def test_bucket_rows_sets_columns_flags_and_histogram() -> None:
    rows = [
        {"status": "ok", "width": 2000, "height": 2000, "flags": []},
        {"status": "ok", "width": 500, "height": 500, "flags": []},
        {"status": "skipped", "width": 10, "height": 10, "flags": []},
        {"status": "ok", "width": 2100, "height": 1000, "flags": []},
    ]
    hist, folds = bucket_rows(rows, buckets=make_buckets(**SDXL), fold_below=2)
    assert (rows[0]["bucket_width"], rows[0]["bucket_height"]) == (1024, 1024)
    assert rows[1]["flags"] == ["upscale_needed"] and rows[0]["flags"] == []
    assert "bucket_width" not in rows[2]
    assert (rows[3]["bucket_width"], rows[3]["bucket_height"]) == (1024, 1024)  # folded: alone in its bucket
    assert folds == {"1472x704": "1024x1024"}
    assert hist == Counter({(1024, 1024): 3})


def test_bucket_config_rejects_impossible_parameters() -> None:
    with pytest.raises(ValueError, match="no bucket fits"):
        BucketConfig(min_side=2048, max_side=2048, max_area=1024 * 1024)
    with pytest.raises(ValueError, match="multiple of step"):
        BucketConfig(min_side=500)
