"""One conversation with images -> the arrays a train step reads (upstream's `BaseDataset`).

Shapes: T tokens of one sample, n tiles of one sample (all its images' tiles, in order),
S tile side, L image tokens per tile.

A sample is built as upstream's `VQADataset._process_data` builds it:
1. every image goes through the `ImageProcessor` -> tiles and a grid (n_h, n_w);
2. stray `<|image|>` strings in the texts are removed (upstream logs and drops them);
3. the image string (`image_string`) is put at the start of the first user message;
4. input_ids = the ChatML ids of the whole conversation;
5. loss mask: for each assistant message, its tokens after the `<|im_start|>assistant\\n`
   prefix through the end of its segment. Upstream takes the segment to be the ids of
   `<|im_start|>assistant\\n{content}<|im_end|>\\n`, so the mask covers the answer, its
   `<|im_end|>` *and the newline after it* (a quirk kept for parity: the label at the
   `<|im_end|>` position is that newline, id 198 for SmolLM2);
6. labels[t] = input_ids[t + 1] where mask[t + 1], else -100; labels[T - 1] = -100;
   attention_mask is all ones (padding is the loader's business).

SmolVLM models (`vlm_family == "smolvlm"`, docs in `jaxvlm.smolvlm_processing`) differ in
steps 1, 3-5: the `SmolVLMImageProcessor` (global view last), the first user message gets one
image part per image (each carrying `smolvlm_image_string` of its grid, which the SmolVLM
template renders in place of `<image>`, as `Idefics3Processor` does), the text is SmolVLM-Instruct's
chat format, and the mask covers each answer after `Assistant:` through its `<end_of_utterance>`.
The tokenizer's `family` chooses; `SampleEncoder.from_config` picks the processor (`processor_for`).

Imports neither jax nor torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from conversion.recipe import IGNORE_INDEX

from ..image_processing import ImageLike, ImageProcessor, processor_for
from ..tokenizer import Tokenizer, check_fits

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that cannot be built (unreadable image, malformed conversation)."""


def shift_labels(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32[T]: labels[t] = input_ids[t + 1] if mask[t + 1] else IGNORE_INDEX, and IGNORE_INDEX at t = T - 1."""
    labels = np.where(mask, input_ids, IGNORE_INDEX).astype(np.int32)
    labels = np.roll(labels, -1)
    if labels.size:
        labels[-1] = IGNORE_INDEX
    return labels


class SampleEncoder:
    """Turns (images, messages) into {input_ids, attention_mask, labels, images, grids}.

    Args:
      tokenizer: a `jaxvlm.tokenizer.Tokenizer` carrying the extra tokens.
      image_processor: an `ImageProcessor` (a `SmolVLMImageProcessor` for a SmolVLM tokenizer).
      n_image_tokens: L, tokens per tile (`VLMConfig.n_image_tokens` / `mp_image_token_length`).
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, n_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.n_image_tokens = int(n_image_tokens)
        self.has_global_token = "global_image_token" in tokenizer.extra_tokens

    @classmethod
    def from_config(cls, cfg, tokenizer: Tokenizer, **processor_kwargs) -> SampleEncoder:
        """The encoder for a model of config `cfg`; the tokenizer must fit it (`tokenizer.check_fits`)."""
        check_fits(cfg, tokenizer)
        return cls(tokenizer, processor_for(cfg, **processor_kwargs), cfg.n_image_tokens)

    @property
    def image_size(self) -> int:
        return self.image_processor.img_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ---- images --------------------------------------------------------------------------
    def tiles_per_image(self, grid: tuple[int, int]) -> int:
        n = grid[0] * grid[1]
        return n + (1 if n > 1 and self.has_global_token else 0)

    def encode_images(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """-> (float32[n, 3, S, S], grids). Without a global-image token the global view is
        dropped, as upstream's `_process_images` does."""
        S = self.image_size
        tiles, grids = [], []
        for k, image in enumerate(images):
            try:
                t, grid = self.image_processor(image)
            except (ValueError, FileNotFoundError) as e:
                raise SampleError(f"image {k}: {e}") from None
            if not self.has_global_token and t.shape[0] == grid[0] * grid[1] + 1:
                t = t[1:]
            tiles.append(t)
            grids.append(grid)
        pixels = np.concatenate(tiles) if tiles else np.zeros((0, 3, S, S), np.float32)
        return pixels, grids

    # ---- text ----------------------------------------------------------------------------
    def build_messages(self, grids: Sequence[tuple[int, int]], messages: Sequence[Mapping[str, str]]) -> list[dict]:
        """Messages with stray image tokens removed and the image string prepended to the
        first user message (or the first message when there is no user message). SmolVLM: that
        message's content becomes [image parts..., text part]."""
        msgs = []
        image_token = self.tokenizer.image_token
        for k, m in enumerate(messages):
            try:
                role, content = m["role"], m["content"]
            except (KeyError, TypeError):
                raise SampleError(f"message {k} must have 'role' and 'content', got {m!r}") from None
            if not isinstance(role, str) or not isinstance(content, str):
                raise SampleError(f"message {k}: 'role' and 'content' must be strings")
            if image_token in content:
                log.warning("removed %s from a %s message before adding the image string", image_token, role)
                content = content.replace(image_token, "")
            msgs.append({"role": role, "content": content})
        if not msgs:
            raise SampleError("a sample needs at least one message")
        if grids:
            first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), 0)
            extra, L = self.tokenizer.extra_tokens, self.n_image_tokens
            if self.tokenizer.family == "smolvlm":
                images = [
                    {"type": "image", "image_string": self.image_processor.image_string([g], L, extra)} for g in grids
                ]
                msgs[first]["content"] = [*images, {"type": "text", "text": msgs[first]["content"]}]
            else:
                msgs[first]["content"] = self.image_processor.image_string(grids, L, extra) + msgs[first]["content"]
        return msgs

    def encode_text(
        self, grids: Sequence[tuple[int, int]], messages: Sequence[Mapping[str, str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids int32[T], labels int32[T]) for a conversation whose images have `grids`."""
        msgs = self.build_messages(grids, messages)
        try:
            ids, mask = self.tokenizer.encode_conversation(msgs)
        except ValueError as e:
            raise SampleError(str(e)) from None
        input_ids = np.asarray(ids, np.int32)
        return input_ids, shift_labels(input_ids, mask)

    def num_tokens(self, grids: Sequence[tuple[int, int]], messages: Sequence[Mapping[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(self.build_messages(grids, messages)))

    # ---- whole samples -------------------------------------------------------------------
    def encode(self, images: Sequence[ImageLike], messages: Sequence[Mapping[str, str]]) -> dict:
        """A training sample: input_ids int32[T], attention_mask int32[T] (ones), labels int32[T],
        images float32[n, 3, S, S], grids [(n_h, n_w)] per image."""
        pixels, grids = self.encode_images(images)
        input_ids, labels = self.encode_text(grids, messages)
        self._check(input_ids, pixels)
        if not np.any(labels != IGNORE_INDEX):
            raise SampleError("the sample has no assistant tokens to train on")
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "labels": labels,
            "images": pixels,
            "grids": grids,
        }

    def encode_prompt(self, images: Sequence[ImageLike], messages: Sequence[Mapping[str, str]] | str) -> dict:
        """A generation prompt (ChatML + `<|im_start|>assistant\\n`, SmolVLM: + `Assistant:`): input_ids int32[T],
        attention_mask int32[T], images float32[n, 3, S, S], grids. A str is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        pixels, grids = self.encode_images(images)
        msgs = self.build_messages(grids, messages)
        input_ids = np.asarray(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True), np.int32)
        self._check(input_ids, pixels)
        return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "images": pixels, "grids": grids}

    def _check(self, input_ids: np.ndarray, pixels: np.ndarray) -> None:
        n_slots = int(np.sum(input_ids == self.tokenizer.image_token_id))
        if n_slots != pixels.shape[0] * self.n_image_tokens:
            raise SampleError(f"{n_slots} image tokens for {pixels.shape[0]} tiles x {self.n_image_tokens} tokens")
