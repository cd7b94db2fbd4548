"""`sdxl prep cache`: every kept image's latents and its caption variants' chunked text embeddings.

Per rank (torchrun gives each a disjoint share; one process without it):
  1. rank 0 checks an existing cache was built with the same settings (else refuse, or --overwrite);
  2. leftovers of a killed run are removed, ids already in finished shards are skipped — so a run
     stopped by Ctrl-C or kill -9 is finished by running the same command again;
  3. images are encoded a bucket at a time: VAE posterior mean and std (training draws a fresh
     latent each epoch), optionally the mirrored crop too; N caption variants per image through both
     CLIP encoders with NovelAI's 75-token chunking;
  4. rank 0 encodes the empty prompt once (unconditional dropout) and finalises cache_meta.json.
The format and its guarantees live in `sdxl_trainer.cache_format` (docs/cache-format.md).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer import console, disk, dist
from sdxl_trainer.cache_format import CacheDims, CacheRow, CacheWriter, check_config, clean_partial, completed_ids
from sdxl_trainer.cache_format import Group, finalise, row_bytes, verify
from sdxl_trainer.config import CacheConfig
from sdxl_trainer.errors import UserError
from sdxl_trainer.models import fingerprint
from sdxl_trainer.models.loading import load_text_encoders, load_tokenizers, load_vae
from sdxl_trainer.models.text import count_chunks, encode_prompts
from sdxl_trainer.prep.cache_sync import check_cache_model, check_latent_stats, sync_with_manifest, variant_texts
from sdxl_trainer.prep.pixels import PixelSource, read_manifest
from sdxl_trainer.prep.transforms import apply_crop, flipped_crop_left, plan_crop, to_tensor

MiB = 1 << 20


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it (fast, and unlike fp16 cannot overflow), else fp32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def content_config(cfg: CacheConfig, vae_dtype: torch.dtype, text_dtype: torch.dtype) -> dict[str, Any]:
    """The settings that change what is stored: a resumed run must match them exactly."""
    return {
        "model": str(Path(cfg.model).resolve()),
        "vae": str(Path(cfg.vae).resolve()) if cfg.vae else None,
        "vae_dtype": str(vae_dtype).removeprefix("torch."),
        "text_dtype": str(text_dtype).removeprefix("torch."),
        "crop": cfg.crop,
        "flip": cfg.flip,
        "max_chunks": cfg.max_chunks,
        "variants": cfg.variants.model_dump(mode="json"),
        "seed": cfg.seed,
    }


class Encoder:
    """The frozen VAE and text encoders, and how one batch of manifest rows becomes CacheRows."""

    def __init__(self, cfg: CacheConfig, device: torch.device, vae_dtype: torch.dtype, text_dtype: torch.dtype):
        self.cfg, self.device = cfg, device
        self.vae = load_vae(cfg.model, vae=cfg.vae, dtype=vae_dtype, device=device)
        self.tok1, self.tok2 = load_tokenizers(cfg.model)
        self.te1, self.te2 = load_text_encoders(cfg.model, dtype=text_dtype, device=device)
        self.dims = CacheDims(
            latent_channels=int(self.vae.config.latent_channels),
            text_dim=int(self.te1.config.hidden_size + self.te2.config.hidden_size),
            pooled_dim=int(self.te2.config.projection_dim),
            variants=cfg.variants.count,
        )

    def text(self, texts: list[str], n_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = encode_prompts(
            self.tok1, self.tok2, self.te1, self.te2, texts, max_chunks=self.cfg.max_chunks, n_chunks=n_chunks
        )
        return hidden.float().cpu(), pooled.float().cpu()

    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist_ = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist_.mean.float().cpu(), dist_.std.float().cpu()

    def captions(self, row: dict) -> tuple[list[str], int]:
        texts = variant_texts(self.cfg, row)
        # Every variant of an image shares one chunk count (shorter ones get empty chunks, as A1111
        # pads cond/uncond), so one image is one row in one (bucket, chunks) partition.
        n = max(count_chunks(self.tok1, t, max_chunks=self.cfg.max_chunks) for t in texts)
        return texts, n

    def batch_text(self, rows: list[dict]) -> list[tuple[list[str], int, torch.Tensor, torch.Tensor]]:
        """Every variant of every row, encoded in one text-encoder call per chunk count."""
        per_row = [self.captions(r) for r in rows]
        out: list = [None] * len(rows)
        for n in sorted({n for _, n in per_row}):
            idx = [i for i, (_, k) in enumerate(per_row) if k == n]
            flat = [t for i in idx for t in per_row[i][0]]
            hidden, pooled = self._text_batched(flat, n)
            v = self.cfg.variants.count
            for j, i in enumerate(idx):
                out[i] = (per_row[i][0], n, hidden[j * v : (j + 1) * v], pooled[j * v : (j + 1) * v])
        return out

    def _text_batched(self, texts: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.text(texts[i : i + self.cfg.text_batch_size], n) for i in range(0, len(texts), self.cfg.text_batch_size)]
        return torch.cat([h for h, _ in parts]), torch.cat([p for _, p in parts])

    @torch.no_grad()
    def encode_batch(self, rows: list[dict], images: list, bucket: tuple[int, int]) -> list[CacheRow]:
        bw, bh = bucket
        crops, pixels, flipped = [], [], []
        for row, image in zip(rows, images):
            rng = random.Random(f"{self.cfg.seed}:{row['id']}") if self.cfg.crop == "random" else None
            crop = plan_crop(width=image.width, height=image.height, bucket_width=bw, bucket_height=bh,
                             mode=self.cfg.crop, rng=rng)  # fmt: skip
            t = to_tensor(apply_crop(image, crop, bucket_width=bw, bucket_height=bh))
            crops.append(crop)
            pixels.append(t)
            flipped.append(t.flip(-1))
        mean, std = self.latents(torch.stack(pixels))
        mean_f = std_f = None
        if self.cfg.flip:
            mean_f, std_f = self.latents(torch.stack(flipped))
        texts = self.batch_text(rows)
        out = []
        for i, (row, image, crop) in enumerate(zip(rows, images, crops)):
            captions, n, hidden, pooled = texts[i]
            out.append(
                CacheRow(
                    id=row["id"], path=row["path"], bucket_width=bw, bucket_height=bh, n_chunks=n,
                    original_height=image.height, original_width=image.width,
                    crop_top=crop.top, crop_left=crop.left, target_height=bh, target_width=bw,
                    latent_mean=mean[i], latent_std=std[i], text_hidden=list(hidden), text_pooled=list(pooled),
                    captions=captions,
                    latent_mean_flip=None if mean_f is None else mean_f[i],
                    latent_std_flip=None if std_f is None else std_f[i],
                    crop_left_flip=flipped_crop_left(crop, bucket_width=bw) if self.cfg.flip else None,
                )  # fmt: skip
            )
        return out


def _batches(rows: list[dict], batch_size: int):
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_bucket.setdefault((r["bucket_width"], r["bucket_height"]), []).append(r)
    for bucket, group in sorted(by_bucket.items()):
        for i in range(0, len(group), batch_size):
            yield bucket, group[i : i + batch_size]


def _encode_share(enc: Encoder, writer: CacheWriter, rows: list[dict], source: PixelSource, skipped_log: Path) -> int:
    """Encode this rank's rows; images that broke since the scan are logged and skipped."""
    skipped = 0
    with console.progress("cache", len(rows), "img") as advance, skipped_log.open("a") as log:
        for bucket, batch in _batches(rows, enc.cfg.batch_size):
            good, images = [], []
            for r in batch:
                image, reason = source.try_open(r)
                if image is None:
                    log.write(json.dumps({"id": r["id"], "path": r["path"], "reason": reason}) + "\n")
                    skipped += 1
                else:
                    good.append(r)
                    images.append(image)
            for row in enc.encode_batch(good, images, bucket) if good else []:
                writer.add(row)
            advance(len(batch))
    return skipped


def run(cfg: CacheConfig, *, verify_after: bool = False) -> dict:
    """Encode the whole manifest into WORK/cache (resuming a stopped run) and finalise it."""
    info = dist.init(device=cfg.device)
    try:
        return _run(cfg, info, verify_after)
    finally:
        dist.shutdown(info)


def _run(cfg: CacheConfig, info: dist.DistInfo, verify_after: bool) -> dict:
    cache = Path(cfg.work) / "cache"
    rows, source = read_manifest(cfg.work)
    device = dist.local_device(info, cfg.device)
    vae_dtype, text_dtype = resolve_precision(cfg.vae_dtype, device), resolve_precision(cfg.text_dtype, device)
    enc = Encoder(cfg, device, vae_dtype, text_dtype)
    recorded = content_config(cfg, vae_dtype, text_dtype)
    model_fp = fingerprint.model_fingerprint(cfg.model, vae=cfg.vae, parts=fingerprint.CACHE_PARTS)
    if info.is_main:
        check_config(cache, config=recorded, dims=enc.dims, overwrite=cfg.overwrite)
        check_cache_model(cfg, cache, model_fp)
        check_latent_stats(cfg, model_fp)
        # Every rank's leftovers, also those of ranks a killed run had and this one lacks.
        clean_partial(cache)
        sync_with_manifest(cfg, cache, rows)  # a rescan: drop rows whose image left or changed
    dist.barrier(info, "cache config check")
    done = completed_ids(cache)
    share = [r for i, r in enumerate(rows) if i % info.world_size == info.rank and r["id"] not in done]
    if info.is_main:
        _check_disk(cache, enc, [r for r in rows if r["id"] not in done])
    skipped_log = cache / "skipped" / f"r{info.rank:03d}.jsonl"
    skipped_log.parent.mkdir(parents=True, exist_ok=True)
    skipped_log.write_text("")  # this run's outcome; images skipped before are retried now
    with CacheWriter(cache, dims=enc.dims, config=recorded, rank=info.rank, world_size=info.world_size,
                     shard_max_bytes=min(cfg.shard_max_mb, 1024) * MiB,
                     provenance={"model_fingerprint": model_fp}) as writer:  # fmt: skip
        skipped = _encode_share(enc, writer, share, source, skipped_log)
    dist.barrier(info, "cache encoding finished")
    if not info.is_main:
        return {"rank": info.rank, "encoded": writer.rows_written, "skipped": skipped}
    with torch.no_grad():
        hidden, pooled = enc.text([""], 1)
    # what the trainer compares with the manifest: ok ids = cached ids + the ones skipped here
    extra = {"model_fingerprint": model_fp, "manifest": {"ok_rows": len(rows)},
             "skipped_ids": sorted({s["id"] for s in _skipped_rows(cache)})}  # fmt: skip
    meta = finalise(cache, config=recorded, dims=enc.dims, uncond={"text_hidden": hidden[0], "text_pooled": pooled[0]},
                    extra=extra)  # fmt: skip
    return _report(cfg, meta, cache, len(rows), len(done), verify_after)


def estimate_bytes(enc: Encoder, rows: list[dict]) -> int:
    """Tensor bytes the rows will take (chunk counts from the scan when it counted them, else 1)."""
    total = 0
    for r in rows:
        n = min(r.get("n_chunks") or 1, enc.cfg.max_chunks)
        total += row_bytes(enc.dims, Group(r["bucket_width"], r["bucket_height"], n), flip=enc.cfg.flip)
    return total


def _check_disk(cache: Path, enc: Encoder, todo: list[dict]) -> None:
    """Say up front how big the cache will be, and refuse to start a run the disk cannot hold."""
    need = estimate_bytes(enc, todo)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    disk.expect(cache, need)  # a disk-full error mid-run says how much the whole cache needs
    size = console.format_bytes
    console.info(f"cache: {len(todo):,} images to encode, about {size(need)} ({size(need / max(len(todo), 1))} "
                 f"each); {size(free)} free")  # fmt: skip
    if need > free:
        raise UserError(
            f"the cache needs about {size(need)} but only {size(free)} is free",
            where=str(cache),
            fix="free space, move WORK to a bigger disk, or lower --variants / --max-chunks / drop --flip",
        )


def _skipped_rows(cache: Path) -> list[dict]:
    out = []
    for log in sorted((cache / "skipped").glob("r*.jsonl")):
        for line in log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that image is retried on the next run anyway
    return out


def _report(cfg: CacheConfig, meta: dict, cache: Path, n_manifest: int, n_resumed: int, verify_after: bool) -> dict:
    skipped = _skipped_rows(cache)
    summary = {
        "manifest_ok": n_manifest,
        "cached": meta["rows"],
        "resumed_from_previous_run": n_resumed,
        "skipped": len(skipped),
        "groups": len(meta["groups"]),
        "bytes_per_sample": meta["bytes_per_sample"],
        "bytes_total": meta["bytes_total"],
    }
    rows = [(k.replace("_", " "), f"{v:,.0f}" if isinstance(v, (int, float)) else v) for k, v in summary.items()]
    rows += [(f"skipped: {s['path']}", s["reason"]) for s in skipped[:10]]
    console.table(f"cache → {cache}", rows, ("", ""))
    if verify_after:
        report = verify(cache)
        summary["verify_ok"] = report.ok
        for w in report.warnings:
            console.info(f"[yellow]warning: {w}[/]")
        if not report.ok:
            raise UserError(f"cache verification failed: {'; '.join(report.problems[:5])}", where=str(cache),
                            fix="delete the shard(s) named and re-run `sdxl prep cache WORK --model MODEL` (it "
                            "re-encodes only their rows), or rebuild with --overwrite")  # fmt: skip
        console.info(f"[green]verified[/] {meta['rows']} rows: counts match, every tensor finite")
    return summary
