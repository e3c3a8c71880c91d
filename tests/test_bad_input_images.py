"""Bad image files (corrupt, empty, decompression bombs) give one clear error; every PIL
mode becomes RGB tiles.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image


# ---- images ---------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _png(size=(40, 24)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty_file": (b"", r"empty image (file|bytes)"),
    "text_file": (b"this is not an image\n" * 10, r"not an image file"),
    "truncated_png": (_png()[:120], r"corrupt image data|cannot read image"),
    "corrupt_png_body": (
        _png()[:60] + b"\x00" * 500 + _png()[-60:],
        r"corrupt image data|cannot read image|not an image file",
    ),
    "bomb_over_pil_limit": (png_header_only(100_000, 100_000), r"refusing to decode a possible decompression bomb"),
    "bomb_over_our_limit": (
        png_header_only(10_000, 9_000),
        r"10000x9000 = 90000000 pixels exceeds the limit of 89478485",
    ),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_files(case, tmp_path):
    from jaxvlm.image_processing import ImageProcessor

    data, pattern = BAD_IMAGES[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(data)
    proc = ImageProcessor(32, 64, False, True)
    with pytest.raises(ValueError, match=pattern) as info:
        proc(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=pattern):
        proc(data)  # the same bytes from memory
    assert path.read_bytes() == data


def _mode_image(mode: str, rng) -> Image.Image:
    """A random 40 x 16 image in `mode` (a 1 x 2 tile grid), built from arrays where PIL allows it."""
    h, w = 16, 40
    u8 = lambda c: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)  # noqa: E731
    if mode == "1":
        return Image.fromarray(u8(1) > 127)
    if mode in ("L", "P"):
        return Image.fromarray(u8(1), "L") if mode == "L" else Image.fromarray(u8(3), "RGB").convert("P")
    if mode in ("LA", "RGB", "RGBA", "CMYK"):
        return Image.fromarray(u8(len(mode)), mode)
    if mode == "PA":
        return Image.fromarray(u8(4), "RGBA").convert("PA")
    if mode == "La":
        return Image.fromarray(u8(2), "LA").convert("La")
    if mode == "RGBa":
        return Image.fromarray(u8(4), "RGBA").convert("RGBa")
    if mode == "YCbCr":
        return Image.fromarray(u8(3), "RGB").convert("YCbCr")
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32), "I")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))  # mode I;16
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    raise AssertionError(mode)


def _expected_rgb(im: Image.Image) -> np.ndarray:
    """uint8[H, W, 3] the processor should see, computed independently of jaxvlm."""
    a = np.asarray(im)
    if im.mode == "I;16":
        g = np.round(a.astype(np.float64) * 255 / 65535)
    elif im.mode == "I":
        g = np.round(np.clip(a, 0, 65535) * 255 / 65535) if a.max() > 255 else a
    elif im.mode == "F":
        g = np.round(a.astype(np.float64) * 255)
    elif im.mode == "La":
        return np.asarray(im.convert("LA").convert("RGB"))
    else:
        return np.asarray(im.convert("RGB"))
    g = np.clip(g, 0, 255).astype(np.uint8)
    return np.stack([g] * 3, axis=-1)


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "F"]
FILE_FORMAT = {
    "1": "PNG",
    "L": "PNG",
    "LA": "PNG",
    "P": "PNG",
    "PA": "TIFF",
    "RGB": "PNG",
    "RGBA": "PNG",
    "CMYK": "TIFF",
    "YCbCr": "TIFF",
    "I": "TIFF",
    "I;16": "PNG",
    "F": "TIFF",
}


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb_tiles(mode, tmp_path):
    from jaxvlm.image_processing import ImageProcessor, load_image

    im = _mode_image(mode, np.random.default_rng(MODES.index(mode)))
    assert im.mode == mode
    proc = ImageProcessor(32, 64, False, True)
    tiles, grid = proc(im)
    assert grid == (1, 2) and tiles.shape == (3, 3, 32, 32) and tiles.dtype == np.float32
    assert np.isfinite(tiles).all() and tiles.min() >= 0 and tiles.max() <= 1
    want, _ = proc(Image.fromarray(_expected_rgb(im), "RGB"))
    assert np.array_equal(tiles, want), f"{mode}: the tiles are not those of its RGB version"
    if mode in ("L", "1", "I", "I;16", "F"):  # grey stays grey
        assert np.array_equal(tiles[:, 0], tiles[:, 1]) and np.array_equal(tiles[:, 1], tiles[:, 2])
    if mode in ("I;16", "I", "F"):  # scaled, not clipped to white
        assert 0.2 < float(tiles.mean()) < 0.8, f"{mode}: mean {tiles.mean():.3f}"
    if mode in FILE_FORMAT:  # the same through a file on disk
        path = tmp_path / f"img.{FILE_FORMAT[mode].lower()}"
        im.save(path, FILE_FORMAT[mode])
        assert Image.open(path).mode in (mode, "I;16", "P")
        assert load_image(path).mode == "RGB"
        from_file, _ = proc(path)
        assert np.array_equal(from_file, tiles), f"{mode}: the file gives other pixels than the image in memory"
