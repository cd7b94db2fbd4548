"""The latent + text cache on disk: format, writer, resume, verify and the low-level reader.

Written by ``sdxl prep cache`` and read by the trainer, which imports this package and never
``sdxl_trainer.prep``. docs/cache-format.md describes the layout, the columns and the guarantees.

Writer side (rank 0 prepares, every rank writes its share, rank 0 finalises)::

    check_config(cache, config=cfg, dims=dims, overwrite=overwrite)
    clean_partial(cache)
    done = completed_ids(cache)
    with CacheWriter(cache, dims=dims, config=cfg, rank=rank, world_size=world) as w:
        for row in encode(ids not in done):
            w.add(row)
    finalise(cache, config=cfg, dims=dims, uncond={"text_hidden": h, "text_pooled": p})

Reader side::

    groups = list_groups(cache)            # {(W, H, n_chunks): [ShardInfo(path, rows), ...]}
    batch = Shard(path).read_rows([3, 17, 5], variant=[0, 1, 0], flip=[False, True, False])
    # reads only the row groups, latents (plain or flipped) and text variant each row needs
"""

from sdxl_trainer.cache_format.finalise import finalise, read_meta
from sdxl_trainer.cache_format.layout import (
    SDXL_DIMS,
    CacheDims,
    Group,
    binary_to_tensor,
    cache_schema,
    fp16_bytes_to_tensor,
    row_bytes,
    tensor_to_fp16_bytes,
)
from sdxl_trainer.cache_format.prune import prune
from sdxl_trainer.cache_format.reader import Shard, ShardInfo, decode_batch, list_groups, load_uncond, read_rows
from sdxl_trainer.cache_format.resume import check_config, clean_partial, completed_ids, remove_cache
from sdxl_trainer.cache_format.verify import VerifyReport, verify
from sdxl_trainer.cache_format.writer import CacheRow, CacheWriter

__all__ = [
    "SDXL_DIMS",
    "CacheDims",
    "CacheRow",
    "CacheWriter",
    "Group",
    "Shard",
    "ShardInfo",
    "VerifyReport",
    "binary_to_tensor",
    "cache_schema",
    "check_config",
    "clean_partial",
    "completed_ids",
    "decode_batch",
    "finalise",
    "fp16_bytes_to_tensor",
    "list_groups",
    "load_uncond",
    "prune",
    "read_meta",
    "read_rows",
    "remove_cache",
    "row_bytes",
    "tensor_to_fp16_bytes",
    "verify",
]
