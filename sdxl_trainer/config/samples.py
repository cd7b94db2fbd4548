"""`sdxl train`'s ``samples:`` section: images rendered while training, and the checks run on them.

Off until a cadence is given (``every_steps`` or ``every_samples``). Each round renders every prompt ×
seed with the UNet being trained (and its EMA), exactly as `sdxl generate` would from the checkpoint
of that step, into RUN/samples/step-NNNNNN/ (docs/samples.md). What can be checked without the
model is checked here, when the config loads; the prompt file and the sizes the model accepts are
checked when training starts, before the first update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdxl_trainer.config.base import Section
from sdxl_trainer.config.evaluate import Sampler, check_pag_layers


class SampleChecksSection(Section):
    """The `sdxl evaluate` checks, run on the weights of a sampling round (numbers → metrics and checks.json)."""

    black: bool | None = Field(None, description="black/white-image test every round; unset: on for v_ztsnr and flow")
    black_seeds: list[int] = Field([0, 1], min_length=1, description="seeds of the black and white images")
    coherence_every: int = Field(0, ge=0, description="high-resolution coherence every N-th round (0 = off)")
    coherence_scales: list[float] = Field([1.0, 1.5], min_length=1, description="canvas sides / the sample side")
    progressive_every: int = Field(0, ge=0, description="progressive-denoising strip every N-th round (0 = off)")
    progressive_frames: int = Field(6, ge=2, description="x0 previews per strip")


class SamplesSection(Section):
    """Images rendered while training (kohya --sample_prompts / --sample_every_n_steps)."""

    prompts: list[str] | Path = Field(
        default_factory=list,
        description="prompts, or a text file with one per line; per prompt: --n negative --w/--h size --d seed "
        "--s steps --l cfg",
    )
    negative: str = Field("", description="negative prompt of every sample (--n overrides it per prompt)")
    every_steps: int | None = Field(None, ge=1, description="render every N updates (unset with every_samples: off)")
    every_samples: int | None = Field(None, ge=1, description="or: every N samples (global)")
    at_start: bool = Field(True, description="also render once before the first update: the baseline")
    seeds: list[int] = Field([0], min_length=1, description="one image per prompt and seed")
    steps: int = Field(28, ge=1, description="sampling steps (UNet evaluations per image, ×2 with CFG)")
    cfg: float = Field(5.0, ge=0, description="classifier-free guidance scale (1 = off)")
    cfg_rescale: float = Field(0.0, ge=0, le=1, description="CFG rescale φ")
    pag_scale: float = Field(0.0, ge=0, description="perturbed-attention guidance scale (0 = off); as sdxl generate")
    pag_layers: list[str] = Field(["mid"], min_length=1, description="PAG's self-attention layers (as sdxl generate)")
    sampler: Sampler = Field("auto", description="auto = dpmpp_2m (eps/v), flow_euler (flow); as sdxl generate")
    schedule: Literal["auto", "karras", "trailing", "uniform"] = Field("auto", description="auto = karras")
    width: int | None = Field(None, gt=0, description="unset: the most common bucket of the training data")
    height: int | None = Field(None, gt=0, description="unset: the most common bucket of the training data")
    max_chunks: int = Field(3, ge=1, le=8, description="75-token prompt chunks")
    checks: SampleChecksSection = Field(default_factory=SampleChecksSection,
                                        description="the sdxl evaluate checks, on each round's weights")

    @field_validator("pag_layers")
    @classmethod
    def _pag_layers(cls, layers: list[str]) -> list[str]:
        return check_pag_layers(layers)

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None or self.every_samples is not None

    @model_validator(mode="after")
    def _consistent(self) -> "SamplesSection":
        if self.every_steps is not None and self.every_samples is not None:
            raise ValueError("give samples.every_steps or samples.every_samples, not both")
        if (self.width is None) != (self.height is None):
            raise ValueError("give samples.width and samples.height together (or neither: the most common bucket)")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"samples.{name} {value} is not a multiple of 8 (the VAE's factor)")
        has_prompts = isinstance(self.prompts, Path) or bool(self.prompts)
        if self.enabled and not has_prompts:
            raise ValueError("samples are on (every_steps/every_samples) but samples.prompts is empty")
        if has_prompts and not self.enabled:
            raise ValueError("samples.prompts is given but no cadence: set samples.every_steps or every_samples")
        return self
