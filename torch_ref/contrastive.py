"""Contrastive pretraining of the vision tower in PyTorch: the twin of `jaxvlm/contrastive.py`
(same names, same attribute paths), for parity tests. CLIP's InfoNCE (Radford et al. 2021) and
SigLIP's sigmoid loss (Zhai et al. 2023); the towers and losses are described there.

Shapes: B pairs, N patches, D vision width, H language width, T text length, E embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from conversion.config import VLMConfig

from .language_model import LanguageModel
from .vision_transformer import ViT

LOSSES = ("siglip", "infonce")
MAX_LOGIT_SCALE = 100.0
INIT_LOGIT_SCALE = {"infonce": math.log(1 / 0.07), "siglip": math.log(10.0)}
INIT_LOGIT_BIAS = -10.0
NORM_EPS = 1e-12


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor):
    """-1/B sum_ij log sigmoid(z_ij (exp(t') x_i.y_j + b)), z = +1 on the diagonal, -1 elsewhere."""
    B = img.shape[0]
    logits = logit_scale.exp() * (img.float() @ txt.float().T) + logit_bias
    z = 2 * torch.eye(B, dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / B


def infonce_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP: logits = min(exp(t'), 100) x_i.y_j; mean of both directions' cross-entropies."""
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * (img.float() @ txt.float().T)
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: VLMConfig, loss: str, *, embed_dim: int | None = None, vision_encoder=None, decoder=None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
        self.loss_name = loss
        self.cfg = cfg
        E = embed_dim or cfg.lm_hidden_dim
        self.vision_encoder = vision_encoder if vision_encoder is not None else ViT(cfg)
        self.decoder = decoder if decoder is not None else LanguageModel(cfg)
        self.image_proj = nn.Linear(cfg.vit_hidden_dim, E, bias=False)
        self.text_proj = nn.Linear(cfg.lm_hidden_dim, E, bias=False)
        for proj in (self.image_proj, self.text_proj):  # CLIP's projections: N(0, width^-1/2)
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE[loss]))
        self.logit_bias = nn.Parameter(torch.tensor(INIT_LOGIT_BIAS)) if loss == "siglip" else None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float[B, 3, S, S] -> unit float32[B, E]."""
        pooled = self.vision_encoder(images).float().mean(dim=1)  # (B, D)
        return F.normalize(self.image_proj(pooled), dim=-1, eps=NORM_EPS)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int[B, T], int[B, T] -> unit float32[B, E] (mean over the real tokens)."""
        hidden, _ = self.decoder(self.decoder.token_embedding(input_ids), attention_mask)  # (B, T, H)
        m = attention_mask.float()[..., None]
        pooled = (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text_proj(pooled), dim=-1, eps=NORM_EPS)

    def forward(self, images, input_ids, attention_mask) -> torch.Tensor:
        img, txt = self.encode_images(images), self.encode_texts(input_ids, attention_mask)
        if self.loss_name == "infonce":
            return infonce_loss(img, txt, self.logit_scale)
        return siglip_loss(img, txt, self.logit_scale, self.logit_bias)


def load_contrastive(run_dir) -> ContrastiveModel:
    """The trained model of a `jaxvlm pretrain-vision` run directory (`jaxvlm.contrastive.load_contrastive`'s
    twin): the towers from `RUN/model`, the heads from `RUN/contrastive_heads.safetensors`."""
    from pathlib import Path

    from conversion.pretrained import HEADS_FILE, read_contrastive_heads

    from .vision_language_model import VisionLanguageModel

    run_dir = Path(run_dir)
    vlm = VisionLanguageModel.from_pretrained(run_dir / "model")
    loss, embed_dim, tensors = read_contrastive_heads(run_dir / HEADS_FILE, vlm.cfg)
    model = ContrastiveModel(vlm.cfg, loss, embed_dim=embed_dim, vision_encoder=vlm.vision_encoder, decoder=vlm.decoder)
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision_encoder.", "decoder."))}
    if heads.keys() != tensors.keys():  # read_contrastive_heads checked the file against the config
        raise ValueError(f"contrastive heads {sorted(tensors)} do not match the model's {sorted(heads)}")
    with torch.no_grad():
        for k, v in tensors.items():
            heads[k].copy_(torch.from_numpy(np.array(v, np.float32)))
    return model
