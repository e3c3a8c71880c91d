"""Bad checkpoint directories: each gives ONE clear `conversion.CheckpointError` (a ValueError)
whose message names the problem and the file, from both `torch_ref` and `jaxvlm`'s
`from_pretrained`: raised without a chained traceback, with nothing printed."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import tiny_cfg

import jaxvlm
import torch_ref
from conversion import CheckpointError, load_safetensors, save_safetensors

LOADERS = {
    "torch_ref": torch_ref.VisionLanguageModel.from_pretrained,
    "jaxvlm": jaxvlm.VisionLanguageModel.from_pretrained,
}


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    torch_ref.VisionLanguageModel(tiny_cfg()).save_pretrained(d)
    return d


def _edit_weights(d, fn):
    tensors, meta = load_safetensors(d / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    fn(tensors)
    save_safetensors(d / "model.safetensors", tensors, metadata=meta)


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _missing_key(d):
    _edit_weights(d, lambda t: t.pop("decoder.blocks.1.mlp.up_proj.weight"))


def _extra_key(d):
    _edit_weights(d, lambda t: t.__setitem__("decoder.blocks.2.attn.q_proj.weight", np.zeros((64, 64), np.float32)))


def _wrong_shape(d):
    _edit_weights(d, lambda t: t.__setitem__("MP.proj.weight", np.zeros((64, 128), np.float32)))


def _truncated(d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _garbage(d):
    (d / "model.safetensors").write_bytes(b"\x00" * 8 + b"not a header")


def _config_mismatch(d):
    _edit_config(d, lambda c: c.__setitem__("lm_hidden_dim", 96))


def _no_config(d):
    (d / "config.json").unlink()


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _invalid_json(d):
    (d / "config.json").write_text('{"vit_hidden_dim": 64,')


def _json_not_object(d):
    (d / "config.json").write_text("[1, 2, 3]")


def _unknown_field(d):
    _edit_config(d, lambda c: c.__setitem__("vit_use_magic", True))


def _inconsistent_config(d):
    _edit_config(d, lambda c: c.__setitem__("mp_image_token_length", 5))


def _no_directory(d):
    shutil.rmtree(d)


# (corruption, regexes the message must match: the problem and where it is)
CASES = {
    "missing_key": (
        _missing_key,
        [r"missing key\(s\): decoder\.blocks\.1\.mlp\.up_proj\.weight", r"model\.safetensors"],
    ),
    "extra_key": (
        _extra_key,
        [r"unexpected key\(s\): decoder\.blocks\.2\.attn\.q_proj\.weight", r"model\.safetensors"],
    ),
    "wrong_shape": (
        _wrong_shape,
        [r"MP\.proj\.weight has shape \(64, 128\), the config expects \(64, 256\)", r"model\.safetensors"],
    ),
    "truncated_file": (_truncated, [r"not a valid safetensors file", r"model\.safetensors"]),
    "garbage_file": (_garbage, [r"not a valid safetensors file", r"model\.safetensors"]),
    "config_does_not_match_weights": (
        _config_mismatch,
        [r"decoder\.norm\.weight has shape \(64,\), the config expects \(96,\)", r"config\.json"],
    ),
    "missing_config_json": (_no_config, [r"has no config\.json"]),
    "missing_model_safetensors": (_no_weights, [r"has no model\.safetensors"]),
    "invalid_json": (_invalid_json, [r"config\.json is not valid JSON"]),
    "json_not_an_object": (_json_not_object, [r"config\.json must hold a JSON object"]),
    "unknown_config_field": (_unknown_field, [r"unknown config field\(s\): vit_use_magic"]),
    "inconsistent_config": (_inconsistent_config, [r"mp_image_token_length 5"]),
    "no_directory": (_no_directory, [r"not found"]),
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_gives_one_clear_error(case, loader, good_dir, tmp_path, capsys):
    corrupt, patterns = CASES[case]
    d = tmp_path / "ckpt"
    shutil.copytree(good_dir, d)
    corrupt(d)
    with pytest.raises(CheckpointError) as info:
        LOADERS[loader](d)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", f"{case} [{loader}]: the loader printed {out!r}"
    err = info.value
    msg = str(err)
    print(f"{case} [{loader}]: {msg[:160]}")
    assert type(err) is CheckpointError and isinstance(err, ValueError)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{case} [{loader}]: message does not match {pattern!r}: {msg}"
    assert str(d) in msg, f"{case} [{loader}]: the message does not name the checkpoint: {msg}"
    # one error: no chained traceback ("During handling of the above exception ...")
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), f"{case}: chained exception"


def test_good_checkpoint_loads(good_dir):
    for load in LOADERS.values():
        assert load(good_dir).cfg == tiny_cfg()
