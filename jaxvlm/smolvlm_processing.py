"""SmolVLM's (transformers' Idefics3) images, image string and chat format, without transformers.

Reproduces `Idefics3ImageProcessorPil` (image_processing_pil_idefics3.py), the placeholder text
of `Idefics3Processor.replace_image_token` (processing_idefics3.py) and SmolVLM-Instruct's chat
template (`SMOLVLM_CHAT_TEMPLATE`) with pillow and numpy; tests/test_smolvlm_processor.py checks
ids and pixels against transformers.

Shapes: S tile side (the processor's `max_image_size["longest_edge"]`, `vit_img_size`), M the
longest edge an image is first resized to (`size["longest_edge"]`, `max_img_size`), n_h x n_w
the tile grid, n = n_h * n_w tiles plus one global view when the image is split.

Images (`SmolVLMImageProcessor`):
  1. RGB; alpha composited onto white (transformers' `convert_to_rgb`);
  2. the longest edge resized to M, the other to `int(M / aspect)` rounded up to even (always,
     small images are upscaled), both capped at 4096; LANCZOS on the uint8 image;
  with splitting:
  3. resized again (LANCZOS) to multiples of S: the long side `ceil(long / S) * S`, the short
     side `ceil(int(long' / aspect) / S) * S`;
  4. if either side exceeds S: the S x S blocks in row-major order, then the global view - the
     image of step 3 resized to S x S (LANCZOS) - LAST; grid (n_h, n_w);
     otherwise the one S x S image, grid (1, 1) (Idefics3 reports rows = cols = 0);
  without splitting: the image of step 2 resized to S x S, grid (1, 1) (Idefics3: 0, 0).
  Then float32 = float32(float64(u8) * (1/255)), transformers' `rescale`, so that
  `(x - float32(mean)) / float32(std)` per channel in float32 (done inside the model) is
  bit-identical to the processor's `pixel_values`. A split grid always has n_h * n_w >= 2, so
  grid (1, 1) <=> one tile, as in nanoVLM.

Imports neither jax nor torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .image_processing import DEFAULT_MAX_PIXELS, ImageLike, load_image, to_rgb

# Idefics3's MAX_IMAGE_SIZE: no side is resized beyond 4096 in step 2.
MAX_IMAGE_SIZE = 4096
WHITE = (255, 255, 255)
# transformers' `rescale`: float64(u8) * (1/255), then float32; a table of its 256 values.
_RESCALE = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
IM_START = "<|im_start|>"
ASSISTANT_PREFIX = "Assistant:"

# SMOLVLM_CHAT_TEMPLATE (conversion.smolvlm, written with exported checkpoints) is SmolVLM-Instruct's
# chat template (transformers' `DEFAULT_CHAT_TEMPLATE` in models/smolvlm/processing_smolvlm.py,
# without its video branch); `render_smolvlm_chat` writes it out in Python, the tests render it.


# ---- sizes (Idefics3's arithmetic, float for float) ---------------------------------------------
def _fit_longest_edge(h: int, w: int, longest: int) -> tuple[int, int]:
    """Idefics3's `get_resize_output_image_size`: long side -> `longest`, short side even; <= 4096."""
    aspect = w / h
    if w >= h:
        w = longest
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w = MAX_IMAGE_SIZE
        h = int(w / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h = MAX_IMAGE_SIZE
        w = int(h * aspect)
    return max(h, 1), max(w, 1)


def _tile_multiple(h: int, w: int, tile: int) -> tuple[int, int]:
    """Idefics3's `resize_for_vision_encoder` size: both sides multiples of `tile`."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def _resize(image: Image.Image, h: int, w: int) -> Image.Image:
    if h < 1 or w < 1:
        raise ValueError(f"image of {image.width}x{image.height} would be resized to {w}x{h}")
    return image.resize((w, h), Image.Resampling.LANCZOS)


def _to_float(image: Image.Image) -> np.ndarray:
    """RGB PIL -> float32[3, H, W] in [0, 1], transformers' rescale."""
    return _RESCALE[np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)]


# ---- the image string -------------------------------------------------------------------------
def smolvlm_image_string(
    grids: Sequence[tuple[int, int]], n_image_tokens: int, extra_tokens: Mapping[str, str] | Iterable[tuple[str, str]]
) -> str:
    """The text that `Idefics3Processor` puts in place of each image's `<image>`, for images
    with these grids, concatenated (one `<image>` placeholder per image).

    Per image, with F = `<fake_token_around_image>`, G = `<global-img>`, I = `<image>` * L:
    grid (1, 1) (not split): `F G I F`;
    grid (n_h, n_w): for each row r, `F <row_r_col_c> I` for c = 1..n_w, then "\\n"; then
    "\\n" `F G I F`. Example, grid (1, 2), L = 1:
    `F<row_1_col_1><image>F<row_1_col_2><image>\\n\\nF<global-img><image>F`.
    """
    tokens = dict(extra_tokens.items() if isinstance(extra_tokens, Mapping) else extra_tokens)
    for name in ("image_token", "fake_image_token", "global_image_token"):
        if name not in tokens:
            raise ValueError(f"extra_tokens has no {name!r} (SmolVLM's image string needs it)")
    fake, img = tokens["fake_image_token"], tokens["image_token"] * n_image_tokens
    global_view = fake + tokens["global_image_token"] + img + fake
    out = []
    for k, (n_h, n_w) in enumerate(grids):
        if (n_h, n_w) == (1, 1):
            out.append(global_view)
            continue
        for r in range(1, n_h + 1):
            for c in range(1, n_w + 1):
                name = f"r{r}c{c}"
                if name not in tokens:
                    raise ValueError(f"image {k} has grid {n_h}x{n_w} but there is no extra token {name!r}")
                out.append(fake + tokens[name] + img)
            out.append("\n")
        out.append("\n" + global_view)
    return "".join(out)


# ---- the chat format --------------------------------------------------------------------------
def _parts(content, k: int) -> list[Mapping]:
    """A message's content as template parts; a str is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) for p in content):
        return list(content)
    raise ValueError(f"message {k}: 'content' must be a str or a list of parts, got {type(content).__name__}")


def render_smolvlm_chat(
    messages: Sequence[Mapping], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """`SMOLVLM_CHAT_TEMPLATE` rendered without jinja2 -> (text, spans of the assistant answers).

    `<|im_start|>`, then per message `Role` (capitalised) + ":" when its first part is an image,
    else ": ", its parts, `<end_of_utterance>\\n`; then `Assistant:` for a generation prompt.
    Content is a list of parts - {"type": "text", "text": ...} or {"type": "image"} - or a str,
    taken as one text part (the jinja template would render nothing for a str). An image part
    renders as its "image_string" when it has one (the text `Idefics3Processor` substitutes for
    `<image>`, see `smolvlm_image_string`), else as the template's `<image>`.

    The spans are the (start, end) characters of each assistant message after its `Assistant:`
    through its `<end_of_utterance>`: what the loss is taken on.
    """
    out, spans, pos = [IM_START], [], len(IM_START)
    for k, m in enumerate(messages):
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError):
            raise ValueError(f"message {k} must be a mapping with 'role' and 'content', got {m!r}") from None
        if not isinstance(role, str):
            raise ValueError(f"message {k}: 'role' must be a str, got {type(role).__name__}")
        parts = _parts(content, k)
        head = role.capitalize() + (":" if parts and parts[0].get("type") == "image" else ": ")
        body = []
        for p in parts:
            if p.get("type") == "text":
                if not isinstance(p.get("text"), str):
                    raise ValueError(f"message {k}: a text part needs a str 'text', got {p!r}")
                body.append(p["text"])
            elif p.get("type") == "image":
                body.append(p.get("image_string", IMAGE_TOKEN))
        seg = head + "".join(body) + END_OF_UTTERANCE
        if role == "assistant":  # from after "Assistant:" (its space included)
            spans.append((pos + len(ASSISTANT_PREFIX), pos + len(seg)))
        out.append(seg + "\n")
        pos += len(seg) + 1
    if add_generation_prompt:
        out.append(ASSISTANT_PREFIX)
    return "".join(out), spans


# ---- the image processor ----------------------------------------------------------------------
class SmolVLMImageProcessor:
    """Idefics3's image processor: `proc(image) -> (tiles float32[n, 3, S, S] in [0, 1], (n_h, n_w))`.

    Args:
      tile: S, the tile side (`max_image_size["longest_edge"]`, `vit_img_size`).
      longest_edge: M, the longest side after the first resize (`size["longest_edge"]`, `max_img_size`).
      splitting: Idefics3's `do_image_splitting`.
      max_pixels: decompression-bomb limit for `load_image`.

    The tiles are not normalised: the model applies (x - mean) / std (`vlm_image_mean/std`).
    """

    def __init__(
        self, tile: int, longest_edge: int, splitting: bool = True, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ):
        if tile <= 0 or longest_edge <= 0:
            raise ValueError(f"tile ({tile}) and longest_edge ({longest_edge}) must be positive")
        self.img_size = int(tile)
        self.max_img_size = int(longest_edge)
        self.splitting = bool(splitting)
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, cfg, **kwargs) -> SmolVLMImageProcessor:
        """S = `vit_img_size`, M = `max_img_size`, splitting = `vlm_image_splitting`."""
        return cls(cfg.vit_img_size, cfg.max_img_size, cfg.vlm_image_splitting, **kwargs)

    @property
    def max_tiles(self) -> int:
        """Upper bound on the tiles one image can produce (grid plus global view)."""
        if not self.splitting:
            return 1
        side = math.ceil(min(self.max_img_size, MAX_IMAGE_SIZE) / self.img_size)
        return side * side + 1 if side > 1 else 1

    def load_image(self, src: ImageLike) -> Image.Image:
        return load_image(src, max_pixels=self.max_pixels, background=WHITE)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(n_h, n_w) for an image of this size, without decoding it."""
        if not self.splitting:
            return (1, 1)
        h, w = _tile_multiple(*_fit_longest_edge(height, width, self.max_img_size), self.img_size)
        S = self.img_size
        if h > S or w > S:
            return ((h - S) // S + 1, (w - S) // S + 1)
        return (1, 1)

    def num_tiles(self, width: int, height: int) -> int:
        n_h, n_w = self.grid(width, height)
        return n_h * n_w + (1 if n_h * n_w > 1 else 0)

    def __call__(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """Image (path, bytes or PIL) -> (float32[n, 3, S, S] in [0, 1], (n_h, n_w)).

        For a split image tile k < n_h * n_w is block (r, c) = divmod(k, n_w) and the last tile
        is the global view; otherwise the one tile is the whole image.
        """
        if not isinstance(image, Image.Image):
            image = self.load_image(image)
        elif image.mode != "RGB":
            image = to_rgb(image, background=WHITE)
        S = self.img_size
        image = _resize(image, *_fit_longest_edge(image.height, image.width, self.max_img_size))
        if not self.splitting:
            return _to_float(_resize(image, S, S))[None], (1, 1)
        image = _resize(image, *_tile_multiple(image.height, image.width, S))
        if image.height <= S and image.width <= S:
            return _to_float(image)[None], (1, 1)
        n_h, n_w = (image.height - S) // S + 1, (image.width - S) // S + 1
        x = _to_float(image)[:, : n_h * S, : n_w * S]
        tiles = x.reshape(3, n_h, S, n_w, S).transpose(1, 3, 0, 2, 4).reshape(n_h * n_w, 3, S, S)
        tiles = np.concatenate([tiles, _to_float(_resize(image, S, S))[None]])
        return np.ascontiguousarray(tiles, dtype=np.float32), (n_h, n_w)

    image_string = staticmethod(smolvlm_image_string)  # the module function, for callers holding a processor

    def __repr__(self) -> str:
        return (
            f"SmolVLMImageProcessor(tile={self.img_size}, longest_edge={self.max_img_size}, splitting={self.splitting})"
        )
