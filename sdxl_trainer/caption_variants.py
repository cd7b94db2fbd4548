"""Caption variants: N prompts per image, a pure function of (seed, image id, variant index).

Cached text embeddings freeze the prompt, so per-step tag shuffle and dropout are impossible;
instead each image gets N variants built here and the trainer picks one per step. The same
functions serve the trainer's on-the-fly text mode, so this module stays pure: no torch, no I/O,
no global RNG. docs/caption-variants.md explains every step and default.

Vocabulary (the manifest's columns): *tags* is the ``tags`` list; the *caption* is natural-language
text, which is the ``caption`` column only when ``caption_kind == "caption"`` — for a tag sidecar the
``caption`` column is just the tag string again. :func:`variant_inputs` makes that mapping.
"""

from __future__ import annotations

import hashlib
import math
import random

from sdxl_trainer.config import CaptionVariantsConfig
from sdxl_trainer.errors import UserError

TAG_SEPARATOR = ", "
# How often make_variants re-draws a tag arrangement that repeats an earlier variant before it
# accepts the repeat (few tags leave few distinct arrangements; some images have only one).
_MAX_ATTEMPTS = 16


def tag_key(tag: str) -> str:
    """The form tags are compared in: case-folded, "_" read as " ", outer whitespace removed."""
    return tag.replace("_", " ").strip().casefold()


def variant_inputs(
    *, tags: list[str] | None, caption: str | None, caption_kind: str | None
) -> tuple[list[str], str | None]:
    """Map a manifest row's (tags, caption, caption_kind) to make_variants' (tags, caption)."""
    tags = [t for t in (tags or []) if t and t.strip()]
    if caption_kind == "caption":
        text = (caption or "").strip()
        return tags, text or None
    if caption_kind in ("tags", "none", None):
        # A tag sidecar's caption column repeats the tags as one string: the list already carries it.
        return tags, None
    raise UserError(
        f"unknown caption_kind {caption_kind!r} (expected tags, caption or none)",
        where="manifest.parquet",
        fix="re-run `sdxl prep scan` with this version",
    )


def with_keep_tokens(cfg: CaptionVariantsConfig, keep_tokens: int | None) -> CaptionVariantsConfig:
    """``cfg`` with an image's own ``keep_tokens`` (the manifest column, per dataset entry) as ``keep_first``;
    ``cfg`` itself when the image has none (null) or the same value."""
    if keep_tokens is None or keep_tokens == cfg.keep_first:
        return cfg
    if keep_tokens < 0:
        raise UserError(f"keep_tokens={keep_tokens} must be ≥ 0", where="manifest.parquet",
                        fix="fix the dataset's keep_tokens and re-run `sdxl prep scan`")  # fmt: skip
    return cfg.model_copy(update={"keep_first": int(keep_tokens)})


def variant_rng(*, seed: int, image_id: str, index: int, stream: str) -> random.Random:
    """A private generator for one (seed, image, variant, purpose), equal in every process.

    Seeded with an integer from blake2b, not hash() (salted per process) and not the global RNG.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{image_id}\x1f{index}\x1f{stream}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _below(rng: random.Random, n: int) -> int:
    # Only Random.random() is promised to stay the same across Python versions (shuffle, sample and
    # randrange are not), and a cache built on one Python may be trained on another.
    return min(int(rng.random() * n), n - 1)


def _shuffle(rng: random.Random, items: list) -> None:
    for i in range(len(items) - 1, 0, -1):  # Fisher–Yates
        j = _below(rng, i + 1)
        items[i], items[j] = items[j], items[i]


def _fixed_mask(tags: list[str], cfg: CaptionVariantsConfig) -> list[bool]:
    keep = {tag_key(t) for t in cfg.keep_tags}
    return [i < cfg.keep_first or tag_key(t) in keep for i, t in enumerate(tags)]


def _kept_count(*, n_free: int, n_fixed: int, rng: random.Random, cfg: CaptionVariantsConfig) -> int:
    """How many free tags survive dropout: uniform between the dropout floor and all of them."""
    low = math.ceil(n_free * (1.0 - cfg.max_dropout) - 1e-9)
    low = min(n_free, max(low, cfg.min_kept - n_fixed, 0))
    return low + _below(rng, n_free - low + 1)


def arrange_tags(tags: list[str], *, rng: random.Random, cfg: CaptionVariantsConfig) -> list[str]:
    """Drop, then shuffle, the free tags; kept tags (first K, keep list) stay in their slots.

    Dropout removes a random subset of the free tags; the survivors are then permuted among the
    free slots that remain, so a kept tag never moves relative to the other kept tags.
    """
    fixed = _fixed_mask(tags, cfg)
    free_idx = [i for i, f in enumerate(fixed) if not f]
    k = _kept_count(n_free=len(free_idx), n_fixed=len(tags) - len(free_idx), rng=rng, cfg=cfg)
    order = list(free_idx)
    _shuffle(rng, order)  # a random subset: the first k of a random permutation
    survivors = set(order[:k])
    slots = [i for i in range(len(tags)) if fixed[i] or i in survivors]
    free_tags = [tags[i] for i in slots if not fixed[i]]
    if cfg.shuffle:
        _shuffle(rng, free_tags)
    it = iter(free_tags)
    return [tags[i] if fixed[i] else next(it) for i in slots]


def _with_quality(body: str, *, present: list[str], quality: bool, cfg: CaptionVariantsConfig) -> str:
    """Add the quality tags the text does not already carry, before or after it."""
    have = {tag_key(t) for t in present}
    extra = [q for q in cfg.quality_tags if tag_key(q) not in have] if quality else []
    parts = [*extra, body] if cfg.quality_position == "prepend" else [body, *extra]
    return TAG_SEPARATOR.join(p for p in parts if p)


def _draw(
    *,
    tags: list[str],
    caption: str | None,
    seed: int,
    image_id: str,
    index: int,
    attempt: int,
    cfg: CaptionVariantsConfig,
) -> tuple[str, bool]:
    """One random variant and whether it is the caption (True) or a tag string (False)."""
    # Mode and quality come from a stream that ignores `attempt`: re-drawing a repeat must not tilt
    # the caption/tags split (every caption-mode variant of an image is the same string).
    mode_rng = variant_rng(seed=seed, image_id=image_id, index=index, stream="mode")
    use_caption = caption is not None and (not tags or mode_rng.random() < cfg.caption_prob)
    quality = mode_rng.random() < cfg.quality_prob
    if use_caption:
        return _with_quality(caption, present=[], quality=quality, cfg=cfg), True
    rng = variant_rng(seed=seed, image_id=image_id, index=index, stream=f"tags/{attempt}")
    arranged = arrange_tags(tags, rng=rng, cfg=cfg)
    return _with_quality(TAG_SEPARATOR.join(arranged), present=arranged, quality=quality, cfg=cfg), False


def _clean(tags: list[str] | None, caption: str | None) -> tuple[list[str], str | None]:
    tags = [t.strip() for t in (tags or []) if t and t.strip()]
    return tags, (caption.strip() or None) if caption else None


def unaltered(*, tags: list[str], caption: str | None, cfg: CaptionVariantsConfig) -> str:
    """The sidecar text as written: the caption when there is one, else the tags in their order.

    Quality tags are added (always): they describe the image, not the augmentation.
    """
    tags, caption = _clean(tags, caption)
    if caption is not None:
        return _with_quality(caption, present=[], quality=True, cfg=cfg)
    return _with_quality(TAG_SEPARATOR.join(tags), present=tags, quality=True, cfg=cfg)


def make_variant(
    *, tags: list[str], caption: str | None, seed: int, image_id: str, index: int, cfg: CaptionVariantsConfig
) -> str:
    """One variant, drawn independently per index (the on-the-fly text mode's call, e.g. index = epoch).

    Unlike make_variants it does not avoid repeating another index's variant.
    """
    if index < 0:
        raise ValueError(f"index={index}: variant indices start at 0")
    tags, caption = _clean(tags, caption)
    if index == 0 and cfg.first_unaltered:
        return unaltered(tags=tags, caption=caption, cfg=cfg)
    return _draw(tags=tags, caption=caption, seed=seed, image_id=image_id, index=index, attempt=0, cfg=cfg)[0]


def make_variants(
    *, tags: list[str], caption: str | None, n: int, seed: int, image_id: str, cfg: CaptionVariantsConfig
) -> list[str]:
    """``n`` caption variants for one image, distinct where the tags allow.

    Variant ``i`` depends only on (seed, image_id, i) and the variants before it, so it is the same
    for every ``n > i``, in any process and in any order images are visited. A tag-mode variant
    that repeats an earlier one is re-drawn up to 16 times; caption-mode variants may repeat.
    """
    if n < 1:
        raise ValueError(f"n={n}: at least one variant is needed")
    tags, caption = _clean(tags, caption)
    out: list[str] = []
    for i in range(n):
        if i == 0 and cfg.first_unaltered:
            out.append(unaltered(tags=tags, caption=caption, cfg=cfg))
            continue
        for attempt in range(_MAX_ATTEMPTS):
            text, is_caption = _draw(
                tags=tags, caption=caption, seed=seed, image_id=image_id, index=i, attempt=attempt, cfg=cfg
            )
            if is_caption or text not in out:
                break
        out.append(text)
    return out
