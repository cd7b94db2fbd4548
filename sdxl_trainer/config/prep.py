"""Configs of the prep stages: scan (and its buckets), stats, cache (and caption variants), weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdxl_trainer.config.base import Precision, Section
from sdxl_trainer.config.datasets import DatasetEntry, name_entries


def parse_resolution(value: Any) -> tuple[int, int]:
    """``1024`` / ``"768"`` / ``"832,1216"`` / ``"832x1216"`` → (width, height)."""
    text = str(value).strip().lower().replace("x", ",").replace(" ", "")
    parts = text.split(",")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) <= 0:
        raise ValueError(f"resolution {value!r} is not a size: give 1024, 768, 512 or W,H such as 832,1216")
    return (sides[0], sides[-1])


def resolution_buckets(value: Any, step: int = 64) -> dict[str, int]:
    """The bucket parameters one ``--resolution`` stands for: the area of W×H (R² for one number),
    the square base √area, sides from base/2 to 2·base, all multiples of ``step``. 1024 gives
    exactly the SDXL defaults (max_area 1024², base 1024, sides 512–2048)."""
    width, height = parse_resolution(value)
    base = math.isqrt(width * height) // step * step
    if base < step:
        raise ValueError(f"resolution {value!r} is smaller than one bucket step ({step} px)")
    return {"max_area": width * height, "base": base, "min_side": max(step, base // 2 // step * step),
            "max_side": 2 * base}


class BucketConfig(Section):
    """NovelAI's aspect-ratio bucket algorithm (diffusion-facts.md), SDXL parameters by default.

    ``resolution`` (``--resolution``) sets max_area, base, min_side and max_side in one value; keys
    given beside it (``--min-bucket-reso``/``--max-bucket-reso`` set min_side/max_side) win.
    """

    resolution: str | None = Field(
        None, description="1024 | 768 | 512 | W,H: sets max_area (W·H), base (√area) and min/max side (base/2, 2·base)"
    )
    max_area: int = Field(1024 * 1024, gt=0, description="largest w·h of a bucket, in pixels")
    step: int = Field(64, gt=0, description="bucket sides are multiples of this (8 = one latent pixel)")
    min_side: int = Field(512, gt=0, description="shortest bucket side walked")
    max_side: int = Field(2048, gt=0, description="longest bucket side allowed")
    base: int = Field(1024, gt=0, description="the square base resolution, always a bucket")
    fold_below: int = Field(0, ge=0, description="fold buckets with fewer images than this into the nearest one")

    @model_validator(mode="before")
    @classmethod
    def _from_resolution(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("resolution") is not None:
            data = dict(data, resolution=str(data["resolution"]))
            step = data.get("step", 64)
            derived = resolution_buckets(data["resolution"], step if isinstance(step, int) and step > 0 else 64)
            data = {**derived, **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _sides(self) -> "BucketConfig":
        for name in ("min_side", "max_side", "base"):
            if getattr(self, name) % self.step:
                raise ValueError(f"buckets.{name}={getattr(self, name)} is not a multiple of step={self.step}")
        if self.step % 8:
            raise ValueError(f"buckets.step={self.step} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.min_side > self.max_side:
            raise ValueError("buckets.min_side must not exceed buckets.max_side")
        if self.min_side * self.min_side > self.max_area:
            raise ValueError(
                f"buckets.min_side={self.min_side} squared exceeds buckets.max_area={self.max_area}: no bucket fits"
            )
        return self


class ScanConfig(Section):
    """`sdxl prep scan`: find, validate and bucket every image; write WORK/manifest.parquet."""

    data_dir: Path | None = Field(None, description="folder tree of images with optional .txt sidecars")
    datasets: list[DatasetEntry] = Field(
        default_factory=list, description="several folders / HF datasets, each with its own repeats and caption "
        "options (docs/datasets.md); instead of data_dir / hf_dataset"
    )
    hf_dataset: Path | None = Field(None, description="a local Hugging Face dataset (save_to_disk folder or Parquet)")
    image_column: str | None = Field(None, description="HF dataset image column (auto-detected when unset)")
    caption_column: str | None = Field(None, description="HF dataset caption column (auto-detected when unset)")
    hf_split: str | None = Field(None, description="HF dataset split (the only one, or 'train', when unset)")
    allow_outside_paths: bool = Field(
        False, description="HF dataset: read image paths outside the dataset folder (../x.jpg, absolute); "
        "otherwise such rows are skipped as outside_dataset"
    )
    out: Path = Field(..., description="work directory that receives manifest.parquet")
    model: Path | None = Field(None, description="SDXL folder whose tokenizer counts caption chunks")
    fast: bool = Field(False, description="read headers only (no full decode check)")
    min_side: int = Field(256, ge=1, description="skip images whose short side is smaller than this")
    max_pixels: int = Field(120_000_000, gt=0, description="skip larger images (decompression bombs) unallocated")
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    underscores_to_spaces: bool = Field(False, description="rewrite tag underscores as spaces")
    folder_repeats: bool = Field(
        True, description="a first-level folder named N_name (10_hopper, 1 ≤ N ≤ 999) repeats its images N times "
        "an epoch; 'name' captions its images that have no sidecar"
    )
    alpha_background: Literal["white", "black"] = Field("white", description="what transparent pixels become")
    max_chunks: int = Field(3, ge=1, description="75-token chunks a caption may use")
    buckets: BucketConfig = Field(default_factory=BucketConfig)

    @model_validator(mode="after")
    def _one_source(self) -> "ScanConfig":
        given = [n for n, v in (("DATA_DIR", self.data_dir), ("--hf-dataset", self.hf_dataset),
                                ("a datasets: list", self.datasets)) if v]  # fmt: skip
        if len(given) != 1:
            what = " and ".join(given) if given else "no input"
            raise ValueError(f"give exactly one input: a DATA_DIR folder, --hf-dataset PATH or a datasets: list "
                             f"(--dataset-config FILE), got {what}")
        if self.datasets:
            top = [k for k in ("image_column", "caption_column", "hf_split") if getattr(self, k) is not None]
            if top:
                raise ValueError(f"with a datasets: list, set {', '.join(top)} in its hf_dataset entry")
            name_entries(self.datasets)
        return self


DEFAULT_IGNORE_TAGS = [
    "masterpiece", "best quality", "high quality", "good quality", "normal quality", "medium quality",
    "low quality", "worst quality", "bad quality", "amazing quality", "very aesthetic", "aesthetic",
    "displeasing", "very displeasing", "highres", "absurdres", "incredibly absurdres", "lowres",
    "general", "sensitive", "questionable", "explicit", "safe", "nsfw", "sfw",
]  # fmt: skip
DEFAULT_IGNORE_PREFIXES = ["rating:", "rating ", "score ", "score:", "year "]


class WeightsConfig(Section):
    """`sdxl prep weights`: tag-frequency loss weights → WORK/tag_weights.parquet (docs/tag-weights.md)."""

    work: Path = Field(..., description="work directory holding manifest.parquet; receives tag_weights.parquet")
    alpha: float = Field(0.5, ge=0, le=4, description="strength: per-tag weight = (count / reference count)^-alpha")
    min_count: int = Field(5, ge=1, description="tags on fewer images than this are left out (too rare to weigh)")
    clip_min: float = Field(0.25, gt=0, description="smallest per-tag weight (most attenuated common tag)")
    clip_max: float = Field(4.0, gt=0, description="largest per-tag weight (most lifted rare tag)")
    combine: Literal["geometric", "arithmetic", "max"] = Field(
        "geometric", description="how an image's tag weights become one weight (geometric = mean of log-weights)"
    )
    ignore_tags: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE_TAGS), description="tags never weighed (quality, rating)"
    )
    ignore_prefixes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE_PREFIXES), description="tags starting with these never weighed"
    )
    show: int = Field(10, ge=0, description="rows of most attenuated / most lifted tags in the printed table")

    @model_validator(mode="after")
    def _clip_order(self) -> "WeightsConfig":
        if self.clip_min > self.clip_max:
            raise ValueError(f"clip_min={self.clip_min} must not exceed clip_max={self.clip_max}")
        return self


class CaptionVariantsConfig(Section):
    """Caption variants per image, so cached text embeddings still see shuffle and dropout.

    docs/caption-variants.md describes each step; `sdxl_trainer.caption_variants` builds them.
    """

    count: int = Field(4, ge=1, description="variants per image (each one is a cached text embedding)")
    seed: int = Field(0, description="variants are a pure function of (seed, image id, variant index)")
    first_unaltered: bool = Field(True, description="variant 0 is the sidecar text as written (caption, else tags)")
    caption_prob: float = Field(
        0.8, ge=0, le=1, description="when an image has both a caption and tags: chance a variant uses the caption"
    )
    shuffle: bool = Field(True, description="shuffle the tags that are not kept in place")
    keep_first: int = Field(0, ge=0, description="the first K tags are never shuffled or dropped (an image's own "
                            "keep_tokens, set per dataset entry, replaces it)")
    keep_tags: list[str] = Field(default_factory=list, description="tags never shuffled or dropped, wherever they are")
    max_dropout: float = Field(
        0.3, ge=0, lt=1, description="a variant drops a uniformly random share in [0, max_dropout] of the free tags"
    )
    min_kept: int = Field(1, ge=0, description="a variant keeps at least this many tags in all (when it has them)")
    quality_tags: list[str] = Field(default_factory=list, description="tags added to every variant, e.g. masterpiece")
    quality_position: Literal["prepend", "append"] = Field("prepend", description="where quality tags go")
    quality_prob: float = Field(1.0, ge=0, le=1, description="chance a variant gets the quality tags")


class StatsConfig(Section):
    """`sdxl prep stats`: per-channel mean/std of raw VAE latents → WORK/latent_stats.json."""

    work: Path = Field(..., description="work directory holding manifest.parquet")
    model: Path = Field(..., description="SDXL diffusers folder (its VAE is used)")
    vae: Path | None = Field(None, description="a separate diffusers AutoencoderKL folder (e.g. a fixed fp16 VAE)")
    max_images: int = Field(0, ge=0, description="measure a seeded random subset of this many kept images (0 = all)")
    batch_size: int = Field(8, ge=1, description="images per VAE call (one bucket per batch)")
    dtype: Precision = Field("fp32", description="VAE precision (fp16 only with a fixed VAE: SDXL's overflows)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    seed: int = Field(0, description="subset choice and posterior draws")


class CacheConfig(Section):
    """`sdxl prep cache`: latents + chunked text embeddings of every kept image → WORK/cache/."""

    work: Path = Field(..., description="work directory holding manifest.parquet; receives cache/")
    model: Path = Field(..., description="SDXL diffusers folder (VAE, tokenizers, text encoders)")
    vae: Path | None = Field(None, description="a separate diffusers AutoencoderKL folder (e.g. a fixed fp16 VAE)")
    vae_dtype: Precision | Literal["auto"] = Field("auto", description="auto = bf16 on a bf16-capable GPU, else fp32")
    text_dtype: Precision | Literal["auto"] = Field("auto", description="text encoder precision; auto as vae_dtype")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    batch_size: int = Field(8, ge=1, description="images per VAE call (one bucket per batch)")
    text_batch_size: int = Field(32, ge=1, description="prompts per text-encoder call")
    crop: Literal["center", "random"] = Field("center", description="where the bucket window sits; random is recorded")
    flip: bool = Field(False, description="also cache a horizontally flipped latent of every image")
    max_chunks: int = Field(3, ge=1, le=8, description="75-token chunks per prompt (NovelAI context extension)")
    variants: CaptionVariantsConfig = Field(default_factory=CaptionVariantsConfig)
    shard_max_mb: int = Field(256, ge=1, description="a cache shard is closed at this size")
    seed: int = Field(0, description="random crops")
    overwrite: bool = Field(False, description="discard an existing cache built with a different config or model")
    allow_model_change: bool = Field(
        False, description="accept WORK/latent_stats.json measured with another VAE than this one (a warning instead)"
    )
