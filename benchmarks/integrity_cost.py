"""What the cache checksums and model fingerprints cost (docs/reliability.md), on this machine.

    python benchmarks/integrity_cost.py            # ~0.5 GB in /tmp; a minute on 2 cores

- full SHA-256 of one SDXL-size shard (256 MiB, 1024², 1 variant: ~212 rows, one row group each),
  warm (page cache) and cold (pages dropped with posix_fadvise DONTNEED);
- the start-up check of one shard: stat + footer hash (warm and cold);
- the model fingerprint of the real SDXL layout: safetensors files with SDXL's tensor names and
  shapes (built on the meta device from the packaged configs), written sparse, so the reads cost
  what the layout costs, not what a disk costs;
- projections for a 10-million-image cache. Writes benchmarks/out/integrity_cost.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from sdxl_trainer.cache_format import SDXL_DIMS, CacheRow, CacheWriter
from sdxl_trainer.cache_format.checksum import file_sha256, footer_sha256
from sdxl_trainer.models.fingerprint import part_fingerprint

CONFIGS = Path(__file__).resolve().parents[1] / "sdxl_trainer" / "models" / "configs" / "sdxl-base-1.0"
IMAGES = 10_000_000


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _timed(fn, *args, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def sdxl_shard(root: Path) -> Path:
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((4, 128, 128)).astype(np.float16)
    hid = rng.standard_normal((231, 2048)).astype(np.float16)
    pooled = rng.standard_normal(1280).astype(np.float16)
    with CacheWriter(root, dims=SDXL_DIMS, config={"bench": 1}, shard_max_bytes=256 << 20) as w:
        for i in range(212):
            w.add(CacheRow(id=f"{i:032x}", path=f"{i}.png", bucket_width=1024, bucket_height=1024, n_chunks=3,
                           original_height=1024, original_width=1024, crop_top=0, crop_left=0, target_height=1024,
                           target_width=1024, latent_mean=lat, latent_std=lat, text_hidden=[hid], text_pooled=[pooled],
                           captions=["x"]))  # fmt: skip
    return w.shards_written[0]


def sparse_safetensors(part: str, folder: Path) -> int:
    """A safetensors file with the real part's tensor names/shapes (fp16), data left sparse."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if part == "unet":
            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        elif part == "vae":
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
        else:
            cls = CLIPTextModel if part == "text_encoder" else CLIPTextModelWithProjection
            model = cls(CLIPTextConfig.from_pretrained(CONFIGS / part))
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        n = t.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return len(header)


def main() -> None:
    out: dict = {"date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores", "command": "python benchmarks/integrity_cost.py"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        shard = sdxl_shard(Path(tmp) / "cache")
        size = shard.stat().st_size
        warm = _timed(file_sha256, shard)
        _drop(shard)
        t = time.perf_counter()
        file_sha256(shard)
        cold = time.perf_counter() - t
        footer_warm = _timed(lambda: (shard.stat(), footer_sha256(shard)), repeat=20)
        _drop(shard)
        t = time.perf_counter()
        footer_sha256(shard)
        footer_cold = time.perf_counter() - t
        trailer = shard.read_bytes()[-8:]
        footer_len = int.from_bytes(trailer[:4], "little")
        shards_10m = IMAGES * 1_210_880 / size
        out["shard"] = {"bytes": size, "footer_bytes": footer_len, "sha256_MBps_warm": size / warm / 1e6,
                        "sha256_MBps_cold": size / cold / 1e6, "startup_check_ms_warm": footer_warm * 1e3,
                        "startup_check_ms_cold": footer_cold * 1e3}  # fmt: skip
        out["projection_10M_images"] = {
            "cache_TB": IMAGES * 1_210_880 / 1e12, "shards": shards_10m,
            "verify_hash_hours_at_warm_rate": IMAGES * 1_210_880 / (size / warm) / 3600,
            "startup_check_s_warm": shards_10m * footer_warm, "startup_check_s_cold": shards_10m * footer_cold,
            "startup_footer_GB_read": shards_10m * footer_len / 1e9,
        }  # fmt: skip
        fp = {}
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            n = sparse_safetensors(part, Path(tmp) / part)
            fp[part] = {"tensors": n, "ms": _timed(part_fingerprint, Path(tmp) / part) * 1e3}
        out["fingerprint_sdxl_layout"] = fp
    dest = Path(__file__).parent / "out" / "integrity_cost.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
