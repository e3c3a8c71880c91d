"""The whole nanoVLM in PyTorch (upstream `models/vision_language_model.py`).

Its state dict is upstream's key for key, so upstream checkpoints load strictly and ours load
in upstream. Shapes: B batch, T sequence, N_img images (all samples' images concatenated in
batch order), S image side, L image tokens per image, H language width, V vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conversion import hub
from conversion import model_card as cards
from conversion.config import VLMConfig
from conversion.mapping import check_keys, expected_shapes
from conversion.pretrained import CONFIG_FILE, WEIGHTS_FILE, read_config
from conversion.recipe import IGNORE_INDEX
from conversion.safetensors_io import BF16, CheckpointError
from conversion.smolvlm import is_smolvlm_directory, read_smolvlm

from .language_model import LanguageModel, RMSNorm
from .modality_projector import build_projector
from .vision_transformer import ViT

log = logging.getLogger(__name__)


def init_weights(module: nn.Module) -> None:
    """Upstream's initialisation: Linear/Embedding N(0, 0.02), zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


def _as_tensor(x, dtype=None, device=None):
    if x is None or isinstance(x, torch.Tensor):
        return x if x is None else x.to(device=device, dtype=dtype) if dtype or device else x
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _torch_tensor(value) -> torch.Tensor:
    """A torch tensor of a numpy array, bfloat16 (ml_dtypes, which torch cannot read) included."""
    if isinstance(value, torch.Tensor):
        return value
    value = np.asarray(value)
    if value.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(value).view(np.uint16)).view(torch.bfloat16)
    return torch.as_tensor(value)


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = ViT(cfg)
        self.decoder = LanguageModel(cfg)
        self.MP = build_projector(cfg)  # cfg.mp_type's variant
        self.apply(init_weights)

    # ---- forward -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings float[B, T, H] with image-token rows replaced, in row-major order
        over the batch, by the projected images float[N_img * L, H]."""
        token_embd = self.decoder.token_embedding(input_ids)
        is_image = input_ids == self.cfg.image_token_id
        n_slots = int(is_image.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_slots != n_images * self.cfg.n_image_tokens:
            raise ValueError(
                f"the prompt has {n_slots} image tokens (id {self.cfg.image_token_id}) but {n_images} image(s) "
                f"x {self.cfg.n_image_tokens} tokens each = {n_images * self.cfg.n_image_tokens} were given"
            )
        if n_images == 0:
            return token_embd
        image_embd = self.MP(self.vision_encoder(images))  # (N_img, L, H)
        token_embd = token_embd.clone()
        token_embd[is_image] = image_embd.reshape(-1, image_embd.shape[-1]).to(token_embd.dtype)
        return token_embd

    def forward(self, input_ids, images=None, attention_mask=None, targets=None, segment_ids=None, position_ids=None):
        """(logits float[B, T, V], loss or None).

        Args:
          input_ids: int[B, T]. images: float[N_img, 3, S, S] in [0, 1], or None.
          attention_mask: int[B, T], 1 real / 0 padding (left padding), or None.
          targets: int[B, T] already shifted by the data pipeline, IGNORE_INDEX (-100) = ignored.
          segment_ids, position_ids: int[B, T] or None, for rows packing several samples (see
            `LanguageModel.forward`).
        """
        device = self.decoder.token_embedding.weight.device
        dtype = self.decoder.token_embedding.weight.dtype
        input_ids = _as_tensor(input_ids, torch.long, device)
        images = _as_tensor(images, dtype, device)
        attention_mask = _as_tensor(attention_mask, torch.long, device)
        segment_ids = _as_tensor(segment_ids, torch.long, device)
        position_ids = _as_tensor(position_ids, torch.long, device)
        hidden, _ = self.decoder(
            self.embed(input_ids, images),
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            position_ids=position_ids,
        )
        logits = self.decoder.head(hidden)
        loss = None
        if targets is not None:
            targets = _as_tensor(targets, torch.long, device)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def generate(self, input_ids, images, attention_mask=None, **kwargs):
        """New token ids int64[B, max_new_tokens]: see `torch_ref.generate.generate` (same keywords)."""
        from .generate import generate

        return generate(self, input_ids, images, attention_mask, **kwargs)

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors upstream's `save_model` stores: the tied head once, as decoder.head.weight."""
        state = self.state_dict()
        if self.cfg.lm_tie_weights:
            state.pop("decoder.token_embedding.weight")
        return {k: v.detach().contiguous() for k, v in state.items()}

    def save_pretrained(self, directory: str | Path, *, model_card: bool = False, repo_id: str | None = None) -> None:
        """Write `config.json` + `model.safetensors` exactly as upstream's save_pretrained does;
        `model_card`: and a README.md (`conversion.model_card`; never over a README.md it did not write)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.cpu() for k, v in self.checkpoint_state().items()}
        check_keys(expected_shapes(self.cfg), state, source="model state", shape_of=lambda t: tuple(t.shape))
        if model_card:
            cards.check_writable(directory)  # before anything is written
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_FILE}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_FILE)
        self.cfg.to_json(directory / CONFIG_FILE)
        if model_card:
            cards.write(directory, self.cfg, sum(t.numel() for t in state.values()), repo_id=repo_id)

    def push_to_hub(
        self, repo_id: str, *, tokenizer=None, private: bool = False, token=None, commit_message: str | None = None
    ) -> str:
        """save_pretrained(model_card=True) + the `tokenizer` files (a tokenizer.json or its
        directory), uploaded to the Hub repo `repo_id` (`conversion.hub.push_to_hub`). Returns the commit's URL."""

        def save(d):
            return self.save_pretrained(d, model_card=True, repo_id=repo_id)

        return hub.push_to_hub(
            save, repo_id, tokenizer=tokenizer, private=private, token=token, commit_message=commit_message
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, strict_config: bool = True):
        """Load a nanoVLM checkpoint directory, or a Hugging Face Hub repo id ("owner/name",
        `conversion.hub.resolve`). Any missing, unexpected or mis-shaped key, a corrupt file or a
        config that does not match the weights raises CheckpointError naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = hub.resolve(directory)
        if is_smolvlm_directory(directory):  # a transformers SmolVLM directory, converted in memory
            cfg, tensors = read_smolvlm(directory)
            return cls.from_state(cfg, tensors, dtype=dtype, source=str(directory))
        cfg = read_config(directory, strict=strict_config)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{weights} is not a valid safetensors file: {e}") from None
        return cls.from_state(cfg, state, dtype=dtype, source=f"{weights} (config {directory / CONFIG_FILE})")

    @classmethod
    def from_state(cls, cfg: VLMConfig, state: dict, *, dtype: torch.dtype = torch.float32, source: str = "state"):
        """Build a model from checkpoint tensors (file keys; torch tensors or numpy arrays). Strict."""
        check_keys(expected_shapes(cfg), state, source=source, shape_of=lambda t: tuple(t.shape))
        state = {k: _torch_tensor(v) for k, v in state.items()}
        for key, t in state.items():  # the rules of conversion.pretrained.check_values, on torch tensors
            if not t.is_floating_point():
                raise CheckpointError(
                    f"{source}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; model weights are floating point"
                )
            bad = t.numel() - int(torch.isfinite(t).sum())
            if bad:
                raise CheckpointError(
                    f"{source}: tensor {key!r} has {bad} non-finite value(s) of {t.numel()}: a broken model"
                )
        model = cls(cfg).to(dtype)
        with torch.no_grad():
            params = dict(model.named_parameters(remove_duplicate=False))
            params.update(model.named_buffers())
            for key, value in state.items():
                params[key].copy_(torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value)
        return model
