"""The two command lines on bad input: one line on stderr and exit 2 (a traceback only with
--debug); a training run whose loss turns NaN stops with one line and keeps its last good
checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    SMOLLM2,
    needs_tokenizer,
    run_cli,
    tiny_cfg,
    truncate,
)
from test_bad_input_hf import LANGUAGE, write_hf

import torch_ref
from conversion.hf import _language_expected


# ---- the command lines ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch_ref.VisionLanguageModel(tiny_cfg(lm_max_length=64)).save_pretrained(d)
    if (SMOLLM2 / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(SMOLLM2 / name, d / name)
    return d


def _cli_cases(tiny_dir: Path, tmp: Path):
    broken = tmp / "broken"
    shutil.copytree(tiny_dir, broken)
    truncate(broken / "model.safetensors")
    mismatch = tmp / "mismatch"
    shutil.copytree(tiny_dir, mismatch)
    c = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**c, "lm_inter_dim": 96}))
    no_tok = tmp / "no_tokenizer"
    shutil.copytree(tiny_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    llama = write_hf(tmp / "llama", LANGUAGE, _language_expected(LANGUAGE))
    return {  # name: (argv, regex for the one line, paths that must not appear)
        "conversion to-jax truncated": (
            ["-m", "conversion", "to-jax", str(broken), str(tmp / "o1")],
            r"^error: .*broken/model\.safetensors is not a valid safetensors file",
            [tmp / "o1"],
        ),
        "conversion check config mismatch": (
            ["-m", "conversion", "check", str(mismatch)],
            r"^error: .*mlp\.gate_proj\.weight has shape \(160, 64\), the config expects \(96, 64\)",
            [],
        ),
        "conversion from-hf swapped directories": (
            ["-m", "conversion", "from-hf", "--vision", str(llama), "--language", str(llama), "--out", str(tmp / "o2")],
            r"^error: .*llama/config\.json: unsupported vision model_type 'llama'",
            [tmp / "o2"],
        ),
        "conversion from-hf no directory": (
            [
                "-m",
                "conversion",
                "from-hf",
                "--vision",
                str(tmp / "nope"),
                "--language",
                str(llama),
                "--out",
                str(tmp / "o3"),
            ],
            r"^error: vision backbone directory not found: .*nope$",
            [tmp / "o3"],
        ),
        "jaxvlm train bad init": (
            [
                "-m",
                "jaxvlm",
                "train",
                "--init-from",
                str(mismatch),
                "--output-dir",
                str(tmp / "run1"),
                "--tokenizer",
                str(SMOLLM2),
            ],
            r"^error: .*mismatch/model\.safetensors .*lm_inter_dim|^error: .*shape \(160, 64\)",
            [],
        ),
        "jaxvlm train no tokenizer": (
            ["-m", "jaxvlm", "train", "--init-from", str(no_tok), "--output-dir", str(tmp / "run2")],
            r"^error: no tokenizer: pass --tokenizer",
            [],
        ),
        "jaxvlm generate no tokenizer": (
            ["-m", "jaxvlm", "generate", "--model", str(no_tok), "--prompt", "hi"],
            r"^error: no tokenizer\.json in directory .*no_tokenizer$",
            [],
        ),
        "jaxvlm eval missing model": (
            ["-m", "jaxvlm", "eval", "--model", str(tmp / "absent")],
            r"^error: checkpoint directory not found: .*absent$",
            [],
        ),
        "jaxvlm generate too long": (
            ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "100"],
            r"^error: prompt length \d+ \+ max_new_tokens 100 = \d+ exceeds the model context lm_max_length = 64$",
            [],
        ),
        "jaxvlm generate corrupt image": (
            ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--image", str(tmp / "text.png")],
            r"^error: .*text\.png: not an image file",
            [],
        ),
    }


@pytest.mark.slow
@needs_tokenizer
def test_command_lines_print_one_line(tiny_dir, tmp_path):
    (tmp_path / "text.png").write_text("not a picture")
    for name, (argv, pattern, absent) in _cli_cases(tiny_dir, tmp_path).items():
        code, out, err = run_cli(*argv)
        print(f"{name}: exit {code}: {err}")
        assert code == 2, f"{name}: exit code {code}, stderr {err}"
        assert len(err) == 1, f"{name}: expected one line on stderr, got {len(err)}:\n" + "\n".join(err)
        assert __import__("re").search(pattern, err[0]), f"{name}: {pattern!r} does not match {err[0]!r}"
        assert "Traceback" not in out + err[0]
        for p in absent:
            assert not p.exists(), f"{name}: {p} was written"
    code, _, err = run_cli("-m", "jaxvlm", "--debug", "eval", "--model", str(tmp_path / "absent"))
    assert code != 0 and err[0].startswith("Traceback") and "CheckpointError" in err[-1]
    code, _, err = run_cli("-m", "conversion", "--debug", "to-jax", str(tmp_path / "absent"), str(tmp_path / "o"))
    assert code != 0 and err[0].startswith("Traceback") and "CheckpointError" in err[-1]


# ---- training runs that go wrong ------------------------------------------------------------
TRAIN = [
    "-m",
    "jaxvlm",
    "train",
    "--tokenizer",
    str(SMOLLM2),
    "--steps",
    "5",
    "--batch-size",
    "4",
    "--synthetic-size",
    "64",
    "--save-every",
    "1",
    "--log-every",
    "1",
    "--max-length",
    "128",
    "--keep",
    "3",
]


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


@pytest.mark.slow
@needs_tokenizer
def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, jax_cache):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        *TRAIN,
        "--output-dir",
        str(out),
        "--lr-mp",
        "1e6",
        "--lr-language-backbone",
        "1e6",
        "--lr-vision-backbone",
        "1e6",
        env=jax_cache,
    )
    print(err)
    assert code == 2 and len(err) == 1, err
    m = __import__("re").match(
        r"^error: loss is (nan|inf|-inf) at step (\d+); stopped\. Last good checkpoint: (.*)$", err[0]
    )
    assert m, err[0]
    bad_step, good = int(m.group(2)), Path(m.group(3))
    assert checkpoint_steps(out / "checkpoints") == list(range(max(1, bad_step - 3), bad_step)), (
        "a checkpoint after the bad step"
    )
    assert good == out / "checkpoints" / str(bad_step - 1)
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        params = c.restore(good.absolute() / "state")["params"]
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), "the kept checkpoint is not finite"
