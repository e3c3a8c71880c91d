"""Datasets, sample encoding and the static-shape loader, with the real SmolLM2 tokenizer and COCO JPEGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conversion.config import VLMConfig
from jaxvlm.data import (
    ANSWERS,
    DataLoader,
    SampleEncoder,
    SampleError,
    SyntheticShapesDataset,
    cauldron_dataset,
    coco_captions_dataset,
    collate,
    llava_dataset,
    pick_bucket,
    power_of_two_buckets,
    shift_labels,
)
from jaxvlm.data.synthetic import BACKGROUND, COLORS, POSITIONS, render
from jaxvlm.tokenizer import from_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
COCO_ROOT = SHARED / "data" / "coco-mini"
COCO = COCO_ROOT / "images"
IMG_A = COCO / "000000000790.jpg"
IMG_B = COCO / "000000078499.jpg"

pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
    reason=f"real tokenizer / COCO data not found under {SHARED / 'data'} (the shared directory beside the repo)",
)

CFG = VLMConfig.tiny()  # S 32, max 64 (2x2 grid + global = 5 tiles per COCO image), L 4


@pytest.fixture(scope="module")
def tok():
    return from_config(CFG, SMOLLM2)


@pytest.fixture(scope="module")
def enc(tok):
    return SampleEncoder.from_config(CFG, tok)


@pytest.fixture(scope="module")
def syn_enc(tok):
    return SampleEncoder.from_config(CFG.replace(max_img_size=32), tok)  # one tile per image


@pytest.fixture(scope="module")
def coco_all(enc):
    return coco_captions_dataset(COCO_ROOT, enc, captions="all")


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


# ---- encoding ------------------------------------------------------------------------------
def test_shift_labels():
    ids = np.array([5, 6, 7, 8, 9], np.int32)
    mask = np.array([0, 0, 1, 1, 1], bool)
    np.testing.assert_array_equal(shift_labels(ids, mask), [-100, 7, 8, 9, -100])


def test_single_turn_sample_matches_upstream_layout(enc, tok):
    s = enc.encode([IMG_A], [{"role": "user", "content": "What is here?"}, {"role": "assistant", "content": "A cake."}])
    ids, labels = s["input_ids"], s["labels"]
    assert s["images"].shape == (5, 3, 32, 32) and s["grids"] == [(2, 2)]
    assert ids.dtype == labels.dtype == s["attention_mask"].dtype == np.int32
    assert np.all(s["attention_mask"] == 1)
    im = "<|image|>" * 4
    expected_text = (
        "<|im_start|>user\n<|global_image|>"
        + im
        + "".join(f"<row_{r}_col_{c}>" + im for r in (1, 2) for c in (1, 2))
        + "What is here?<|im_end|>\n<|im_start|>assistant\nA cake.<|im_end|>\n"
    )
    assert tok.decode(ids) == expected_text
    assert int(np.sum(ids == tok.image_token_id)) == 5 * 4
    # the trained tokens: the answer, <|im_end|> and (upstream's quirk) the newline after it
    answer = tok.encode("A cake.")
    start = len(ids) - len(answer) - 2  # first answer token
    expected = np.full(len(ids), -100)
    expected[start - 1 : -1] = ids[start:]
    np.testing.assert_array_equal(labels, expected)
    assert labels[start - 1] == answer[0] and labels[-3] == 2 and labels[-2] == 198 and labels[-1] == -100
    assert list(ids[start - 4 : start]) == tok.assistant_prefix_ids


def test_multi_turn_trains_only_on_answers(enc, tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red"},
        {"role": "user", "content": "Count?"},
        {"role": "assistant", "content": "3"},
    ]
    s = enc.encode([IMG_B], msgs)
    trained = s["labels"][s["labels"] != -100]
    assert tok.decode(trained) == "Red<|im_end|>\n3<|im_end|>\n"
    text = tok.decode(s["input_ids"])
    assert text.startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|global_image|>"
    )  # first *user* message


def test_stray_image_tokens_are_removed_and_text_only_samples_work(enc, tok):
    s = enc.encode([IMG_A], [{"role": "user", "content": "<|image|>look"}, {"role": "assistant", "content": "ok"}])
    assert int(np.sum(s["input_ids"] == tok.image_token_id)) == 5 * 4
    t = enc.encode([], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert t["images"].shape == (0, 3, 32, 32) and t["grids"] == []
    assert tok.decode(t["input_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_encode_prompt_ends_with_generation_prefix(enc, tok):
    p = enc.encode_prompt([IMG_A], "What is this?")
    assert list(p["input_ids"][-4:]) == tok.assistant_prefix_ids
    assert p["images"].shape[0] * 4 == int(np.sum(p["input_ids"] == tok.image_token_id))
    assert "labels" not in p


def test_legacy_model_gets_bare_image_tokens(tok):
    cfg = VLMConfig.nanovlm_222m(vit_img_size=32, vit_patch_size=16, mp_image_token_length=1)
    from jaxvlm.tokenizer import load_tokenizer

    legacy = SampleEncoder.from_config(cfg, load_tokenizer(SMOLLM2, extra_tokens=cfg.extra_tokens))
    s = legacy.encode(
        [IMG_A, IMG_B], [{"role": "user", "content": "Compare."}, {"role": "assistant", "content": "Cake, horses."}]
    )
    assert s["images"].shape == (2, 3, 32, 32)
    assert legacy.tokenizer.decode(s["input_ids"]).startswith("<|im_start|>user\n<|image|><|image|>Compare.")


# ---- file datasets -------------------------------------------------------------------------
def test_llava_json_and_jsonl(tmp_path, enc, tok):
    rows = [
        {
            "image": _rel(IMG_A, tmp_path),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is on the table?"},
                {"from": "gpt", "value": "A cake."},
            ],
        },
        {
            "image": [_rel(IMG_A, tmp_path), str(IMG_B)],  # relative and absolute
            "conversations": [
                {"from": "human", "value": "Two pictures <image>"},
                {"from": "gpt", "value": "Cake and horses."},
                {"from": "human", "value": "More?"},
                {"from": "gpt", "value": "No."},
            ],
        },
        {"conversations": [{"from": "human", "value": "No image here."}, {"from": "gpt", "value": "Fine."}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("data.json", "data.jsonl"):
        ds = llava_dataset(tmp_path / name, enc)
        assert len(ds) == 3 and ds.n_skipped == 0
        s0, s1, s2 = ds[0], ds[1], ds[2]
        t0 = tok.decode(s0["input_ids"])
        assert "<image>" not in t0 and "What is on the table?<|im_end|>" in t0
        assert s1["images"].shape == (10, 3, 32, 32) and s1["grids"] == [(2, 2), (2, 2)]
        t1 = tok.decode(s1["input_ids"])
        assert t1.index("<image: 0>") < t1.index("<image: 1>") < t1.index("Two pictures")
        assert tok.decode(s1["labels"][s1["labels"] != -100]) == "Cake and horses.<|im_end|>\nNo.<|im_end|>\n"
        assert s2["images"].shape[0] == 0
        for i in range(3):
            assert ds.sample_shape(i) == (len(ds[i]["input_ids"]), ds[i]["images"].shape[0])


def test_cauldron_jsonl(tmp_path, enc, tok):
    rows = [
        {
            "images": [_rel(IMG_B, tmp_path)],
            "texts": [
                {"user": "What animals?", "assistant": "Horses.", "source": "x"},
                {"user": "Where?", "assistant": "On a hill."},
            ],
        },
        {"images": None, "texts": [{"user": "Say hi", "assistant": "hi"}]},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = cauldron_dataset(tmp_path / "c.jsonl", enc)
    s = ds[0]
    assert s["images"].shape == (5, 3, 32, 32)
    assert tok.decode(s["labels"][s["labels"] != -100]) == "Horses.<|im_end|>\nOn a hill.<|im_end|>\n"
    assert ds[1]["images"].shape[0] == 0


def test_bad_rows_raise_or_are_skipped(tmp_path, enc):
    good = {
        "image": _rel(IMG_A, tmp_path),
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    }
    no_answer = {"image": _rel(IMG_A, tmp_path), "conversations": [{"from": "human", "value": "Q"}]}
    empty_answer = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}
    missing_image = {
        "image": "nope.jpg",
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    }
    bad_speaker = {"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    no_value = {"conversations": [{"from": "Human", "value": "Q"}, {"from": "GPT"}]}
    f = tmp_path / "rows.jsonl"
    f.write_text(
        "\n".join(json.dumps(r) for r in [good, no_answer, empty_answer, missing_image, bad_speaker, no_value, [1, 2]])
    )
    with pytest.raises(ValueError, match=r"rows.jsonl:1: no assistant answer"):
        llava_dataset(f, enc)
    ds = llava_dataset(f, enc, on_error="skip")
    assert len(ds) == 1 and ds.n_skipped == 6
    for row, message in (
        (bad_speaker, "'from'"),
        (no_value, r"message 1 \(assistant\) has no text"),
        ([1, 2], "JSON object"),
    ):
        one = tmp_path / "one.json"
        one.write_text(json.dumps([row]))
        with pytest.raises(ValueError, match=message):
            llava_dataset(one, enc)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(missing_image))
    with pytest.raises(ValueError, match="nope.jpg"):
        llava_dataset(only_bad, enc)
    with pytest.raises(ValueError, match="empty"):
        llava_dataset(only_bad, enc, on_error="skip")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        llava_dataset(tmp_path / "empty.json", enc)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        llava_dataset(tmp_path / "absent.json", enc)
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{broken\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        llava_dataset(tmp_path / "broken.jsonl", enc)


def test_parquet_needs_pyarrow(tmp_path, enc):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            cauldron_dataset(tmp_path / "d.parquet", enc)
    else:
        pytest.skip("pyarrow is installed; the missing-pyarrow error cannot be shown")


def _dataset_with_a_cut_jpeg(tmp_path, enc):
    """Two LLaVA rows: row 0's JPEG cut short (unreadable), row 1 a real COCO image."""
    (tmp_path / "bad.jpg").write_bytes(IMG_A.read_bytes()[:3000])
    rows = [
        {"image": name, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        for name in ("bad.jpg", _rel(IMG_A, tmp_path))
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = llava_dataset(tmp_path / "d.json", enc)
    return ds


def test_unreadable_image_is_a_sample_error_and_the_loader_can_blank_it(tmp_path, enc):
    ds = _dataset_with_a_cut_jpeg(tmp_path, enc)
    with pytest.raises(SampleError, match="bad.jpg"):
        ds[0]
    with pytest.raises(SampleError, match="bad.jpg"):  # raised in the prefetch thread, re-raised here
        list(DataLoader(ds, 2, shuffle=False, prefetch=2))
    loader = DataLoader(ds, 2, shuffle=False, on_error="skip", prefetch=0)
    (batch,) = list(loader)
    assert loader.stats["errors"] == 1 and loader.stats["blank_rows"] == 1
    assert batch["attention_mask"][0].sum() == 0 and np.all(batch["labels"][0] == -100)
    assert batch["n_images"] == 5


def test_coco_captions(enc, tok, coco_all):
    first = coco_captions_dataset(COCO_ROOT, enc)
    assert len(first) == 51
    assert len(coco_all) == 50 * 5 + 2  # one image has only two captions
    assert len(coco_captions_dataset(COCO_ROOT, enc, split="train2017")) == 26
    data = json.loads((COCO_ROOT / "captions.json").read_text())
    s = first[0]
    text = tok.decode(s["input_ids"])
    assert "Describe the image.<|im_end|>" in text
    assert tok.decode(s["labels"][s["labels"] != -100]) == data["images"][0]["captions"][0] + "<|im_end|>\n"
    assert s["images"].shape == (5, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="captions.json"):
        coco_captions_dataset(COCO, enc)


# ---- synthetic -----------------------------------------------------------------------------
def test_synthetic_is_deterministic(syn_enc):
    a = SyntheticShapesDataset(syn_enc, size=50, seed=3)
    b = SyntheticShapesDataset(syn_enc, size=50, seed=3)
    c = SyntheticShapesDataset(syn_enc, size=50, seed=4)
    for i in (0, 7, 49):
        for k in ("input_ids", "labels", "images"):
            np.testing.assert_array_equal(a[i][k], b[i][k])
    assert any(a.scene(i) != c.scene(i) for i in range(50))
    s = a[0]
    assert s["images"].shape == (1, 3, 32, 32) and s["grids"] == [(1, 1)]
    assert a.sample_shape(5) == (len(a[5]["input_ids"]), 1)
    with pytest.raises(IndexError):
        a.scene(50)


def test_synthetic_splits_never_share_an_instance(syn_enc):
    train = SyntheticShapesDataset(syn_enc, split="train", size=1500, seed=0)
    held = SyntheticShapesDataset(syn_enc, split="heldout", size=300, seed=0)
    held_other_seed = SyntheticShapesDataset(syn_enc, split="heldout", size=300, seed=1)
    train_keys = {train.scene(i).key for i in range(len(train))}
    train_pixels = {(train.question(i), train.image(i).tobytes()) for i in range(len(train))}
    for ds in (held, held_other_seed):
        for i in range(len(ds)):
            assert ds.scene(i).key not in train_keys
            assert (ds.question(i), ds.image(i).tobytes()) not in train_pixels
    assert len({held.scene(i).key for i in range(300)}) > 200  # mostly distinct instances


def _components(fg: np.ndarray) -> int:
    """Number of 4-connected foreground blobs."""
    seen = np.zeros_like(fg)
    n = 0
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < fg.shape[0] and 0 <= xx < fg.shape[1] and fg[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return n


def test_synthetic_answers_describe_the_picture(syn_enc, tok):
    ds = SyntheticShapesDataset(syn_enc, size=200, seed=0, image_size=48)
    seen = set()
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert scene.answer in ANSWERS and scene.task == ("shape", "color", "count", "position")[i % 4]
        seen.add(scene.answer)
        img = np.asarray(render(scene, 48)).astype(int)
        fg = np.abs(img - np.array(BACKGROUND)).sum(-1) > 60  # not background
        ys, xs = np.nonzero(fg)
        if scene.task == "count":
            assert len(scene.shapes) == int(scene.answer) == _components(fg)
        elif scene.task == "color":
            mean = img[fg].mean(0)
            nearest = min(COLORS, key=lambda c: np.abs(mean - COLORS[c]).sum())
            assert nearest == scene.answer
        elif scene.task == "position":
            row, col = POSITIONS[scene.answer]
            assert int(ys.mean() // 16) == row and int(xs.mean() // 16) == col
    assert seen == set(ANSWERS)
    s = ds[2]
    assert tok.decode(s["labels"][s["labels"] != -100]) == ds.answer(2) + "<|im_end|>\n"
    assert "How many shapes are there?" in tok.decode(s["input_ids"])
    p = ds.prompt(2)
    assert list(p["input_ids"][-4:]) == tok.assistant_prefix_ids


def test_synthetic_argument_checks(syn_enc):
    with pytest.raises(ValueError, match="split"):
        SyntheticShapesDataset(syn_enc, split="val")
    with pytest.raises(ValueError, match="tasks"):
        SyntheticShapesDataset(syn_enc, tasks=("size",))
    with pytest.raises(ValueError, match="size"):
        SyntheticShapesDataset(syn_enc, size=0)


# ---- loader --------------------------------------------------------------------------------
def test_buckets():
    assert power_of_two_buckets(32, 256) == (32, 64, 128, 256)
    assert power_of_two_buckets(32, 100) == (32, 64, 100)
    assert pick_bucket(33, (32, 64)) == 64 and pick_bucket(65, (32, 64)) is None


def test_collate_left_pads(enc):
    s = [
        enc.encode([], [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        enc.encode(
            [IMG_A], [{"role": "user", "content": "longer question here"}, {"role": "assistant", "content": "b"}]
        ),
    ]
    b = collate(s + [None], seq_len=64, n_images=8, pad_id=2, image_size=32)
    assert b["input_ids"].shape == (3, 64) and b["images"].shape == (8, 3, 32, 32) and b["n_images"] == 5
    n0 = len(s[0]["input_ids"])
    assert np.all(b["input_ids"][0, : 64 - n0] == 2) and np.all(b["attention_mask"][0, : 64 - n0] == 0)
    np.testing.assert_array_equal(b["input_ids"][0, 64 - n0 :], s[0]["input_ids"])
    np.testing.assert_array_equal(b["labels"][0, 64 - n0 :], s[0]["labels"])
    assert np.all(b["labels"][0, : 64 - n0] == -100)
    assert b["attention_mask"][2].sum() == 0 and np.all(b["labels"][2] == -100)
    np.testing.assert_array_equal(b["images"][:5], s[1]["images"])
    assert not b["images"][5:].any()


def test_loader_batches_are_static_and_consistent(coco_all, tok):
    loader = DataLoader(coco_all, 4, seq_buckets=(96, 128, 192), seed=0, prefetch=2)
    L = CFG.n_image_tokens
    seen = []
    for k, b in enumerate(loader):
        T = b["input_ids"].shape[1]
        assert T in (96, 128, 192) and b["images"].shape[1:] == (3, 32, 32)
        assert b["images"].shape[0] in loader.image_buckets and b["n_images"] == 20  # 4 rows x 5 tiles
        assert int(np.sum(b["input_ids"] == tok.image_token_id)) == b["n_images"] * L
        assert not b["images"][b["n_images"] :].any()
        lengths = b["attention_mask"].sum(1)
        assert T == pick_bucket(int(lengths.max()), (96, 128, 192))
        for r in range(4):  # left padding: the mask is 0...0 1...1
            assert np.all(b["attention_mask"][r, T - lengths[r] :] == 1)
        seen.append(b)
        if k == 5:
            break
    assert loader.state_dict()["step"] == 6 and loader.image_buckets == (1, 2, 4, 8, 16, 20)


def test_padded_images_are_never_read_by_the_merge():
    jnp = pytest.importorskip("jax.numpy")
    from jaxvlm.vision_language_model import merge_image_embeddings

    rng = np.random.default_rng(0)
    L, H, image_id = 3, 5, 7
    ids = np.array([[1, 7, 7, 7, 2, 7, 7, 7], [0, 0, 1, 7, 7, 7, 2, 2]], np.int32)  # 3 images' worth of tokens
    emb = rng.normal(size=(2, 8, H)).astype(np.float32)
    real = rng.normal(size=(3, L, H)).astype(np.float32)
    padded = np.concatenate([real, np.full((5, L, H), 1e6, np.float32)])  # junk in the padding rows
    a = merge_image_embeddings(jnp.asarray(ids), jnp.asarray(emb), jnp.asarray(real), image_id)
    b = merge_image_embeddings(jnp.asarray(ids), jnp.asarray(emb), jnp.asarray(padded), image_id)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(b)[1, 3:6], real[2])


def test_shuffle_seed_and_epochs(syn_enc):
    ds = SyntheticShapesDataset(syn_enc, size=40)
    a = DataLoader(ds, 4, seed=1, prefetch=0)
    b = DataLoader(ds, 4, seed=1, prefetch=0)
    c = DataLoader(ds, 4, seed=2, prefetch=0)
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert sorted(a.order(0)) == list(range(40))
    assert not np.array_equal(a.order(0), a.order(1)) and not np.array_equal(a.order(0), c.order(0))
    first = next(iter(a))
    expected = collate(
        [ds[i] for i in a.batch_indices(0, 0)],
        seq_len=first["input_ids"].shape[1],
        n_images=first["images"].shape[0],
        pad_id=2,
        image_size=32,
    )
    for k in ("input_ids", "labels", "attention_mask", "images"):
        np.testing.assert_array_equal(first[k], expected[k])
    unshuffled = DataLoader(ds, 4, shuffle=False, prefetch=0)
    assert unshuffled.batch_indices(3, 2) == [8, 9, 10, 11]


def _same(b1, b2):
    assert b1.keys() == b2.keys()
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)


def test_resume_yields_exactly_the_same_batches(syn_enc):
    ds = SyntheticShapesDataset(syn_enc, size=30)
    ref = DataLoader(ds, 4, seed=5, prefetch=2)  # 7 steps per epoch
    it = ref.forever()
    for _ in range(5):
        next(it)
    state = ref.state_dict()
    assert (state["epoch"], state["step"]) == (0, 5)
    expected = [next(it) for _ in range(6)]  # crosses into epoch 1
    assert ref.state_dict()["epoch"] == 1
    resumed = DataLoader(ds, 4, seed=5, prefetch=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    got = resumed.forever()
    for e in expected:
        _same(e, next(got))
    with pytest.raises(ValueError, match="seed"):
        DataLoader(ds, 4, seed=6).load_state_dict(state)
    end = DataLoader(ds, 4, seed=5)
    end.load_state_dict({**state, "step": len(end)})  # a finished epoch resumes at the next
    assert (end.epoch, end.step) == (1, 0)


def test_prefetch_matches_and_stops_its_thread(syn_enc):
    ds = SyntheticShapesDataset(syn_enc, size=64)
    before = threading.active_count()
    plain = list(DataLoader(ds, 8, seed=0, prefetch=0))
    threaded = list(DataLoader(ds, 8, seed=0, prefetch=3, num_workers=2))
    assert len(plain) == len(threaded) == 8
    for a, b in zip(plain, threaded):
        _same(a, b)
    loader = DataLoader(ds, 8, seed=0, prefetch=3)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    assert loader.state_dict()["step"] == 2
    assert threading.active_count() == before


def test_multi_host_shards_agree_on_shapes(coco_all):
    kw = dict(seq_buckets=(52, 56, 64, 96), seed=3, prefetch=0)
    hosts = [DataLoader(coco_all, 3, process_index=p, process_count=2, **kw) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 252 // 6
    seen = []
    shapes_vary = set()
    for step, (b0, b1) in enumerate(zip(*hosts)):
        assert b0["input_ids"].shape == b1["input_ids"].shape and b0["images"].shape == b1["images"].shape
        shapes_vary.add(b0["input_ids"].shape[1])
        i0, i1 = hosts[0].batch_indices(0, step), hosts[1].batch_indices(0, step)
        assert not set(i0) & set(i1)
        seen += i0 + i1
        if step == 12:
            break
    assert len(seen) == len(set(seen)) == 13 * 6
    assert seen == [int(i) for i in hosts[0].order(0)[:78]]
    assert len(shapes_vary) > 1  # the bucket follows the global batch, not a fixed length


def test_shape_groups_share_shapes(coco_all):
    loader = DataLoader(
        coco_all, 2, seq_buckets=(52, 56, 64, 96), image_buckets=(5, 10), shape_group=3, seed=0, prefetch=0
    )
    assert len(loader) % 3 == 0
    batches = []
    for k, b in enumerate(loader):
        batches.append(b)
        if k == 8:
            break
    for g in range(3):
        group = batches[3 * g : 3 * g + 3]
        assert len({b["input_ids"].shape for b in group}) == 1 and len({b["images"].shape for b in group}) == 1


def test_too_long_samples_and_last_partial_batch(coco_all, syn_enc):
    loader = DataLoader(coco_all, 4, seq_buckets=(32,), prefetch=0, shuffle=False)
    b = next(iter(loader))
    assert b["input_ids"].shape == (4, 32) and b["attention_mask"].sum() == 0 and b["n_images"] == 0
    assert loader.stats["too_long"] == 4
    with pytest.raises(ValueError, match="largest bucket 32"):
        next(iter(DataLoader(coco_all, 4, seq_buckets=(32,), on_too_long="raise", prefetch=0)))
    ds = SyntheticShapesDataset(syn_enc, size=10)
    keep = DataLoader(ds, 4, drop_last=False, shuffle=False, prefetch=0)
    batches = list(keep)
    assert len(batches) == 3 and batches[-1]["input_ids"].shape[0] == 4
    assert batches[-1]["attention_mask"][2:].sum() == 0 and batches[-1]["n_images"] == 2
    assert len(list(DataLoader(ds, 4, prefetch=0))) == 2
    with pytest.raises(ValueError, match="largest image bucket"):
        next(iter(DataLoader(coco_all, 4, image_buckets=(8,), prefetch=0)))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DataLoader(ds, 16)


def test_data_modules_import_neither_jax_nor_torch():
    """jaxvlm/__init__.py imports jax; the data-side modules themselves must not."""
    repo = Path(__file__).resolve().parents[1]
    code = f"""
import sys, types
sys.modules["jax"] = None; sys.modules["torch"] = None; sys.modules["flax"] = None  # importing them fails
pkg = types.ModuleType("jaxvlm"); pkg.__path__ = [{str(repo / "jaxvlm")!r}]; sys.modules["jaxvlm"] = pkg
sys.path.insert(0, {str(repo)!r})
import jaxvlm.tokenizer, jaxvlm.image_processing, jaxvlm.data
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- worker processes ---------------------------------------------------------------------------------
def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_worker_processes_build_the_same_batches_and_resume(coco_all):
    """Real COCO JPEGs decoded, split into tiles and tokenised in 2 spawned worker processes:
    the batches equal those built in this process, batch for batch, and a loader restored from a
    mid-epoch state_dict continues with the same batches as the uninterrupted one."""
    here = DataLoader(coco_all, 4, seq_buckets=(96, 128, 192), seed=3, prefetch=0)
    workers = DataLoader(coco_all, 4, seq_buckets=(96, 128, 192), seed=3, prefetch=2, worker_processes=2)
    try:
        want = [b for _, b in zip(range(6), here.forever())]
        it = workers.forever()
        got = [next(it) for _ in range(3)]
        state = workers.state_dict()
        it.close()
        workers.close()
        resumed = DataLoader(coco_all, 4, seq_buckets=(96, 128, 192), seed=3, prefetch=2, worker_processes=2)
        resumed.load_state_dict(state)
        it = resumed.forever()
        got += [next(it) for _ in range(3)]
        it.close()
        resumed.close()
    finally:
        workers.close()
    assert all(_same(g, w) for g, w in zip(got, want)), "worker processes built other batches"
    assert len(got) == 6


def test_worker_processes_report_unreadable_samples_like_the_main_process(tmp_path, enc):
    ds = _dataset_with_a_cut_jpeg(tmp_path, enc)
    loader = DataLoader(ds, 2, shuffle=False, prefetch=0, worker_processes=1)
    try:
        with pytest.raises(SampleError, match="bad.jpg"):
            list(loader)
    finally:
        loader.close()
    loader = DataLoader(ds, 2, shuffle=False, on_error="skip", prefetch=0, worker_processes=1)
    try:
        (batch,) = list(loader)
    finally:
        loader.close()
    assert loader.stats["errors"] == 1 and loader.stats["blank_rows"] == 1
    assert batch["attention_mask"][0].sum() == 0 and batch["n_images"] == 5


def test_bench_loader_compares_worker_counts_on_coco(tmp_path):
    from conftest import run_cli

    out = tmp_path / "loader.json"
    code, stdout, err = run_cli("-m", "jaxvlm", "bench-loader", "--data", f"coco:{COCO_ROOT}", "--tokenizer",
                                str(SMOLLM2), "--preset", "tiny", "--batch-size", "4", "--batches", "2",
                                "--workers", "0", "2", "--json", str(out))  # fmt: skip
    assert code == 0, err[-5:]
    report = json.loads(out.read_text())
    assert [r["worker_processes"] for r in report["results"]] == [0, 2]
    assert all(r["samples_per_s"] > 0 for r in report["results"]) and report["machine"]["cpu"]
    assert "| 2 |" in stdout
