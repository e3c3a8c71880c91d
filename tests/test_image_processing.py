"""Image loading, resizing, splitting and the image string (docs/conventions.md, "Tokenizer and prompts", "Images"), on real COCO JPEGs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conversion.config import DEFAULT_EXTRA_TOKENS, LEGACY_EXTRA_TOKENS, VLMConfig
from jaxvlm.image_processing import ImageProcessor, image_string, load_image, resized_hw, to_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO = SHARED / "data" / "coco-mini" / "images"
LANDSCAPE = COCO / "000000000790.jpg"  # 640 wide x 422 high

needs_coco = pytest.mark.skipif(
    not LANDSCAPE.is_file(), reason=f"real COCO images not found at {COCO} (the shared data directory beside the repo)"
)


def _portrait() -> Path:
    for p in sorted(COCO.glob("*.jpg")):
        with Image.open(p) as im:
            if im.size == (383, 640):
                return p
    pytest.skip("no 383x640 COCO image")


def _tiles_of(resized: Image.Image, S: int) -> list[np.ndarray]:
    """Row-major S x S crops of the resized image, as float32 [3, S, S] in [0, 1]."""
    W, H = resized.size
    out = []
    for r in range(H // S):
        for c in range(W // S):
            crop = np.asarray(resized.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)), np.float32) / 255.0
            out.append(crop.transpose(2, 0, 1))
    return out


# ---- resize rules --------------------------------------------------------------------------
def test_resized_hw_hand_computed():
    # landscape 640 x 422, tile 16, max 64, resize to max side: long 640 -> 64, scale 0.1,
    # short 42.2 -> ceil(42.2 / 16) * 16 = 48
    assert resized_hw(422, 640, 16, 64, True) == (48, 64)
    # the same without resize_to_max_side_len, tile 256, max 1024: long -> min(1024, 768) = 768,
    # scale 1.2, short 506.4 -> 512
    assert resized_hw(422, 640, 256, 1024, False) == (512, 768)
    # portrait 383 x 640 (h = 640): long -> 64, short 38.3 -> 48
    assert resized_hw(640, 383, 16, 64, True) == (64, 48)
    # a small image is rounded *up* to whole tiles but not upscaled to the max without R
    assert resized_hw(10, 20, 16, 64, False) == (16, 32)
    assert resized_hw(10, 20, 16, 64, True) == (32, 64)
    # a very thin image keeps at least one tile on its short side
    assert resized_hw(1, 500, 32, 64, True) == (32, 64)
    # square
    assert resized_hw(612, 612, 512, 2048, True) == (2048, 2048)


@needs_coco
def test_landscape_tiles_match_pil_crops_exactly():
    proc = ImageProcessor(16, 64, resize_to_max_side_len=True)
    tiles, grid = proc(LANDSCAPE)
    assert grid == (3, 4)
    assert tiles.shape == (1 + 12, 3, 16, 16) and tiles.dtype == np.float32
    assert 0.0 <= tiles.min() and tiles.max() <= 1.0
    resized = Image.open(LANDSCAPE).convert("RGB").resize((64, 48), Image.Resampling.BICUBIC)
    for k, expected in enumerate(_tiles_of(resized, 16)):
        np.testing.assert_array_equal(tiles[1 + k], expected, err_msg=f"tile {k}")
    # tile (r=1, c=2) is the block at rows 16..31, columns 32..47
    block = np.asarray(resized, np.float32)[16:32, 32:48].transpose(2, 0, 1) / 255.0
    np.testing.assert_array_equal(tiles[1 + 1 * 4 + 2], block)


@needs_coco
def test_portrait_grid_and_processor_from_config():
    portrait = _portrait()
    tiles, grid = ImageProcessor(16, 64, True)(portrait)
    assert grid == (4, 3) and tiles.shape == (13, 3, 16, 16)
    cfg = VLMConfig.tiny()  # S 32, max 64, resize to max side
    proc = ImageProcessor.from_config(cfg)
    assert (proc.img_size, proc.max_img_size, proc.resize_to_max_side_len, proc.splitting) == (32, 64, True, True)
    assert proc.max_tiles == 5
    tiles, grid = proc(portrait)
    assert grid == (2, 2) and tiles.shape == (5, 3, 32, 32)
    assert proc.grid(383, 640) == (2, 2) and proc.num_tiles(383, 640) == 5


@needs_coco
def test_global_view_is_antialiased_bilinear_of_the_float_image():
    proc = ImageProcessor(16, 64, True)
    tiles, _ = proc(LANDSCAPE)
    resized = (
        np.asarray(Image.open(LANDSCAPE).convert("RGB").resize((64, 48), Image.Resampling.BICUBIC), np.float32) / 255.0
    )
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(resized[..., c]), "F").resize((16, 16), Image.Resampling.BILINEAR)
        )
        for c in range(3)
    ]
    np.testing.assert_allclose(tiles[0], np.stack(chans), atol=0, rtol=0)
    torch = pytest.importorskip("torch")  # upstream: torchvision resize(tensor) = interpolate(bilinear, antialias)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(resized.transpose(2, 0, 1).copy())[None],
        size=[16, 16],
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].numpy()
    err = float(np.abs(tiles[0] - ref).max())
    assert err <= 1e-6, f"global view vs torch antialiased bilinear: max|diff| {err:.2e}"


def test_one_tile_grid_has_no_global_view_and_small_image_upscales():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    tiles, grid = ImageProcessor(16, 64, False)(img)
    assert grid == (1, 2) and tiles.shape == (3, 3, 16, 16)  # global view + 2 tiles
    square = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    tiles, grid = ImageProcessor(32, 64, False)(square)
    assert grid == (1, 1) and tiles.shape == (1, 3, 32, 32)
    expected = np.asarray(square.resize((32, 32), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1) / 255.0
    np.testing.assert_array_equal(tiles[0], expected)
    # an image already of the target size is not resampled at all
    exact = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    tiles, grid = ImageProcessor(32, 64, True)(exact)
    assert grid == (1, 2)
    np.testing.assert_array_equal(tiles[1], np.asarray(exact, np.float32)[:, :32].transpose(2, 0, 1) / 255.0)


@needs_coco
def test_without_splitting_resizes_to_one_square_tile():
    proc = ImageProcessor.from_config(
        VLMConfig.nanovlm_222m(vit_img_size=32, mp_image_token_length=1, vit_patch_size=16)
    )
    assert not proc.splitting and proc.max_tiles == 1
    tiles, grid = proc(LANDSCAPE)
    assert grid == (1, 1) and tiles.shape == (1, 3, 32, 32)
    expected = np.asarray(Image.open(LANDSCAPE).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    np.testing.assert_array_equal(tiles[0], expected.transpose(2, 0, 1) / 255.0)


def test_splitting_needs_max_size_multiple_of_tile():
    with pytest.raises(ValueError, match="multiple"):
        ImageProcessor(32, 48)
    ImageProcessor(32, 48, splitting=False)  # fine: resized to 32 x 32


# ---- loading and colour modes -------------------------------------------------------------
def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_colour_modes_become_rgb():
    gray = Image.new("L", (4, 4), 77)
    assert load_image(_png_bytes(gray)).getpixel((0, 0)) == (77, 77, 77)
    la = Image.new("LA", (4, 4), (100, 0))
    assert load_image(_png_bytes(la)).getpixel((1, 1)) == (100, 100, 100)  # alpha dropped, as upstream
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = load_image(_png_bytes(rgba))
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (10, 20, 30)  # not composited on white
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    assert load_image(cmyk).getpixel((0, 0)) == (0, 255, 255)
    bilevel = Image.new("1", (4, 4), 1)
    assert load_image(_png_bytes(bilevel)).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_converts_without_warning():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    data = _png_bytes(pal, transparency=1)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(data)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (200, 100, 50)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped():
    a = np.array([[0, 257, 32768, 65535]], np.uint16)
    im16 = Image.fromarray(a)
    assert im16.mode == "I;16"
    for src in (im16, _png_bytes(im16)):
        out = np.asarray(load_image(src))[0, :, 0]
        np.testing.assert_array_equal(out, [0, 1, 128, 255])
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], np.int32))
    np.testing.assert_array_equal(np.asarray(to_rgb(i32))[0, :, 1], [0, 4, 255])
    i8 = Image.fromarray(np.array([[0, 100, 255]], np.int32))  # "I" with 8-bit values
    np.testing.assert_array_equal(np.asarray(to_rgb(i8))[0, :, 2], [0, 100, 255])
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(f01))[0, :, 0], [0, 128, 255])
    f255 = Image.fromarray(np.array([[0.0, 30.0, 300.0]], np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(f255))[0, :, 0], [0, 30, 255])


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[2, 10].mean() > 200 and arr[-3, 10].mean() < 50  # the left band is now on top


@needs_coco
def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="not an image"):
        load_image(text)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(LANDSCAPE.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(ValueError, match="empty"):
        load_image(b"")
    with pytest.raises(TypeError):
        load_image(12345)


@needs_coco
def test_decompression_bomb_limits():
    with pytest.raises(ValueError, match="exceeds the limit of 1000"):
        load_image(LANDSCAPE, max_pixels=1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        ImageProcessor(32, 64, max_pixels=640 * 422 - 1)(LANDSCAPE)
    assert load_image(LANDSCAPE, max_pixels=640 * 422).size == (640, 422)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A PNG header claiming 100000 x 100000 pixels: PIL itself refuses it at open time.
    header = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(header, max_pixels=None)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(header)


# ---- the image string ----------------------------------------------------------------------
def test_image_string_single_tile():
    s = image_string([(1, 1)], 3, DEFAULT_EXTRA_TOKENS)
    assert s == "<|global_image|>" + "<|image|>" * 3


def test_image_string_grid_in_row_major_order():
    s = image_string([(2, 2)], 2, dict(DEFAULT_EXTRA_TOKENS))
    im = "<|image|>" * 2
    assert s == (
        "<|global_image|>"
        + im
        + "<row_1_col_1>"
        + im
        + "<row_1_col_2>"
        + im
        + "<row_2_col_1>"
        + im
        + "<row_2_col_2>"
        + im
    )


def test_image_string_several_images_are_numbered_from_zero():
    s = image_string([(1, 2), (1, 1)], 1, DEFAULT_EXTRA_TOKENS)
    assert s == (
        "<image: 0><|global_image|><|image|><row_1_col_1><|image|><row_1_col_2><|image|>"
        "<image: 1><|global_image|><|image|>"
    )
    assert ImageProcessor.image_string([(1, 1)], 1, DEFAULT_EXTRA_TOKENS) == "<|global_image|><|image|>"


def test_image_string_legacy_and_errors():
    assert image_string([(1, 1), (1, 1)], 2, LEGACY_EXTRA_TOKENS) == "<|image|>" * 4
    with pytest.raises(ValueError, match="split images"):
        image_string([(1, 2)], 2, LEGACY_EXTRA_TOKENS)
    with pytest.raises(ValueError, match="r9c1"):
        image_string([(9, 1)], 1, DEFAULT_EXTRA_TOKENS)
    with pytest.raises(ValueError, match="image_token"):
        image_string([(1, 1)], 1, {"global_image_token": "<g>"})
    assert image_string([], 64, DEFAULT_EXTRA_TOKENS) == ""
