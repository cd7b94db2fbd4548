"""Open, validate and convert one image: the scan's probe and the RGB pixels every later stage uses.

:func:`probe_task` runs in a scan worker (the pool is :mod:`sdxl_trainer.prep.pool`): it reads the
file once, hashes it (the row id) and checks it, returning a plain dict and never raising. :func:`open_rgb` gives later stages (stats, cache)
the same RGB pixels the scan validated: first frame, EXIF orientation applied, every mode converted
the way :func:`conversion_for` describes, alpha composited on a background.

Pillow's own decompression-bomb check and its truncated-image switch are process-wide globals;
both are pinned while we open a file (:func:`_own_limits`) so that our ``max_pixels`` is the one
limit, checked on the header *before* any pixel is allocated, and a truncated file always fails.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Only these decoders are tried: Pillow would otherwise "recognise" random bytes as e.g. TGA.
# (Camera MPO files come in through the JPEG decoder.)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
DEFAULT_MAX_PIXELS = 120_000_000
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_MODE_STEPS = {
    "RGB": [], "L": ["grey→RGB"], "1": ["1-bit→RGB"], "RGBX": ["RGBX→RGB"], "CMYK": ["CMYK→RGB"],
    "YCbCr": ["YCbCr→RGB"], "LAB": ["LAB→RGB"], "HSV": ["HSV→RGB"],
    **{m: ["16-bit grey ÷257→8-bit→RGB"] for m in _SIXTEEN_BIT},
    "I": ["32-bit grey clipped to 0..65535 ÷257→8-bit→RGB"],
    "F": ["float grey clipped to 0..1 ×255→8-bit→RGB"],
}  # fmt: skip
_ALPHA_MODES = {"RGBA": "alpha", "RGBa": "alpha", "LA": "grey+alpha", "La": "grey+alpha", "PA": "palette+alpha"}


class BadImage(Exception):
    """A file that cannot be used; ``str()`` is the manifest reason, ``code: detail``."""

    def __init__(self, code: str, detail: str):
        self.code = code
        super().__init__(f"{code}: {detail}")


_limits_lock = threading.Lock()
_limits_state: dict[str, Any] = {"depth": 0, "saved": None}


@contextmanager
def _own_limits() -> Iterator[None]:
    # Counted, so that threads opening images at the same time restore Pillow's values only when the
    # last one leaves (a plain save/restore per call could leave them switched for good).
    with _limits_lock:
        if _limits_state["depth"] == 0:
            _limits_state["saved"] = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        _limits_state["depth"] += 1
    try:
        yield
    finally:
        with _limits_lock:
            _limits_state["depth"] -= 1
            if _limits_state["depth"] == 0:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = _limits_state["saved"]


def _open(fp: IO[bytes]) -> Image.Image:
    try:
        return Image.open(fp, formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "not a readable JPEG, PNG, WebP, BMP, TIFF or GIF") from None
    except Exception as e:  # a broken header: Pillow raises SyntaxError, struct.error, ValueError …
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise BadImage("corrupt", f"header says {w}×{h}")
    if w * h > max_pixels:
        raise BadImage("too_many_pixels", f"{w}×{h} = {w * h:,} pixels > max_pixels {max_pixels:,}")


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as e:  # OSError, SyntaxError, zlib errors …: all mean the pixels are unusable
        code = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImage(code, f"{type(e).__name__}: {e}") from None


def exif_orientation(im: Image.Image, *, loaded: bool) -> tuple[int, list[str]]:
    """EXIF orientation 1..8 and flags. A PNG's eXIf chunk may follow the pixels: header-only
    probing reads only one that precedes them (reading the rest would decode the image)."""
    try:
        if im.format == "PNG" and not loaded:
            exif = Image.Exif()
            if im.info.get("exif"):
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        value = exif.get(0x0112, 1)
    except Exception:
        return 1, ["exif_unreadable"]
    if not isinstance(value, int) or not 1 <= value <= 8:
        return 1, ["exif_orientation_invalid"]
    return value, []


def display_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _ROTATED else size


def apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    return im.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else im


@functools.lru_cache(maxsize=16)
def _icc_transform(profile: bytes, mode: str) -> Any:
    """A transform to sRGB, or None when the profile already is sRGB (most files)."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    if "srgb" in ImageCms.getProfileDescription(src).lower().replace(" ", ""):
        return None
    return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, "RGB")


def _icc_step(im: Image.Image, flat_mode: str) -> str | None:
    profile = im.info.get("icc_profile")
    if not profile or flat_mode not in ("RGB", "L", "CMYK"):
        return None
    try:
        return "ICC profile→sRGB" if _icc_transform(profile, flat_mode) is not None else None
    except Exception:  # a broken profile: the pixels are still usable, the row says so
        return "ICC profile unreadable, ignored"


def _flat_mode(im: Image.Image) -> str:
    """The mode the pixels have once alpha is composited, before any ICC transform."""
    if im.mode in ("L", "CMYK") and "transparency" not in im.info:
        return im.mode
    return "RGB"


def conversion_for(im: Image.Image, *, alpha_background: str = "white") -> str:
    """How ``open_rgb`` turns this image's stored mode into RGB, in words (the manifest records it)."""
    mode, transparency = im.mode, "transparency" in im.info
    if mode == "P":
        steps = [f"palette transparency over {alpha_background}→RGB"] if transparency else ["palette→RGB"]
    elif mode in _ALPHA_MODES:
        steps = [f"{_ALPHA_MODES[mode]} over {alpha_background}→RGB"]
    elif mode in _MODE_STEPS:
        steps = list(_MODE_STEPS[mode])
        if transparency and mode in ("RGB", "L"):
            steps.append(f"transparent colour over {alpha_background}")
    else:
        raise BadImage("unsupported_mode", f"Pillow mode {mode!r} has no RGB conversion here")
    icc = _icc_step(im, _flat_mode(im))
    return " + ".join(steps + ([icc] if icc else [])) or "none"


def _high_bit_grey(im: Image.Image) -> Image.Image:
    # Pillow's own I;16 → L conversion clips at 255 instead of scaling, which whites out the image.
    a = np.asarray(im)
    if im.mode == "F":
        a8 = np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5
    else:
        a8 = (np.clip(a.astype(np.int64), 0, 65535) + 128) // 257
    return Image.fromarray(a8.astype(np.uint8), "L")


def _composite(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def to_rgb(im: Image.Image, *, alpha_background: str = "white") -> Image.Image:
    """Loaded image (any supported mode) → 8-bit RGB, as :func:`conversion_for` describes."""
    conversion_for(im, alpha_background=alpha_background)  # raises for an unsupported mode
    profile = im.info.get("icc_profile")
    flat_mode = _flat_mode(im)
    if im.mode in (*_SIXTEEN_BIT, "I", "F"):
        flat = _high_bit_grey(im)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        flat = _composite(im, BACKGROUNDS[alpha_background])
    elif im.mode in ("RGB", "L", "CMYK"):
        flat = im
    else:
        flat = im.convert("RGB")
    transform = None
    if profile and flat.mode == flat_mode and flat_mode in ("RGB", "L", "CMYK"):
        try:
            transform = _icc_transform(profile, flat_mode)
        except Exception:
            transform = None  # recorded as "ICC profile unreadable, ignored" by conversion_for
    if transform is not None:
        return ImageCms.applyTransform(flat, transform)
    return flat if flat.mode == "RGB" and flat is not im else flat.convert("RGB")


def open_rgb(
    source: str | os.PathLike | IO[bytes],
    *,
    alpha_background: str = "white",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """The RGB pixels of an image file as the scan validated them (raises :class:`BadImage`)."""
    fp = io.BytesIO(Path(source).read_bytes()) if isinstance(source, (str, os.PathLike)) else source
    with _own_limits():
        im = _open(fp)
        _check_pixels(im.size, max_pixels)
        _load(im)
        orientation, _ = exif_orientation(im, loaded=True)
        return apply_orientation(to_rgb(im, alpha_background=alpha_background), orientation)


def _count_frames(im: Image.Image) -> tuple[int | None, list[str]]:
    try:
        n = int(getattr(im, "n_frames", 1))
        im.seek(0)
        return n, []
    except Exception:  # a later frame is broken; the first one is all we use
        try:
            im.seek(0)
        except Exception as e:
            raise BadImage("corrupt", f"cannot return to the first frame: {type(e).__name__}: {e}") from None
        return None, ["frames_unreadable"]


def _probe(data: bytes, facts: dict[str, Any], *, full: bool, max_pixels: int, min_side: int, background: str) -> None:
    if not data:
        raise BadImage("empty_file", "0 bytes")
    im = _open(io.BytesIO(data))
    facts.update(format=im.format, mode=im.mode, width=im.size[0], height=im.size[1])
    _check_pixels(im.size, max_pixels)
    if min(im.size) < min_side:  # rotation cannot change the short side
        raise BadImage("too_small", f"{im.size[0]}×{im.size[1]}, short side < min_side {min_side}")
    facts["n_frames"], flags = _count_frames(im)
    # What can fail in the RGB conversion fails here (an unsupported mode, an ICC profile littleCMS
    # cannot use), so converting the decoded pixels again would only cost time (≈ the decode, for RGBA).
    facts["conversion"] = conversion_for(im, alpha_background=background)
    if full:
        if im.format in ("JPEG", "MPO"):
            # Decode at 1/8 scale (and colour JPEGs as grey): libjpeg still entropy-decodes every
            # block of every component, so truncation and broken Huffman data are caught, but skips
            # most of the IDCT, the upsampling and the colour conversion. Half the time of a decode.
            im.draft("L" if im.mode == "RGB" else im.mode, (1, 1))
        _load(im)
        orientation, more = exif_orientation(im, loaded=True)
    else:
        orientation, more = exif_orientation(im, loaded=False)
    w, h = display_size((facts["width"], facts["height"]), orientation)
    facts.update(width=w, height=h, exif_orientation=orientation, image_flags=flags + more)


def probe_bytes(
    data: bytes, *, full: bool, max_pixels: int, min_side: int, alpha_background: str = "white"
) -> dict[str, Any]:
    """Check one encoded image; never raises. ``status`` is ``ok`` or ``skipped`` with a ``reason``."""
    facts: dict[str, Any] = {"status": "ok", "reason": None, "image_flags": []}
    try:
        with _own_limits():
            _probe(data, facts, full=full, max_pixels=max_pixels, min_side=min_side, background=alpha_background)
    except BadImage as e:
        facts.update(status="skipped", reason=str(e))
    except Exception as e:  # MemoryError, a decoder bug …: a row with a reason, never a dead scan
        facts.update(status="skipped", reason=f"corrupt: {type(e).__name__}: {e}")
    return facts


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def content_id(data: bytes) -> str:
    """The row id: blake2b-128 of the file bytes, hex (stable across renames and rescans)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def probe_task(task: tuple[str, str | None, bytes | None], **options: Any) -> dict[str, Any]:
    """``(key, path, data)`` → probe dict plus ``key``, ``id`` and ``file_size``. Reads ``path``
    when ``data`` is None (a folder scan); an unreadable file is a skipped row with ``id`` None."""
    key, path, data = task
    if data is None:
        try:
            data = read_file(path)
        except OSError as e:
            return {"key": key, "id": None, "status": "skipped", "reason": f"unreadable: {e.strerror or e}",
                    "image_flags": []}
    result = probe_bytes(data, **options)
    result.update(key=key, id=content_id(data), file_size=len(data))
    return result


def probe_chunk(tasks: list[tuple[str, str | None, bytes | None]], **options: Any) -> list[dict[str, Any]]:
    """A worker's unit of work: several files per inter-process round trip."""
    return [probe_task(t, **options) for t in tasks]


def probe_flags(flags: list[str]) -> list[str]:
    """The flags a probe sets (as opposed to caption or bucket flags), for reuse on a rescan."""
    return [f for f in flags if f.startswith(("exif_", "frames_"))]
