"""Streamed Cauldron / FineVision parquet shards: split across readers, seeded, exactly resumable.

For datasets too large to hold as a list of `Record`s (FineVision: tens of millions of rows in
thousands of shards). Memory is one window of rows, whatever the size of the dataset.

    stream = ShardStream("finevision/", seed=0, reader_index=r, reader_count=R, on_error="yield")
    for item, state in stream.items():   # endless: epoch e + 1 follows epoch e
        item                             # a Record (images as bytes or paths, ChatML messages),
                                         # or a SampleError naming "shard.parquet:row"
        state                            # JSON-able position after `item`, for a checkpoint
    stream.load_state_dict(state)        # the stream goes on with the item after `item`

Shapes: U units, W = `shuffle_window` units per window, C = `chunk_rows` rows per unit at most,
R readers (processes x loader workers).

Index. Built from the parquet footers only (row groups and their row counts; no data is read):
unit u = (shard, row group, start, stop), a slice of at most C rows of one row group. A shard
whose footer cannot be read, or without a `texts` column, is a ValueError naming it, when the
stream is built (before any training step).

Order. Epoch e's unit order is `default_rng([seed, e]).permutation(U)` (file order without
shuffle); reader r of R takes `order[r::R]`, so the readers' shares are disjoint and together
cover every unit once. A reader goes through its share W units at a time: it reads only those
units' rows (the needed columns of one row group each), parses them, and - with shuffle -
permutes the window's items with `default_rng([seed, e, r, window])`. So (epoch, window,
offset in the window) is the whole position; a restored stream re-reads the current window and
yields exactly what the saved one would have yielded next.

Reading one unit decodes its row group from the start up to the unit's last row; C at least the
row-group size (HF writes image datasets in row groups of ~100 rows) reads each row group once.
The defaults (C 128, W 8: about 1000 rows in memory) mix rows of 8 random places of the dataset.

Rating filter, as upstream nanoVLM (`data/datasets.py` `BaseDataset._get_messages`, minimums
from `models/config.py` `TrainConfig.relevance_min_rating` etc., all 1): turn t of a row is
dropped when a present rating column (`relevance_ratings`, `image_correspondence_ratings`,
`visual_dependency_ratings`, `formatting_ratings`) rates it below that column's minimum; a null
rating, or an absent column, keeps it; a row left with no turn is not trained on (upstream's
`_process_data` returns None and the collator drops it). Here such rows are not yielded and are
counted in `stats["filtered"]` (rows) and `stats["filtered_turns"]`. One difference: a rating
list too short for turn t keeps the turn by that column only (upstream's IndexError, caught in
its `try`, also skips the columns after it).

Errors. A row without an answer, a malformed row, an image with neither bytes nor a path, an
image path that does not exist: a `SampleError` item. A unit whose data cannot be decoded
(a corrupt page): one SampleError item naming the shard and its rows. `on_error` decides what
happens to them: "raise" (the default) raises it from the iterator, "skip" logs and drops it,
"yield" hands it to the caller (which counts it, e.g. as a blank row, or raises). Whatever the
mode, the position counts the item, so the readers of a resumed run agree.

Imports neither jax nor torch.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .datasets import (
    RATING_COLUMNS,
    UPSTREAM_MIN_RATINGS,
    Record,
    _check_messages,
    check_min_ratings,
    parse_cauldron_row,
)
from .encoding import SampleError

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip", "yield")
_OPEN_FILES = 8  # parquet files kept open by one stream (a window touches at most W shards)
_POSITION = ("epoch", "window", "offset")
_DEPENDS_ON = ("seed", "shuffle", "reader_index", "reader_count", "chunk_rows", "shuffle_window", "min_ratings")


def find_shards(pattern: str | os.PathLike) -> list[Path]:
    """The parquet shards `pattern` names: a .parquet file, a directory (its *.parquet files,
    recursively, sorted) or a glob (its .parquet matches, sorted; `**` recurses).
    Nothing found: FileNotFoundError naming the pattern; a file that is not .parquet: ValueError."""
    text, path = os.fspath(pattern), Path(pattern)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: not a .parquet file")
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    elif any(c in text for c in "*?["):
        shards = sorted(Path(m) for m in glob.glob(text, recursive=True) if m.endswith(".parquet"))
        shards = [p for p in shards if p.is_file()]
    else:
        shards = []
    if not shards:
        raise FileNotFoundError(f"no parquet shard found for {text!r}")
    return shards


class Shard(NamedTuple):
    path: Path
    name: str  # relative to the shards' common directory: what a saved state compares
    rows: int
    columns: tuple[str, ...]  # the columns this stream reads from it


class Unit(NamedTuple):
    shard: int  # index into ShardStream.shards
    row_group: int
    start: int  # rows start..stop-1 of the row group
    stop: int
    row: int  # the shard's row number of row `start`


def _read_footer(path: Path) -> tuple[pq.FileMetaData, list[str]]:
    """(footer, top-level column names); a truncated or non-parquet file is a ValueError naming it."""
    try:
        meta = pq.read_metadata(path)
        return meta, meta.schema.to_arrow_schema().names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the parquet footer (truncated, or not parquet?): {e}") from None


def build_index(paths: Sequence[Path], *, chunk_rows: int, wanted: Sequence[str]) -> tuple[list[Shard], list[Unit]]:
    """(shards, units) from the footers of `paths`; each shard reads `texts` and those of
    `wanted` it has. See the module docstring."""
    paths = [Path(p) for p in paths]
    seen: set[Path] = set()
    for p in paths:
        if p.resolve() in seen:
            raise ValueError(f"{p}: a shard is listed more than once")
        seen.add(p.resolve())
    root = os.path.commonpath([p.resolve().parent for p in paths])
    shards, units = [], []
    for i, path in enumerate(paths):
        meta, names = _read_footer(path)
        if "texts" not in names:
            raise ValueError(f"{path}: no 'texts' column (it has {', '.join(names) or 'none'}); not Cauldron layout")
        row = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            units += [Unit(i, g, s, min(s + chunk_rows, n), row + s) for s in range(0, n, chunk_rows)]
            row += n
        columns = ("texts", *(c for c in wanted if c in names and c != "texts"))
        shards.append(Shard(path, os.path.relpath(path.resolve(), root), row, columns))
    if not units:
        raise ValueError(f"the {len(paths)} shards have no rows ({paths[0]} ...)")
    return shards, units


class ShardStream:
    """Records from Cauldron-layout parquet shards, endlessly. See the module docstring.

    Args:
      shards: a pattern for `find_shards`, or a sequence of them (their shards in that order).
      seed: the unit order and the within-window order.
      shuffle: False: units in file order, and rows in file order within each window.
      shuffle_window: W, units per window: rows in memory and the span of the local shuffle.
      chunk_rows: C, rows per unit at most.
      reader_index, reader_count: this reader's share, r of R (e.g. process p, loader worker w:
        r = p * workers + w, R = processes * workers).
      min_ratings: {"relevance" | "image_correspondence" | "visual_dependency" | "formatting":
        minimum or None}; columns not named are not filtered; None filters nothing. Default:
        upstream's (1 for each).
      image_root: where relative image paths are (default: each shard's directory).
      on_error: what to do with SampleError items: "raise", "skip" or "yield".

    `stats` counts, as windows are read (a restored stream re-reads its window): units_read,
    rows_read, filtered (rows with no turn left), filtered_turns, errors (SampleError items).
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        seed: int,
        shuffle: bool = True,
        shuffle_window: int = 8,
        chunk_rows: int = 128,
        reader_index: int = 0,
        reader_count: int = 1,
        min_ratings: Mapping[str, float | None] | None = UPSTREAM_MIN_RATINGS,
        image_root: str | os.PathLike | None = None,
        on_error: str = "raise",
    ):
        if chunk_rows <= 0 or shuffle_window <= 0:
            raise ValueError(f"chunk_rows and shuffle_window must be positive, got {chunk_rows}, {shuffle_window}")
        if not 0 <= reader_index < reader_count:
            raise ValueError(f"reader_index {reader_index} not in 0..{reader_count - 1}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        paths = [p for pattern in patterns for p in find_shards(pattern)]
        if not paths:
            raise FileNotFoundError("no shard given")
        self.min_ratings = check_min_ratings(min_ratings)
        wanted = ["images", *(RATING_COLUMNS[k] for k in self.min_ratings)]
        self.shards, self.units = build_index(paths, chunk_rows=chunk_rows, wanted=wanted)
        if len(self.units) < reader_count:
            raise ValueError(
                f"{len(self.units)} units (row-group slices of at most {chunk_rows} rows) are fewer than the "
                f"{reader_count} readers: every reader needs one; lower chunk_rows or use fewer readers"
            )
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.shuffle_window, self.chunk_rows = int(shuffle_window), int(chunk_rows)
        self.reader_index, self.reader_count = int(reader_index), int(reader_count)
        self.image_root = Path(image_root) if image_root is not None else None
        self.on_error = on_error
        share = len(range(self.reader_index, len(self.units), self.reader_count))
        self.windows_per_epoch = math.ceil(share / self.shuffle_window)
        self.epoch, self.window, self.offset = 0, 0, 0
        self.stats = {"units_read": 0, "rows_read": 0, "filtered": 0, "filtered_turns": 0, "errors": 0}
        self._fixed = {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "reader_index": self.reader_index,
            "reader_count": self.reader_count,
            "chunk_rows": self.chunk_rows,
            "shuffle_window": self.shuffle_window,
            "min_ratings": dict(self.min_ratings),
            "shards": [[s.name, s.rows] for s in self.shards],
        }
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._share: tuple[int, np.ndarray] | None = None

    @property
    def n_rows(self) -> int:
        """Rows in all shards (before any filtering or error)."""
        return sum(s.rows for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"ShardStream({len(self.shards)} shards, {self.n_rows} rows, {len(self.units)} units, "
            f"reader {self.reader_index}/{self.reader_count}, at {self.epoch}:{self.window}:{self.offset})"
        )

    # ---- pickling: parquet files are opened lazily, in the process that reads --------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state

    def close(self) -> None:
        """Close the open parquet files (a later read opens them again)."""
        while self._files:
            self._files.popitem()[1].close()

    # ---- the plan ----------------------------------------------------------------------------
    def unit_order(self, epoch: int) -> np.ndarray:
        """int[U]: every reader's unit order of `epoch`; this reader takes `[reader_index::reader_count]`."""
        n = len(self.units)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def share(self, epoch: int) -> np.ndarray:
        """This reader's units of `epoch`, in order."""
        if self._share is None or self._share[0] != epoch:
            self._share = (epoch, self.unit_order(epoch)[self.reader_index :: self.reader_count])
        return self._share[1]

    def window_units(self, epoch: int, window: int) -> list[Unit]:
        """The units of window `window` of `epoch`, in the order they are read."""
        W = self.shuffle_window
        return [self.units[u] for u in self.share(epoch)[window * W : (window + 1) * W]]

    # ---- reading -----------------------------------------------------------------------------
    def _file(self, shard: int) -> pq.ParquetFile:
        f = self._files.pop(shard, None)
        if f is None:
            f = pq.ParquetFile(self.shards[shard].path, page_checksum_verification=True)
            if len(self._files) >= _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def _read_rows(self, unit: Unit) -> list[dict[str, Any]]:
        """Rows start..stop-1 of the unit's row group, its shard's needed columns only."""
        batches = self._file(unit.shard).iter_batches(
            batch_size=self.chunk_rows,
            row_groups=[unit.row_group],
            columns=list(self.shards[unit.shard].columns),
            use_threads=False,
        )
        rows, at = [], 0
        for batch in batches:
            lo, hi = max(unit.start - at, 0), min(unit.stop - at, batch.num_rows)
            if lo < hi:
                rows += batch.slice(lo, hi - lo).to_pylist()
            at += batch.num_rows
            if at >= unit.stop:
                break
        return rows

    def read_unit(self, unit: Unit) -> list[Record | SampleError]:
        """The unit's items in file order: Records and SampleErrors; rows with no turn left after
        the rating filter are left out. An undecodable unit is one SampleError."""
        shard = self.shards[unit.shard]
        n = unit.stop - unit.start
        where = f"{shard.path}: rows {unit.row}..{unit.row + n - 1} (row group {unit.row_group})"
        self.stats["units_read"] += 1
        try:
            rows = self._read_rows(unit)
        except (pa.ArrowException, OSError) as e:
            self.stats["errors"] += 1
            return [SampleError(f"{where}: cannot read the data: {' '.join(str(e).split())}")]
        if len(rows) != n:
            self.stats["errors"] += 1
            return [SampleError(f"{where}: the row group holds {len(rows)} of them, not {n} as its footer says")]
        self.stats["rows_read"] += n
        base = self.image_root if self.image_root is not None else shard.path.parent
        items: list[Record | SampleError] = []
        for k, row in enumerate(rows):
            source = f"{shard.path}:{unit.row + k}"
            try:
                images, messages, dropped = parse_cauldron_row(row, source, base=base, min_ratings=self.min_ratings)
                self.stats["filtered_turns"] += dropped
                if not messages:
                    self.stats["filtered"] += 1
                    continue
                _check_messages(messages, source)
                items.append(Record(tuple(images), tuple(messages), source))
            except SampleError as e:
                self.stats["errors"] += 1
                items.append(e)
        return items

    def read_window(self, epoch: int, window: int) -> list[Record | SampleError]:
        """The items of one window, in the order they are yielded."""
        items = [item for unit in self.window_units(epoch, window) for item in self.read_unit(unit)]
        if not self.shuffle:
            return items
        order = np.random.default_rng([self.seed, epoch, self.reader_index, window]).permutation(len(items))
        return [items[i] for i in order]

    # ---- iteration ---------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[Record | SampleError, dict[str, Any]]]:
        """(item, state after it), without end, from the position at this call. `state_dict()`
        follows the items read; with a prefetching consumer, checkpoint the state that came
        with the last item consumed instead. Treat the states as read-only."""
        return self._items(self.epoch, self.window, self.offset)

    def __iter__(self) -> Iterator[Record | SampleError]:
        """The items without end, from the current position. See `items`."""
        return (item for item, _ in self.items())

    def _items(self, epoch: int, window: int, offset: int) -> Iterator[tuple[Record | SampleError, dict[str, Any]]]:
        e, first, k, W = epoch, window, offset, self.windows_per_epoch
        while True:
            whole_epoch, records = (first, k) == (0, 0), 0
            for w in range(first, W):
                items = self.read_window(e, w)
                n = len(items)
                if k > n:
                    raise ValueError(f"cannot resume: offset {k} is past the {n} items of window {w} of epoch {e}")
                for j in range(k, n):
                    item, items[j] = items[j], None  # consumed items are not kept
                    self.epoch, self.window, self.offset = (
                        (e, w, j + 1) if j + 1 < n else (e, w + 1, 0) if w + 1 < W else (e + 1, 0, 0)
                    )
                    if isinstance(item, SampleError):
                        if self.on_error == "raise":
                            raise item
                        if self.on_error == "skip":
                            log.warning("skipping %s", item)
                            continue
                    else:
                        records += 1
                    yield item, {**self._fixed, "epoch": self.epoch, "window": self.window, "offset": self.offset}
                del items
                k = 0
            if whole_epoch and not records:
                raise ValueError(
                    f"reader {self.reader_index}/{self.reader_count} found no usable row in epoch {e} "
                    f"({self.stats['filtered']} rows filtered out by the ratings, {self.stats['errors']} errors)"
                )
            e, first, k = e + 1, 0, 0

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the last item yielded, and what the order depends on."""
        fixed = {**self._fixed, "shards": [list(s) for s in self._fixed["shards"]]}
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset, **fixed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on after the item `state` was saved with. A mismatch is a ValueError naming the field."""
        for key in (*_POSITION, *_DEPENDS_ON, "shards"):
            if key not in state:
                raise ValueError(f"cannot resume: the saved state has no {key!r}")
        for key in _DEPENDS_ON:
            if state[key] != self._fixed[key]:
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this stream has {self._fixed[key]!r}")
        saved = [tuple(s) for s in state["shards"]]
        mine = [tuple(s) for s in self._fixed["shards"]]
        if saved != mine:
            if len(saved) != len(mine):
                raise ValueError(f"cannot resume: saved shards are {len(saved)} files, this stream has {len(mine)}")
            i = next(i for i, (a, b) in enumerate(zip(saved, mine)) if a != b)
            raise ValueError(f"cannot resume: saved shards[{i}] is {saved[i]} (name, rows), this stream has {mine[i]}")
        epoch, window, offset = (int(state[k]) for k in _POSITION)
        if epoch < 0 or not 0 <= window < self.windows_per_epoch or offset < 0:
            raise ValueError(
                f"cannot resume: position epoch {epoch}, window {window}, offset {offset} is outside "
                f"epochs of {self.windows_per_epoch} windows"
            )
        self.epoch, self.window, self.offset = epoch, window, offset


# ---- writing shards -------------------------------------------------------------------------------
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_TYPES = {
    "images": pa.list_(_IMAGE),
    "texts": pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())])),
}


def _image_struct(x):
    if isinstance(x, (bytes, bytearray)):
        return {"bytes": bytes(x), "path": None}
    if isinstance(x, (str, os.PathLike)):
        return {"bytes": None, "path": os.fspath(x)}
    return x  # a {"bytes", "path"} mapping, or None


def _table(rows: list[Mapping[str, Any]]) -> pa.Table:
    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if name == "images":
            values = [None if v is None else [_image_struct(x) for x in v] for v in values]
        columns[name] = pa.array(values, type=_TYPES.get(name))
    return pa.table(columns)


def _cycle(n: int | Sequence[int], what: str) -> Iterator[int]:
    sizes = [n] if isinstance(n, int) else list(n)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"{what} must be positive, got {n!r}")
    return itertools.cycle(sizes)


def write_cauldron_shards(
    rows: Iterable[Mapping[str, Any]],
    directory: str | os.PathLike,
    rows_per_shard: int | Sequence[int],
    row_group_size: int | Sequence[int],
    *,
    prefix: str = "shard",
) -> list[Path]:
    """Write `rows` as Cauldron-layout parquet shards `directory/{prefix}-00000.parquet`, ...

    Rows are dicts as upstream's: "images" (a list of bytes, paths or {"bytes", "path"}, stored as
    {"bytes", "path"} structs), "texts" (a list of {"user", "assistant"}) and any other column
    (e.g. the rating lists), typed by pyarrow; a shard has the columns its rows name. A sequence
    for `rows_per_shard` or `row_group_size` is cycled (shard k has rows_per_shard[k % len]
    rows; row groups of a shard take the sizes in turn). `rows` is consumed one shard at a time.
    Each shard is written under a temporary name and moved into place; an existing shard is a
    FileExistsError. Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard_sizes, rows = _cycle(rows_per_shard, "rows_per_shard"), iter(rows)
    _cycle(row_group_size, "row_group_size")
    paths = []
    for k in itertools.count():
        chunk = list(itertools.islice(rows, next(shard_sizes)))
        if not chunk:
            return paths
        path = directory / f"{prefix}-{k:05d}.parquet"
        if path.exists():
            raise FileExistsError(f"{path} exists; not writing over it")
        table, tmp = _table(chunk), directory / f".{path.name}.tmp"
        try:
            with pq.ParquetWriter(tmp, table.schema, write_page_checksum=True) as writer:
                start, sizes = 0, _cycle(row_group_size, "row_group_size")
                while start < table.num_rows:
                    n = next(sizes)
                    writer.write_table(table.slice(start, n), row_group_size=n)
                    start += n
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
