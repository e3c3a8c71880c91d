"""Pixel-shuffle projector (upstream `models/modality_projector.py`).

Shapes: N_img images, N patches (a perfect square), D vision width, s shuffle factor,
L = N / s^2 image tokens, H language width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from conversion.config import VLMConfig


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """float[N_img, N, D] -> float[N_img, N/s^2, s*s*D] (space-to-depth over the patch grid)."""
    B, N, D = x.shape
    side = int(round(N**0.5))
    if side * side != N or side % s:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {s}, got {N} patches")
    x = x.view(B, side // s, s, side // s, s, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, D): the order upstream uses
    return x.reshape(B, (side // s) ** 2, s * s * D)


class ModalityProjector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.mp_input_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        return self.proj(pixel_shuffle(x, self.scale_factor))
