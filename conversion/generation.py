"""Generation argument checks shared by `jaxvlm.generate` and `torch_ref.generate` (no framework)."""

from __future__ import annotations

import math

from .config import VLMConfig


def check_generation_args(
    cfg: VLMConfig, prompt_len: int, max_new_tokens: int, *, greedy: bool, temperature: float, top_k: int, top_p: float
) -> None:
    """Raise ValueError for arguments upstream would silently misuse (both frameworks call this).

    The context limit is `cfg.lm_max_length` (the sequence length the model was trained with,
    which upstream's processor truncates prompts to): prompt + new tokens must fit in it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty: generation needs at least one input token")
    if prompt_len + max_new_tokens > cfg.lm_max_length:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model context lm_max_length = {cfg.lm_max_length}"
        )
    if not greedy:
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
