"""Aspect-ratio buckets: NovelAI's published algorithm, nearest-log-aspect assignment, folding.

NovelAI (diffusion-facts.md, "Aspect-ratio buckets"): walk the width w from ``min_side`` upward in
``step``s; for each w take the largest h (a multiple of ``step``) with w·h ≤ ``max_area`` and
h ≤ ``max_side``; add (w, h) and the swapped (h, w); add the square ``base``; dedupe. NovelAI's SD1
parameters give 19 buckets, the SDXL analogue (the defaults here) 33.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

Bucket = tuple[int, int]  # (width, height)


def make_buckets(*, max_area: int, step: int, min_side: int, max_side: int, base: int) -> list[Bucket]:
    """NovelAI's bucket list, sorted by aspect ratio (tallest first), then by area."""
    found: set[Bucket] = set()
    w = min_side
    # NovelAI's loop stops once even the shortest height no longer fits the area budget.
    while w <= max_side and w * min_side <= max_area:
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            found.add((w, h))
            found.add((h, w))
        w += step
    if base * base <= max_area:
        found.add((base, base))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def log_aspect(width: int, height: int) -> float:
    """ln(w/h): distances in this space treat 2:1 and 1:2 alike."""
    return math.log(width / height)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket of nearest log aspect ratio; ties go to the larger bucket (less upscaling)."""
    la = log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(log_aspect(*b) - la), -b[0] * b[1], b))


def assign_buckets(sizes: Iterable[tuple[int, int]], buckets: Sequence[Bucket]) -> list[Bucket]:
    """Bucket for each (width, height), memoised on the exact size (datasets repeat sizes a lot)."""
    memo: dict[tuple[int, int], Bucket] = {}
    out = []
    for size in sizes:
        if size not in memo:
            memo[size] = nearest_bucket(size[0], size[1], buckets)
        out.append(memo[size])
    return out


def fold_buckets(counts: Counter[Bucket] | dict[Bucket, int], *, fold_below: int) -> dict[Bucket, Bucket]:
    """Map each used bucket to the bucket its images end up in after folding small buckets.

    Repeatedly the smallest used bucket with fewer than ``fold_below`` images is merged into the used
    bucket of nearest log aspect ratio (an empty neighbour would only move the problem), until every
    used bucket holds at least ``fold_below`` images or only one is left. Deterministic: ties break
    on the bucket itself.
    """
    live: dict[Bucket, int] = {b: n for b, n in counts.items() if n > 0}
    target: dict[Bucket, Bucket] = {b: b for b in live}
    while len(live) > 1:
        small = min(live, key=lambda b: (live[b], b))
        if live[small] >= fold_below:
            break
        la = log_aspect(*small)
        into = min(
            (b for b in live if b != small),
            key=lambda b: (abs(log_aspect(*b) - la), -live[b], b),
        )
        live[into] += live.pop(small)
        for b, t in target.items():
            if t == small:
                target[b] = into
    return target


def bucket_label(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def bucket_rows(rows: list[dict], *, buckets: Sequence[Bucket], fold_below: int) -> tuple[Counter, dict[str, str]]:
    """Set ``bucket_width``/``bucket_height`` on the ok manifest rows (flagging ``upscale_needed``
    where the image is smaller than its bucket); returns the histogram and the folds made."""
    ok = [r for r in rows if r["status"] == "ok"]
    first = assign_buckets(((r["width"], r["height"]) for r in ok), buckets)
    fold = fold_buckets(Counter(first), fold_below=fold_below)
    hist: Counter = Counter()
    for row, bucket in zip(ok, first):
        bw, bh = fold[bucket]
        row.update(bucket_width=bw, bucket_height=bh)
        hist[(bw, bh)] += 1
        if max(bw / row["width"], bh / row["height"]) > 1:
            row["flags"].append("upscale_needed")
    return hist, {bucket_label(s): bucket_label(t) for s, t in fold.items() if s != t}
