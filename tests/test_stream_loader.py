"""StreamLoader (jaxvlm.data.stream_loader): packed and unpacked batches from streamed parquet
shards of real COCO JPEGs and captions (real SmolLM2 tokenizer), resumed exactly at every
group boundary, identical with worker processes, bad samples counted or raised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conversion.config import VLMConfig
from jaxvlm.data import SampleEncoder, coco_captions_dataset
from jaxvlm.data.encoding import SampleError
from jaxvlm.data.stream_loader import IndexSource, ShardSource, StreamLoader
from jaxvlm.data.streaming import ShardStream, write_cauldron_shards
from jaxvlm.tokenizer import from_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
COCO_ROOT = SHARED / "data" / "coco-mini"

pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
    reason=f"real tokenizer / COCO data not found under {SHARED / 'data'} (the shared directory beside the repo)",
)

CFG = VLMConfig.tiny()  # S 32, max 64: a COCO photo is a 2x2 grid + global = 5 tiles, L 4 tokens each


@pytest.fixture(scope="module")
def enc():
    return SampleEncoder.from_config(CFG, from_config(CFG, SMOLLM2))


def coco_rows(n_repeat: int = 1) -> list[dict]:
    """Cauldron rows of the COCO photos: JPEG bytes, one to three caption turns."""
    index = json.loads((COCO_ROOT / "captions.json").read_text())
    rows = []
    for rep in range(n_repeat):
        for k, im in enumerate(index["images"]):
            caps = im["captions"][: 1 + (k + rep) % 3]
            texts = [
                {"user": "Describe the image." if j == 0 else "Again?", "assistant": c} for j, c in enumerate(caps)
            ]
            rows.append({"images": [(COCO_ROOT / "images" / im["file_name"]).read_bytes()], "texts": texts})
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_cauldron_shards(coco_rows(2), d, rows_per_shard=[30, 41, 31], row_group_size=[7, 12])
    return d


def make_loader(shards, enc, *, packing="segments", workers=0, prefetch=2, seed=0, **kw):
    stream = ShardStream(shards, seed=seed, chunk_rows=8, shuffle_window=3, on_error="yield")
    args = {"batch_size": 2, "max_length": 160, "packing": packing, "pack_buffer": 16, "shape_group": 2,
            "n_image_tokens": CFG.n_image_tokens, "worker_processes": workers, "prefetch": prefetch, **kw}  # fmt: skip
    return StreamLoader(ShardSource(stream, enc), **args)


def take(loader, n):
    it = loader.forever()
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_packed_batches_have_static_shapes_and_real_packs(shards, enc):
    batches = take(make_loader(shards, enc), 8)
    for b in batches:
        assert b["input_ids"].shape == (2, 160) and b["segment_ids"].shape == (2, 160)
        assert b["images"].shape[1:] == (3, 32, 32)
        n_img_tokens = int((b["input_ids"] == CFG.image_token_id).sum())
        assert n_img_tokens == b["n_images"] * CFG.n_image_tokens, "image tokens match the real tiles"
        assert not b["images"][b["n_images"] :].any()
    per_row = [int(b["segment_ids"][r].max()) for b in batches for r in range(2)]
    assert max(per_row) >= 2, f"rows should pack several samples, got {per_row}"
    fill = np.mean([b["attention_mask"].mean() for b in batches])
    assert fill > 0.7, f"packed rows are mostly real tokens, got {fill:.2f}"


@pytest.mark.parametrize("packing", ["segments", None])
def test_resume_at_every_group_is_exact(shards, enc, packing):
    """A loader restored from the state after g groups yields exactly the batches the
    uninterrupted one yielded next, past round and epoch boundaries (~2 epochs)."""
    ref_loader = make_loader(shards, enc, packing=packing)
    it = ref_loader.forever()
    groups, states = [], []
    for _ in range(30):
        groups.append([next(it), next(it)])
        states.append(json.loads(json.dumps(ref_loader.state_dict())))  # what a checkpoint keeps
    it.close()
    assert ref_loader.stats["samples"] > 102, f"covers more than one epoch of 102 rows: {ref_loader.stats}"
    for g in (0, 1, 5, 11, 17, 23, 27):
        resumed = make_loader(shards, enc, packing=packing, prefetch=0 if g % 2 else 2)
        resumed.load_state_dict(states[g])
        assert resumed.stats == states[g]["stats"], "the counts carry over"
        got = take(resumed, 4)
        want = groups[g + 1] + groups[g + 2]
        assert all(same(a, b) for a, b in zip(got, want)), f"resumed after group {g}: different batches"
        assert resumed.stats == states[g + 2]["stats"]


def test_worker_processes_build_identical_batches(shards, enc):
    plain = take(make_loader(shards, enc), 6)
    loader = make_loader(shards, enc, workers=2)
    try:
        workers = take(loader, 6)
    finally:
        loader.close()
    assert all(same(a, b) for a, b in zip(plain, workers))


def test_settings_mismatch_refuses_to_resume(shards, enc):
    loader = make_loader(shards, enc)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="cannot resume: saved max_length=160"):
        make_loader(shards, enc, max_length=192).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume: saved seed"):
        make_loader(shards, enc, seed=1).load_state_dict(state)


def test_too_long_samples_are_skipped_and_counted_never_blank(shards, enc):
    # a one-caption sample is ~40 tokens (20 image tokens + text); three captions exceed 64
    loader = make_loader(shards, enc, max_length=64)
    batches = take(loader, 10)
    assert loader.stats["too_long"] > 0 and loader.stats["blank_rows"] == 0
    assert all(b["attention_mask"].any(axis=1).all() for b in batches), "no row is blank"
    with pytest.raises(SampleError, match="longer than max_length 64"):
        take(make_loader(shards, enc, max_length=64, on_too_long="raise"), 10)


def test_an_image_that_will_not_decode_is_counted_or_raised(tmp_path, enc):
    rows = coco_rows()[:20]
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    cut = buf.getvalue()
    rows[3]["images"] = [cut[: len(cut) // 2]]  # a header that reads, pixels that do not
    write_cauldron_shards(rows, tmp_path, rows_per_shard=10, row_group_size=5)
    loader = make_loader(tmp_path, enc, on_error="skip")
    take(loader, 6)
    assert loader.stats["errors"] >= 1
    with pytest.raises(SampleError, match="shard-00000.parquet:3"):
        take(make_loader(tmp_path, enc), 6)


def test_index_source_packs_a_random_access_dataset(enc):
    ds = coco_captions_dataset(COCO_ROOT, enc, captions="all")
    loader = StreamLoader(IndexSource(ds, seed=0), 2, max_length=160, packing="segments", pack_buffer=16,
                          n_image_tokens=CFG.n_image_tokens)  # fmt: skip
    it = loader.forever()
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    want = [next(it) for _ in range(3)]
    it.close()
    again = StreamLoader(IndexSource(ds, seed=0), 2, max_length=160, packing="segments", pack_buffer=16,
                         n_image_tokens=CFG.n_image_tokens)  # fmt: skip
    again.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(take(again, 3), want))


def test_stream_flags_reach_the_stream_and_a_changed_window_refuses_to_resume(shards):
    import dataclasses

    from jaxvlm.train_loop import RunConfig, build_stream

    run = RunConfig(data=f"cauldron:{shards}", stream_window=2, stream_chunk_rows=5, seed=3, relevance_min_rating=None)
    stream = build_stream(run)
    assert (stream.shuffle_window, stream.chunk_rows, stream.seed) == (2, 5, 3)
    assert all(u.stop - u.start <= 5 for u in stream.units) and len(stream.units) > 102 // 5
    assert "relevance" not in stream.min_ratings and stream.min_ratings["formatting"] == 1
    state = stream.state_dict()
    with pytest.raises(ValueError, match="cannot resume: saved shuffle_window=2"):
        build_stream(dataclasses.replace(run, stream_window=4)).load_state_dict(state)
