"""SigLIP-style ViT (upstream `models/vision_transformer.py`; HF `modeling_siglip.py`).

Shapes: N_img images, C=3 channels, S image side, P patch size, N = (S/P)^2 patches, D width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conversion.config import VLMConfig

from .attention import attention


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        D, P = cfg.vit_hidden_dim, cfg.vit_patch_size
        self.conv = nn.Conv2d(3, D, kernel_size=P, stride=P, padding="valid")
        self.position_embedding = nn.Parameter(torch.rand(1, cfg.vit_n_patches, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float[N_img, 3, S, S] -> float[N_img, N, D], patches in row-major order."""
        x = self.conv(x)  # (N_img, D, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (N_img, N, D)
        return x + self.position_embedding


class ViTMultiHeadAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.qkv_proj = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim, bias=True)
        self.out_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim, bias=True)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k, v, each [B, nh, T, hd]."""
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)  # fused in the order q, k, v
        return tuple(t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.project_qkv(x)
        y = attention(q, k, v, causal=False)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class ViTMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTMultiHeadAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class ViT(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.patch_embedding = ViTPatchEmbeddings(cfg)
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.layer_norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.image_mean, self.image_std = cfg.vlm_image_mean, cfg.vlm_image_std  # tuples or None

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """The config's per-channel (x - mean) / std in float32 (identity when it names none)."""
        if self.image_mean is None:
            return images
        mean, std = (
            torch.tensor(v, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
            for v in (self.image_mean, self.image_std)
        )
        return ((images.float() - mean) / std).to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float[N_img, 3, S, S] in [0, 1] -> float[N_img, N, D] (normalised first, see `normalise`)."""
        x = self.patch_embedding(self.normalise(images))
        for block in self.blocks:
            x = block(x)
        return self.layer_norm(x)
