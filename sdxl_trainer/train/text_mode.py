"""On-the-fly text mode: the text encoders run in the trainer, on a fresh prompt variant every step.

With ``text.mode: on_the_fly`` each sample's prompt is built per step from its manifest tags and
caption by :func:`sdxl_trainer.caption_variants.make_variant` (tag shuffle, dropout, keep-first-K),
with a variant index drawn from a generator seeded by (seed, step): every step sees other prompts,
and a resumed run sees exactly the prompts the uninterrupted one saw. An image's own ``keep_tokens``
(manifest column, per dataset entry) replaces ``text.variants.keep_first`` for it. A sample the
loader dropped for classifier-free guidance (``batch["uncond"]``: data.p_uncond or the image's own
``caption_dropout``) gets the empty prompt.

The cache's embeddings are then unused; its latents, micro-conditioning and tag weights are not.
Frozen encoders run in eval mode under ``no_grad``; trained ones (``text.train_encoders``) get their
own optimiser groups, their weights go into the checkpoint's ``text_encoders.safetensors`` for
resume and into the exported pipeline and single file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxl_trainer.caption_variants import make_variant, unaltered, variant_inputs, with_keep_tokens
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.config.train import TextSection
from sdxl_trainer.errors import UserError
from sdxl_trainer.models.loading import load_text_encoders, load_tokenizers
from sdxl_trainer.models.text import encode_prompts
from sdxl_trainer.schema import read_table
from sdxl_trainer.train.per_image import manifest_columns

MANIFEST_PRODUCER = "sdxl prep scan"
ENCODER_NAMES = ("text_encoder", "text_encoder_2")
_PROMPT_STREAM = 0x7E47  # keeps the prompt generator's seeds apart from every other (seed, step) stream
_MAX_INDEX = 2**31 - 1


def load_captions(work: Path) -> dict[str, tuple[list[str], str | None]]:
    """WORK/manifest.parquet → image id → (tags, natural-language caption or None)."""
    table, _ = read_table(Path(work) / "manifest.parquet", artifact="manifest", produced_by=MANIFEST_PRODUCER)
    cols = {c: table.column(c).to_pylist() for c in ("id", "tags", "caption", "caption_kind")}
    return {
        image_id: variant_inputs(tags=tags, caption=caption, caption_kind=kind)
        for image_id, tags, caption, kind in zip(cols["id"], cols["tags"], cols["caption"], cols["caption_kind"])
    }


def load_keep_tokens(work: Path) -> dict[str, int]:
    """Image id → its own keep_tokens, for the ok rows that have one (none in an older manifest)."""
    path = Path(work) / "manifest.parquet"
    if "keep_tokens" not in manifest_columns(path):
        return {}
    columns = ["id", "status", "keep_tokens"]
    table, _ = read_table(path, artifact="manifest", produced_by=MANIFEST_PRODUCER, columns=columns)
    return {i: k for i, s, k in zip(*(table.column(c).to_pylist() for c in columns))
            if s == "ok" and k is not None}  # fmt: skip


def variant_indices(*, seed: int, step: int, micro_batches: int, batch_size: int, world_size: int = 1,
                    rank: int = 0) -> list[list[int]]:  # fmt: skip
    """Variant indices for this rank's samples of update ``step``: one list per micro-batch.

    Drawn for the whole global micro-batch from a CPU generator seeded by (seed, step), keeping rows
    [rank·b, (rank+1)·b) as the batch sampler does: a sample's prompt does not depend on the world
    size, and no device generator is touched (the noise draws stay those of the cached mode).
    """
    state = np.random.SeedSequence([seed, step, _PROMPT_STREAM]).generate_state(1, dtype=np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) >> 1)
    drawn = torch.randint(0, _MAX_INDEX, (micro_batches, batch_size * world_size), generator=generator)
    return drawn[:, rank * batch_size : (rank + 1) * batch_size].tolist()


@dataclass
class TextMode:
    """The loaded tokenizers and encoders, the manifest's texts, and how prompts are built."""

    tokenizers: tuple[Any, Any]
    encoders: tuple[torch.nn.Module, torch.nn.Module]
    captions: Mapping[str, tuple[list[str], str | None]]
    cfg: TextSection
    device: torch.device
    world_size: int = 1
    rank: int = 0
    keep_tokens: Mapping[str, int] = field(default_factory=dict)  # image id → its own keep_first

    @property
    def train(self) -> bool:
        return self.cfg.train_encoders

    # ── prompts ──────────────────────────────────────────────────────────────────────────────
    def _texts(self, image_id: str) -> tuple[list[str], str | None]:
        try:
            return self.captions[image_id]
        except KeyError:
            raise UserError(f"image {image_id!r} is in the cache but not in manifest.parquet", where="text.mode",
                            fix="rebuild the cache from this manifest, or use text.mode: cached") from None  # fmt: skip

    def set_prompts(self, micro_batches: Sequence[dict[str, Any]], *, seed: int, step: int) -> None:
        """Give each micro-batch of update ``step`` its ``prompts``: a fresh variant, "" where dropped."""
        indices = variant_indices(seed=seed, step=step, micro_batches=len(micro_batches),
                                  batch_size=len(micro_batches[0]["ids"]), world_size=self.world_size,
                                  rank=self.rank)  # fmt: skip
        for batch, idx in zip(micro_batches, indices):
            if len(batch["ids"]) != len(idx):
                raise ValueError(f"micro-batches of one update differ in size ({len(batch['ids'])} vs {len(idx)})")
            uncond = batch["uncond"].tolist()
            batch["prompts"] = [
                "" if drop else make_variant(tags=tags, caption=caption, seed=self.cfg.variants.seed,
                                             image_id=image_id, index=index,
                                             cfg=with_keep_tokens(self.cfg.variants, self.keep_tokens.get(image_id)))  # fmt: skip
                for image_id, index, drop, (tags, caption) in zip(
                    batch["ids"], idx, uncond, (self._texts(i) for i in batch["ids"])
                )
            ]

    def set_fixed_prompts(self, batch: dict[str, Any]) -> None:
        """Validation: the sidecar text as written, the same at every step and on every resume."""
        batch["prompts"] = [unaltered(tags=t, caption=c, cfg=self.cfg.variants) for t, c in map(self._texts, batch["ids"])]

    # ── encoding ─────────────────────────────────────────────────────────────────────────────
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, n·77, D], pooled [B, P]) on the training device; n is the batch's own chunk count."""
        tok1, tok2 = self.tokenizers
        te1, te2 = self.encoders
        with torch.enable_grad() if self.train and torch.is_grad_enabled() else torch.no_grad():
            return encode_prompts(tok1, tok2, te1, te2, list(prompts), max_chunks=self.cfg.max_chunks,
                                  device=self.device)  # fmt: skip

    def trained_modules(self) -> tuple[torch.nn.Module, ...]:
        return self.encoders if self.train else ()

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trained_modules() for p in m.parameters() if p.requires_grad]

    # ── checkpoint ───────────────────────────────────────────────────────────────────────────
    def state(self) -> dict[str, torch.Tensor]:
        """The trained encoders' weights in fp32, keyed ``text_encoder.*`` and ``text_encoder_2.*``."""
        return {f"{part}.{name}": p.detach().contiguous()
                for part, m in zip(ENCODER_NAMES, self.trained_modules()) for name, p in m.named_parameters()}  # fmt: skip

    @torch.no_grad()
    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        params = {f"{part}.{name}": p for part, m in zip(ENCODER_NAMES, self.encoders) for name, p in m.named_parameters()}
        if set(tensors) != set(params):
            raise UserError("the checkpoint's text encoder weights do not fit this model",
                            fix="resume with the same --model")  # fmt: skip
        for name, value in tensors.items():
            params[name].copy_(value)


def build_text_mode(cfg: TrainConfig, device: torch.device, *, rank: int = 0, world_size: int = 1) -> TextMode | None:
    """None in cached mode; else the fp32 encoders (frozen or trainable) and the manifest's texts."""
    text = cfg.text
    if text.mode == "cached":
        return None
    if text.train_encoders and world_size > 1:
        raise UserError("text.train_encoders is not supported under torchrun yet (the encoders are not DDP-wrapped)",
                        where="text.train_encoders", fix="train the encoders in one process, or freeze them")  # fmt: skip
    encoders = load_text_encoders(cfg.model, dtype=torch.float32, device=device)
    for m in encoders:
        m.requires_grad_(text.train_encoders)
        m.train(text.train_encoders)
    return TextMode(tokenizers=load_tokenizers(cfg.model), encoders=encoders, captions=load_captions(cfg.work),
                    cfg=text, device=device, world_size=world_size, rank=rank,
                    keep_tokens=load_keep_tokens(cfg.work))  # fmt: skip
