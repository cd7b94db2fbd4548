"""What `sdxl train` checks at start-up about its inputs, before the first update (docs/reliability.md).

- every cache shard's size and footer hash against cache_meta.json (cheap; the full SHA-256 is
  ``prep cache --verify``'s), a warning for a cache written before checksums;
- the cache's model fingerprint (VAE, text encoders, tokenizers; the VAE alone with on-the-fly
  text) against ``--model``'s, and latent_stats.json's VAE against the cache's (per-channel only);
- ``--vae``: its encoder side must be --model's VAE's (run_vae.py);
- the manifest's ok ids against the cache's ids (plus the ones the cache stage skipped): a rescan
  after images were removed, added or changed needs ``sdxl prep cache`` again.

Returns the model fingerprint, which the checkpoint records so that a resume can compare it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sdxl_trainer import console
from sdxl_trainer.cache_format import read_meta
from sdxl_trainer.cache_format.checksum import quick_check
from sdxl_trainer.cache_format.layout import META_NAME
from sdxl_trainer.config import TrainConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import fingerprint
from sdxl_trainer.schema import read_json, read_table
from sdxl_trainer.train.run_vae import check_run_vae

CACHE_FIX = "re-encode it with this model: `sdxl prep cache WORK --model MODEL --overwrite`"
UPDATE_CACHE = "update the cache: `sdxl prep cache WORK --model MODEL` (drops removed images, encodes new ones, keeps the rest)"


def _warn(line: str | None) -> None:
    if line:
        console.info(f"[yellow]warning: {line}[/]")


def check_inputs(cfg: TrainConfig, ids_by_group: Mapping[Any, pa.Array]) -> dict[str, Any]:
    """Run every start-up check (raising a one-line UserError) and return --model's fingerprint."""
    cache = Path(cfg.work) / "cache"
    meta = read_meta(cache)
    unchecked = quick_check(cache, meta)
    if unchecked:
        _warn(f"{cache / META_NAME}: {unchecked} of {len(meta['shards'])} shard(s) have no recorded checksum (a "
              "cache written before checksums): run `sdxl prep cache WORK --model MODEL --verify` once to record "
              "and check them (nothing is re-encoded)")  # fmt: skip
    current = fingerprint.model_fingerprint(cfg.model)
    parts = fingerprint.CACHE_PARTS if cfg.text.mode == "cached" else ("vae",)
    _warn(fingerprint.check(meta.get("model_fingerprint"), current, parts=parts, what="the cache",
                            where=str(cache / META_NAME), model=str(cfg.model), allow=cfg.allow_model_change,
                            fix=CACHE_FIX))  # fmt: skip
    if cfg.latents.normalization == "per_channel":
        _check_stats(cfg, meta.get("model_fingerprint") or current)
    _warn(check_run_vae(cfg))  # --vae: only its decoder may differ from the VAE that made the cache
    cache_ids = pa.chunked_array(list(ids_by_group.values()), type=pa.string())
    check_manifest(Path(cfg.work) / "manifest.parquet", meta, cache_ids)
    return current


def _check_stats(cfg: TrainConfig, latents_fp: dict[str, Any]) -> None:
    """latent_stats.json must describe the VAE that encoded the cache's latents."""
    path = Path(cfg.work) / "latent_stats.json"
    if not path.is_file():
        return  # build_latent_norm says what to run
    stats = read_json(path, artifact="latent_stats", produced_by="sdxl prep stats WORK --model MODEL")
    _warn(fingerprint.check(stats.get("model_fingerprint"), latents_fp, parts=("vae",), what="latent_stats.json",
                            where=str(path), model="the VAE that encoded the cache", allow=cfg.allow_model_change,
                            fix="re-measure it with the cache's VAE: `sdxl prep stats WORK --model MODEL`"))  # fmt: skip


def check_manifest(path: Path, meta: dict[str, Any], cache_ids: pa.ChunkedArray) -> None:
    """The manifest's ok ids must be the cache's ids plus the ones the cache stage could not read."""
    if not path.is_file():
        _warn(f"{path} not found: the cache is not compared with the manifest, and per-image repeats and "
              "caption dropout are not applied (every image once per epoch, data.p_uncond)")
        return
    table, _ = read_table(path, artifact="manifest", produced_by="sdxl prep scan", columns=["id", "status"])
    ok = table.filter(pc.equal(table["status"], "ok")).column("id").combine_chunks()
    cached = cache_ids.combine_chunks() if isinstance(cache_ids, pa.ChunkedArray) else cache_ids
    accounted = pa.concat_arrays([cached, pa.array(meta.get("skipped_ids", []), type=pa.string())])
    gone = cached.filter(pc.invert(pc.is_in(cached, value_set=ok)))
    new = ok.filter(pc.invert(pc.is_in(ok, value_set=accounted)))
    if len(gone) or len(new):
        first = (gone if len(gone) else new)[0].as_py()
        raise UserError(
            f"the cache does not match the manifest: {len(gone):,} cached image(s) are no longer in it, "
            f"{len(new):,} of its images are not cached (first: id {first}); training would use the old rows",
            where=str(path),
            fix=UPDATE_CACHE,
        )
