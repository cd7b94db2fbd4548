"""`sdxl train`: one section per component (torchtitan style), turned into callables once at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from sdxl_trainer.config.base import Precision, Section
from sdxl_trainer.config.prep import CaptionVariantsConfig
from sdxl_trainer.config.samples import SamplesSection


# One section per component (torchtitan style); the trainer turns each into callables once, at
# start-up. Keys the seed scripts' flags map onto: --learning_rate → optimizer.learning_rate,
# --num_epochs → num_epochs, --batch_size, --gradient_accumulation_steps, --use_adafactor →
# optimizer.name=adafactor, --enable_compile → compile, --compile_mode, --save_checkpoints →
# checkpoints.every_steps, --use_wandb → logging.wandb, --wandb_project, --wandb_run_name.


class ObjectiveSection(Section):
    """What the UNet learns to predict and at which noise levels (docs/diffusion.md §3–4)."""

    name: Literal["auto", "eps", "v", "v_ztsnr", "flow"] = Field(
        "auto", description="auto (the base model's own: its scheduler config or single-file markers) | eps | v | "
        "v_ztsnr | flow")
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
    fp8_base: bool = Field(
        False,
        description="store the frozen UNet base as float8 e4m3 with a per-channel scale (SDXL 2.6 GB instead of "
        "5.1 GB), upcast layer by layer: weight-only, the matmuls stay in the precision dtype (docs/memory.md)",
    )

    @model_validator(mode="after")
    def _fp8_needs_lora(self) -> "LoraSection":
        if self.fp8_base and not self.enabled:
            raise ValueError(
                "lora.fp8_base needs lora.enabled: fp8 storage is for a LoRA's frozen base, and a full finetune "
                "trains these weights — add --lora, or drop --fp8-base"
            )
        return self


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
    fused_backward_pass: bool = Field(
        False, description="full finetune: step each parameter inside backward and free its gradient at once "
        "(adamw/adafactor; clips per parameter; no accumulation, fp16 or torchrun) — docs/memory.md")
    bf16_weights: bool = Field(
        False, description="full finetune: keep the trained weights in bf16 with no fp32 master copy; every update "
        "is stochastically rounded")


class ScheduleSection(Section):
    kind: Literal["constant", "linear", "cosine"] = Field("constant", description="after the linear warm-up")
    warmup_samples: int = Field(0, ge=0, description="warm-up length in samples (global)")
    min_factor: float = Field(0.0, ge=0, le=1, description="final fraction of the peak rate (linear/cosine)")


class TrainDataSection(Section):
    p_flip: float = Field(0.5, ge=0, le=1, description="chance of the cached flip copy, where one was cached")
    p_uncond: float = Field(
        0.0, ge=0, le=1, description="caption dropout (--caption-dropout-rate): this share of samples trains on the "
        "cached empty prompt instead of any caption variant, so CFG has an unconditional model (≈0.05–0.1); images "
        "whose dataset entry sets caption_dropout use that instead. Drawn per sample at training time (no re-cache); "
        "tag dropout inside a prompt is the variants' job, fixed at cache time (prep cache variants.max_dropout, "
        "keep_tokens per dataset) or per step on the fly (text.variants)")
    prefetch: int = Field(4, ge=1, description="batches read ahead")
    workers: int = Field(2, ge=1, description="reader threads")


class CheckpointSection(Section):
    every_steps: int | None = Field(None, ge=1, description="checkpoint every N updates")
    every_samples: int | None = Field(None, ge=1, description="checkpoint every N samples (global)")
    keep_last: int = Field(3, ge=0, description="checkpoints kept (0 = all)")
    diffusers: bool = Field(True, description="a StableDiffusionXLPipeline folder in each checkpoint")
    single_file: bool = Field(True, description="an original-layout .safetensors (ComfyUI, A1111)")
    dtype: Precision = Field("fp16", description="dtype of the exported weights (training state keeps the trained dtype)")
    export_ema: bool = Field(True, description="with EMA on, export the EMA weights (resume state keeps the raw ones)")

    @model_validator(mode="after")
    def _one_cadence(self) -> "CheckpointSection":
        if self.every_steps is not None and self.every_samples is not None:
            raise ValueError("give checkpoints.every_steps or checkpoints.every_samples, not both")
        return self


class HubSection(Section):
    """Publishing the run's last checkpoint to the Hugging Face Hub when training ends (`sdxl publish`)."""

    push_to_hub: bool = Field(False, description="after the run, upload its last checkpoint with a model card")
    model_id: str | None = Field(None, description="Hub repository USER/NAME")
    private: bool = Field(False, description="create the repository private")
    what: Literal["auto", "full", "lora", "both"] = Field("auto", description="which exports (auto: what it has)")

    @model_validator(mode="after")
    def _needs_repo(self) -> "HubSection":
        if self.push_to_hub and not self.model_id:
            raise ValueError("hub.push_to_hub needs hub.model_id (--hub-model-id USER/NAME)")
        return self


class TextSection(Section):
    """Where the text conditioning comes from: the cache, or the text encoders run every step."""

    mode: Literal["cached", "on_the_fly"] = Field(
        "cached", description="cached: the cache's embeddings | on_the_fly: encode a fresh prompt variant per step"
    )
    train_encoders: bool = Field(False, description="train both text encoders (on_the_fly; needs optimizer.text_encoder_lr)")
    max_chunks: int = Field(3, ge=1, description="on_the_fly: at most this many 75-token chunks per prompt")
    variants: CaptionVariantsConfig = Field(
        default_factory=CaptionVariantsConfig,
        description="on_the_fly: tag shuffle / dropout / keep-first-K per step (count and seed are not used)",
    )


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
    vae: Path | None = Field(
        None, description="export and sample with this VAE instead of --model's (a `sdxl train-vae` run, checkpoint, "
        "vae/ folder or vae.safetensors); only its decoder may differ from --model's VAE, which made the cache")
    allow_model_change: bool = Field(
        False,
        description="train although the cache, latent_stats.json or the resumed checkpoint was made with other "
        "model parts than --model (a warning instead of an error)",
    )
    batch_size: int = Field(4, ge=1, description="samples per device per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Precision | Literal["auto"] = Field(
        "auto", description="autocast dtype; auto = bf16 on a bf16-capable GPU (and with optimizer.bf16_weights), fp16 "
        "on an older GPU, else fp32; the weights stay fp32 (see optimizer.bf16_weights)")
    gradient_checkpointing: bool = Field(False)
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="attention backend")
    compile: bool = Field(False, description="torch.compile the UNet (the first updates wait for the compile)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode"
    )
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks",
        description="blocks: the transformer blocks (regional: one graph serves them all, quick to compile) | "
        "model: the whole UNet",
    )
    num_samples: int | None = Field(None, ge=1, description="run length in samples (global)")
    num_steps: int | None = Field(None, ge=1, description="run length in updates")
    num_epochs: float | None = Field(
        None, gt=0, description="run length in passes over the training split, each image shown its dataset's "
        "repeats times per pass (kohya's epoch)")
    max_consecutive_skips: int = Field(10, ge=1, description="stop after this many non-finite updates in a row")
    max_skipped_fraction: float = Field(
        0.01, ge=0, le=1,
        description="end with an error (exit 2, after the last checkpoint) when more than this share of the updates "
        "was skipped; their sample ids are in RUN/skipped.jsonl",
    )
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    latents: LatentSection = Field(default_factory=LatentSection)
    loss: LossSection = Field(default_factory=LossSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    ema: EMASection = Field(default_factory=EMASection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    data: TrainDataSection = Field(default_factory=TrainDataSection)
    checkpoints: CheckpointSection = Field(default_factory=CheckpointSection)
    hub: HubSection = Field(default_factory=HubSection)
    text: TextSection = Field(default_factory=TextSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        given = [n for n in ("num_samples", "num_steps", "num_epochs") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one run length: num_samples, num_steps or num_epochs (got {given or 'none'})"
            )
        if self.validation.holdout_fraction and self.validation.holdout_count:
            raise ValueError("give validation.holdout_fraction or validation.holdout_count, not both")
        if self.validation.every_steps and not (self.validation.holdout_fraction or self.validation.holdout_count):
            raise ValueError(
                "validation.every_steps needs a held-out split: set validation.holdout_fraction or holdout_count"
            )
        if self.text.train_encoders and self.text.mode != "on_the_fly":
            raise ValueError("text.train_encoders needs text.mode: on_the_fly (cached embeddings cannot train)")
        if self.text.train_encoders and self.optimizer.text_encoder_lr is None:
            raise ValueError("text.train_encoders needs optimizer.text_encoder_lr (often 2–10× below the UNet's)")
        if self.text.train_encoders and self.lora.enabled:
            raise ValueError("text.train_encoders with lora.enabled is not supported yet: train the full UNet")
        return self

    @model_validator(mode="after")
    def _memory_savers(self) -> "TrainConfig":
        """optimizer.fused_backward_pass and bf16_weights: what each one can be combined with (docs/memory.md)."""
        o = self.optimizer
        for key in [k for k in ("fused_backward_pass", "bf16_weights") if getattr(o, k)]:
            if self.lora.enabled:
                raise ValueError(f"optimizer.{key} is for full finetunes; a LoRA's trained weights and gradients are "
                                 "small already: turn it off, or train the full UNet (lora.enabled: false)")  # fmt: skip
            if o.name == "adamw8bit":
                raise ValueError(f"optimizer.{key} works with adamw or adafactor, not adamw8bit")
            if self.text.train_encoders:
                raise ValueError(f"optimizer.{key} with text.train_encoders is not supported yet: freeze the encoders")
        if o.fused_backward_pass and self.gradient_accumulation_steps > 1:
            raise ValueError("optimizer.fused_backward_pass frees each gradient as soon as it is applied, so it "
                             "cannot accumulate: set gradient_accumulation_steps: 1 (raise batch_size instead)")  # fmt: skip
        if o.fused_backward_pass and self.precision == "fp16":
            raise ValueError("optimizer.fused_backward_pass cannot use fp16's GradScaler (it must see every gradient "
                             "before any update): use precision: bf16")  # fmt: skip
        if o.bf16_weights and self.precision not in ("bf16", "auto"):
            raise ValueError(f"optimizer.bf16_weights needs precision: bf16 (bf16 weights run under bf16 autocast), "
                             f"not {self.precision}")  # fmt: skip
        return self
