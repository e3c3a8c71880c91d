"""The whole nanoVLM in Flax NNX; mirrors `torch_ref/vision_language_model.py`.

Shapes: B batch, T sequence, N_img images (all samples' images concatenated in batch order),
S image side, L image tokens per image, H language width, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.config import VLMConfig
from conversion.recipe import IGNORE_INDEX

from .kernels import Kernels, select
from .language_model import LanguageModel
from .modality_projector import build_projector
from .options import ModelOptions
from .sharding import constrain
from .vision_transformer import ViT


def check_image_tokens(input_ids, n_images: int, cfg: VLMConfig) -> None:
    """Raise a ValueError unless the prompt has exactly n_images * L image tokens."""
    n_slots = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
    if n_slots != n_images * cfg.n_image_tokens:
        raise ValueError(
            f"the prompt has {n_slots} image tokens (id {cfg.image_token_id}) but {n_images} image(s) "
            f"x {cfg.n_image_tokens} tokens each = {n_images * cfg.n_image_tokens} were given"
        )


def merge_image_embeddings(
    input_ids: jax.Array,
    token_embd: jax.Array,
    image_embd: jax.Array,
    image_token_id: int,
    image_offsets: jax.Array | None = None,
) -> jax.Array:
    """Overwrite the image-token rows of token_embd [B, T, H], in row-major order over the batch,
    with image_embd [N_img, L, H] flattened to [N_img * L, H]. Shape-static (a cumsum-gather),
    so it jits once per shape; the count is checked outside jit by `check_image_tokens`.

    `image_offsets` int[B]: the index in image_embd of each row's first image, when the rows'
    images are not simply consecutive (a global batch made of per-process blocks, each with its
    own padding images: process p's images start at p * N_max). Row b's j-th image token then
    takes flat row image_offsets[b] * L + j. None: the k-th image token of the batch takes row k.
    """
    B, T, H = token_embd.shape
    is_image = input_ids == image_token_id  # (B, T)
    flat = constrain(
        image_embd.reshape(-1, H).astype(token_embd.dtype), None, None
    )  # whole: any row may read any image
    if image_offsets is None:
        slot = jnp.cumsum(is_image.reshape(-1)) - 1  # k-th image token takes row k
    else:
        slot = image_offsets[:, None] * image_embd.shape[1] + jnp.cumsum(is_image, axis=1) - 1
    gathered = jnp.take(flat, jnp.clip(slot, 0, flat.shape[0] - 1), axis=0).reshape(B, T, H)
    return jnp.where(is_image[..., None], gathered, token_embd)


def embed_tokens(embedding: nnx.Embed, input_ids: jax.Array) -> jax.Array:
    """`embedding(input_ids)` (rows of the table in its parameter dtype: the residual stream
    stays there, see `jaxvlm.options.ModelOptions`), with the table first
    pinned whole along its embed axis: on an FSDP mesh the lookup then runs locally on each
    device's batch rows (one all-gather of the table, a reduce-scatter of its gradient)
    instead of XLA's fallback of all-gathering the [B, T, H] activations."""
    table = constrain(embedding.embedding[...], "vocab", None)
    return jnp.take(table, input_ids, axis=0)


class VisionLanguageModel(nnx.Module):
    def __init__(self, cfg: VLMConfig, *, options: ModelOptions = ModelOptions(), rngs: nnx.Rngs):
        """`cfg`: what the model is; `options`: how it is built (dtypes, remat, kernels)."""
        self.cfg = cfg
        self.options = options
        self.vision_encoder = ViT(cfg, options, rngs=rngs)
        self.decoder = LanguageModel(cfg, options, rngs=rngs)
        self.MP = build_projector(cfg, options, rngs=rngs)  # cfg.mp_type's variant

    def embed(
        self, input_ids: jax.Array, images: jax.Array | None, image_offsets: jax.Array | None = None
    ) -> jax.Array:
        """int[B, T], float[N_img, 3, S, S] or None -> float[B, T, H] with images merged in
        (`image_offsets` int[B] or None: see `merge_image_embeddings`)."""
        token_embd = constrain(embed_tokens(self.decoder.token_embedding, input_ids), "batch", "length", None)
        if images is None or images.shape[0] == 0:
            return token_embd
        image_embd = self.MP(self.vision_encoder(images))  # (N_img, L, H)
        merged = merge_image_embeddings(input_ids, token_embd, image_embd, self.cfg.image_token_id, image_offsets)
        return constrain(merged, "batch", "length", None)

    def __call__(self, input_ids, images=None, attention_mask=None, segment_ids=None, position_ids=None) -> jax.Array:
        """Logits float[B, T, V] (the compute dtype).

        Args:
          input_ids: int[B, T]. images: float[N_img, 3, S, S] in [0, 1], or None.
          attention_mask: int[B, T], 1 real / 0 padding (left padding), or None.
          segment_ids, position_ids: int[B, T] or None, for packed rows: see `LanguageModel.__call__`.
        Numpy inputs are accepted; concrete inputs are checked for the image-token count.
        For speed call it under `nnx.jit` (see `jaxvlm.forward`).
        """
        input_ids = jnp.asarray(input_ids)
        if images is not None:
            images = jnp.asarray(images)
        attention_mask, segment_ids, position_ids = (
            None if a is None else jnp.asarray(a) for a in (attention_mask, segment_ids, position_ids)
        )
        if not isinstance(input_ids, jax.core.Tracer):
            check_image_tokens(input_ids, 0 if images is None else images.shape[0], self.cfg)
        hidden = self.hidden_states(
            input_ids, images, attention_mask, segment_ids=segment_ids, position_ids=position_ids
        )
        return self.decoder.logits(hidden)

    def hidden_states(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        image_offsets: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The decoder's final hidden states float[B, T, H], before the head (no input checks)."""
        return self.decoder(self.embed(input_ids, images, image_offsets), attention_mask, segment_ids, position_ids)

    def token_loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """`cross_entropy` through this model's kernels: float[B, T, V], int[B, T] -> float32[]."""
        return cross_entropy(logits, targets, kernels=self.decoder.kernels)

    # ---- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, options: ModelOptions = ModelOptions(), strict_config: bool = True
    ):
        """Load a nanoVLM checkpoint directory (config.json + model.safetensors) through `conversion`,
        or a Hugging Face Hub repo id ("owner/name", from the local cache when HF_HUB_OFFLINE=1)."""
        from .pretrained import load_nanovlm

        return load_nanovlm(directory, options=options, strict_config=strict_config)

    def save_pretrained(self, directory: str | Path, *, model_card: bool = False, repo_id: str | None = None) -> None:
        """Write the nanoVLM directory format that upstream and torch_ref load; `model_card`: and a
        README.md (`conversion.model_card`; never over a README.md it did not write)."""
        from .pretrained import save_nanovlm

        save_nanovlm(self, directory, model_card=model_card, repo_id=repo_id)

    def push_to_hub(
        self, repo_id: str, *, tokenizer=None, private: bool = False, token=None, commit_message: str | None = None
    ) -> str:
        """save_pretrained(model_card=True) + the `tokenizer` files (a tokenizer.json or its
        directory), uploaded to the Hub repo `repo_id` (`conversion.hub.push_to_hub`). Returns the commit's URL."""
        from conversion.hub import push_to_hub

        def save(d):
            return self.save_pretrained(d, model_card=True, repo_id=repo_id)

        return push_to_hub(
            save, repo_id, tokenizer=tokenizer, private=private, token=token, commit_message=commit_message
        )


@nnx.jit
def forward(
    model: VisionLanguageModel, input_ids, images=None, attention_mask=None, segment_ids=None, position_ids=None
) -> jax.Array:
    """Jitted `model(input_ids, images, attention_mask, ...)`: one compile per input shape."""
    return model(input_ids, images, attention_mask, segment_ids, position_ids)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, ignore_index: int = IGNORE_INDEX, *, kernels: Kernels | None = None
) -> jax.Array:
    """Mean token cross-entropy in float32 over targets != ignore_index (torch's F.cross_entropy),
    through `kernels.token_nll` (default: the backend's, `jaxvlm.kernels.select()`)."""
    kernels = kernels or select()
    valid = targets != ignore_index
    nll = kernels.token_nll(logits.astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)
