"""Multimodal packing: several samples in one row of `max_length` tokens (upstream's
`ConstantLengthDataset`), with a mode that keeps each sample exactly what it is alone.

Shapes: B rows, T = max_length, n tiles (the rows of `images`: what the ViT encodes; a
sample's "images" here are its tiles), S side.

Which samples share a row: `pack_greedy`, a balanced greedy knapsack as upstream's - the
fewest rows k >= ceil(total tokens / T) for which placing the samples longest first, each
into the least-loaded row it fits (tokens <= T, tiles <= the per-row cap), succeeds.

What a packed row is, `collate_packed`, by `mode`:

  segments  (default) sample k of a row gets segment id k (1, 2, ...; padding 0) and RoPE
            positions 0..T_k-1: attention is block-diagonal causal (`jaxvlm.attention.segment_bias`,
            `torch_ref.attention`), so every sample's logits, loss terms and gradients are those
            it has when run alone (tests/test_packing.py checks it in both frameworks).
  upstream  nanoVLM's behaviour: the samples are concatenated and attend to each other, RoPE
            positions 0..T-1 along the whole row (the batch is then an ordinary unpacked batch).

Labels never cross a sample boundary: a sample's labels are shifted within the sample (its
last label is -100), so concatenating them is exact.

    rows = pack_greedy([(len_i, tiles_i), ...], max_length=1024, max_tiles=16)  # [[i, j], [k], ...]
    batch = collate_packed([[s_i, s_j], [s_k]], seq_len=1024, n_images=32, pad_id=2,
                           image_size=512, mode="segments")
    batch["segment_ids"], batch["position_ids"]   # int32[B, T] (segments mode only)

Imports neither jax nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .encoding import IGNORE_INDEX

MODES = ("segments", "upstream")


def pack_greedy(shapes: Sequence[tuple[int, int]], max_length: int, max_tiles: int | None = None) -> list[list[int]]:
    """Indices of `shapes` [(tokens, tiles), ...] grouped into rows of at most `max_length` tokens
    and `max_tiles` tiles (None: no tile cap). Every item must fit a row on its own (callers
    drop the ones that do not). Each row lists its items in their original order; rows are
    ordered by their first item. Deterministic: equal inputs give equal rows."""
    for i, (t, n) in enumerate(shapes):
        if t > max_length or (max_tiles is not None and n > max_tiles):
            raise ValueError(f"item {i} ({t} tokens, {n} tiles) does not fit one row")
    if not shapes:
        return []
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0], i))  # longest first, stable
    total = sum(t for t, _ in shapes)
    k = max(1, -(-total // max_length))
    while True:
        load, tiles, rows = [0] * k, [0] * k, [[] for _ in range(k)]
        for i in order:
            t, n = shapes[i]
            for r in sorted(range(k), key=lambda r: (load[r], r)):  # least loaded first
                if load[r] + t <= max_length and (max_tiles is None or tiles[r] + n <= max_tiles):
                    load[r], tiles[r] = load[r] + t, tiles[r] + n
                    rows[r].append(i)
                    break
            else:
                break  # no row takes it: try one more row
        else:
            packed = [sorted(r) for r in rows if r]
            return sorted(packed, key=lambda r: r[0])
        k += 1  # at most len(shapes) rows always succeed (every item fits alone)


def collate_packed(
    rows: Sequence[Sequence[dict] | None],
    *,
    seq_len: int,
    n_images: int,
    pad_id: int,
    image_size: int,
    mode: str = "segments",
) -> dict:
    """Rows of samples (None = a blank row) -> the batch, left-padded to `seq_len`.

    Returns {input_ids, attention_mask, labels: int32[B, seq_len], images: float32[n_images, 3, S, S]
    (all tiles in row order, then zeros), n_images: int (real tiles), n_samples: int} and, in
    `segments` mode, segment_ids and position_ids int32[B, seq_len] (0 on padding).
    """
    if mode not in MODES:
        raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")
    B = len(rows)
    ids = np.full((B, seq_len), pad_id, np.int32)
    mask = np.zeros((B, seq_len), np.int32)
    labels = np.full((B, seq_len), IGNORE_INDEX, np.int32)
    segments = np.zeros((B, seq_len), np.int32)
    positions = np.zeros((B, seq_len), np.int32)
    images = np.zeros((n_images, 3, image_size, image_size), np.float32)
    k = n_samples = 0
    for b, samples in enumerate(rows):
        if not samples:
            continue
        T = sum(len(s["input_ids"]) for s in samples)
        if T > seq_len:
            raise ValueError(f"row {b} packs {T} tokens > the row length {seq_len}")
        t = seq_len - T
        for seg, s in enumerate(samples, 1):
            n = len(s["input_ids"])
            ids[b, t : t + n] = s["input_ids"]
            mask[b, t : t + n] = s["attention_mask"]
            labels[b, t : t + n] = s["labels"]
            segments[b, t : t + n] = seg
            positions[b, t : t + n] = np.arange(n)
            tiles = s["images"].shape[0]
            if k + tiles > n_images:
                raise ValueError(f"the batch has more than {n_images} image tiles")
            images[k : k + tiles] = s["images"]
            k += tiles
            t += n
            n_samples += 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "images": images,
        "n_images": k,
        "n_samples": n_samples,
    }
    if mode == "segments":
        batch["segment_ids"], batch["position_ids"] = segments, positions
    return batch
