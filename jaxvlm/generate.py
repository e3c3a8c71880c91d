"""Fast, exact autoregressive generation: upstream nanoVLM's `generate`, compiled.

Shapes: B batch, T prompt length (the caller's, left-padded), Tb prompt bucket, N
max_new_tokens, Nb its bucket, Tc = Tb + Nb cache slots, V vocabulary, nkv kv heads, hd head dim.

Two jitted calls per `generate`:
1. `_prefill`: encodes the images once, merges them into the prompt embeddings and runs the
   decoder over the whole bucketed prompt, writing every block's keys/values into a
   preallocated KV cache (per block (k, v), each [B, nkv, Tc, hd]: slots contiguous per head,
   the layout the attention matmuls read directly, so no step copies or transposes the
   cache); returns the logits of the last prompt position and the cache.
2. `_decode`: the whole token loop on device, one `lax.while_loop` that stops when N tokens
   are out or every row has emitted EOS. Each step embeds the previous token, writes its
   keys/values into slot Tb + step - 1 with `dynamic_update_slice` (the cache is donated
   to this call and updated in place as a loop carry) and attends over all Tc slots; slots
   not yet written are hidden by the causal mask (q_offset), padding by the attention mask.

Bucketing, so that new prompt lengths do not recompile: the prompt is left-padded further
to Tb (`bucket_length`: a power of two >= 32 up to 256, then a multiple of 256) and N to
Nb (>= 16, same rule). The extra padding is masked and its columns get negative RoPE
positions: the caller's columns keep upstream's positions 0..T-1 (padding included, as
upstream does) and generated tokens T, T+1, ... . The attention mask over the cache is
built once on the host: [zeros(Tb - T), attention_mask, ones(Nb)]. The RoPE rescale past
`lm_max_position_embeddings` is the model's own rule, computed from those positions.

Compiles: `_prefill` once per (B, Tb, Nb, image count, image size); `_decode` once per (B, Tb,
Nb) and sampling mode (greedy, top_k, whether top_p < 1, whether an EOS is given, return_logits).
Temperature, top_p's value, the EOS id, the seed and N itself are traced. `TRACE_COUNTS`
counts traces (= compiles) per function.

Sampling draws use the key `fold_in(key(seed), step)` for the whole batch at each step: the
same (seed, prompt batch) always gives the same tokens (but not torch's: other RNG).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.generation import check_generation_args

from .sampling import select_next_token
from .vision_language_model import check_image_tokens

PROMPT_BUCKET_MIN = 32
NEW_TOKENS_BUCKET_MIN = 16
BUCKET_STEP = 256

TRACE_COUNTS: collections.Counter = collections.Counter()  # {"prefill": n, "decode": n} traces so far
_STREAM_CALLBACK: list = [None]  # the `stream` callable of the generate call in progress


def _emit_token(step, tokens) -> None:
    if _STREAM_CALLBACK[0] is not None:
        _STREAM_CALLBACK[0](int(step), np.asarray(tokens))


def bucket_length(n: int, minimum: int, step: int = BUCKET_STEP) -> int:
    """The smallest power of two >= max(n, minimum) while that is <= step, else n rounded up
    to a multiple of step. E.g. (minimum 32) 5 -> 32, 33 -> 64, 200 -> 256, 300 -> 512, 600 -> 768."""
    if n <= step:
        b = minimum
        while b < n:
            b *= 2
        return b
    return -(-n // step) * step


def replace_after_eos(tokens: jax.Array, eos_token_id) -> jax.Array:
    """int[B, N]: every token after a row's first EOS becomes EOS (upstream's post-processing)."""
    is_eos = (tokens == eos_token_id).astype(jnp.int32)
    after_first = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0  # an EOS strictly before this column
    return jnp.where(after_first, eos_token_id, tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, state, input_ids, images, attention_mask, n_pad, *, cache_len: int):
    """int[B, Tb], float[N_img, 3, S, S] | None, int[B, Tc], int32 scalar ->
    (logits float32[B, V] of the last position, cache per block (k, v) [B, nkv, Tc, hd])."""
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    B, Tb = input_ids.shape
    x = model.embed(input_ids, images)  # (B, Tb, H), images encoded here, once
    positions = jnp.arange(Tb, dtype=jnp.int32)[None] - n_pad  # caller's columns: 0..T-1
    cache = model.decoder.init_cache(B, cache_len, model.options.compute_dtype)
    hidden, cache = model.decoder.extend(x, positions, cache, 0, attention_mask)
    logits = model.decoder.logits(hidden[:, -1:])[:, 0]
    return logits.astype(jnp.float32), cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "n_out", "greedy", "top_k", "use_top_p", "stop_at_eos", "return_logits", "stream"),
    donate_argnames=("cache",),
)
def _decode(
    graphdef,
    state,
    logits,
    cache,
    attention_mask,
    prompt_len,
    max_new_tokens,
    eos_token_id,
    key,
    temperature,
    top_p,
    *,
    n_out: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    stop_at_eos: bool,
    return_logits: bool,
    stream: bool = False,
):
    """The token loop. logits float32[B, V] from the prefill, cache [B, nkv, Tc, hd] per block
    (donated), attention_mask int[B, Tc] -> (tokens int32[B, Nb], logits float32[B, Nb, V] or
    None, cache). Token s is chosen from the logits after token s-1 (s = 0: the prefill's)."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    B, V = logits.shape
    first_slot = attention_mask.shape[1] - n_out  # Tb: slot of the first generated token

    def choose(step_logits, step):
        tok = select_next_token(
            step_logits,
            jax.random.fold_in(key, step),
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else 1.0,
        )
        if stream:  # hand each token to the host as it is chosen, in order
            jax.debug.callback(_emit_token, step, tok, ordered=True)
        return tok

    tok = choose(logits, 0)
    tokens = jnp.full((B, n_out), eos_token_id if stop_at_eos else 0, jnp.int32).at[:, 0].set(tok)
    done = (tok == eos_token_id) if stop_at_eos else jnp.zeros((B,), bool)
    all_logits = jnp.zeros((B, n_out, V), jnp.float32).at[:, 0].set(logits) if return_logits else None

    def cond(carry):
        step, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, cache, all_logits = carry
        prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)  # (B, 1)
        x = model.decoder.token_embedding(prev)
        positions = jnp.reshape(prompt_len + step - 1, (1, 1))
        hidden, cache = model.decoder.extend(x, positions, cache, first_slot + step - 1, attention_mask)
        step_logits = model.decoder.logits(hidden)[:, 0].astype(jnp.float32)
        tok = choose(step_logits, step)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
        if stop_at_eos:
            done = done | (tok == eos_token_id)
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice_in_dim(all_logits, step_logits[:, None], step, axis=1)
        return step + 1, tokens, done, cache, all_logits

    carry = (jnp.int32(1), tokens, done, cache, all_logits)
    _, tokens, _, cache, all_logits = jax.lax.while_loop(cond, body, carry)
    if stop_at_eos:
        tokens = replace_after_eos(tokens, eos_token_id)
    return tokens, all_logits, cache


def generate(
    model,
    input_ids,
    images,
    attention_mask=None,
    *,
    max_new_tokens: int = 5,
    greedy: bool = False,
    temperature: float = 0.5,
    top_k: int = 50,
    top_p: float = 0.9,
    eos_token_id: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
    stream=None,
):
    """New token ids int32[B, N] (and, with return_logits, float32[B, N, V]: the logits each
    token was chosen from, before filtering; rows after an early stop are zeros).

    Args:
      model: a `jaxvlm.VisionLanguageModel`.
      input_ids: int[B, T], left-padded. images: float[N_img, 3, S, S] in [0, 1], or None; their
        count must match the prompt's image tokens (ValueError otherwise).
      attention_mask: int[B, T], 1 real / 0 padding, or None (no padding).
      max_new_tokens: N. T + N must not exceed `cfg.lm_max_length` (ValueError otherwise).
      greedy: argmax. Otherwise upstream's top-k then top-p filtering (`jaxvlm.sampling`), then
        softmax(logits / temperature) and a draw; upstream's defaults.
      eos_token_id: everything after a row's first EOS is set to EOS and the loop stops when
        every row has emitted it; None = never stop.
      seed: the draws are a function of (seed, step) via `jax.random.fold_in`: reproducible.
      stream: optional `callable(step, tokens int32[B])`, called on the host for every token as
        the on-device loop chooses it (a jax.debug.callback; compiled as its own variant).
    Same semantics as `torch_ref.generate.generate` (greedy tokens identical to it).
    """
    cfg = model.cfg
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be int[B, T], got {ids.dtype}{list(ids.shape)}")
    B, T = ids.shape
    mask = np.ones((B, T), np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if images is not None:
        images = jnp.asarray(images, dtype=jnp.float32)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float[N_img, 3, S, S], got shape {images.shape}")
        if images.shape[0] == 0:
            images = None
    check_image_tokens(ids, 0 if images is None else images.shape[0], cfg)
    check_generation_args(cfg, T, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens == 0:
        empty = jnp.zeros((B, 0), jnp.int32)
        return (empty, jnp.zeros((B, 0, cfg.lm_vocab_size), jnp.float32)) if return_logits else empty

    Tb = bucket_length(T, PROMPT_BUCKET_MIN)
    n_out = bucket_length(max_new_tokens, NEW_TOKENS_BUCKET_MIN)
    n_pad = Tb - T
    ids_b = np.concatenate([np.zeros((B, n_pad), np.int32), ids.astype(np.int32)], axis=1)
    mask_c = np.concatenate([np.zeros((B, n_pad), np.int32), mask, np.ones((B, n_out), np.int32)], axis=1)

    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, ids_b, images, mask_c, np.int32(n_pad), cache_len=Tb + n_out)
    stop_at_eos = eos_token_id is not None
    _STREAM_CALLBACK[0] = stream
    try:
        tokens, all_logits, _ = _decode(
            graphdef,
            state,
            logits,
            cache,
            mask_c,
            np.int32(T),
            np.int32(max_new_tokens),
            np.int32(eos_token_id if stop_at_eos else 0),
            jax.random.key(seed),
            np.float32(temperature),
            np.float32(top_p),
            n_out=n_out,
            greedy=bool(greedy),
            top_k=0 if greedy else min(int(top_k), cfg.lm_vocab_size),
            use_top_p=(not greedy) and top_p < 1.0,
            stop_at_eos=stop_at_eos,
            return_logits=bool(return_logits),
            stream=stream is not None,
        )
        if stream is not None:
            jax.effects_barrier()  # every callback has run
    finally:
        _STREAM_CALLBACK[0] = None
    tokens = tokens[:, :max_new_tokens]
    return (tokens, all_logits[:, :max_new_tokens]) if return_logits else tokens
