"""The modality projectors (upstream `models/modality_projector.py` is the first, pixel_shuffle_linear).

`cfg.mp_type` chooses one (`build_projector`); each starts with the pixel shuffle of factor
s = `mp_pixel_shuffle_factor` (s = 1: none), giving C = s*s*D wide features:

  pixel_shuffle_linear  (None, nanoVLM's)  MP.proj: Linear(C, H, no bias).
  mlp                   (LLaVA-1.5's mlp2x_gelu)  MP.fc1: Linear(C, H) -> exact (erf) GELU ->
                        MP.fc2: Linear(H, H), both with bias.
  resampler             (Flamingo's Perceiver resampler) Q learned queries `MP.latents` [Q, C]
                        go through `mp_resampler_layers` blocks of
                            latents += attn(q = ln_latents(latents), kv = [ln_media(x); ln_latents(latents)])
                            latents += mlp(ln_mlp(latents))        (Linear(C, 4C), exact GELU, Linear(4C, C))
                        (vit_n_heads heads, no biases), then `MP.layer_norm` and
                        MP.proj: Linear(C, H, no bias). L = Q image tokens.

Initialisation: `torch_ref.vision_language_model.init_weights` gives every Linear N(0, 0.02),
zero biases, LayerNorms 1 / 0 (nanoVLM's); the queries are drawn here N(0, 1) (open_flamingo's
`torch.randn`). `jaxvlm/modality_projector.py` is the same, class for class.

Shapes: N_img images, N patches (a perfect square), D vision width, s shuffle factor,
C = s*s*D projector input width, M = N / s^2 shuffled features, Q resampler queries,
L image tokens (M, or Q for the resampler), H language width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conversion.config import RESAMPLER_LN_EPS, RESAMPLER_MLP_RATIO, VLMConfig

from .attention import attention


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
    """pixel_shuffle_linear: nanoVLM's projector."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.proj = nn.Linear(cfg.mp_input_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        return self.proj(pixel_shuffle(x, self.scale_factor))


class MLPProjector(nn.Module):
    """mlp: LLaVA-1.5's two-layer projector (Linear, GELU, Linear) after the pixel shuffle."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        self.fc1 = nn.Linear(cfg.mp_input_dim, cfg.lm_hidden_dim)
        self.fc2 = nn.Linear(cfg.lm_hidden_dim, cfg.lm_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float[N_img, N, D] -> float[N_img, L, H]."""
        return self.fc2(F.gelu(self.fc1(pixel_shuffle(x, self.scale_factor)), approximate="none"))


class ResamplerAttention(nn.Module):
    """Queries from the latents; keys and values from [features; latents] (Flamingo)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        C = cfg.mp_input_dim
        self.n_heads = cfg.vit_n_heads
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.out_proj = nn.Linear(C, C, bias=False)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        """float[N_img, Q, C] (normed), float[N_img, M, C] (normed) -> float[N_img, Q, C]."""
        B, Q, C = latents.shape
        kv = torch.cat([media, latents], dim=1)  # (N_img, M + Q, C)
        hd = C // self.n_heads
        q = self.q_proj(latents).view(B, Q, self.n_heads, hd).transpose(1, 2)  # (N_img, nh, Q, hd)
        k = self.k_proj(kv).view(B, kv.shape[1], self.n_heads, hd).transpose(1, 2)
        v = self.v_proj(kv).view(B, kv.shape[1], self.n_heads, hd).transpose(1, 2)
        y = attention(q, k, v, causal=False)  # (N_img, nh, Q, hd), scale 1/sqrt(hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, Q, C))


class ResamplerMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        C = cfg.mp_input_dim
        self.fc1 = nn.Linear(C, RESAMPLER_MLP_RATIO * C, bias=False)
        self.fc2 = nn.Linear(RESAMPLER_MLP_RATIO * C, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class ResamplerBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        C = cfg.mp_input_dim
        self.ln_media = nn.LayerNorm(C, eps=RESAMPLER_LN_EPS)
        self.ln_latents = nn.LayerNorm(C, eps=RESAMPLER_LN_EPS)
        self.attn = ResamplerAttention(cfg)
        self.ln_mlp = nn.LayerNorm(C, eps=RESAMPLER_LN_EPS)
        self.mlp = ResamplerMLP(cfg)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(self.ln_latents(latents), self.ln_media(media))
        return latents + self.mlp(self.ln_mlp(latents))


class PerceiverResampler(nn.Module):
    """resampler: `mp_resampler_queries` learned queries cross-attending to the (shuffled) patches."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.mp_pixel_shuffle_factor
        C = cfg.mp_input_dim
        self.latents = nn.Parameter(torch.randn(cfg.mp_resampler_queries, C))
        self.blocks = nn.ModuleList([ResamplerBlock(cfg) for _ in range(cfg.mp_resampler_layers)])
        self.layer_norm = nn.LayerNorm(C, eps=RESAMPLER_LN_EPS)
        self.proj = nn.Linear(C, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float[N_img, N, D] -> float[N_img, Q, H]."""
        media = pixel_shuffle(x, self.scale_factor)  # (N_img, M, C)
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, media)
        return self.proj(self.layer_norm(latents))


PROJECTORS = {"pixel_shuffle_linear": ModalityProjector, "mlp": MLPProjector, "resampler": PerceiverResampler}


def build_projector(cfg: VLMConfig) -> nn.Module:
    """The projector `cfg.mp_type` names (None: nanoVLM's pixel_shuffle_linear)."""
    return PROJECTORS[cfg.projector](cfg)
