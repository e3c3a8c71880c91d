"""SmolVLM prompts and images against transformers' `Idefics3Processor`, built offline.

The reference is a real `Idefics3Processor`: the SmolLM2 tokenizer from ../shared with SmolVLM's
special tokens added (saved by transformers, so that our tokenizers-only loader reads the same
file), the PIL `Idefics3ImageProcessorPil` with small sizes (tile 64, longest edge 256) and
SmolVLM's real ones (512, 2048), and SmolVLM-Instruct's chat template. Images are COCO JPEGs,
some cropped to a tall and a wide strip. Ids and pixels must be identical (bit for bit, after
the model's (x - mean) / std in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conversion.config import VLMConfig, smolvlm_extra_tokens
from conversion.smolvlm import SMOLVLM_CHAT_TEMPLATE
from jaxvlm.data import SampleEncoder, llava_dataset
from jaxvlm.image_processing import load_image, processor_for
from jaxvlm.smolvlm_processing import (
    END_OF_UTTERANCE,
    SmolVLMImageProcessor,
    smolvlm_image_string,
)
from jaxvlm.tokenizer import SmolVLMTokenizer, check_fits, from_config, load_smolvlm_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
COCO = SHARED / "data" / "coco-mini" / "images"

pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not COCO.is_dir(),
    reason=f"real SmolLM2 tokenizer / COCO images not found under {SHARED / 'data'} (the shared directory beside the repo)",
)
transformers = pytest.importorskip("transformers", reason="transformers is the reference")

SMOLVLM_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
MEAN = STD = (0.5, 0.5, 0.5)  # SmolVLM's


def smolvlm_cfg(image_token_id: int, **overrides) -> VLMConfig:
    """A tiny SmolVLM-family config: tile 64 (8x8 patches of 8, shuffle 2 -> L = 16), longest edge 256."""
    base = dict(
        vlm_family="smolvlm",
        vlm_extra_tokens=smolvlm_extra_tokens(),
        vlm_image_token_id=image_token_id,
        vlm_image_mean=MEAN,
        vlm_image_std=STD,
        lm_vocab_size=49152 + len(SMOLVLM_TOKENS),
        vit_img_size=64,
        mp_image_token_length=16,
        max_img_size=256,
    )
    return VLMConfig.tiny(**{**base, **overrides})


# ---- the reference, built once -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(SMOLLM2)
    hf_tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SMOLVLM_TOKENS], special_tokens=True)
    hf_tok.eos_token = END_OF_UTTERANCE  # SmolVLM-Instruct's tokenizer_config.json
    out = tmp_path_factory.mktemp("smolvlm_tokenizer")
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> SmolVLMTokenizer:
    return load_smolvlm_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def cfg(tok) -> VLMConfig:
    return smolvlm_cfg(tok.token_to_id("<image>"))


def hf_processor(tok_dir: Path, tile: int, longest: int, splitting: bool, seq_len: int):
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    images = Idefics3ImageProcessorPil(
        size={"longest_edge": longest},
        max_image_size={"longest_edge": tile},
        do_image_splitting=splitting,
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    return Idefics3Processor(
        image_processor=images,
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        image_seq_len=seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def hf_small(tok_dir, cfg):
    return {s: hf_processor(tok_dir, 64, 256, s, cfg.n_image_tokens) for s in (True, False)}


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """Real photos in several aspect ratios (decoded by our loader, EXIF applied)."""
    landscape = load_image(COCO / "000000000790.jpg")  # 640 x 422
    portrait = load_image(COCO / "000000121647.jpg")  # 480 x 640
    return {
        "landscape": landscape,
        "portrait": portrait,
        "square": load_image(COCO / "000000165518.jpg"),  # 612 x 612
        "wide": landscape.crop((0, 150, 640, 230)),  # 640 x 80
        "tall": portrait.crop((200, 0, 260, 640)),  # 60 x 640
        "small": landscape.crop((300, 200, 341, 231)),  # 41 x 31, upscaled
    }


def normalised(tiles: np.ndarray) -> np.ndarray:
    """What the model does to our [0, 1] tiles: (x - mean) / std per channel, in float32."""
    mean = np.asarray(MEAN, np.float32)[None, :, None, None]
    std = np.asarray(STD, np.float32)[None, :, None, None]
    return (tiles - mean) / std


def hf_conversation(n_images: int, turns: list[tuple[str, str | None]]) -> list[dict]:
    """HF-style messages: the images at the start of the first user message, as our encoder puts them."""
    conv = []
    for k, (question, answer) in enumerate(turns):
        parts = [{"type": "image"}] * (n_images if k == 0 else 0) + [{"type": "text", "text": question}]
        conv.append({"role": "user", "content": parts})
        if answer is not None:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conv


def our_messages(turns: list[tuple[str, str | None]]) -> list[dict]:
    msgs = []
    for question, answer in turns:
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


# ---- images --------------------------------------------------------------------------------------
@pytest.mark.parametrize("splitting", [True, False])
def test_pixels_tile_order_and_grid_match_idefics3(hf_small, cfg, images, splitting):
    hf = hf_small[splitting].image_processor
    ours = SmolVLMImageProcessor.from_config(cfg.replace(vlm_image_splitting=splitting))
    for name, im in images.items():
        ref = hf(images=[im], return_row_col_info=True, return_tensors="np")
        rows, cols = ref["rows"][0][0], ref["cols"][0][0]
        tiles, grid = ours(im)
        assert grid == ((rows, cols) if rows else (1, 1)), name
        assert ours.grid(im.width, im.height) == grid and ours.num_tiles(im.width, im.height) == len(tiles), name
        assert len(tiles) <= ours.max_tiles
        want = ref["pixel_values"][0]
        assert tiles.dtype == np.float32 and tiles.shape == want.shape, (name, tiles.shape, want.shape)
        assert tiles.min() >= 0.0 and tiles.max() <= 1.0
        err = float(np.max(np.abs(normalised(tiles) - want)))
        assert np.array_equal(normalised(tiles), want), f"{name}: max|diff| {err:.2e}"


def test_one_tile_when_the_image_fits(tok_dir, cfg, images):
    """Splitting on, but a longest edge of one tile: Idefics3 gives rows = cols = 0, we (1, 1)."""
    hf = hf_processor(tok_dir, 64, 64, True, cfg.n_image_tokens).image_processor
    ours = SmolVLMImageProcessor(64, 64, splitting=True)
    for name in ("landscape", "tall"):
        ref = hf(images=[images[name]], return_row_col_info=True, return_tensors="np")
        tiles, grid = ours(images[name])
        assert (ref["rows"][0][0], ref["cols"][0][0]) == (0, 0) and grid == (1, 1) and tiles.shape == (1, 3, 64, 64)
        assert np.array_equal(normalised(tiles), ref["pixel_values"][0]), name


def test_real_smolvlm_sizes(tok_dir, images):
    """SmolVLM's 512-pixel tiles and 2048 longest edge, on a tall strip (8 x 2 -> 4 x 1 tiles) and a photo."""
    hf = hf_processor(tok_dir, 512, 2048, True, 64).image_processor
    ours = SmolVLMImageProcessor(512, 2048)
    assert ours.max_tiles == 17
    for name, want_grid in (("tall", (4, 1)), ("landscape", (3, 4))):
        ref = hf(images=[images[name]], return_row_col_info=True, return_tensors="np")
        tiles, grid = ours(images[name])
        assert grid == want_grid == (ref["rows"][0][0], ref["cols"][0][0]), name
        assert np.array_equal(normalised(tiles), ref["pixel_values"][0]), name


def test_alpha_is_composited_onto_white_like_transformers(hf_small, cfg, images):
    rgba = images["square"].convert("RGBA")
    alpha = np.zeros((rgba.height, rgba.width), np.uint8)
    alpha[:, rgba.width // 3 :] = 128
    rgba.putalpha(Image.fromarray(alpha))
    ours = SmolVLMImageProcessor.from_config(cfg)
    ref = hf_small[True].image_processor(images=[rgba], return_tensors="np")["pixel_values"][0]
    tiles, _ = ours(rgba)
    assert np.array_equal(normalised(tiles), ref)
    assert tiles[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # fully transparent -> white


# ---- text ----------------------------------------------------------------------------------------
def test_image_string_matches_the_processor(tok_dir, tok, cfg, hf_small, images):
    extra = cfg.extra_tokens
    L = cfg.n_image_tokens
    assert smolvlm_image_string([(1, 1)], L, extra) == (
        "<fake_token_around_image><global-img>" + "<image>" * L + "<fake_token_around_image>"
    )
    proc = SmolVLMImageProcessor.from_config(cfg)
    for splitting, name, grid in ((True, "landscape", (3, 4)), (True, "tall", (4, 1)), (False, "wide", (1, 1))):
        im = images[name]
        assert (proc.grid(im.width, im.height) if splitting else (1, 1)) == grid
        ref = hf_small[splitting](text=["<image>"], images=[[im]])["input_ids"][0]
        assert tok.encode(smolvlm_image_string([grid], L, extra)) == list(ref), name
    s = smolvlm_image_string([(1, 2)], 1, extra)
    assert s == (
        "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>"
    )
    with pytest.raises(ValueError, match="r7c1"):
        smolvlm_image_string([(7, 1)], 1, extra)


def test_chat_rendering_matches_the_jinja_template(tok, hf_small):
    proc = hf_small[True]
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Two dogs."}]},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"}]},
        ],
    ]
    for conv in conversations:
        for gen in (False, True):
            want = proc.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == want


CASES = [
    # (images, splitting, turns); a None answer is a generation prompt
    (["landscape"], True, [("What is in the picture?", None)]),
    (["wide"], True, [("Describe it.", "A street.")]),
    (["tall", "square"], True, [("Compare them.", "One is tall."), ("Which is square?", "The second.")]),
    (["portrait", "wide", "small"], True, [("Three pictures: what changes?", None)]),
    (["tall", "landscape"], False, [("Count the images.", "2"), ("Sure?", "Yes, 2 images.")]),
    ([], True, [("No image, just text.", "Fine."), ("Bye", None)]),
]


@pytest.mark.parametrize("names, splitting, turns", CASES)
def test_input_ids_and_pixels_match_the_processor(tok, cfg, hf_small, images, names, splitting, turns):
    proc = hf_small[splitting]
    enc = SampleEncoder.from_config(cfg.replace(vlm_image_splitting=splitting), tok)
    ims = [images[n] for n in names]
    generate = turns[-1][1] is None
    text = proc.apply_chat_template(hf_conversation(len(ims), turns), add_generation_prompt=generate, tokenize=False)
    ref = proc(text=[text], images=[ims] if ims else None, return_tensors="np")
    msgs = our_messages(turns)
    sample = enc.encode_prompt(ims, msgs) if generate else enc.encode(ims, msgs)
    assert sample["input_ids"].tolist() == ref["input_ids"][0].tolist()
    if ims:
        assert np.array_equal(normalised(sample["images"]), ref["pixel_values"][0])
    grids = [enc.image_processor.grid(im.width, im.height) for im in ims]
    assert sample["grids"] == grids
    if not generate:
        assert enc.num_tokens(grids, msgs) == len(sample["input_ids"])


def test_dataset_loss_mask_covers_exactly_the_answers(tmp_path, tok, cfg):
    rows = [
        {
            "image": [str(COCO / "000000000790.jpg"), str(COCO / "000000121647.jpg")],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat is on the table?"},
                {"from": "gpt", "value": "A cake."},
                {"from": "human", "value": "Anything else?"},
                {"from": "gpt", "value": "No, nothing 2 see."},
            ],
        }
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    ds = llava_dataset(tmp_path / "data.json", SampleEncoder.from_config(cfg, tok))
    s = ds[0]
    ids, labels = s["input_ids"], s["labels"]
    trained = labels != -100
    eou = tok.token_to_id(END_OF_UTTERANCE)
    want = tok.encode(" A cake.") + [eou] + tok.encode(" No, nothing 2 see.") + [eou]
    assert labels[trained].tolist() == want
    assert np.array_equal(labels[:-1][trained[:-1]], ids[1:][trained[:-1]])  # labels are the next tokens
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>User:<fake_token_around_image><row_1_col_1>")
    assert text.endswith("Assistant: No, nothing 2 see.<end_of_utterance>\n")
    assert tok.decode(labels[trained]) == " A cake.<end_of_utterance> No, nothing 2 see.<end_of_utterance>"
    assert ds.sample_shape(0) == (len(ids), s["images"].shape[0])
    assert int(np.sum(ids == cfg.image_token_id)) == s["images"].shape[0] * cfg.n_image_tokens


# ---- the tokenizer -------------------------------------------------------------------------------
def test_tokenizer_for_the_smolvlm_family(tok_dir, tok, cfg):
    t = from_config(cfg, tok_dir)
    assert isinstance(t, SmolVLMTokenizer) and t.family == "smolvlm"
    assert t.eos_token == END_OF_UTTERANCE and t.eos_token_id == t.pad_token_id == t.token_to_id(END_OF_UTTERANCE)
    assert t.image_token == "<image>" and t.image_token_id == cfg.image_token_id
    assert t.extra_token_ids["r6c6"] == t.token_to_id("<row_6_col_6>")
    assert t.vocab_size == 49152 + len(SMOLVLM_TOKENS)
    assert t.assistant_prefix_ids == t.encode("Assistant:")
    assert t.decode(t.encode("<global-img>Hi")) == "<global-img>Hi"
    assert isinstance(processor_for(cfg), SmolVLMImageProcessor)
    with pytest.raises(ValueError, match="image token id"):
        check_fits(cfg.replace(vlm_image_token_id=cfg.image_token_id + 1), t)
    with pytest.raises(ValueError, match="do not fit"):
        check_fits(cfg.replace(lm_vocab_size=49160, vlm_image_token_id=5), t)
    with pytest.raises(ValueError, match="nanovlm tokenizer for a smolvlm model"):
        from jaxvlm.tokenizer import load_tokenizer

        check_fits(cfg, load_tokenizer(SMOLLM2))


def test_a_plain_smollm2_tokenizer_is_refused_naming_the_missing_tokens(cfg):
    with pytest.raises(ValueError, match=r"image_token='<image>'.*global_image_token.*'<end_of_utterance>'"):
        from_config(cfg, SMOLLM2)
