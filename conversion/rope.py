"""RoPE inverse frequencies with torch_ref's float32 steps, framework-free (numpy).

jaxvlm's decoder buffer and the Hugging Face importer both take them from here, so a model built
in either place has the same `decoder.rotary_embd.inv_freq` bits as torch_ref.
"""

from __future__ import annotations

import numpy as np


def rope_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """float32[hd/2]: 1 / base^(2i/hd), the buffer torch_ref (and transformers) build with
    `1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))`.

    Same float32 steps: base rounded to float32, exponents 2i/hd divided in float32, the
    reciprocal in float32. The power itself is rounded correctly (computed in float64, then
    rounded once), which torch's CPU kernel does not promise: it uses SLEEF's vectorised powf
    (<= 1 ulp) and glibc's powf for the tail, depending on the CPU. The two agree bit for bit
    for the released configs (head dim 64 with base 1e4, 1e5, 1.3e5; 128 with 5e5, ...);
    elsewhere within 2 ulp (tests/test_hf.py measures both).
    """
    x = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = np.power(np.float64(np.float32(base)), x.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)
