"""Run one checkpoint in torch_ref and jaxvlm on the same inputs and compare the logits
(what `python -m conversion check` prints). Imports torch and jax, so it is loaded lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conversion.config import VLMConfig
from conversion.hub import resolve
from conversion.pretrained import TOKENIZER_FILE, WEIGHTS_FILE, read_checkpoint


def load_both(directory: Path):
    """(cfg, torch_ref model, jaxvlm model) from a nanoVLM directory or an orbax checkpoint."""
    import torch_ref
    from conversion.mapping import jax_to_torch
    from jaxvlm.pretrained import flat_state, load_orbax, model_from_torch_tensors

    if (directory / WEIGHTS_FILE).is_file():
        cfg, tensors = read_checkpoint(directory)
        jmodel = model_from_torch_tensors(cfg, tensors, source=str(directory))
    else:
        jmodel = load_orbax(directory)
        cfg = jmodel.cfg
        tensors = jax_to_torch(cfg, flat_state(jmodel), source=str(directory))
    tmodel = torch_ref.VisionLanguageModel.from_state(
        cfg, {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}, source=str(directory)
    )
    return cfg, tmodel.eval(), jmodel


def random_inputs(cfg: VLMConfig, batch_size: int, seq_len: int, seed: int):
    """Left-padded token batch: row b has b % 3 images and a random amount of left padding."""
    rng = np.random.default_rng(seed)
    L = cfg.n_image_tokens
    ids = rng.integers(0, cfg.lm_base_vocab_size, (batch_size, seq_len))
    mask = np.ones((batch_size, seq_len), np.int32)
    n_images = 0
    for b in range(batch_size):
        k = b % 3
        pad = int(rng.integers(0, seq_len // 4)) if b else 0
        mask[b, :pad] = 0
        start = pad + 1
        if start + k * (L + 1) > seq_len:
            raise ValueError(f"--seq-len {seq_len} is too short for {k} images of {L} tokens")
        for i in range(k):
            ids[b, start + i * (L + 1) : start + i * (L + 1) + L] = cfg.image_token_id
        n_images += k
    images = rng.random((n_images, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32) if n_images else None
    return (
        ids.astype(np.int32),
        images,
        mask,
        f"random: batch {batch_size} x {seq_len} tokens, left padding, {n_images} images (seed {seed})",
    )


def prompt_inputs(cfg: VLMConfig, directory: Path, images: list[str], prompt: str, tokenizer: str | None):
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import load_for_config

    tok = load_for_config(cfg, tokenizer or directory / TOKENIZER_FILE)
    sample = SampleEncoder.from_config(cfg, tok).encode_prompt(images or [], prompt)
    ids = sample["input_ids"][None]
    pixel = sample["images"] if len(sample["images"]) else None
    return ids, pixel, np.ones_like(ids), f"prompt {prompt!r} with {len(images or [])} image(s), {ids.shape[1]} tokens"


def compare_frameworks(
    directory: Path, *, image=None, prompt=None, tokenizer=None, batch_size=2, seq_len=512, seed=0
) -> dict:
    import jax
    import torch

    import jaxvlm

    jax.config.update("jax_default_matmul_precision", "highest")
    directory = resolve(directory, what="checkpoint")  # a directory or a Hub repo id
    cfg, tmodel, jmodel = load_both(directory)
    if prompt is not None:
        ids, images, mask, desc = prompt_inputs(cfg, directory, image, prompt, tokenizer)
    elif image:
        raise ValueError("--image needs --prompt")
    else:
        ids, images, mask, desc = random_inputs(cfg, batch_size, seq_len, seed)
    with torch.no_grad():
        t_logits = (
            tmodel(
                torch.as_tensor(ids).long(),
                None if images is None else torch.as_tensor(images),
                torch.as_tensor(mask).long(),
            )[0]
            .float()
            .numpy()
        )
    j_logits = np.asarray(jaxvlm.forward(jmodel, ids, images, mask), dtype=np.float32)
    valid = mask.astype(bool)
    t, j = t_logits[valid].astype(np.float64), j_logits[valid].astype(np.float64)
    log_pt = t - _logsumexp(t)
    log_pj = j - _logsumexp(j)
    kl = np.sum(np.exp(log_pt) * (log_pt - log_pj), axis=-1)
    return {
        "inputs": desc,
        "n_positions": int(valid.sum()),
        "logit_scale": float(np.abs(t_logits).max()),
        "max_abs_diff": float(np.abs(t_logits - j_logits).max()),  # every position, padding included
        "mean_kl": float(kl.mean()),
        "top1_agreement": float(np.mean(t.argmax(-1) == j.argmax(-1))),
    }


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
