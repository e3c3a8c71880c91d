"""The nanoVLM tokenizer against the real SmolLM2 tokenizer.json (docs/conventions.md, "Tokenizer and prompts")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conversion.config import CHATML_TEMPLATE, DEFAULT_EXTRA_TOKENS, LEGACY_EXTRA_TOKENS, VLMConfig
from jaxvlm.tokenizer import Tokenizer, from_config, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"

pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file(),
    reason=f"real SmolLM2 tokenizer not found at {SMOLLM2} (the shared data directory beside the repo)",
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(SMOLLM2)


def test_extra_token_ids_follow_the_base_vocabulary(tok):
    assert tok.base_vocab_size == 49152
    assert tok.vocab_size == 49152 + 66
    assert tok.image_token == "<|image|>" and tok.image_token_id == 49152
    ids = tok.extra_token_ids
    assert list(ids) == [name for name, _ in DEFAULT_EXTRA_TOKENS]
    assert ids["global_image_token"] == 49153
    assert ids["r1c1"] == 49154 and ids["r1c2"] == 49155 and ids["r2c1"] == 49162 and ids["r8c8"] == 49217
    for name, token in DEFAULT_EXTRA_TOKENS:
        assert tok.token_to_id(token) == ids[name], name
        assert tok.encode(token) == [ids[name]], name  # parsed as one special token
    assert tok.image_token_id == VLMConfig().image_token_id


def test_eos_and_pad_from_tokenizer_config(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_reference_chat_example(tok):
    messages = [{"role": "user", "content": "<|image|>" * 3 + "What is this?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == [1, 4093, 198, 49152, 49152, 49152, 1780, 314, 451, 47, 2, 198, 1, 520, 9531, 198]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n<|image|><|image|><|image|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    without = tok.apply_chat_template(messages)
    assert without == ids[:-4]


def test_chat_template_multi_turn_and_roles(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages) == tok.encode(text)
    assert tok.assistant_prefix_ids == [1, 520, 9531, 198]
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="strings"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_encode_decode_round_trip(tok):
    text = "A cat sat on 12 mats.\n<|image|><row_2_col_3> Ünïcödé ✓"
    ids = tok.encode(text)
    assert ids[0] != 1  # no BOS added
    assert 49152 in ids and tok.extra_token_ids["r2c3"] in ids
    assert tok.encode("12") == [33, 34]  # SmolLM2 splits digits
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|image|>", "").replace("<row_2_col_3>", "")
    import numpy as np

    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_path_may_be_the_file(tok):
    t = load_tokenizer(SMOLLM2 / "tokenizer.json")
    assert t.eos_token_id == 2  # the config files beside the file are still read
    assert t.encode("hello world") == tok.encode("hello world")


def test_eos_falls_back_to_endoftext_without_config(tmp_path):
    shutil.copy(SMOLLM2 / "tokenizer.json", tmp_path / "tokenizer.json")
    t = load_tokenizer(tmp_path)
    assert t.eos_token == "<|endoftext|>" and t.eos_token_id == 0 and t.pad_token_id == 0
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert load_tokenizer(tmp_path).eos_token_id == 2
    assert load_tokenizer(tmp_path, eos_token="<|im_start|>").eos_token_id == 1


def test_legacy_and_custom_extra_tokens():
    legacy = load_tokenizer(SMOLLM2, extra_tokens=dict(LEGACY_EXTRA_TOKENS))
    assert legacy.vocab_size == 49153 and legacy.image_token_id == 49152
    assert legacy.encode("<|global_image|>") != [49153]  # not a token here
    none = load_tokenizer(SMOLLM2, extra_tokens={})
    assert none.vocab_size == 49152
    with pytest.raises(ValueError, match="image_token"):
        _ = none.image_token_id
    custom = load_tokenizer(SMOLLM2, extra_tokens=[("image_token", "<img>"), ("other", "<other>")])
    assert custom.extra_token_ids == {"image_token": 49152, "other": 49153}


def test_extra_token_colliding_with_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="expected 49153"):
        load_tokenizer(SMOLLM2, extra_tokens={"image_token": "<|image|>", "oops": "<|im_end|>"})
    with pytest.raises(ValueError, match="duplicate"):
        load_tokenizer(SMOLLM2, extra_tokens=[("a", "<x>"), ("a", "<y>")])


def test_tokenizer_saved_with_the_extra_tokens_loads_to_the_same_ids(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.base_vocab_size == 49152 and again.vocab_size == tok.vocab_size
    assert again.extra_token_ids == tok.extra_token_ids


def test_chat_template_must_be_chatml():
    assert load_tokenizer(SMOLLM2, chat_template=CHATML_TEMPLATE).eos_token_id == 2
    with pytest.raises(ValueError, match="ChatML"):
        load_tokenizer(SMOLLM2, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer"):
        load_tokenizer(bad)
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=str(bad.name)):
        load_tokenizer(bad)


def test_from_config_checks_sizes():
    t = from_config(VLMConfig.tiny(), SMOLLM2)
    assert t.image_token_id == VLMConfig.tiny().image_token_id and t.vocab_size == 49218
    legacy = from_config(VLMConfig.nanovlm_222m(), SMOLLM2)
    assert legacy.vocab_size == 49153
    with pytest.raises(ValueError, match="lm_base_vocab_size"):
        from_config(VLMConfig.tiny(lm_base_vocab_size=50000, lm_vocab_size=50066), SMOLLM2)
