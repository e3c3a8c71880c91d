"""Llama/SmolLM2-style decoder (upstream `models/language_model.py`).

Shapes: B batch, T sequence, H width, nh query heads, nkv kv heads, hd head dim, V vocabulary.
The decoder works on embeddings (the VLM overwrites image-token rows before calling it);
`head` turns its output into logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from conversion.config import VLMConfig

from .attention import attention


class RMSNorm(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.lm_hidden_dim))
        self.eps = cfg.lm_rms_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + self.eps) * self.weight


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """float[hd/2]: 1 / base^(2i/hd)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))


class RotaryEmbedding(nn.Module):
    """cos/sin for the rotate-half RoPE convention. `inv_freq` is a persistent buffer (it is in
    the checkpoint). Past `lm_max_position_embeddings` the frequencies are divided by
    max_pos / lm_max_position_embeddings, as upstream does (linear scaling)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg.lm_head_dim, cfg.lm_re_base))
        self.original_max_seq_len = cfg.lm_max_position_embeddings
        self.attention_scaling = cfg.lm_attn_scaling

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int[B, T] -> (cos, sin), each float[B, T, hd]."""
        max_seq = position_ids.max() + 1
        inv_freq = self.inv_freq
        if max_seq > self.original_max_seq_len:
            inv_freq = inv_freq / (max_seq / self.original_max_seq_len)
        freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return torch.cos(emb) * self.attention_scaling, torch.sin(emb) * self.attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_embd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x float[B, heads, T, hd]; cos/sin float[B, T, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class LanguageModelGroupedQueryAttention(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.lm_n_heads, cfg.lm_n_kv_heads, cfg.lm_head_dim
        H = cfg.lm_hidden_dim
        self.q_proj = nn.Linear(H, H, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(H, H, bias=False)

    def project_qkv(self, x, cos, sin):
        """x [B, T, H] -> q [B, nh, T, hd], k, v [B, nkv, T, hd], RoPE applied to q and k."""
        B, T, H = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary_pos_embd(q, cos, sin), apply_rotary_pos_embd(k, cos, sin), v

    def forward(self, x, cos, sin, attention_mask=None, block_kv_cache=None, segment_ids=None):
        """x float[B, T, H] -> (float[B, T, H], cache {"key", "value": float[B, nkv, T_total, hd]})."""
        B, T, H = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        if block_kv_cache is not None:
            k = torch.cat([block_kv_cache["key"], k], dim=2)
            v = torch.cat([block_kv_cache["value"], v], dim=2)
        y = attention(q, k, v, causal=True, attention_mask=attention_mask, segment_ids=segment_ids)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H)), {"key": k, "value": v}


class LanguageModelMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        H, I = cfg.lm_hidden_dim, cfg.lm_inter_dim
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LanguageModelBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.mlp = LanguageModelMLP(cfg)
        self.attn = LanguageModelGroupedQueryAttention(cfg)
        self.norm1 = RMSNorm(cfg)
        self.norm2 = RMSNorm(cfg)

    def forward(self, x, cos, sin, attention_mask=None, block_kv_cache=None, segment_ids=None):
        y, block_kv_cache = self.attn(self.norm1(x), cos, sin, attention_mask, block_kv_cache, segment_ids)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, block_kv_cache


class LanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rotary_embd = RotaryEmbedding(cfg)
        self.blocks = nn.ModuleList([LanguageModelBlock(cfg) for _ in range(cfg.lm_n_blocks)])
        self.norm = RMSNorm(cfg)
        self.head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        if cfg.lm_tie_weights:
            self.head.weight = self.token_embedding.weight

    def forward(self, x, attention_mask=None, kv_cache=None, start_pos: int = 0, segment_ids=None, position_ids=None):
        """Embeddings float[B, T, H] at positions start_pos.. -> (hidden float[B, T, H], kv_cache).

        `attention_mask` int[B, start_pos + T] covers the cached keys and the new ones. Packed
        rows (training): `segment_ids` int[B, T] (see `attention`) and `position_ids` int[B, T]
        (RoPE positions restarting at 0 for each sample) instead of start_pos.. .
        """
        B, T, _ = x.shape
        positions = torch.arange(start_pos, start_pos + T, device=x.device)[None].expand(B, -1)
        if position_ids is not None:
            positions = position_ids
        cos, sin = self.rotary_embd(positions)
        kv_cache = list(kv_cache) if kv_cache is not None else [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            x, kv_cache[i] = block(x, cos, sin, attention_mask, kv_cache[i], segment_ids)
        return self.norm(x), kv_cache
