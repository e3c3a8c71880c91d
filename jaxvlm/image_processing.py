"""Images for nanoVLM: loading, resizing, splitting into tiles, and the image-token string.

Reproduces upstream nanoVLM's `get_image_processor` (DynamicResize -> ToTensor ->
GlobalAndSplitImages) and `get_image_string` (docs/conventions.md, "Tokenizer and prompts" and "Images") with pillow and numpy.

Shapes: S tile side (`vit_img_size`), M `max_img_size`, n_h x n_w the tile grid,
n = n_h * n_w tiles plus one global view when the grid is larger than 1x1.

Resize rules (upstream's `DynamicResize`, `resize_to_max_side_len` = R):
  long side  -> M if R else min(M, ceil(long / S) * S)
  short side -> max(S, ceil(short * (long' / long) / S) * S)
  bicubic (PIL's, which always antialiases), then /255 to float32 in [0, 1].
The tiles are the S x S blocks of the resized image in row-major order. When n_h * n_w > 1 a
global view comes first: the *float* resized image shrunk to S x S with antialiased bilinear
interpolation (upstream applies torchvision's tensor `resize`, whose default is bilinear with
antialias; PIL's bilinear on a float ("F") image is the same filter).
Without splitting (the nanoVLM-222M generation) the image is resized to S x S with PIL's
bilinear filter (upstream's old `transforms.Resize((S, S))`), grid (1, 1).

Colour modes (`to_rgb`): like upstream, everything becomes RGB with PIL's `convert("RGB")`, so
alpha is *dropped*, not composited (a transparent pixel shows whatever colour it stores);
palette images with transparency go through RGBA first (same pixels, no PIL warning). Two
deliberate departures, because PIL's `convert` clips these modes to 0..255 and so turns
most 16-bit images white: 16-bit ("I;16*") images are scaled by 255/65535; 32-bit integer
("I") images likewise when their maximum exceeds 255 (else taken as 8-bit); float ("F")
images are taken as [0, 1] when they lie in that range (else clipped to 0..255).
EXIF orientation is applied (upstream's datasets arrive already decoded; files from disk need it).

Imports neither jax nor torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = str | Path | bytes | bytearray | Image.Image

# PIL's own default (Image.MAX_IMAGE_PIXELS, ~89.5 megapixels): above it we refuse to decode.
DEFAULT_MAX_PIXELS = 89_478_485


def _describe(src) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return repr(src)


def load_image(
    src: ImageLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """A decoded RGB image (EXIF orientation applied) from a path, bytes or a PIL image.

    `background`: see `to_rgb` (None: alpha dropped, as nanoVLM does).
    Raises FileNotFoundError for a missing path, and ValueError for an empty, corrupt or
    non-image file and for an image of more than `max_pixels` pixels (a decompression bomb;
    None disables this check, but PIL still refuses more than 2 x `Image.MAX_IMAGE_PIXELS`).
    """
    name = _describe(src)
    if isinstance(src, Image.Image):
        im = src
    else:
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
            if path.stat().st_size == 0:
                raise ValueError(f"{name}: empty image file")
            fp = path
        elif isinstance(src, (bytes, bytearray)):
            if not src:
                raise ValueError("empty image bytes")
            fp = io.BytesIO(bytes(src))
        else:
            raise TypeError(f"expected a path, bytes or a PIL image, got {type(src).__name__}")
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name}: refusing to decode a possible decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise ValueError(f"{name}: not an image file (or a format pillow cannot read)") from None
        except OSError as e:
            raise ValueError(f"{name}: cannot read image: {e}") from None
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(
            f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (possible decompression bomb)"
        )
    if w == 0 or h == 0:
        raise ValueError(f"{name}: image has zero size {w}x{h}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: refusing to decode a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ValueError(f"{name}: corrupt image data: {e}") from None
    return to_rgb(im, background=background)


def to_rgb(im: Image.Image, *, background: tuple[int, int, int] | None = None) -> Image.Image:
    """RGB version of `im` (see the module docstring for the rules per mode).

    `background`: None drops alpha (nanoVLM). A colour composites images with an alpha band
    ("A" in their bands) or a transparency entry onto it, as transformers' `convert_to_rgb` does
    with white (the SmolVLM / Idefics3 processor); other modes follow the rules above.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if background is not None and ("A" in im.getbands() or im.info.get("transparency") is not None):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.round(a * (255.0 / 65535.0)).astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if a.size and a.max() > 255:
            a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    if mode == "La":  # premultiplied alpha: PIL converts it only to LA (un-premultiplied, as RGBa -> RGB is)
        return im.convert("LA").convert("RGB")
    return im.convert("RGB")


def resized_hw(h: int, w: int, tile: int, max_side: int, resize_to_max_side_len: bool) -> tuple[int, int]:
    """Upstream's `DynamicResize._get_new_hw`: the (height, width) to resize to."""
    long, short = (w, h) if w >= h else (h, w)
    target_long = max_side if resize_to_max_side_len else min(max_side, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if w >= h else (target_long, target_short)


def _to_float(im: Image.Image) -> np.ndarray:
    """RGB PIL -> float32[3, H, W] in [0, 1] (torchvision's ToTensor)."""
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


def _global_view(img: np.ndarray, side: int) -> np.ndarray:
    """float32[3, H, W] -> float32[3, side, side]: antialiased bilinear, per channel in float."""
    chans = [np.asarray(Image.fromarray(c, mode="F").resize((side, side), Image.Resampling.BILINEAR)) for c in img]
    return np.stack(chans).astype(np.float32)


def image_string(
    grids: Sequence[tuple[int, int]], n_image_tokens: int, extra_tokens: Mapping[str, str] | Iterable[tuple[str, str]]
) -> str:
    """The placeholder text for images with these grids (upstream's `get_image_string`).

    Per image: `<image: k>` (0-based, only when there are several images), then
    `<|global_image|>` + `<|image|>` * L, then - only for grids larger than 1x1 - for each
    tile in row-major order `<row_r_col_c>` + `<|image|>` * L. Example, one 1x2 grid, L = 2:
    `<|global_image|><|image|><|image|><row_1_col_1><|image|><|image|><row_1_col_2><|image|><|image|>`.

    With legacy extra tokens (only `image_token`, the nanoVLM-222M generation) each image is
    `<|image|>` * L with no separators, as that release wrote it.
    """
    tokens = dict(extra_tokens.items() if isinstance(extra_tokens, Mapping) else extra_tokens)
    if "image_token" not in tokens:
        raise ValueError("extra_tokens has no 'image_token'")
    img = tokens["image_token"] * n_image_tokens
    if "global_image_token" not in tokens and "r1c1" not in tokens:  # legacy format
        for k, grid in enumerate(grids):
            if tuple(grid) != (1, 1):
                raise ValueError(
                    f"image {k} has grid {tuple(grid)} but the extra tokens have no grid tokens (r1c1...): "
                    "this model cannot take split images"
                )
        return img * len(grids)
    out = []
    for k, (n_h, n_w) in enumerate(grids):
        if len(grids) > 1:
            out.append(f"<image: {k}>")
        if "global_image_token" in tokens:
            out.append(tokens["global_image_token"] + img)
            if n_h == 1 and n_w == 1:
                continue
        for r in range(1, n_h + 1):
            for c in range(1, n_w + 1):
                name = f"r{r}c{c}"
                if name not in tokens:
                    raise ValueError(f"image {k} has grid {n_h}x{n_w} but there is no extra token {name!r}")
                out.append(tokens[name] + img)
    return "".join(out)


class ImageProcessor:
    """Upstream's image processor: `proc(image) -> (tiles float32[n, 3, S, S] in [0, 1], (n_h, n_w))`.

    Args:
      img_size: S, the tile side (`vit_img_size`).
      max_img_size: M, the largest side after resizing (a multiple of S when splitting).
      resize_to_max_side_len: always scale the long side to M (upscaling small images).
      splitting: False for the one-image-one-tile models (nanoVLM-222M): resize to S x S.
      max_pixels: decompression-bomb limit for `load_image`.
    """

    def __init__(
        self,
        img_size: int,
        max_img_size: int,
        resize_to_max_side_len: bool = False,
        splitting: bool = True,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        if splitting and (max_img_size < img_size or max_img_size % img_size):
            raise ValueError(
                f"max_img_size {max_img_size} must be a positive multiple of img_size {img_size} when splitting"
            )
        self.img_size = int(img_size)
        self.max_img_size = int(max_img_size)
        self.resize_to_max_side_len = bool(resize_to_max_side_len)
        self.splitting = bool(splitting)
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, cfg, **kwargs) -> ImageProcessor:
        """Splitting is on when the config has the grid tokens (`r1c1`), as every model since
        nanoVLM-460M; the legacy one-token configs resize to S x S."""
        splitting = "r1c1" in cfg.extra_tokens
        max_side = cfg.max_img_size if splitting else cfg.vit_img_size
        return cls(cfg.vit_img_size, max_side, cfg.resize_to_max_side_len, splitting, **kwargs)

    @property
    def max_tiles(self) -> int:
        """Upper bound on the tiles one image can produce (grid plus global view)."""
        if not self.splitting:
            return 1
        side = self.max_img_size // self.img_size
        return side * side + (1 if side > 1 else 0)

    def load_image(self, src: ImageLike) -> Image.Image:
        return load_image(src, max_pixels=self.max_pixels)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(n_h, n_w) for an image of this size, without decoding it."""
        if not self.splitting:
            return (1, 1)
        h, w = resized_hw(height, width, self.img_size, self.max_img_size, self.resize_to_max_side_len)
        return (h // self.img_size, w // self.img_size)

    def num_tiles(self, width: int, height: int) -> int:
        n_h, n_w = self.grid(width, height)
        return n_h * n_w + (1 if n_h * n_w > 1 else 0)

    def resize(self, image: Image.Image) -> Image.Image:
        """The resized RGB image that is cut into tiles (upstream's DynamicResize)."""
        S = self.img_size
        if not self.splitting:
            return image.resize((S, S), Image.Resampling.BILINEAR)
        h, w = resized_hw(image.height, image.width, S, self.max_img_size, self.resize_to_max_side_len)
        if (h, w) == (image.height, image.width):
            return image
        return image.resize((w, h), Image.Resampling.BICUBIC)

    def __call__(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """Image (path, bytes or PIL) -> (float32[n, 3, S, S] in [0, 1], (n_h, n_w)).

        Tile k >= 1 (or k >= 0 for a 1x1 grid) is block (r, c) = divmod(k - 1, n_w) of the
        resized image; tile 0 is the global view when n_h * n_w > 1.
        """
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            image = self.load_image(image) if not isinstance(image, Image.Image) else to_rgb(image)
        S = self.img_size
        x = _to_float(self.resize(image))  # (3, H, W)
        _, H, W = x.shape
        n_h, n_w = H // S, W // S
        tiles = x.reshape(3, n_h, S, n_w, S).transpose(1, 3, 0, 2, 4).reshape(n_h * n_w, 3, S, S)
        if n_h * n_w > 1:
            tiles = np.concatenate([_global_view(x, S)[None], tiles])
        return np.ascontiguousarray(tiles, dtype=np.float32), (n_h, n_w)

    image_string = staticmethod(image_string)  # the module function, for callers holding a processor

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(img_size={self.img_size}, max_img_size={self.max_img_size}, "
            f"resize_to_max_side_len={self.resize_to_max_side_len}, splitting={self.splitting})"
        )


def processor_for(cfg, **kwargs):
    """The image processor of a model of config `cfg`: `ImageProcessor` (nanoVLM) or, for
    `vlm_family == "smolvlm"`, `jaxvlm.smolvlm_processing.SmolVLMImageProcessor`. Both offer
    `__call__`, `grid`, `num_tiles`, `max_tiles`, `load_image`, `img_size` and `image_string`."""
    if cfg.vlm_family == "smolvlm":
        from .smolvlm_processing import SmolVLMImageProcessor  # it imports this module

        return SmolVLMImageProcessor.from_config(cfg, **kwargs)
    return ImageProcessor.from_config(cfg, **kwargs)
