"""Bad prompts and datasets: context length, image-token counts, empty or unanswerable
datasets, too-long samples, unreadable images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    SMOLLM2,
    make_batch,
    tiny_cfg,
)
from PIL import Image
from test_bad_input_images import png_header_only

import torch_ref


# ---- context length, image tokens -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models():
    cfg = tiny_cfg(lm_max_length=64)
    tmodel = torch_ref.VisionLanguageModel(cfg).eval()
    from jaxvlm.pretrained import model_from_torch_tensors

    jmodel = model_from_torch_tensors(cfg, {k: v.numpy() for k, v in tmodel.checkpoint_state().items()})
    return cfg, tmodel, jmodel


def test_generation_beyond_the_context_raises(tiny_models):
    from jaxvlm.generate import generate

    cfg, tmodel, jmodel = tiny_models
    for name, gen in (("jaxvlm", lambda *a, **k: generate(jmodel, *a, **k)), ("torch_ref", tmodel.generate)):
        for T, n in ((60, 5), (65, 0), (64, 1)):
            with pytest.raises(
                ValueError,
                match=rf"prompt length {T} \+ max_new_tokens {n} = {T + n} exceeds the model context lm_max_length = 64",
            ):
                gen(np.full((1, T), 7), None, None, max_new_tokens=n, greedy=True)
        assert np.asarray(gen(np.full((1, 60), 7), None, None, max_new_tokens=4, greedy=True)).shape == (1, 4), name


@pytest.mark.parametrize(
    "rows,n_images",
    [([(0, 2)], 1), ([(0, 1)], 2), ([(0, 0)], 1), ([(0, 1)], 0)],
    ids=["fewer_images", "more_images", "images_without_tokens", "tokens_without_images"],
)
def test_image_token_count_mismatch_raises_in_both_frameworks(rows, n_images, tiny_models):
    cfg, tmodel, jmodel = tiny_models
    ids, _, mask = make_batch(cfg, rows, 40, 0)
    images = np.random.default_rng(0).random((n_images, 3, 32, 32), dtype=np.float32) if n_images else None
    n_tokens = int((ids == cfg.image_token_id).sum())
    pattern = rf"the prompt has {n_tokens} image tokens \(id 49152\) but {n_images} image\(s\) x 4 tokens each = {4 * n_images}"
    with pytest.raises(ValueError, match=pattern):
        tmodel(ids, images, mask)
    with pytest.raises(ValueError, match=pattern):
        jmodel(ids, images, mask)


# ---- datasets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found under {SMOLLM2}")
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import from_config

    cfg = tiny_cfg(max_img_size=32)
    return SampleEncoder.from_config(cfg, from_config(cfg, SMOLLM2))


def _llava(tmp_path, rows, name="d.json"):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name


def _row(q="What is it?", a="A square."):
    turns = [{"from": "human", "value": "<image>\n" + q}] + ([{"from": "gpt", "value": a}] if a is not None else [])
    return {"image": "a.png", "conversations": turns}


def test_empty_dataset(tmp_path, encoder):
    from jaxvlm.data import DataLoader, llava_dataset

    for name, text in (("empty.json", "[]"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: the dataset is empty"):
            llava_dataset(tmp_path / name, encoder)
    with pytest.raises(ValueError, match="the dataset is empty"):
        DataLoader([], 2)


def test_rows_without_answers(tmp_path, encoder):
    from jaxvlm.data import llava_dataset

    path = _llava(tmp_path, [_row(), _row(a=None), _row(a="   ")])
    with pytest.raises(ValueError, match=r"d\.json:1: no assistant answer"):
        llava_dataset(path, encoder)
    ds = llava_dataset(path, encoder, on_error="skip")
    assert (len(ds), ds.n_skipped) == (1, 2)
    only_bad = _llava(tmp_path, [_row(a=None), _row(a="")], "bad.json")
    with pytest.raises(ValueError, match=r"bad\.json: the dataset is empty \(2 invalid rows skipped\)"):
        llava_dataset(only_bad, encoder, on_error="skip")


def test_samples_beyond_the_context_are_skipped_or_raise(tmp_path, encoder):
    from jaxvlm.data import DataLoader, llava_dataset

    long_answer = " ".join(["word"] * 200)
    ds = llava_dataset(_llava(tmp_path, [_row(), _row(a=long_answer), _row(), _row(q=long_answer)]), encoder)
    lengths = [len(ds[i]["input_ids"]) for i in range(4)]
    assert lengths[0] <= 64 < min(lengths[1], lengths[3])
    loader = DataLoader(ds, 2, seq_buckets=(32, 64), shuffle=False, prefetch=0)
    batches = list(loader)
    assert loader.stats["too_long"] == 2 and loader.stats["blank_rows"] == 2
    for b in batches:
        assert b["input_ids"].shape[1] <= 64 and b["attention_mask"][1].sum() == 0 and np.all(b["labels"][1] == -100)
    with pytest.raises(ValueError, match=rf"sample 1 has {lengths[1]} tokens, more than the largest bucket 64"):
        list(DataLoader(ds, 2, seq_buckets=(32, 64), shuffle=False, prefetch=0, on_too_long="raise"))


def test_unreadable_images_in_a_dataset(tmp_path, encoder):
    from jaxvlm.data import SampleError, llava_dataset

    rows = [_row(), {**_row(), "image": "bomb.png"}, {**_row(), "image": "text.png"}, {**_row(), "image": "absent.png"}]
    path = _llava(tmp_path, rows)
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match=r"d\.json:3: image file not found: .*absent\.png"):
        llava_dataset(path, encoder)
    ds = llava_dataset(path, encoder, on_error="skip")
    assert len(ds) == 3
    with pytest.raises(
        SampleError, match=r"d\.json:1: image 0: .*bomb\.png: refusing to decode a possible decompression bomb"
    ):
        ds[1]
    with pytest.raises(SampleError, match=r"d\.json:2: image 0: .*text\.png: not an image file"):
        ds[2]
