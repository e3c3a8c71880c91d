"""Batches from a stream of samples: streamed parquet shards and/or packed rows, resumable exactly.

`DataLoader` (jaxvlm.data.loader) plans whole epochs of a random-access dataset one sample per
row. This loader reads a *stream* - `ShardStream` over parquet shards, or a random-access
dataset walked in seeded epochs (`IndexSource`) - and, with `packing`, puts several samples in
each row of `max_length` tokens (`jaxvlm.data.packing`). Shapes: B rows per process, A
micro-batches per group (gradient accumulation), T tokens, N_max tiles, S side.

    loader = StreamLoader(ShardSource(stream, encoder), batch_size=8, max_length=1024, packing="segments")
    for batch in loader.forever():   # endless
        batch["input_ids"]          # int32[B, T]; T = max_length when packing
        batch["segment_ids"]        # int32[B, T] (segments mode), with position_ids
        batch["images"]             # float32[N_max, 3, S, S]: the batch's tiles in row order, then zeros
    state = loader.state_dict()     # JSON-able: resumes at the next batch

How rows are made. The loader works in rounds: it takes the next `pack_buffer` usable samples
of the source (with packing; else A * B), computes each one's (tokens, tiles) from the text and
the image headers without decoding pixels, packs them (`pack_greedy`; without packing each
sample is a row), and hands the rows out in order, B per batch. A sample longer than
`max_length` (or with more tiles than `max_images_per_sample`) is dropped and counted
(`stats["too_long"]`, or raised with `on_too_long="raise"`); a sample whose image will not
decode is dropped from its row and counted (`stats["errors"]`; raised with `on_error="raise"`).
Pixels are decoded only for the rows of the batch being built, in `worker_processes` spawned
processes when asked (the source's codec is sent to each once).

Resuming. The position is (the source's state at the start of the current round, the round's
number, rows of it already handed out): a restored loader re-reads that round from the source,
packs it again - the same rows, as packing is deterministic - and goes on with the next row.
So a resumed run sees exactly the batches an uninterrupted one would have.

Several processes. Process p reads the source's share p of P (disjoint), so no sample is seen
twice; every process yields B rows per step for ever, so all take the same steps. T is static
with packing (max_length); without packing the bucket of the group's longest row on one
process, max_length on several (so that all agree without talking). N_max is the image bucket
of the group's tiles; on several processes `Trainer.place_batch` pads every process's images
to the largest N_max of any (a count all-gathered per step; padding images are never read).

Imports neither jax nor torch.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from .datasets import Record, record_shape
from .encoding import SampleError
from .loader import pick_bucket, power_of_two_buckets, prefetched
from .packing import MODES, collate_packed, pack_greedy

log = logging.getLogger(__name__)


# ---- sources: items with a resumable state, and how to measure and encode them -------------------
class ShardSource:
    """A `ShardStream` (built with on_error="yield") of Records, encoded with `encoder`."""

    def __init__(self, stream, encoder):
        if stream.on_error != "yield":
            raise ValueError("ShardSource needs a ShardStream built with on_error='yield' (the loader decides)")
        self.stream, self.codec = stream, RecordCodec(encoder)

    def items(self) -> Iterator[tuple[Any, dict]]:
        return self.stream.items()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    @property
    def stats(self) -> dict:
        return self.stream.stats


class IndexSource:
    """A random-access dataset as a stream: epoch e visits `default_rng([seed, e]).permutation(n)`
    (0..n-1 without shuffle), reader r of R taking positions r, r + R, ... of it."""

    def __init__(self, dataset, *, seed: int, shuffle: bool = True, reader_index: int = 0, reader_count: int = 1):
        self.dataset, self.codec = dataset, DatasetCodec(dataset)
        self.n = len(dataset)
        if self.n < reader_count:
            raise ValueError(f"{self.n} samples are fewer than the {reader_count} readers")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.reader_index, self.reader_count = reader_index, reader_count
        self.epoch, self.pos = 0, 0
        self.stats: dict[str, int] = {}

    def _order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order[self.reader_index :: self.reader_count]

    def items(self) -> Iterator[tuple[int, dict]]:
        epoch, pos = self.epoch, self.pos
        while True:
            order = self._order(epoch)
            for k in range(pos, len(order)):
                self.epoch, self.pos = (epoch, k + 1) if k + 1 < len(order) else (epoch + 1, 0)
                yield int(order[k]), self.state_dict()
            epoch, pos = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.n, "reader_index": self.reader_index, "reader_count": self.reader_count}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_samples", "reader_index", "reader_count"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume: saved {key}={state.get(key)!r} but this source has {mine[key]!r}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class RecordCodec:
    """Shape and encoding of a `Record` (picklable: it is what worker processes receive)."""

    def __init__(self, encoder):
        self.encoder = encoder

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    def shape(self, rec: Record) -> tuple[int, int]:
        """(tokens, tiles) from the text and the image headers."""
        return record_shape(self.encoder, rec)

    def encode(self, rec: Record) -> dict:
        try:
            return self.encoder.encode(rec.images, rec.messages)
        except SampleError as e:
            raise SampleError(f"{rec.source}: {e}") from None


class DatasetCodec:
    """Shape (`sample_shape`) and encoding (`ds[i]`) of an index into a random-access dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def image_size(self) -> int:
        return self.dataset.image_size

    @property
    def pad_token_id(self) -> int:
        return self.dataset.pad_token_id

    def shape(self, i: int) -> tuple[int, int]:
        return self.dataset.sample_shape(i)

    def encode(self, i: int) -> dict:
        return self.dataset[i]


# ---- the loader -------------------------------------------------------------------------------------
class StreamLoader:
    """See the module docstring.

    Args:
      source: a `ShardSource` or `IndexSource` (this process's share).
      batch_size: B, rows per process.
      max_length: the row length with packing; the longest sample otherwise.
      packing: None (one sample per row), "segments" or "upstream" (`jaxvlm.data.packing`).
      pack_buffer: samples packed together per round (packing only).
      max_images_per_sample, max_images_per_pack: caps in tiles (what the ViT encodes); None:
        no cap beyond the tokens (every tile takes its image tokens of the row).
      seq_buckets: allowed T without packing (default powers of two from 32 to max_length).
      process_count: P (T is then fixed without packing too, see the module docstring).
      worker_processes, prefetch, on_error, on_too_long, shape_group: as `DataLoader`'s.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        max_length: int,
        packing: str | None = None,
        pack_buffer: int = 256,
        max_images_per_sample: int | None = None,
        max_images_per_pack: int | None = None,
        n_image_tokens: int = 1,
        seq_buckets=None,
        process_count: int = 1,
        worker_processes: int = 0,
        prefetch: int = 2,
        on_error: str = "raise",
        on_too_long: str = "skip",
        shape_group: int = 1,
    ):
        if packing is not None and packing not in MODES:
            raise ValueError(f"packing must be None or one of {MODES}, got {packing!r}")
        if batch_size <= 0 or max_length <= 0 or pack_buffer <= 0 or shape_group <= 0:
            raise ValueError("batch_size, max_length, pack_buffer and shape_group must be positive")
        if on_error not in ("raise", "skip") or on_too_long not in ("raise", "skip"):
            raise ValueError("on_error and on_too_long must be 'raise' or 'skip'")
        self.source, self.codec = source, source.codec
        self.batch_size, self.max_length, self.packing = batch_size, max_length, packing
        self.pack_buffer = pack_buffer if packing else batch_size * shape_group
        self.max_images_per_sample, self.max_images_per_pack = max_images_per_sample, max_images_per_pack
        self.process_count, self.worker_processes, self.prefetch = process_count, worker_processes, prefetch
        self.on_error, self.on_too_long, self.shape_group = on_error, on_too_long, shape_group
        self.seq_buckets = (
            tuple(sorted(seq_buckets)) if seq_buckets else power_of_two_buckets(min(32, max_length), max_length)
        )
        # tiles one row can hold: its tokens bound them (each tile takes n_image_tokens of them)
        row_tiles = max_length // max(int(n_image_tokens), 1)
        if packing and max_images_per_pack is not None:
            row_tiles = min(row_tiles, max_images_per_pack)
        if max_images_per_sample is not None and not packing:
            row_tiles = min(row_tiles, max_images_per_sample)
        self.row_tiles = max(row_tiles, 1)
        self.image_buckets = power_of_two_buckets(1, batch_size * self.row_tiles)
        self.pad_id, self.image_size = int(self.codec.pad_token_id), int(self.codec.image_size)
        # stats: the counts up to the last position handed out; _live: those of the rows built
        # so far (the prefetch thread runs ahead)
        self.stats = {"samples": 0, "rows": 0, "too_long": 0, "errors": 0, "blank_rows": 0}
        self._live = dict(self.stats)
        self._position = {"source": source.state_dict(), "round": 0, "taken": 0}
        self._processes: ProcessPoolExecutor | None = None

    # ---- state -------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"batch_size": self.batch_size, "max_length": self.max_length, "packing": self.packing,
                "pack_buffer": self.pack_buffer, "max_images_per_sample": self.max_images_per_sample,
                "max_images_per_pack": self.max_images_per_pack, "shape_group": self.shape_group}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch (JSON-able), the counts so far and the settings it depends on."""
        return {**self._position, "stats": dict(self.stats), **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in self._settings().items():
            if key not in state or state[key] != mine:
                raise ValueError(f"cannot resume: saved {key}={state.get(key)!r} but this loader has {mine!r}")
        self.source.load_state_dict(state["source"])
        self._position = {"source": state["source"], "round": int(state["round"]), "taken": int(state["taken"])}
        self.stats.update(state.get("stats", {}))
        self._live = dict(self.stats)

    # ---- rounds: the plan of rows ------------------------------------------------------------
    def _skip(self, key: str, message: str, on: str) -> None:
        if on == "raise":
            raise SampleError(message)
        log.warning("skipping %s", message)
        self._live[key] += 1

    def _rounds(self, position: dict) -> Iterator[tuple[list, dict]]:
        """(row: [item, ...], position after it) from `position` on, without end."""
        self.source.load_state_dict(position["source"])
        start, number, taken = position["source"], position["round"], position["taken"]
        items = self.source.items()
        while True:
            chosen, shapes, end = [], [], start
            while len(chosen) < self.pack_buffer:
                item, end = next(items)
                if isinstance(item, SampleError):
                    self._skip("errors", str(item), self.on_error)
                    continue
                try:
                    t, n = self.codec.shape(item)
                except SampleError as e:
                    self._skip("errors", str(e), self.on_error)
                    continue
                tile_cap = self.max_images_per_sample if self.max_images_per_sample is not None else self.row_tiles
                if t > self.max_length or n > min(tile_cap, self.row_tiles):
                    self._skip("too_long", f"{_name(item)}: {t} tokens, {n} tiles: longer than max_length "
                               f"{self.max_length} or more tiles than {min(tile_cap, self.row_tiles)}", self.on_too_long)  # fmt: skip
                    continue
                chosen.append(item)
                shapes.append((t, n))
            if self.packing:
                rows = [[chosen[i] for i in r] for r in pack_greedy(shapes, self.max_length, self.row_tiles)]
            else:
                rows = [[item] for item in chosen]
            for k in range(taken, len(rows)):
                after = {"source": end, "round": number + 1, "taken": 0} if k + 1 == len(rows) else \
                        {"source": start, "round": number, "taken": k + 1}  # fmt: skip
                yield rows[k], after
            start, number, taken = end, number + 1, 0

    # ---- batches -----------------------------------------------------------------------------
    def _encode(self, items: list) -> list:
        """Encoded samples (or SampleError) of `items`, in order: in the worker processes or here."""
        if self.worker_processes > 0:
            if self._processes is None:
                self._processes = ProcessPoolExecutor(
                    self.worker_processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                    initargs=(self.codec,),
                )
            chunk = max(1, len(items) // (2 * self.worker_processes))
            return list(self._processes.map(_worker_encode, items, chunksize=chunk))
        return [_encode_one(self.codec, item) for item in items]

    def _group(self, rows: list[list]) -> list[dict]:
        """A rows of B items each -> A collated batches sharing (T, N_max)."""
        flat = [item for row in rows for item in row]
        encoded = iter(self._encode(flat))
        filled = []
        for row in rows:
            samples = []
            for _ in row:
                s = next(encoded)
                if isinstance(s, SampleError):
                    self._skip("errors", str(s), self.on_error)
                    continue
                samples.append(s)
            filled.append(samples)
        B = self.batch_size
        batches = [filled[a * B : (a + 1) * B] for a in range(self.shape_group)]
        if self.packing or self.process_count > 1:
            T = self.max_length
        else:
            longest = max((sum(len(s["input_ids"]) for s in r) for r in filled), default=1)
            T = pick_bucket(max(longest, 1), self.seq_buckets) or self.max_length
        # the group's own bucket; on several processes `Trainer.place_batch` pads every process
        # to the largest (one all-gather of a count per step)
        tiles = max(sum(s["images"].shape[0] for r in b for s in r) for b in batches)
        n_max = pick_bucket(max(tiles, 1), self.image_buckets)
        out = []
        for b in batches:
            batch = collate_packed(b, seq_len=T, n_images=n_max, pad_id=self.pad_id, image_size=self.image_size,
                                   mode=self.packing or "upstream")  # fmt: skip
            self._live["samples"] += batch.pop("n_samples")
            self._live["rows"] += len(b)
            self._live["blank_rows"] += sum(not r for r in b)
            out.append(batch)
        return out

    def _batches(self, position: dict) -> Iterator[tuple[dict, dict, dict]]:
        """(batch, position after it, stats after it), without end."""
        rows = self._rounds(position)
        while True:
            group, after = [], None
            for _ in range(self.shape_group * self.batch_size):
                row, after = next(rows)
                group.append(row)
            batches = self._group(group)
            for k, batch in enumerate(batches):
                # a group is one unit: resuming inside it rebuilds it, so only its end is a position
                yield batch, (after if k + 1 == len(batches) else None), dict(self._live)

    def forever(self) -> Iterator[dict]:
        """Batches without end. After each group of `shape_group` batches `state_dict()` points
        at the next group (checkpoints fall between optimizer steps, i.e. between groups)."""
        self._live = dict(self.stats)  # rows are built again from the position on
        source = self._batches(dict(self._position)) if self.prefetch <= 0 else self._prefetched()
        try:
            for batch, after, stats in source:
                if after is not None:
                    self._position, self.stats = after, stats
                yield batch
        finally:
            source.close()

    def _prefetched(self) -> Iterator[tuple[dict, dict, dict]]:
        return prefetched(self._batches(dict(self._position)), self.prefetch, "StreamLoader-prefetch")

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        if self._processes is not None:
            self._processes.shutdown(cancel_futures=True)
            self._processes = None


def _name(item) -> str:
    return item.source if isinstance(item, Record) else f"sample {item}"


def _encode_one(codec, item):
    try:
        return codec.encode(item)
    except SampleError as e:
        return e


# ---- worker processes ---------------------------------------------------------------------------
_WORKER_CODEC = None


def _worker_init(codec) -> None:
    global _WORKER_CODEC
    _WORKER_CODEC = codec


def _worker_encode(item):
    """The encoded sample, or the SampleError (other errors propagate)."""
    return _encode_one(_WORKER_CODEC, item)
