"""Batches with static shapes for a jitted train step: left padding, bucketed lengths and image
counts, seeded shuffling, multi-host sharding, background prefetch, resumable position.

Shapes: B rows per process (`batch_size`), T a sequence bucket, N_max an image bucket, S side.

    loader = DataLoader(dataset, batch_size=8, seq_buckets=(64, 128, 256), seed=0)
    for batch in loader:          # the rest of the current epoch; then the next epoch begins
        batch["input_ids"]        # int32[B, T]     pad id on the left
        batch["attention_mask"]   # int32[B, T]     1 real token, 0 padding
        batch["labels"]           # int32[B, T]     -100 on padding and non-answer tokens
        batch["images"]           # float32[N_max, 3, S, S]: the batch's tiles in row order, then zeros
        batch["n_images"]         # int: how many rows of `images` are real
    state = loader.state_dict()   # {"epoch", "step", "seed", ...}: resumes at the next batch

The image contract for the train step. Every tile of the batch is concatenated in row order
(row 0's tiles, then row 1's, ...) into `images[:n_images]`; the rows `n_images..N_max-1` are
zeros. The token side always has exactly `n_images * L` image tokens. The model's
`merge_image_embeddings` gives the k-th image token (row-major over the batch) the embedding
row k of the flattened [N_max * L, H] image embeddings; k never reaches n_images * L, so the
padding images are encoded by the ViT (wasted work) but never read: the logits and the loss
are exactly those of the unpadded batch. N_max is the smallest of `image_buckets` that holds
n_images, so the step compiles once per (T, N_max) pair. Do not pass a padded batch to an
eager (non-jitted) model call: its image-count check compares against `images.shape[0]`;
check `n_images * L` image tokens yourself if you want the check.

Blank rows. A row that cannot be filled (the last, partial batch with `drop_last=False`; a
sample longer than the largest bucket with `on_too_long="skip"`; an unreadable sample with
`on_error="skip"`) is a blank row: all padding (mask 0, labels -100, no images), so the
shapes stay static and every host keeps the same number of steps. `loader.stats` counts them.

Multi-host. With `process_count` P > 1, each epoch's permutation (the same on every host) is
cut into global batches of P * B samples; process p takes rows p*B .. (p+1)*B - 1 of each,
which is the layout `jax.make_array_from_process_local_data` expects. So that all hosts pick
the same (T, N_max), the bucket comes from the whole global batch, via the dataset's cheap
`sample_shape(i) -> (T_i, n_tiles_i)` (no pixel decoding); each host checks that its own
samples agree with it. With P = 1 the encoded samples themselves decide.

Shape groups. `shape_group=A` makes A consecutive batches share (T, N_max), so that they can be
stacked as the A micro-batches of one gradient-accumulation step.

Resuming. The order of epoch e is `np.random.default_rng([seed, e]).permutation(n)`, so
(seed, epoch, step) is the whole iteration state; `load_state_dict` restores it and the loader
yields exactly the batches the saved one would have yielded next.

Imports neither jax nor torch.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np

from .encoding import IGNORE_INDEX, SampleError

log = logging.getLogger(__name__)


def power_of_two_buckets(low: int, high: int) -> tuple[int, ...]:
    """(low, 2 low, 4 low, ..., high): powers of two from `low` up to and including `high`."""
    if low <= 0 or high < low:
        raise ValueError(f"bad bucket range {low}..{high}")
    out, b = [], low
    while b < high:
        out.append(b)
        b *= 2
    out.append(high)
    return tuple(out)


def pick_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= n, or None if none is."""
    for b in buckets:
        if b >= n:
            return b
    return None


def collate(samples: Sequence[dict | None], *, seq_len: int, n_images: int, pad_id: int, image_size: int) -> dict:
    """Left-pad `samples` (None = blank row) to [B, seq_len] and their tiles to [n_images, 3, S, S].

    Returns {input_ids, attention_mask, labels: int32[B, seq_len], images: float32[n_images, 3, S, S],
    n_images: int (real tiles)}.
    """
    B = len(samples)
    ids = np.full((B, seq_len), pad_id, np.int32)
    mask = np.zeros((B, seq_len), np.int32)
    labels = np.full((B, seq_len), IGNORE_INDEX, np.int32)
    images = np.zeros((n_images, 3, image_size, image_size), np.float32)
    k = 0
    for b, s in enumerate(samples):
        if s is None:
            continue
        T = len(s["input_ids"])
        if T > seq_len:
            raise ValueError(f"row {b} has {T} tokens > the batch length {seq_len}")
        ids[b, seq_len - T :] = s["input_ids"]
        mask[b, seq_len - T :] = s["attention_mask"]
        labels[b, seq_len - T :] = s["labels"]
        n = s["images"].shape[0]
        if k + n > n_images:
            raise ValueError(f"the batch has more than {n_images} image tiles")
        images[k : k + n] = s["images"]
        k += n
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images, "n_images": k}


class DataLoader:
    """See the module docstring.

    Args:
      dataset: random access (`len`, `ds[i]` -> sample dict, `image_size`, `pad_token_id`,
        `max_tiles_per_sample`; with process_count > 1 also `sample_shape(i)`).
      batch_size: B, rows per process.
      seq_buckets: allowed T, ascending (default: powers of two from 32 to `max_length`).
      max_length: longest sequence when `seq_buckets` is not given (default 1024).
      image_buckets: allowed N_max, ascending (default: powers of two from 1 to
        B * dataset.max_tiles_per_sample). A batch with more tiles than the largest is an error.
      shuffle, seed: the per-epoch permutation.
      drop_last: drop the last partial global batch (else fill it with blank rows).
      process_index, process_count: this host's shard (`jax.process_index()`, `jax.process_count()`).
      prefetch: batches built ahead in a background thread (0: build in the caller's thread).
      num_workers: threads encoding the samples of a batch (PIL releases the GIL while decoding).
      worker_processes: processes encoding the samples instead (decoding, resizing and
        tokenising in parallel beyond one core: what feeding a GPU needs). The dataset is sent
        to each worker once (pickled; started with "spawn", so no JAX state is forked); the
        batches are identical to those built in this process. `close()` stops them. A script
        that uses them needs the usual `if __name__ == "__main__":` guard (spawned workers
        import the main module).
      on_error: "raise" or "skip" (blank row) for samples that raise `SampleError`.
      on_too_long: "skip" (blank row, as upstream drops them) or "raise" for samples over the
        largest bucket.
      shape_group: consecutive batches sharing one (T, N_max) (the gradient-accumulation count).
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        seq_buckets: Sequence[int] | None = None,
        max_length: int = 1024,
        image_buckets: Sequence[int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        num_workers: int = 0,
        worker_processes: int = 0,
        on_error: str = "raise",
        on_too_long: str = "skip",
        shape_group: int = 1,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
        if on_error not in ("raise", "skip") or on_too_long not in ("raise", "skip"):
            raise ValueError("on_error and on_too_long must be 'raise' or 'skip'")
        if shape_group <= 0:
            raise ValueError(f"shape_group must be positive, got {shape_group}")
        if worker_processes < 0 or num_workers < 0:
            raise ValueError("num_workers and worker_processes must be >= 0")
        self.dataset = dataset
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the dataset is empty")
        self.batch_size = batch_size
        self.seq_buckets = (
            tuple(sorted(seq_buckets)) if seq_buckets else power_of_two_buckets(min(32, max_length), max_length)
        )
        max_tiles = batch_size * int(dataset.max_tiles_per_sample)
        self.image_buckets = (
            tuple(sorted(image_buckets)) if image_buckets else power_of_two_buckets(1, max(max_tiles, 1))
        )
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.process_index, self.process_count = process_index, process_count
        self.prefetch, self.num_workers, self.worker_processes = prefetch, num_workers, worker_processes
        self._processes: ProcessPoolExecutor | None = None
        self.on_error, self.on_too_long, self.shape_group = on_error, on_too_long, shape_group
        self.pad_id = int(dataset.pad_token_id)
        self.image_size = int(dataset.image_size)
        global_batch = batch_size * process_count
        if self.n < global_batch and drop_last:
            raise ValueError(
                f"{self.n} samples are fewer than one global batch of {global_batch} (set drop_last=False)"
            )
        steps = self.n // global_batch if drop_last else math.ceil(self.n / global_batch)
        self.steps_per_epoch = steps - steps % shape_group if drop_last else steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.n} samples give no full group of {shape_group} batches of {global_batch}")
        self.epoch, self.step = 0, 0
        self.stats = {"blank_rows": 0, "too_long": 0, "errors": 0}
        self._lock = threading.Lock()
        self._order: tuple[int, np.ndarray] | None = None

    # ---- the plan ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (identical on every host)."""
        cached = self._order
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        self._order = (epoch, order)
        return order

    def global_indices(self, epoch: int, step: int) -> list[list[int | None]]:
        """Per process, the dataset indices of batch `step` (None = blank row)."""
        order = self.order(epoch)
        G = self.batch_size * self.process_count
        chunk = [int(i) for i in order[step * G : (step + 1) * G]]
        chunk += [None] * (G - len(chunk))
        return [chunk[p * self.batch_size : (p + 1) * self.batch_size] for p in range(self.process_count)]

    def batch_indices(self, epoch: int, step: int) -> list[int | None]:
        """This process's dataset indices for batch `step` of `epoch` (None = blank row)."""
        return self.global_indices(epoch, step)[self.process_index]

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch to be yielded, and what it depends on. There is no separate
        random state: epoch e's order is drawn from `default_rng([seed, e])`."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_samples": self.n,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "batch_size", "process_count", "shuffle"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this loader has {mine!r}")
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"cannot resume at step {step} of an epoch of {self.steps_per_epoch} steps")
        self.epoch, self.step = (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

    # ---- building batches ----------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _load(self, i: int | None) -> dict | None:
        if i is None:
            return None
        try:
            return self.dataset[i]
        except SampleError as e:
            if self.on_error == "raise":
                raise
            log.warning("blank row for sample %d: %s", i, e)
            self._count("errors")
            return None

    def _load_many(self, indices: list[int | None], threads) -> list[dict | None]:
        """`_load` of each index: in the worker processes, the threads, or here."""
        if self.worker_processes > 0:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(
                    self.worker_processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(self.dataset,),
                )
            chunk = max(1, len(indices) // (2 * self.worker_processes))
            results = list(self._processes.map(_worker_load, indices, chunksize=chunk))
            samples = []
            for i, (sample, error) in zip(indices, results):
                if error is not None:  # raised in the worker: handled as _load handles it here
                    if self.on_error == "raise":
                        raise SampleError(error)
                    log.warning("blank row for sample %d: %s", i, error)
                    self._count("errors")
                samples.append(sample)
            return samples
        return list(threads.map(self._load, indices)) if threads else [self._load(i) for i in indices]

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        if self._processes is not None:
            self._processes.shutdown(cancel_futures=True)
            self._processes = None

    def _fits(self, T: int, i) -> bool:
        if T <= self.seq_buckets[-1]:
            return True
        if self.on_too_long == "raise":
            raise ValueError(f"sample {i} has {T} tokens, more than the largest bucket {self.seq_buckets[-1]}")
        return False

    def _shapes_single(self, samples: list[dict | None], indices) -> tuple[int, int]:
        T = n_img = 0
        for b, s in enumerate(samples):
            if s is None:
                continue
            if not self._fits(len(s["input_ids"]), indices[b]):
                self._count("too_long")
                samples[b] = None
                continue
            T = max(T, len(s["input_ids"]))
            n_img += s["images"].shape[0]
        return T, n_img

    def _sample_shape(self, i: int | None) -> tuple[int, int] | None:
        if i is None:
            return None
        try:
            return tuple(self.dataset.sample_shape(i))
        except SampleError:
            if self.on_error == "raise":
                raise
            return None  # the row itself will fail to load and be blank on its host

    def _shapes_global(self, epoch: int, step: int, samples: list[dict | None], indices) -> tuple[int, int]:
        """(T, tiles) over all processes' rows from `sample_shape`; drops this host's too-long rows."""
        T = n_img = 0
        for idx in self.global_indices(epoch, step):
            tiles = 0
            for i in idx:
                shape = self._sample_shape(i)
                if shape is not None and self._fits(shape[0], i):
                    T, tiles = max(T, shape[0]), tiles + shape[1]
            n_img = max(n_img, tiles)
        for b, s in enumerate(samples):
            if s is None:
                continue
            want = self._sample_shape(indices[b])
            got = (len(s["input_ids"]), s["images"].shape[0])
            if got != want:
                raise RuntimeError(f"sample {indices[b]}: encoded shape {got} != sample_shape {want}")
            if not self._fits(got[0], indices[b]):
                self._count("too_long")
                samples[b] = None
        return T, n_img

    def _make_group(self, epoch: int, first: int) -> list[dict]:
        """Batches first .. first + shape_group - 1 of `epoch`, sharing one (T, N_max)."""
        steps = range(first, min(first + self.shape_group, self.steps_per_epoch))
        groups, T, n_img = [], 1, 0
        pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 and not self.worker_processes else None
        try:
            for step in steps:
                indices = self.batch_indices(epoch, step)
                samples = self._load_many(indices, pool)
                if self.process_count > 1:
                    t, n = self._shapes_global(epoch, step, samples, indices)
                else:
                    t, n = self._shapes_single(samples, indices)
                T, n_img = max(T, t), max(n_img, n)
                groups.append(samples)
        finally:
            if pool:
                pool.shutdown()
        seq_len = pick_bucket(T, self.seq_buckets)
        n_max = pick_bucket(n_img, self.image_buckets)
        if n_max is None:
            raise ValueError(
                f"a batch has {n_img} image tiles, more than the largest image bucket {self.image_buckets[-1]}; "
                "raise image_buckets or lower batch_size"
            )
        out = []
        for samples in groups:
            self._count("blank_rows", sum(s is None for s in samples))
            out.append(
                collate(samples, seq_len=seq_len, n_images=n_max, pad_id=self.pad_id, image_size=self.image_size)
            )
        return out

    def _batches(self, epoch: int, step: int) -> Iterator[tuple[int, int, dict]]:
        """(epoch, step, batch) from (epoch, step) to the end of that epoch. Groups start at
        multiples of shape_group, so a resumed loader groups batches as the original did."""
        first = step - step % self.shape_group
        while first < self.steps_per_epoch:
            for k, batch in enumerate(self._make_group(epoch, first)):
                if first + k >= step:
                    yield epoch, first + k, batch
            first += self.shape_group

    # ---- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """The remaining batches of the current epoch. After each yielded batch `state_dict()`
        points at the next one; at the end the position moves to the next epoch."""
        epoch, step = self.epoch, self.step
        if step >= self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        source = self._batches(epoch, step) if self.prefetch <= 0 else self._prefetched(epoch, step)
        try:
            for e, s, batch in source:
                self.epoch, self.step = e, s + 1
                yield batch
        finally:
            source.close()
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

    def forever(self) -> Iterator[dict]:
        """Batches across epochs without end."""
        while True:
            yield from self

    def _prefetched(self, epoch: int, step: int) -> Iterator[tuple[int, int, dict]]:
        return prefetched(self._batches(epoch, step), self.prefetch, "DataLoader-prefetch")


def prefetched(source: Iterator, depth: int, name: str) -> Iterator:
    """`source`'s items, produced up to `depth` ahead in a background thread; an exception in
    the thread is raised to the consumer. Closing the result stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in source:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if not sys.is_finalizing():  # an iterator left open until interpreter exit
            thread.join()


# ---- worker processes ---------------------------------------------------------------------------
_WORKER_DATASET = None


def _worker_init(dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _worker_load(i: int | None) -> tuple[dict | None, str | None]:
    """(sample, None), or (None, message) for a SampleError (other errors propagate)."""
    if i is None:
        return None, None
    try:
        return _WORKER_DATASET[i], None
    except SampleError as e:
        return None, f"{e}"
