"""The parquet shard stream on real COCO JPEGs: coverage across readers, seeded order, exact
resumption, upstream's rating filter, bad shards and rows, bounded memory, pickling."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import shutil
import weakref
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, truncate
from PIL import Image

from jaxvlm.data import SampleError, cauldron_dataset
from jaxvlm.data import streaming as streaming_module
from jaxvlm.data.datasets import Record
from jaxvlm.data.streaming import UPSTREAM_MIN_RATINGS, ShardStream, find_shards, write_cauldron_shards

COCO_ROOT = SHARED / "data" / "coco-mini"
SMOLLM2 = SHARED / "data" / "smollm2"

pytestmark = pytest.mark.skipif(
    not (COCO_ROOT / "captions.json").is_file(),
    reason=f"COCO data not found under {COCO_ROOT} (the shared directory beside the repo)",
)


@pytest.fixture(scope="module")
def coco() -> list[tuple[str, bytes, list[str]]]:
    """(file name, JPEG bytes, captions) of every COCO-mini image."""
    index = json.loads((COCO_ROOT / "captions.json").read_text())
    return [
        (im["file_name"], (COCO_ROOT / "images" / im["file_name"]).read_bytes(), im["captions"])
        for im in index["images"]
    ]


def coco_rows(coco, n: int) -> list[dict]:
    """n rows, row i: COCO image i % 51 and 1-3 caption turns that name i (so rows differ)."""
    rows = []
    for i in range(n):
        name, jpeg, caps = coco[i % len(coco)]
        turns = [{"user": f"Row {i}: describe the image.", "assistant": caps[t % len(caps)]} for t in range(1 + i % 3)]
        rows.append({"images": [jpeg], "texts": turns})
    return rows


def expected_by_source(rows: list[dict], paths: list[Path]) -> dict[str, dict]:
    """ "shard.parquet:row" -> the row written there (write_cauldron_shards fills shards in order)."""
    sizes = [pq.read_metadata(p).num_rows for p in paths]
    sources = [f"{p}:{j}" for p, n in zip(paths, sizes) for j in range(n)]
    assert len(sources) == len(rows)
    return dict(zip(sources, rows))


@pytest.fixture(scope="module")
def dataset(coco, tmp_path_factory):
    """100 rows in 3 shards of 40, 27 and 33 rows, row groups of 7, 13, 4, 7, ... rows."""
    rows = coco_rows(coco, 100)
    paths = write_cauldron_shards(rows, tmp_path_factory.mktemp("shards"), [40, 27, 33], [7, 13, 4])
    return paths, expected_by_source(rows, paths)


def by_epoch(stream: ShardStream, n_epochs: int) -> list[list]:
    """The items of epochs 0 .. n_epochs - 1 of a fresh stream; nothing of the next is read."""
    out, epoch = [[] for _ in range(n_epochs)], stream.state_dict()["epoch"]
    for item, state in stream.items():
        out[epoch].append(item)
        epoch = state["epoch"]
        if epoch >= n_epochs:
            break
    return out


def key(item):
    """What identifies an item: a Record by value, a SampleError by its message."""
    return ("error", str(item)) if isinstance(item, SampleError) else item


# ---- finding shards and indexing ---------------------------------------------------------------
def test_find_shards(tmp_path, dataset):
    paths, _ = dataset
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for target in ("b/deep/z.parquet", "b/a.parquet", "c.parquet"):
        shutil.copy(paths[0], tmp_path / target)
    (tmp_path / "notes.txt").write_text("not a shard")
    assert find_shards(tmp_path / "c.parquet") == [tmp_path / "c.parquet"]
    assert find_shards(tmp_path) == [tmp_path / "b/a.parquet", tmp_path / "b/deep/z.parquet", tmp_path / "c.parquet"]
    assert find_shards(f"{tmp_path}/*") == [tmp_path / "c.parquet"]  # notes.txt and b/ are not shards
    assert find_shards(f"{tmp_path}/**/*.parquet") == find_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        find_shards(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=r"\*\.arrow"):
        find_shards(f"{tmp_path}/*.arrow")
    with pytest.raises(ValueError, match="notes.txt: not a .parquet file"):
        find_shards(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="more than once"):
        ShardStream([paths[0], paths[0]], seed=0)
    two = ShardStream([paths[2], paths[0]], seed=0)
    assert [s.path for s in two.shards] == [paths[2], paths[0]]


def test_index_reads_footers_only(dataset, monkeypatch):
    paths, expected = dataset

    def no_data(*args, **kwargs):
        raise AssertionError("building the index read data")

    for name in ("iter_batches", "read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, no_data)
    monkeypatch.setattr(pq, "read_table", no_data)
    stream = ShardStream(paths, seed=0, chunk_rows=5)
    assert stream.n_rows == len(expected) == 100
    for shard, path in enumerate(paths):
        meta = pq.read_metadata(path)
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert len(set(groups)) > 1, "the fixture should have row groups of unequal sizes"
        units = [u for u in stream.units if u.shard == shard]
        for g, n in enumerate(groups):  # each row group cut into contiguous slices of <= 5 rows
            cuts = [(u.start, u.stop) for u in units if u.row_group == g]
            assert [a for a, _ in cuts] == list(range(0, n, 5)) and cuts[-1][1] == n
            assert all(0 < b - a <= 5 for a, b in cuts)
        assert [u.row for u in units] == sorted(u.row for u in units)
        assert units[0].row == 0 and units[-1].row + units[-1].stop - units[-1].start == sum(groups)


# ---- order and coverage --------------------------------------------------------------------------
@pytest.mark.parametrize("reader_count", [1, 3])
def test_every_row_once_per_epoch_across_readers(dataset, reader_count):
    paths, expected = dataset
    orders = {}
    for seed in (0, 1):
        epochs = [[] for _ in range(3)]
        for r in range(reader_count):
            stream = ShardStream(
                paths, seed=seed, chunk_rows=5, shuffle_window=3, reader_index=r, reader_count=reader_count
            )
            for e, items in enumerate(by_epoch(stream, 3)):
                epochs[e].append([rec.source for rec in items])
                for rec in items:  # the row's content came through: the JPEG bytes and every turn
                    row = expected[rec.source]
                    assert rec.images == (row["images"][0],)
                    assert [m["content"] for m in rec.messages] == [
                        x for t in row["texts"] for x in (t["user"], t["assistant"])
                    ]
        for e, shares in enumerate(epochs):
            count = Counter(s for share in shares for s in share)
            assert set(count) == set(expected) and set(count.values()) == {1}, f"seed {seed} epoch {e}"
            if reader_count > 1:  # a reader's share is whole units, so the shares are disjoint
                assert sum(len(s) for s in shares) == 100 and all(shares)
        orders[seed] = [sum(shares, []) for shares in epochs]
    for seed in (0, 1):
        assert len({tuple(o) for o in orders[seed]}) == 3, "each epoch has its own order"
    assert orders[0][0] != orders[1][0], "the seed changes the order"
    stream = ShardStream(paths, seed=0, chunk_rows=5, shuffle_window=3, reader_count=reader_count)
    assert by_epoch(stream, 1)[0][0].source == orders[0][0][0], "the same seed, the same order"


def test_shuffle_off_is_file_order(dataset):
    paths, expected = dataset
    (epoch,) = by_epoch(ShardStream(paths, seed=0, shuffle=False, chunk_rows=5, shuffle_window=3), 1)
    assert [rec.source for rec in epoch] == list(expected)
    # two readers without shuffle: alternate units, each in file order
    stream = ShardStream(paths, seed=0, shuffle=False, chunk_rows=5, reader_index=1, reader_count=2)
    (epoch,) = by_epoch(stream, 1)
    want = [f"{paths[u.shard]}:{u.row + k}" for u in stream.units[1::2] for k in range(u.stop - u.start)]
    assert [rec.source for rec in epoch] == want


# ---- resuming --------------------------------------------------------------------------------
def resumable_rows(coco, n: int) -> list[dict]:
    """coco_rows with some turns and rows filtered out by the ratings and some bad rows, so that
    windows have unequal numbers of items."""
    rows = coco_rows(coco, n)
    for i, row in enumerate(rows):
        if i % 7 == 3:
            row["relevance_ratings"] = [0] * len(row["texts"])  # filtered out: not an item
        elif i % 11 == 5:
            row["texts"] = [{"user": "Q", "assistant": None}]  # a SampleError item
    return rows


def test_resume_is_exact_at_every_cut(coco, tmp_path):
    paths = write_cauldron_shards(resumable_rows(coco, 90), tmp_path, [50, 40], [9, 16])
    kwargs = dict(seed=3, chunk_rows=4, shuffle_window=3, reader_index=1, reader_count=2, on_error="yield")
    reference = list(itertools.islice(ShardStream(paths, **kwargs).items(), 150))  # ~3.5 epochs
    states = [ShardStream(paths, **kwargs).state_dict()] + [s for _, s in reference]
    assert any(isinstance(item, SampleError) for item, _ in reference)
    positions = [(s["epoch"], s["window"], s["offset"]) for s in states]
    assert {(e, 0, 0) for e in range(4)} <= set(positions), "the cuts include epoch boundaries"
    assert {(e, w, 0) for e, w, _ in positions} <= set(positions), "and every window boundary"
    assert len({(e, w) for e, w, _ in positions}) > 15
    for k, state in enumerate(states[:-5]):
        resumed = ShardStream(paths, **kwargs)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        items = resumed.items()
        got = [next(items)]
        window = resumed.window_units(state["epoch"], state["window"])
        assert resumed.stats["units_read"] == len(window), f"cut after {k}: re-reads only the current window"
        got += itertools.islice(items, 4)
        assert [key(i) for i, _ in got] == [key(i) for i, _ in reference[k : k + 5]], f"cut after {k} items"
        assert [s for _, s in got] == [s for _, s in reference[k : k + 5]]
    # state_dict() after plain iteration is the state that came with the last item
    stream = ShardStream(paths, **kwargs)
    for _ in itertools.islice(stream, 37):
        pass
    assert stream.state_dict() == reference[36][1]


def test_state_mismatch_is_an_error(dataset):
    paths, _ = dataset
    base = dict(seed=0, chunk_rows=5, shuffle_window=3, reader_count=2)
    stream = ShardStream(paths, **base)
    for _ in itertools.islice(stream, 10):
        pass
    state = json.loads(json.dumps(stream.state_dict()))
    for field, change in [
        ("seed", {"seed": 1}),
        ("shuffle", {"shuffle": False}),
        ("reader_index", {"reader_index": 1}),
        ("reader_count", {"reader_count": 3}),
        ("chunk_rows", {"chunk_rows": 6}),
        ("shuffle_window", {"shuffle_window": 4}),
        ("min_ratings", {"min_ratings": None}),
    ]:
        with pytest.raises(ValueError, match=f"cannot resume: saved {field}="):
            ShardStream(paths, **{**base, **change}).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume: saved shards are 3 files, this stream has 2"):
        ShardStream(paths[:2], **base).load_state_dict(state)
    other = {**state, "shards": [list(s) for s in state["shards"]]}
    other["shards"][1][1] += 1
    with pytest.raises(ValueError, match=r"cannot resume: saved shards\[1\]"):
        ShardStream(paths, **base).load_state_dict(other)
    with pytest.raises(ValueError, match="cannot resume: the saved state has no 'offset'"):
        ShardStream(paths, **base).load_state_dict({k: v for k, v in state.items() if k != "offset"})
    with pytest.raises(ValueError, match="cannot resume: position"):
        ShardStream(paths, **base).load_state_dict({**state, "window": 999})
    past = ShardStream(paths, **base)
    past.load_state_dict({**state, "offset": 999})
    with pytest.raises(ValueError, match="cannot resume: offset 999 is past"):
        next(iter(past))


# ---- the rating filter -------------------------------------------------------------------------
def test_rating_filter_per_turn_as_upstream(coco, tmp_path):
    jpeg = coco[0][1]
    turns = [{"user": "Q0", "assistant": "A0"}, {"user": "Q1", "assistant": "A1"}]
    none = [None, None]
    rows = [
        # relevance, image_correspondence, visual_dependency, formatting
        {"rel": [0, 3], "img": none, "vis": none, "fmt": none},  # 0: turn 0 below 1
        {"rel": [0, 0], "img": none, "vis": none, "fmt": none},  # 1: both below 1: row dropped
        {"rel": [None, 4], "img": none, "vis": none, "fmt": [5, 0]},  # 2: null kept, turn 1 by formatting
        {"rel": None, "img": None, "vis": None, "fmt": None},  # 3: null columns: no filter
        {"rel": none, "img": [5, 0], "vis": [0, 5], "fmt": none},  # 4: each turn fails one column
        {"rel": [2], "img": none, "vis": none, "fmt": none},  # 5: too short: turn 1 unrated, kept
        {"rel": [1, 2], "img": [1, 1], "vis": [3, 1], "fmt": [1, 4]},  # 6: all at or above 1
    ]
    rows = [
        {
            "images": [jpeg],
            "texts": turns,
            "relevance_ratings": r["rel"],
            "image_correspondence_ratings": r["img"],
            "visual_dependency_ratings": r["vis"],
            "formatting_ratings": r["fmt"],
        }
        for r in rows
    ]
    (rated,) = write_cauldron_shards(rows, tmp_path / "rated", 100, 3)
    (plain,) = write_cauldron_shards([{"images": [jpeg], "texts": turns}] * 2, tmp_path / "plain", 100, 3)
    assert "relevance_ratings" not in pq.read_schema(plain).names

    def kept(path, **kw):
        stream = ShardStream(path, seed=0, shuffle=False, chunk_rows=4, **kw)
        (epoch,) = by_epoch(stream, 1)
        users = {int(r.source.rsplit(":", 1)[1]): [m["content"] for m in r.messages[::2]] for r in epoch}
        return users, stream.stats

    assert dict(UPSTREAM_MIN_RATINGS) == {
        "relevance": 1,
        "image_correspondence": 1,
        "visual_dependency": 1,
        "formatting": 1,
    }, "upstream nanoVLM models/config.py TrainConfig.*_min_rating"
    users, stats = kept(rated)  # the default: upstream's minimums
    assert users == {0: ["Q1"], 2: ["Q0"], 3: ["Q0", "Q1"], 5: ["Q0", "Q1"], 6: ["Q0", "Q1"]}
    assert (stats["filtered"], stats["filtered_turns"]) == (2, 6)
    users, stats = kept(rated, min_ratings=None)
    assert users == {i: ["Q0", "Q1"] for i in range(7)} and stats["filtered"] == 0
    users, _ = kept(rated, min_ratings={"relevance": 3})  # only relevance, at 3
    assert users == {0: ["Q1"], 2: ["Q0", "Q1"], 3: ["Q0", "Q1"], 4: ["Q0", "Q1"], 5: ["Q1"]}
    users, stats = kept(plain)  # no rating columns: nothing filtered
    assert users == {0: ["Q0", "Q1"], 1: ["Q0", "Q1"]} and stats["filtered_turns"] == 0
    with pytest.raises(ValueError, match="unknown rating 'quality'"):
        ShardStream(rated, seed=0, min_ratings={"quality": 2})
    (rated_low,) = write_cauldron_shards(rows[:2], tmp_path / "low", 100, 1)
    all_filtered = ShardStream(rated_low, seed=0, min_ratings={"relevance": 10})
    with pytest.raises(ValueError, match=r"no usable row in epoch 0 \(2 rows filtered out by the ratings"):
        next(iter(all_filtered))

    # cauldron_dataset applies the same filter through the same row parser
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found under {SMOLLM2}")
    from conversion.config import VLMConfig
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import from_config

    cfg = VLMConfig.tiny()
    encoder = SampleEncoder.from_config(cfg, from_config(cfg, SMOLLM2))
    ds = cauldron_dataset(rated, encoder, min_ratings=UPSTREAM_MIN_RATINGS)
    assert ds.n_filtered == 2 and [[m["content"] for m in r.messages[::2]] for r in ds.records] == [
        ["Q1"],
        ["Q0"],
        ["Q0", "Q1"],
        ["Q0", "Q1"],
        ["Q0", "Q1"],
    ]
    assert len(cauldron_dataset(rated, encoder)) == 7, "cauldron_dataset filters nothing by default, as before"


# ---- bad shards and bad rows ------------------------------------------------------------------
def test_bad_shards_fail_at_construction(dataset, tmp_path):
    paths, _ = dataset
    good = tmp_path / "good.parquet"
    shutil.copy(paths[0], good)
    cut = tmp_path / "cut" / "half.parquet"
    cut.parent.mkdir()
    shutil.copy(paths[0], cut)
    truncate(cut)
    with pytest.raises(ValueError, match=r"half.parquet: cannot read the parquet footer"):
        ShardStream([good, cut], seed=0)
    junk = tmp_path / "junk" / "junk.parquet"
    junk.parent.mkdir()
    junk.write_text("id,caption\n1,a cat\n")
    with pytest.raises(ValueError, match=r"junk.parquet: cannot read the parquet footer"):
        ShardStream(junk, seed=0)
    (notexts,) = write_cauldron_shards(
        [{"images": [b"x"], "conversations": ["Q", "A"]}], tmp_path / "notexts", 10, 10, prefix="llava"
    )
    with pytest.raises(ValueError, match=r"llava-00000.parquet: no 'texts' column \(it has images, conversations\)"):
        ShardStream([good, notexts], seed=0)
    empty = tmp_path / "empty" / "e.parquet"
    empty.parent.mkdir()
    pq.write_table(pq.read_table(good).slice(0, 0), empty)
    with pytest.raises(ValueError, match="have no rows"):
        ShardStream(empty, seed=0)
    assert ShardStream([empty, good], seed=0).n_rows == 40, "an empty shard beside others is fine"
    with pytest.raises(
        ValueError, match=r"5 units \(row-group slices of at most 13 rows\) are fewer than the 9 readers"
    ):
        ShardStream(good, seed=0, chunk_rows=13, reader_count=9)


def test_bad_rows_are_sample_error_items(coco, tmp_path):
    name, jpeg, caps = coco[1]
    qa = [{"user": "What is this?", "assistant": caps[0]}]
    rows = [
        {"images": [jpeg], "texts": qa},  # 0 good
        {"images": [jpeg], "texts": [{"user": "Q", "assistant": None}]},  # 1 no answer
        {"images": [jpeg], "texts": [{"user": "Q", "assistant": "  "}]},  # 2 blank answer
        {"images": [{"bytes": None, "path": None}], "texts": qa},  # 3 image without bytes or path
        {"images": [jpeg], "texts": None},  # 4 no texts
        {"images": ["nope.jpg"], "texts": qa},  # 5 missing image file
        {"images": [f"images/{name}"], "texts": qa},  # 6 a path under image_root
        {"images": None, "texts": qa},  # 7 text only
    ]
    (path,) = write_cauldron_shards(rows, tmp_path, 100, 3)
    stream = ShardStream(path, seed=0, shuffle=False, chunk_rows=3, image_root=COCO_ROOT, on_error="yield")
    (items,) = by_epoch(stream, 1)
    assert [type(i).__name__ for i in items] == ["Record"] + ["SampleError"] * 5 + ["Record"] * 2
    assert [str(i) for i in items[1:6]] == [
        f"{path}:1: message 1 (assistant) has no text",
        f"{path}:2: no assistant answer",
        f"{path}:3: an image has neither bytes nor a path",
        f"{path}:4: no 'texts' list",
        f"{path}:5: image file not found: {COCO_ROOT / 'nope.jpg'}",
    ]
    assert items[0].images == (jpeg,) and items[0].source == f"{path}:0"
    assert items[6].images == (COCO_ROOT / "images" / name,) and items[7].images == ()
    assert stream.stats["errors"] == 5

    raising = ShardStream(path, seed=0, shuffle=False, chunk_rows=3, image_root=COCO_ROOT)
    it = iter(raising)
    assert next(it) == items[0]
    with pytest.raises(SampleError, match=r"shard-00000.parquet:1: message 1"):
        next(it)
    assert raising.state_dict()["offset"] == 2, "the position is past the row that raised"
    skipping = ShardStream(path, seed=0, shuffle=False, chunk_rows=3, image_root=COCO_ROOT, on_error="skip")
    (kept,) = by_epoch(skipping, 1)
    assert kept == [items[0], items[6], items[7]]


@pytest.mark.parametrize("damage", ["page data, CRC written", "page header, no CRC"])
def test_corrupt_page_is_one_error_per_unit(dataset, tmp_path, damage):
    paths, expected = dataset
    path = tmp_path / "c.parquet"
    if damage == "page data, CRC written":
        shutil.copy(paths[0], path)  # write_cauldron_shards: row groups of 7, 13, 4, 7, 9 rows
    else:  # as most writers (HF datasets among them) do: no page checksums
        table = pq.read_table(paths[0])
        with pq.ParquetWriter(path, table.schema) as writer:
            for start, n in ((0, 7), (7, 13), (20, 4), (24, 7), (31, 9)):
                writer.write_table(table.slice(start, n), row_group_size=n)
    group = pq.read_metadata(path).row_group(1)  # rows 7..19
    column = next(group.column(j) for j in range(group.num_columns) if group.column(j).path_in_schema.startswith("i"))
    first_page = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    at = first_page + column.total_compressed_size // 2 if damage.startswith("page data") else first_page
    raw = bytearray(path.read_bytes())
    raw[at : at + 64] = b"\xff" * 64  # in the JPEG bytes' column of row group 1
    path.write_bytes(bytes(raw))
    stream = ShardStream(path, seed=0, shuffle=False, chunk_rows=5, on_error="yield")
    (items,) = by_epoch(stream, 1)
    errors = [i for i in items if isinstance(i, SampleError)]
    assert [str(e).split(": cannot")[0] for e in errors] == [
        f"{path}: rows 7..11 (row group 1)",
        f"{path}: rows 12..16 (row group 1)",
        f"{path}: rows 17..19 (row group 1)",
    ]
    assert all("cannot read the data" in str(e) for e in errors)
    records = [i for i in items if not isinstance(i, SampleError)]
    assert [int(r.source.rsplit(":", 1)[1]) for r in records] == [*range(7), *range(20, 40)]
    original = {int(s.rsplit(":", 1)[1]): row for s, row in expected.items() if s.startswith(f"{paths[0]}:")}
    assert all(r.images == (original[int(r.source.rsplit(":", 1)[1])]["images"][0],) for r in records)


# ---- memory and pickling -----------------------------------------------------------------------
def test_memory_is_one_window(coco, tmp_path, monkeypatch):
    """20k tiny rows: the stream never holds more than one window of Records, and every read is
    one unit's row group, never a whole file."""
    thumbs = []
    for _, jpeg, _ in coco:
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).convert("RGB").resize((16, 16)).save(buf, "JPEG")
        thumbs.append(buf.getvalue())
    rows = ({"images": [thumbs[i % len(thumbs)]], "texts": [{"user": f"Q{i}", "assistant": "A"}]} for i in range(20000))
    paths = write_cauldron_shards(rows, tmp_path, 1000, [300, 200, 500])
    W, C = 4, 100

    live = [0]  # Records alive now (Records hold dicts, so they cannot go in a WeakSet)

    def tracked_record(*args):
        rec = Record(*args)
        live[0] += 1
        weakref.finalize(rec, lambda: live.__setitem__(0, live[0] - 1))
        return rec

    reads = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kwargs):
        reads.append(kwargs["row_groups"])
        return real_iter_batches(self, *args, **kwargs)

    def whole(*args, **kwargs):
        raise AssertionError("read a whole file")

    monkeypatch.setattr(streaming_module, "Record", tracked_record)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    for name in ("read", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)

    stream = ShardStream(paths, seed=0, chunk_rows=C, shuffle_window=W)
    assert stream.n_rows == 20000 and len(stream.units) == 200
    most, seen = 0, set()
    for n, rec in enumerate(stream):
        most = max(most, live[0])
        if n < 20000:
            seen.add(rec.source)
        del rec
        if n == 20000 + 1000:
            break
    assert most == W * C, f"at most one window of {W * C} rows in memory, saw {most}"
    assert len(seen) == 20000
    assert all(len(g) == 1 for g in reads) and len(reads) == stream.stats["units_read"]
    assert stream.stats["rows_read"] <= 20000 + 1000 + W * C


def test_pickle_round_trip(dataset):
    paths, _ = dataset
    stream = ShardStream(paths, seed=5, chunk_rows=5, shuffle_window=3, reader_index=1, reader_count=2)
    copy = pickle.loads(pickle.dumps(stream))  # before iteration: no file is open
    assert [key(i) for i in itertools.islice(copy, 30)] == [key(i) for i in itertools.islice(stream, 30)]
    assert stream._files, "iterating opened files"
    later = pickle.loads(pickle.dumps(stream))  # the open files stay behind; the position travels
    assert later.state_dict() == stream.state_dict() and not later._files
    assert [key(i) for i in itertools.islice(later, 20)] == [key(i) for i in itertools.islice(stream, 20)]
    stream.close()
    assert not stream._files


def test_write_cauldron_shards(coco, tmp_path):
    rows = coco_rows(coco, 23)
    rows[2]["images"] = [f"images/{coco[2][0]}", {"bytes": coco[3][1], "path": "x.jpg"}]
    rows[5]["relevance_ratings"] = [4]
    paths = write_cauldron_shards(rows, tmp_path, [10, 8], [3, 4])
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    groups = [
        [pq.read_metadata(p).row_group(g).num_rows for g in range(pq.read_metadata(p).num_row_groups)] for p in paths
    ]
    assert groups == [[3, 4, 3], [3, 4, 1], [3, 2]]
    first = pq.read_table(paths[0]).to_pylist()
    assert first[0]["images"] == [{"bytes": rows[0]["images"][0], "path": None}]
    assert first[2]["images"] == [
        {"bytes": None, "path": f"images/{coco[2][0]}"},
        {"bytes": coco[3][1], "path": "x.jpg"},
    ]
    assert [r["texts"] for r in first] == [r["texts"] for r in rows[:10]]
    assert first[5]["relevance_ratings"] == [4] and first[4]["relevance_ratings"] is None
    assert "relevance_ratings" not in pq.read_schema(paths[1]).names
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths], "no temporary file is left"
    with pytest.raises(FileExistsError, match="shard-00000.parquet exists"):
        write_cauldron_shards(rows, tmp_path, 10, 3)
    assert pa.types.is_binary(pq.read_schema(paths[0]).field("images").type.value_type.field("bytes").type)
