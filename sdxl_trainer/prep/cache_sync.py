"""`prep cache` against what is already there: model fingerprints, latent_stats.json, the manifest.

Run by rank 0 before any rank writes (after ``check_config``):

- the cache's recorded model fingerprint (VAE, text encoders, tokenizers) must be this model's:
  mixing two encodings in one cache is never right, so the fix is ``--overwrite``;
- WORK/latent_stats.json, when present, must have been measured with this VAE (else training with
  per-channel normalisation would scale these latents with another VAE's statistics), unless
  ``--allow-model-change``;
- rows whose image left the manifest, or whose bucket or caption variants changed since they were
  encoded (a rescan: another caption, or the row's own ``keep_tokens``), are dropped
  (``cache_format.prune``); the ids then missing are encoded as on any resume, so an unchanged
  image is never encoded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdxl_trainer import console
from sdxl_trainer.cache_format import Group, prune, read_meta, remove_cache
from sdxl_trainer.cache_format.layout import META_NAME, list_shard_paths, read_shard_meta
from sdxl_trainer.caption_variants import make_variants, variant_inputs, with_keep_tokens
from sdxl_trainer.config import CacheConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import fingerprint
from sdxl_trainer.schema import read_json


def variant_texts(cfg: CacheConfig, row: dict) -> list[str]:
    """The caption variants the cache stores for a manifest row (a pure function of its inputs); the
    row's own ``keep_tokens`` (per dataset entry), when set, replaces ``variants.keep_first``."""
    tags, caption = variant_inputs(tags=row["tags"], caption=row["caption"], caption_kind=row["caption_kind"])
    variants = with_keep_tokens(cfg.variants, row.get("keep_tokens"))
    return make_variants(tags=tags, caption=caption, n=variants.count, seed=variants.seed,
                         image_id=row["id"], cfg=variants)  # fmt: skip


def _recorded(cache: Path) -> list[tuple[str, dict | None]]:
    """(where, model fingerprint) of cache_meta.json and of every shard."""
    out = []
    if (cache / META_NAME).is_file():
        out.append((str(cache / META_NAME), read_meta(cache).get("model_fingerprint")))
    out += [(str(p), read_shard_meta(p).get("model_fingerprint")) for _, p in list_shard_paths(cache)]
    return out


def check_cache_model(cfg: CacheConfig, cache: Path, current: dict[str, Any]) -> None:
    """Refuse to add to a cache encoded with other model parts (--overwrite re-encodes it)."""
    unrecorded = 0
    for where, recorded in _recorded(cache):
        diff = fingerprint.differing_parts(recorded, current, fingerprint.CACHE_PARTS)
        if diff is None:
            unrecorded += 1
        elif diff and cfg.overwrite:
            console.info(f"[yellow]{where}: encoded with another {', '.join(diff)}; --overwrite: rebuilding[/]")
            remove_cache(cache)
            return
        elif diff:
            raise UserError(
                f"the cache was encoded with another {', '.join(diff)} than {cfg.model}",
                where=where,
                fix="pass --overwrite to re-encode it with this model, or use another WORK folder",
            )
    if unrecorded:
        console.info(f"[yellow]warning: {unrecorded} cache file(s) record no model fingerprint (written before "
                     f"fingerprints): not checked against {cfg.model}[/]")  # fmt: skip


def check_latent_stats(cfg: CacheConfig, current: dict[str, Any]) -> None:
    path = Path(cfg.work) / "latent_stats.json"
    if not path.is_file():
        return
    stats = read_json(path, artifact="latent_stats", produced_by="sdxl prep stats WORK --model MODEL")
    warning = fingerprint.check(stats.get("model_fingerprint"), current, parts=("vae",), what="latent_stats.json",
                                where=str(path), model=str(cfg.vae or cfg.model), allow=cfg.allow_model_change,
                                fix="re-measure it: `sdxl prep stats WORK --model MODEL` (with --vae if you use one)")  # fmt: skip
    if warning:
        console.info(f"[yellow]warning: {warning}[/]")


def sync_with_manifest(cfg: CacheConfig, cache: Path, rows: list[dict]) -> dict[str, int]:
    """Drop cached rows the manifest no longer has, or whose bucket or caption variants changed."""
    by_id = {r["id"]: r for r in rows}

    def keep(ids: list[str], group: Group, captions: list[list[str]]) -> np.ndarray:
        out = np.zeros(len(ids), dtype=bool)
        for i, (id_, cached) in enumerate(zip(ids, captions)):
            row = by_id.get(id_)
            if row is None or (row["bucket_width"], row["bucket_height"]) != group[:2]:
                continue
            out[i] = variant_texts(cfg, row) == list(cached or [])
        return out

    done = prune(cache, keep)
    if done["rows_removed"]:
        console.info(f"cache: {done['rows_removed']:,} row(s) no longer match the manifest (image removed or "
                     f"changed, bucket or caption changed): removed ({done['shards_rewritten']} shard(s) "
                     f"rewritten, {done['shards_deleted']} deleted)")  # fmt: skip
    return done
