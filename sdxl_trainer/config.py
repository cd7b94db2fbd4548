"""Typed configs for every stage: a YAML/TOML file plus flag overrides, unknown keys rejected.

Each stage's config is a pydantic model with ``extra="forbid"``; :func:`load_config` merges a file
and ``--flag`` overrides (dotted keys for nested sections) and turns validation errors into one
clear :class:`~sdxl_trainer.errors.UserError` with a "did you mean" suggestion for a misspelt key.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdxl_trainer.errors import UserError


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class BucketConfig(Section):
    """NovelAI's aspect-ratio bucket algorithm (diffusion-facts.md), SDXL parameters by default."""

    max_area: int = Field(1024 * 1024, gt=0, description="largest w·h of a bucket, in pixels")
    step: int = Field(64, gt=0, description="bucket sides are multiples of this (8 = one latent pixel)")
    min_side: int = Field(512, gt=0, description="shortest bucket side walked")
    max_side: int = Field(2048, gt=0, description="longest bucket side allowed")
    base: int = Field(1024, gt=0, description="the square base resolution, always a bucket")
    fold_below: int = Field(0, ge=0, description="fold buckets with fewer images than this into the nearest one")

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
    hf_dataset: Path | None = Field(None, description="a local Hugging Face dataset (save_to_disk folder or Parquet)")
    image_column: str | None = Field(None, description="HF dataset image column (auto-detected when unset)")
    caption_column: str | None = Field(None, description="HF dataset caption column (auto-detected when unset)")
    hf_split: str | None = Field(None, description="HF dataset split (the only one, or 'train', when unset)")
    out: Path = Field(..., description="work directory that receives manifest.parquet")
    model: Path | None = Field(None, description="SDXL folder whose tokenizer counts caption chunks")
    fast: bool = Field(False, description="read headers only (no full decode check)")
    min_side: int = Field(256, ge=1, description="skip images whose short side is smaller than this")
    max_pixels: int = Field(120_000_000, gt=0, description="skip larger images (decompression bombs) unallocated")
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    underscores_to_spaces: bool = Field(False, description="rewrite tag underscores as spaces")
    alpha_background: Literal["white", "black"] = Field("white", description="what transparent pixels become")
    max_chunks: int = Field(3, ge=1, description="75-token chunks a caption may use")
    buckets: BucketConfig = Field(default_factory=BucketConfig)

    @model_validator(mode="after")
    def _one_source(self) -> "ScanConfig":
        if (self.data_dir is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one input: a DATA_DIR folder or --hf-dataset PATH")
        return self


C = TypeVar("C", bound=Section)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file not found", where=str(path), fix="check the --config path")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot parse config: {e}", where=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of keys to values", where=str(path))
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key}: {p} is not a section")
    node[parts[-1]] = value


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _explain(cls: type[BaseModel], err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            known = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" — did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint}")
        else:
            lines.append(f"{key}: {e['msg']}")
    return UserError("; ".join(lines), where=source, fix="see `--help` or docs/configuration.md for the keys")


def load_config(cls: type[C], file: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a ``cls`` from an optional config file plus overrides (dotted keys; ``None`` = unset)."""
    data = read_config_file(file) if file else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _explain(cls, e, str(file) if file else "options") from None


def dump_config(config: BaseModel, path: Path) -> None:
    """Write the resolved config as YAML (what a user can pass back with --config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# Tags that describe how good or how explicit an image is rather than what it shows: a user
# prompts for them on purpose, so flattening their frequency would fight the very conditioning
# they exist for. Matched case-insensitively with "_" read as " ".
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

    docs/caption-variants.md describes each step; `sdxl_trainer.prep.variants` builds them.
    """

    count: int = Field(4, ge=1, description="variants per image (each one is a cached text embedding)")
    seed: int = Field(0, description="variants are a pure function of (seed, image id, variant index)")
    first_unaltered: bool = Field(True, description="variant 0 is the sidecar text as written (caption, else tags)")
    caption_prob: float = Field(
        0.8, ge=0, le=1, description="when an image has both a caption and tags: chance a variant uses the caption"
    )
    shuffle: bool = Field(True, description="shuffle the tags that are not kept in place")
    keep_first: int = Field(0, ge=0, description="the first K tags are never shuffled or dropped")
    keep_tags: list[str] = Field(default_factory=list, description="tags never shuffled or dropped, wherever they are")
    max_dropout: float = Field(
        0.3, ge=0, lt=1, description="a variant drops a uniformly random share in [0, max_dropout] of the free tags"
    )
    min_kept: int = Field(1, ge=0, description="a variant keeps at least this many tags in all (when it has them)")
    quality_tags: list[str] = Field(default_factory=list, description="tags added to every variant, e.g. masterpiece")
    quality_position: Literal["prepend", "append"] = Field("prepend", description="where quality tags go")
    quality_prob: float = Field(1.0, ge=0, le=1, description="chance a variant gets the quality tags")


Precision = Literal["fp32", "bf16", "fp16"]


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
    overwrite: bool = Field(False, description="discard an existing cache built with a different config")


# ── `sdxl train` ──────────────────────────────────────────────────────────────────────────────────
# One section per component (torchtitan style); the trainer turns each into callables once, at
# start-up. Keys the seed scripts' flags map onto: --learning_rate → optimizer.learning_rate,
# --num_epochs → num_epochs, --batch_size, --gradient_accumulation_steps, --use_adafactor →
# optimizer.name=adafactor, --enable_compile → compile, --compile_mode, --save_checkpoints →
# checkpoints.every_steps, --use_wandb → logging.wandb, --wandb_project, --wandb_run_name.


class ObjectiveSection(Section):
    """What the UNet learns to predict and at which noise levels (docs/diffusion.md §3–4)."""

    name: Literal["eps", "v", "v_ztsnr", "flow"] = Field("eps", description="eps | v | v_ztsnr | flow")
    sigma_max: float | None = Field(None, gt=0, description="terminal σ: v_ztsnr 20000 when unset; eps/v: SDXL's 14.6")
    ztsnr_rescale: bool = Field(True, description="v_ztsnr: Lin-rescaled table (True) or SDXL's with the last σ raised")
    flow_shift: float = Field(3.0, gt=0, description="flow: logit-normal mean ln(shift) (bigASP v2.5: 3)")
    logit_std: float = Field(1.0, gt=0, description="flow: std of the logit-normal time distribution")
    t_min: float | None = Field(None, ge=0, description="lowest training level: table index, or flow t")
    t_max: float | None = Field(None, ge=0, description="highest training level: table index, or flow t")
    terminal_oversample: float = Field(0.0, ge=0, lt=1, description="extra probability of the terminal step")

    @model_validator(mode="after")
    def _fits(self) -> "ObjectiveSection":
        if self.name == "flow" and (self.sigma_max is not None or self.terminal_oversample):
            raise ValueError("objective.sigma_max and terminal_oversample do not apply to flow")
        return self


class LatentSection(Section):
    normalization: Literal["scaling_factor", "per_channel"] = Field(
        "scaling_factor", description="scaling_factor (SDXL) | per_channel (WORK/latent_stats.json, NovelAI V3)"
    )
    scaling_factor: float | None = Field(None, gt=0, description="unset: the model's vae/config.json value")


class LossSection(Section):
    weighting: Literal["none", "min_snr"] = Field("none", description="per-sample loss weight by noise level")
    gamma: float = Field(5.0, gt=0, description="min-SNR γ (NovelAI V3: 5)")
    min_snr_form: Literal["objective", "hang"] = Field("objective", description="docs/diffusion.md §5")
    tag_weights: bool = Field(False, description="multiply by WORK/tag_weights.parquet (sdxl prep weights)")
    offset_noise: float = Field(0.0, ge=0, description="per-channel noise offset strength (≈0.1; eps/v only)")
    input_perturbation: float = Field(0.0, ge=0, description="input-only noise perturbation (Ning et al., ≈0.1)")


class LoraSection(Section):
    enabled: bool = Field(False, description="train a LoRA adapter instead of the full UNet")
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="attention projections by default"
    )


class EMASection(Section):
    enabled: bool = Field(False)
    decay: float = Field(0.9999, ge=0, lt=1)
    warmup: Literal["inverse", "power", "none"] = Field("inverse")
    power: float = Field(2 / 3, gt=0, description="warmup=power: decay 1 − (1 + n)^−power")
    update_every: int = Field(1, ge=1, description="optimiser steps between EMA updates")
    device: Literal["same", "cpu"] = Field("same", description="keep the shadow on the training device or the CPU")


class OptimizerSection(Section):
    name: Literal["adamw", "adamw8bit", "adafactor"] = Field("adamw")
    learning_rate: float = Field(1e-5, gt=0, description="UNet learning rate (peak, after warm-up)")
    text_encoder_lr: float | None = Field(None, gt=0, description="text encoders' rate, when they train")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the total gradient norm; unset = no clipping")


class ScheduleSection(Section):
    kind: Literal["constant", "linear", "cosine"] = Field("constant", description="after the linear warm-up")
    warmup_samples: int = Field(0, ge=0, description="warm-up length in samples (global)")
    min_factor: float = Field(0.0, ge=0, le=1, description="final fraction of the peak rate (linear/cosine)")


class TrainDataSection(Section):
    p_flip: float = Field(0.5, ge=0, le=1, description="chance of the cached flip copy, where one was cached")
    p_uncond: float = Field(0.0, ge=0, le=1, description="unconditional-prompt dropout rate (for CFG)")
    prefetch: int = Field(4, ge=1, description="batches read ahead")
    workers: int = Field(2, ge=1, description="reader threads")


class CheckpointSection(Section):
    every_steps: int | None = Field(None, ge=1, description="checkpoint every N updates")
    every_samples: int | None = Field(None, ge=1, description="checkpoint every N samples (global)")
    keep_last: int = Field(3, ge=0, description="checkpoints kept (0 = all)")
    diffusers: bool = Field(True, description="a StableDiffusionXLPipeline folder in each checkpoint")
    single_file: bool = Field(True, description="an original-layout .safetensors (ComfyUI, A1111)")
    dtype: Precision = Field("fp16", description="dtype of the exported weights (training state stays fp32)")

    @model_validator(mode="after")
    def _one_cadence(self) -> "CheckpointSection":
        if self.every_steps is not None and self.every_samples is not None:
            raise ValueError("give checkpoints.every_steps or checkpoints.every_samples, not both")
        return self


class ValidationSection(Section):
    every_steps: int = Field(0, ge=0, description="held-out loss every N updates (0 = off)")
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="share of the cache held out (by id hash)")
    holdout_count: int = Field(0, ge=0, description="or: this many images held out")
    levels: list[float] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9],
        description="fixed levels as fractions of the schedule (table position, or flow t)",
    )
    batch_size: int = Field(4, ge=1)
    seed: int = Field(0, description="the fixed validation noise")


class LoggingSection(Section):
    every_steps: int = Field(10, ge=1)
    tensorboard: bool = Field(True)
    wandb: bool = Field(False)
    wandb_project: str = Field("sdxl-trainer")
    wandb_run_name: str | None = Field(None)
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline works without network")


class TrainConfig(Section):
    """`sdxl train`: WORK/cache → RUN/ (checkpoints, metrics). Written resolved to RUN/config.yaml."""

    model: Path = Field(..., description="SDXL diffusers folder to start from")
    work: Path = Field(..., description="work directory holding cache/ (and latent_stats.json, tag_weights.parquet)")
    out: Path = Field(..., description="run directory: checkpoints/, metrics.jsonl, config.yaml")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    resume: str | None = Field(None, description="latest | a run or checkpoint folder")
    force: bool = Field(False, description="resume even with a changed batch size or objective")
    batch_size: int = Field(4, ge=1, description="samples per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Precision = Field("bf16", description="autocast dtype; the weights stay fp32")
    gradient_checkpointing: bool = Field(False)
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="attention backend")
    compile: bool = Field(False, description="torch.compile the UNet")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    num_samples: int | None = Field(None, ge=1, description="run length in samples (global)")
    num_steps: int | None = Field(None, ge=1, description="run length in updates")
    num_epochs: float | None = Field(None, gt=0, description="run length in passes over the training split")
    max_consecutive_skips: int = Field(10, ge=1, description="stop after this many non-finite updates in a row")
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    latents: LatentSection = Field(default_factory=LatentSection)
    loss: LossSection = Field(default_factory=LossSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    ema: EMASection = Field(default_factory=EMASection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    data: TrainDataSection = Field(default_factory=TrainDataSection)
    checkpoints: CheckpointSection = Field(default_factory=CheckpointSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        given = [n for n in ("num_samples", "num_steps", "num_epochs") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one run length: num_samples, num_steps or num_epochs (got {given or 'none'})")
        if self.validation.holdout_fraction and self.validation.holdout_count:
            raise ValueError("give validation.holdout_fraction or validation.holdout_count, not both")
        if self.validation.every_steps and not (self.validation.holdout_fraction or self.validation.holdout_count):
            raise ValueError("validation.every_steps needs a held-out split: set validation.holdout_fraction or holdout_count")
        return self



# ── `sdxl generate` and `sdxl evaluate` (docs/evaluate.md) ───────────────────────────────────────
Sampler = Literal["auto", "euler", "euler_ancestral", "dpmpp_2m", "flow_euler"]


class SamplingSection(Section):
    """How images are sampled; σ_max, flow shift and latent normalisation come from the checkpoint."""

    steps: int = Field(28, ge=1, description="UNet evaluations per image (×2 with CFG)")
    cfg_scale: float = Field(5.0, ge=0, description="classifier-free guidance scale (NovelAI V3: 3.5–5; 1 = off)")
    cfg_rescale: float = Field(0.0, ge=0, le=1, description="CFG rescale φ (Lin et al.: 0.7)")
    sampler: Sampler = Field("auto", description="auto = dpmpp_2m (eps/v), flow_euler (flow)")
    schedule: Literal["auto", "karras", "trailing", "uniform"] = Field("auto", description="auto = karras")
    negative: str = Field("", description="negative prompt (the encoded empty prompt by default, as in training)")
    lora: Path | None = Field(None, description="a LoRA file (diffusers/PEFT or kohya) merged into the UNet")
    lora_scale: float = Field(1.0, description="LoRA strength")
    config_dir: Path | None = Field(None, description="single file: diffusers SDXL folder with configs and tokenizers")
    max_chunks: int = Field(3, ge=1, le=8, description="75-token prompt chunks (as the cache was built)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on a GPU, else fp32")


class GenerateConfig(SamplingSection):
    """`sdxl generate`: prompts → PNGs with their parameters in the PNG text chunks."""

    checkpoint: Path = Field(..., description="diffusers folder, single .safetensors, checkpoint or run folder")
    prompt: list[str] = Field(..., min_length=1, description="one or more prompts")
    out: Path = Field(Path("samples"), description="folder that receives the PNGs (never overwritten)")
    width: int | None = Field(None, gt=0, description="unset: the model's base resolution")
    height: int | None = Field(None, gt=0, description="unset: the model's base resolution")
    seed: int = Field(0, ge=0, description="first seed; image i uses seed + i")
    num_images: int = Field(1, ge=1, description="images per prompt")
    sigma_max: float | None = Field(None, gt=0, description="start σ (karras); unset: the trained σ_max")
    flow_shift: float | None = Field(None, gt=0, description="flow sampling shift; unset: the trained shift")


class EvaluateConfig(SamplingSection):
    """`sdxl evaluate`: REPORT/ with the black-image, coherence, schedule and denoising checks."""

    checkpoint: Path = Field(..., description="run folder, checkpoint folder, diffusers folder or single file")
    out: Path = Field(..., description="report folder: report.md, metrics.json, PNGs with their CSVs")
    checks: list[Literal["black", "coherence", "schedules", "progressive"]] = ["black", "coherence", "schedules",
                                                                              "progressive"]  # fmt: skip
    base_resolution: int | None = Field(None, gt=0, description="the training side; unset: UNet sample_size × 8")
    black_prompt: str = Field("solid color, black background, no humans", description="asks for solid black")
    white_prompt: str = Field("solid color, white background, no humans", description="asks for solid white")
    seeds: list[int] = Field([0, 1, 2, 3], min_length=1, description="seeds of the black/white images")
    coherence_prompts: list[str] = Field(["red circle, blue background, simple shapes, no humans"], min_length=1)
    coherence_seeds: list[int] = Field([0, 1], min_length=1)
    coherence_scales: list[float] = Field([1.0, 1.5, 2.0], min_length=1, description="sides / base_resolution")
    coherence_grid: int = Field(8, ge=1, description="side of the low-frequency lattice images are compared on")
    progressive_prompts: list[str] | None = Field(None, description="unset: the black and first coherence prompt")
    progressive_frames: int = Field(8, ge=2, description="x0 previews per strip, at evenly spaced steps")
    density_samples: int = Field(200_000, ge=1000, description="draws of the training-level sampler")
    thumbnail: int = Field(256, ge=16, description="longest side of an image in a grid or strip")
