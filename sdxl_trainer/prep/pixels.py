"""The kept images of a manifest, and their RGB pixels exactly as the scan validated them.

`prep stats` and `prep cache` read pixels here. An image that decoded at scan time but is now gone,
unreadable or different (its content hash no longer matches the manifest id) is reported with a
reason instead of stopping a long encoding run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from sdxl_trainer.errors import UserError
from sdxl_trainer.prep.hf_source import open_source
from sdxl_trainer.prep.images import DEFAULT_MAX_PIXELS, BadImage, content_id, open_rgb
from sdxl_trainer.schema import read_table

ROW_COLUMNS = ("id", "path", "source", "status", "width", "height", "bucket_width", "bucket_height", "tags",
               "caption", "caption_kind", "n_chunks", "keep_tokens")  # fmt: skip


class PixelSource:
    """Opens manifest rows as RGB images, using the scan's source description and conversion settings."""

    def __init__(self, meta: dict[str, Any]):
        if "source" not in meta:
            raise UserError("manifest has no source description", fix="re-run `sdxl prep scan` with this version")
        self.source_meta = meta["source"]
        scan_cfg = meta.get("config") or {}
        self.alpha_background = scan_cfg.get("alpha_background", "white")
        self.max_pixels = scan_cfg.get("max_pixels", DEFAULT_MAX_PIXELS)

    def try_open(self, row: dict) -> tuple[Image.Image | None, str | None]:
        """``(image, None)``, or ``(None, reason)`` when the file changed or broke since the scan."""
        try:
            data = open_source(self.source_meta, row["source"]).read()
        except (OSError, KeyError, IndexError, UserError) as e:
            return None, f"unreadable since scan: {e}"
        if content_id(data) != row["id"]:
            return None, "content changed since scan (re-run `sdxl prep scan`)"
        try:
            return open_rgb(io.BytesIO(data), alpha_background=self.alpha_background, max_pixels=self.max_pixels), None
        except BadImage as e:
            return None, f"no longer decodes: {e}"


def read_manifest(work: Path) -> tuple[list[dict], PixelSource]:
    """The ok rows of WORK/manifest.parquet (as dicts, sorted by path) and a source that opens them."""
    table, meta = read_table(Path(work) / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    columns = [c for c in ROW_COLUMNS if c in table.column_names]
    rows = [r for r in table.select(columns).to_pylist() if r["status"] == "ok"]
    if not rows:
        raise UserError("the manifest has no usable (status ok) images", where=str(Path(work) / "manifest.parquet"),
                        fix="check the scan summary for why every image was skipped")  # fmt: skip
    rows.sort(key=lambda r: r["path"])
    return rows, PixelSource(meta)
