"""`sdxl train-vae`: decoder finetuning of the model's VAE (docs/vae.md). Sections reused from `sdxl train`
where they mean the same (optimiser, schedule, EMA, logging); the rest are the VAE's own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdxl_trainer.config.base import Section
from sdxl_trainer.config.train import EMASection, LoggingSection, OptimizerSection, ScheduleSection


class VaeLossSection(Section):
    """Pixel loss on [0, 1]: l1_weight · |x̂ − x| + ssim_weight · (1 − MS-SSIM(x̂, x)); optionally plus an
    adversarial term from a patch discriminator (gan_weight > 0, after gan_start_step updates)."""

    l1_weight: float = Field(1.0, ge=0, description="weight of the mean absolute error")
    ssim_weight: float = Field(
        0.2, ge=0, description="weight of 1 − MS-SSIM (crops ≥ 161 px; smaller crops: single-scale SSIM, "
        "which the run names at start)")

    gan_weight: float = Field(
        0.0, ge=0, description="weight of the patch discriminator's generator term −D(x̂) (0 = no discriminator; "
        "the SD VAE recipe: 0.5, with gan_adaptive)")
    gan_start_step: int = Field(
        500, ge=0, description="updates before the discriminator trains and its term enters the loss (warm-up)")
    gan_adaptive: bool = Field(
        True, description="scale the term by |∇ pixel loss| / |∇ GAN term| at the decoder's last layer (SD VAE "
        "recipe); off: gan_weight alone")

    @model_validator(mode="after")
    def _something(self) -> "VaeLossSection":
        if self.l1_weight == 0 and self.ssim_weight == 0:
            raise ValueError("loss.l1_weight and loss.ssim_weight are both 0: nothing to learn from")
        return self


class VaeOptimizerSection(OptimizerSection):
    """As `sdxl train`'s optimizer section; a decoder finetune's usual rate; no weight decay by default."""

    learning_rate: float = Field(1e-5, gt=0, description="decoder learning rate (peak, after warm-up)")
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _plain(self) -> "VaeOptimizerSection":
        if self.fused_backward_pass or self.bf16_weights or self.text_encoder_lr is not None:
            raise ValueError("sdxl train-vae trains the fp32 decoder alone: optimizer.fused_backward_pass, "
                             "bf16_weights and text_encoder_lr do not apply")  # fmt: skip
        return self


class VaeDiscriminatorSection(Section):
    """The patch discriminator (used only with loss.gan_weight > 0): conv stack, GroupNorm, LeakyReLU 0.2."""

    learning_rate: float | None = Field(None, gt=0, description="Adam rate, constant (unset: the decoder's peak rate)")
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas (the SD VAE recipe's)")
    channels: int = Field(64, ge=8, description="channels of the first conv (doubled per layer, up to 8×)")
    layers: int = Field(3, ge=1, le=5, description="stride-2 convs: each patch score sees a 70 px field at 3")


class VaeEvalSection(Section):
    """The held-out images: picked by a hash of their id (fixed across runs and resumes), centre crops."""

    holdout_count: int = Field(16, ge=1, description="images held out of training (the smallest id hashes)")
    every_steps: int = Field(0, ge=0, description="evaluate every N updates too (0: at step 0 and every checkpoint)")
    grid_images: int = Field(8, ge=1, description="held-out crops in RUN/vae_grid.png (original / before / after)")


class VaeCheckpointSection(Section):
    every_steps: int | None = Field(None, ge=1, description="checkpoint every N updates (and always at the end)")
    keep_last: int = Field(3, ge=0, description="checkpoints kept (0 = all)")
    export_ema: bool = Field(True, description="with EMA on, export the EMA decoder (resume state keeps the raw one)")


class VaeTrainConfig(Section):
    """`sdxl train-vae`: finetune the VAE decoder on WORK's images → RUN/ (checkpoints with vae/, metrics)."""

    model: Path = Field(..., description="SDXL diffusers folder whose vae/ is finetuned")
    work: Path = Field(..., description="work directory holding manifest.parquet (sdxl prep scan)")
    out: Path = Field(..., description="run directory: checkpoints/, metrics.jsonl, vae_eval.csv, vae_grid.png")
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (one process; torchrun is not supported)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype of the decoder; auto = bf16 on a bf16-capable GPU, else fp32 (fp16 is "
        "refused: the SDXL VAE overflows in fp16)")
    resume: str | None = Field(None, description="latest | a run or checkpoint folder")
    force: bool = Field(False, description="resume even with a changed batch size, crop, latent, loss or discriminator")
    allow_model_change: bool = Field(
        False, description="resume from a checkpoint whose base VAE (its fingerprint) differs from --model's")
    batch_size: int = Field(4, ge=1, description="crops per update")
    num_steps: int = Field(1000, ge=1, description="run length in updates")
    crop: int = Field(256, ge=16, description="square training crop in pixels, a multiple of 8 (images smaller are skipped)")
    latent: Literal["sample", "mean"] = Field("sample", description="decode a posterior sample (as the cache) or its mean")
    max_consecutive_skips: int = Field(10, ge=1, description="stop after this many non-finite updates in a row")
    loss: VaeLossSection = Field(default_factory=VaeLossSection)
    optimizer: VaeOptimizerSection = Field(default_factory=VaeOptimizerSection)
    discriminator: VaeDiscriminatorSection = Field(default_factory=VaeDiscriminatorSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    ema: EMASection = Field(default_factory=EMASection)
    eval: VaeEvalSection = Field(default_factory=VaeEvalSection)
    checkpoints: VaeCheckpointSection = Field(default_factory=VaeCheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @field_validator("crop")
    @classmethod
    def _crop(cls, crop: int) -> int:
        if crop % 8:
            raise ValueError(f"crop={crop} must be a multiple of 8 (the VAE downsamples 8×)")
        return crop

    @model_validator(mode="after")
    def _gan_crop(self) -> "VaeTrainConfig":
        smallest = 3 * 2**self.discriminator.layers  # vae_train/discriminator.min_crop: one patch score at least
        if self.loss.gan_weight > 0 and self.crop < smallest:
            raise ValueError(f"crop={self.crop} is below the {smallest} px a {self.discriminator.layers}-layer "
                             f"discriminator needs: raise crop or lower discriminator.layers")  # fmt: skip
        return self
