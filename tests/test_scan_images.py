"""One image at a time: every bad-input kind, EXIF orientation, every mode's RGB conversion, animations."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from sdxl_trainer.prep import images
from sdxl_trainer.prep.images import BadImage, open_rgb, probe_bytes

FULL = dict(full=True, max_pixels=10_000_000, min_side=16)
FAST = dict(FULL, full=False)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def rgb_at(im: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in im.getpixel((x, y)))


# ── bad inputs: each a skipped result with a reason code, never an exception ────────────────────


def test_good_jpeg_is_ok() -> None:
    r = probe_bytes(encode(noise(), "JPEG"), **FULL)
    assert r["status"] == "ok" and r["reason"] is None
    assert (r["format"], r["mode"], r["width"], r["height"], r["n_frames"]) == ("JPEG", "RGB", 96, 64, 1)
    assert r["conversion"] == "none" and r["exif_orientation"] == 1


def test_zero_byte_file() -> None:
    assert probe_bytes(b"", **FULL)["reason"] == "empty_file: 0 bytes"


@pytest.mark.parametrize("data", [b"hello, this is a text file\n" * 5, b"\x00" * 300, b"GIF89a garbage"])
def test_non_image_bytes(data: bytes) -> None:
    r = probe_bytes(data, **FULL)
    assert r["status"] == "skipped" and r["reason"].split(":")[0] in ("not_an_image", "corrupt")


def test_text_is_not_an_image_even_where_pillow_would_guess() -> None:
    # Pillow's TGA decoder accepts almost any bytes; only the formats we list are tried.
    data = bytes(range(256)) * 4
    assert probe_bytes(data, **FULL)["reason"].startswith("not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_truncated_file_is_caught_by_the_full_decode_only(fmt: str) -> None:
    im = noise(200, 150) if fmt != "GIF" else noise(200, 150).convert("P")
    data = encode(im, fmt)
    cut = data[: len(data) * 2 // 3]
    full = probe_bytes(cut, **FULL)
    assert full["status"] == "skipped" and full["reason"].startswith("truncated"), full["reason"]
    assert probe_bytes(cut, **FAST)["status"] == "ok"  # --fast reads the header only: it cannot know


def test_jpeg_draft_decoding_still_detects_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(640, 480), "JPEG", quality=95)
    cut = data[: len(data) - 2000]
    for mode in ("RGB", "L"):  # the probe asks for "L": chroma still entropy-decoded, not converted
        im = Image.open(io.BytesIO(cut))
        im.draft(mode, (1, 1))
        assert im.size == (80, 60) and im.mode == mode  # decoding at 1/8 scale
        with pytest.raises(OSError, match="truncated"):
            im.load()
    # and the probe takes that path
    calls = []
    real = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, *a: calls.append(a) or real(self, *a))
    assert probe_bytes(cut, **FULL)["reason"].startswith("truncated")
    assert probe_bytes(data, **FULL)["status"] == "ok"
    assert len(calls) == 2


def test_corrupt_png_data() -> None:
    data = bytearray(encode(noise(120, 90), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)  # wipe compressed pixels in the middle
    r = probe_bytes(bytes(data), **FULL)
    assert r["status"] == "skipped" and r["reason"].split(":")[0] in ("corrupt", "truncated")


def test_decompression_bomb_is_skipped_from_its_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    r = probe_bytes(png_claiming(100_000, 100_000), **FULL)
    assert r["status"] == "skipped"
    assert r["reason"] == "too_many_pixels: 100000×100000 = 10,000,000,000 pixels > max_pixels 10,000,000"
    assert (r["width"], r["height"]) == (100_000, 100_000)


def test_max_pixels_is_ours_not_pillows() -> None:
    # Pillow's own limit (~179 MP raises) must neither fire first nor linger after our calls.
    saved = Image.MAX_IMAGE_PIXELS
    r = probe_bytes(png_claiming(20_000, 10_000), **dict(FAST, max_pixels=500_000_000))
    assert r["status"] == "ok" and r["width"] == 20_000
    assert Image.MAX_IMAGE_PIXELS == saved and ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_small() -> None:
    r = probe_bytes(encode(noise(300, 40), "PNG"), **dict(FULL, min_side=64))
    assert r["reason"] == "too_small: 300×40, short side < min_side 64"
    assert probe_bytes(encode(noise(300, 64), "PNG"), **dict(FULL, min_side=64))["status"] == "ok"


def test_unreadable_file_is_a_row_not_a_crash(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = images.probe_task(("k", str(tmp_path / "gone.jpg"), None), **FULL)
    assert missing["status"] == "skipped" and missing["reason"].startswith("unreadable")
    assert missing["id"] is None

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(images, "read_file", denied)
    r = images.probe_task(("k", str(tmp_path / "x.jpg"), None), **FULL)
    assert r["reason"] == "unreadable: Permission denied"


def test_ids_are_blake2b_128_of_the_bytes() -> None:
    import hashlib

    data = encode(noise(), "PNG")
    r = images.probe_task(("k", None, data), **FULL)
    assert r["id"] == hashlib.blake2b(data, digest_size=16).hexdigest() and len(r["id"]) == 32
    assert r["file_size"] == len(data)


# ── EXIF orientation ──────────────────────────────────────────────────────────────────────────


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def with_orientation(im: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_is_rotated_for_display(fmt: str) -> None:
    data = with_orientation(halves(300, 200), 6, fmt)
    for opts in (FULL, FAST):
        r = probe_bytes(data, **opts)
        assert (r["width"], r["height"], r["exif_orientation"]) == (200, 300, 6)
    rgb = open_rgb(io.BytesIO(data))
    assert rgb.size == (200, 300)
    # 6 = rotate 90° clockwise to display: the left (red) half becomes the top
    top, bottom = rgb_at(rgb, 100, 20), rgb_at(rgb, 100, 280)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(rgb), np.asarray(reference))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillows_exif_transpose(orientation: int) -> None:
    data = with_orientation(halves(64, 32), orientation, "PNG")
    rgb = open_rgb(io.BytesIO(data))
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(rgb), np.asarray(reference))
    r = probe_bytes(data, **FULL)
    assert (r["width"], r["height"]) == (rgb.size if orientation > 1 else (64, 32))


def test_invalid_orientation_is_flagged_and_ignored() -> None:
    data = with_orientation(halves(64, 32), 42)
    r = probe_bytes(data, **FULL)
    assert r["status"] == "ok" and r["exif_orientation"] == 1 and r["image_flags"] == ["exif_orientation_invalid"]
    assert open_rgb(io.BytesIO(data)).size == (64, 32)


# ── modes: the recorded conversion and the pixels it gives ────────────────────────────────────


def _modes() -> list:
    grey = Image.new("L", (40, 30), 100)
    la = Image.new("LA", (40, 30), (100, 0))  # fully transparent
    p = Image.new("P", (40, 30), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    cmyk = Image.new("CMYK", (40, 30), (255, 0, 0, 0))  # pure cyan
    i16 = Image.fromarray(np.full((30, 40), 32896, np.uint16))  # 32896 / 257 = 128
    return [
        ("L", grey, "PNG", {}, "grey→RGB", (100, 100, 100)),
        ("LA", la, "PNG", {}, "grey+alpha over white→RGB", (255, 255, 255)),
        ("P", p, "PNG", {}, "palette→RGB", (10, 20, 30)),
        ("P", p, "PNG", {"transparency": 1}, "palette transparency over white→RGB", (255, 255, 255)),
        ("RGBA", rgba, "PNG", {}, "alpha over white→RGB", (255, 127, 127)),
        ("CMYK", cmyk, "JPEG", {"quality": 100}, "CMYK→RGB", (0, 255, 255)),
        ("CMYK", cmyk, "TIFF", {}, "CMYK→RGB", (0, 255, 255)),
        ("I;16", i16, "PNG", {}, "16-bit grey ÷257→8-bit→RGB", (128, 128, 128)),
        ("1", Image.new("1", (40, 30), 1), "PNG", {}, "1-bit→RGB", (255, 255, 255)),
    ]


@pytest.mark.parametrize(("mode", "im", "fmt", "kw", "conversion", "pixel"), _modes(),
                         ids=[f"{m[0]}-{m[2]}-{len(m[3])}" for m in _modes()])  # fmt: skip
def test_mode_conversion(mode: str, im: Image.Image, fmt: str, kw: dict, conversion: str, pixel: tuple) -> None:
    data = encode(im, fmt, **kw)
    r = probe_bytes(data, **FULL)
    assert (r["status"], r["mode"], r["conversion"]) == ("ok", mode, conversion)
    rgb = open_rgb(io.BytesIO(data))
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    assert rgb_at(rgb, 5, 5) == pytest.approx(pixel, abs=2)


def test_alpha_background_black() -> None:
    data = encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG")
    assert rgb_at(open_rgb(io.BytesIO(data), alpha_background="black"), 1, 1) == (0, 0, 0)
    assert rgb_at(open_rgb(io.BytesIO(data)), 1, 1) == (255, 255, 255)
    r = probe_bytes(data, **dict(FULL, alpha_background="black"))
    assert r["conversion"] == "alpha over black→RGB"


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    rgb = np.asarray(open_rgb(io.BytesIO(encode(Image.fromarray(ramp), "PNG"))))[..., 0]
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb.astype(int) - np.round(ramp / 257)).max() <= 1  # Pillow's own convert("L") clips at 255


def rgb_profile(*, swap_red_green: bool) -> bytes:
    """A minimal ICC v2 matrix/TRC RGB profile: sRGB's primaries (red and green swapped if asked)
    and a 2.2 gamma, so converting it to sRGB visibly swaps red and green."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    if swap_red_green:
        red, green = green, red
    text = b"swapped test RGB\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]  # fmt: skip
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))  # fmt: skip
    return header + struct.pack(">I", len(tags)) + table + body


def test_icc_profile_is_converted_to_srgb() -> None:
    from PIL import ImageCms

    im = Image.new("RGB", (40, 30), (200, 100, 50))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = encode(im, "PNG", icc_profile=srgb)
    assert probe_bytes(plain, **FULL)["conversion"] == "none"  # sRGB already: nothing to do
    assert rgb_at(open_rgb(io.BytesIO(plain)), 3, 3) == (200, 100, 50)
    swapped = encode(im, "PNG", icc_profile=rgb_profile(swap_red_green=True))
    r = probe_bytes(swapped, **FULL)
    assert (r["status"], r["conversion"]) == ("ok", "ICC profile→sRGB")
    assert rgb_at(open_rgb(io.BytesIO(swapped)), 3, 3) == pytest.approx((100, 200, 50), abs=6)
    same = encode(im, "JPEG", quality=100, icc_profile=rgb_profile(swap_red_green=False))
    assert rgb_at(open_rgb(io.BytesIO(same)), 3, 3) == pytest.approx((200, 100, 50), abs=6)


def test_broken_icc_profile_is_ignored_and_said_so() -> None:
    data = encode(Image.new("RGB", (40, 30), (200, 100, 50)), "PNG", icc_profile=b"not a profile" * 10)
    r = probe_bytes(data, **FULL)
    assert (r["status"], r["conversion"]) == ("ok", "ICC profile unreadable, ignored")
    assert rgb_at(open_rgb(io.BytesIO(data)), 3, 3) == (200, 100, 50)


# ── animations: first frame, frame count ──────────────────────────────────────────────────────


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r = probe_bytes(data, **FULL)
    assert r["status"] == "ok" and r["n_frames"] == 3
    rgb = open_rgb(io.BytesIO(data))
    assert rgb_at(rgb, 10, 10) == pytest.approx((255, 0, 0), abs=8)


def test_open_rgb_raises_badimage_for_bad_input(tmp_path) -> None:
    with pytest.raises(BadImage, match="not_an_image"):
        open_rgb(io.BytesIO(b"nope" * 100))
    with pytest.raises(BadImage, match="too_many_pixels"):
        open_rgb(io.BytesIO(png_claiming(50_000, 50_000)))
    p = tmp_path / "a.png"
    p.write_bytes(encode(noise(), "PNG"))
    assert open_rgb(p).size == (96, 64) and open_rgb(str(p)).mode == "RGB"


def test_pillow_limits_are_restored_after_concurrent_use() -> None:
    from concurrent.futures import ThreadPoolExecutor

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    data = encode(noise(400, 300), "PNG")
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: open_rgb(io.BytesIO(data)).size, range(32)))
    assert sizes == [(400, 300)] * 32
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == saved
