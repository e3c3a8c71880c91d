"""The promises of the README's "Promises" section, one class of fault at a time: no command
destroys or overwrites a user's file; a non-finite model is never saved or exported; loading
is strict; bad input is one line and exit 2, refused before anything is allocated or written.

Data-loss cases compare the bytes of every user file before and after (`snapshot`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, SMOLLM2, needs_tokenizer, run_cli, snapshot, tiny_cfg

import torch_ref
from conversion import CheckpointError, read_checkpoint, save_safetensors, write_checkpoint
from conversion.config import VLMConfig
from conversion.generation import check_generation_args

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch_ref.VisionLanguageModel(tiny_cfg(lm_max_length=64)).save_pretrained(d)
    if (SMOLLM2 / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            (d / name).write_bytes((SMOLLM2 / name).read_bytes())
    return d


def one_error_line(code: int, err: list[str], *patterns: str) -> str:
    assert code == 2, f"exit {code}, stderr: {err[-5:]}"
    assert len(err) == 1 and err[0].startswith("error: "), err[-5:]
    for p in patterns:
        assert p in err[0], (p, err[0])
    return err[0]


def user_dir(tmp_path: Path) -> Path:
    """A directory of the user's files with the names a run writes."""
    d = tmp_path / "mine"
    (d / "model").mkdir(parents=True)
    for name, text in {"summary.json": "{}", "run_config.json": '{"mine": 1}', "loss_curve.png": "png",
                       "metrics.jsonl": '{"step": 1}\n', "model/config.json": "{}", "notes.txt": "keep"}.items():  # fmt: skip
        (d / name).write_text(text)
    return d


# ---- data loss: generate --batch ------------------------------------------------------------------
def _batch_file(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@needs_tokenizer
def test_generate_out_equal_to_batch_is_refused(tiny_dir, tmp_path):
    batch = _batch_file(tmp_path, [{"prompt": "hi"}])
    before = batch.read_bytes()
    for out in (batch, tmp_path / "." / "prompts.jsonl"):
        code, _, err = run_cli("-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--batch", str(batch),
                               "--out", str(out), "--greedy", "--max-new-tokens", "2", "--overwrite")  # fmt: skip
        one_error_line(code, err, "is also an input")
        assert batch.read_bytes() == before


@needs_tokenizer
def test_generate_never_replaces_an_existing_out_without_overwrite(tiny_dir, tmp_path):
    batch = _batch_file(tmp_path, [{"prompt": "hi"}])
    out = tmp_path / "answers.jsonl"
    out.write_text("the user's answers\n")
    code, _, err = run_cli("-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--batch", str(batch),
                           "--out", str(out), "--greedy", "--max-new-tokens", "2")  # fmt: skip
    one_error_line(code, err, "already exists", "--overwrite")
    assert out.read_text() == "the user's answers\n"


@needs_tokenizer
def test_generate_failing_row_leaves_out_untouched(tiny_dir, tmp_path):
    """Row 3 names a missing image: exit 2 naming the row; an existing OUT (with --overwrite)
    keeps its bytes, a new OUT never appears, and no temporary file is left behind."""
    batch = _batch_file(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "images": ["nope.jpg"]}])
    for existing in (True, False):
        out = tmp_path / f"answers-{existing}.jsonl"
        if existing:
            out.write_text("old\n")
        code, _, err = run_cli("-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--batch", str(batch),
                               "--out", str(out), "--greedy", "--max-new-tokens", "2", "--batch-size", "2",
                               "--overwrite")  # fmt: skip
        one_error_line(code, err, "prompts.jsonl:3")
        assert (out.read_text() == "old\n") if existing else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers-True.jsonl", "prompts.jsonl"]


@pytest.mark.parametrize("images", [[5], None, "a.jpg", {"x": 1}])
def test_generate_batch_row_images_must_be_a_list_of_paths(images, tmp_path):
    from cli.generate import _batch_rows

    batch = _batch_file(tmp_path, [{"prompt": "a"}, {"prompt": "b", "images": images}])
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: 'images' must be a list of image paths"):
        _batch_rows(batch)


# ---- data loss: training output directories --------------------------------------------------------
def _run(out: Path, **kw):
    from jaxvlm.train_loop import RunConfig

    base = dict(output_dir=str(out), tokenizer=str(SMOLLM2), steps=3, batch_size=4, synthetic_size=32,
                save_every=1, log_every=1, max_length=128, keep=3, seed=1)  # fmt: skip
    return RunConfig(**{**base, **kw})


@needs_tokenizer
def test_train_refuses_a_directory_that_is_not_a_run(tmp_path):
    from jaxvlm.train_loop import train

    d = user_dir(tmp_path)
    before = snapshot(d)
    for resume in (False, True):
        with pytest.raises((FileExistsError, ValueError), match="not a jaxvlm run directory"):
            train(_run(d, resume=resume))
        assert snapshot(d) == before


@pytest.mark.slow
@needs_tokenizer
def test_train_refuses_another_run_and_a_held_lock(tmp_path):
    """A finished run's directory: a new run without --resume is refused (its files unchanged),
    a failed --resume (other model settings) leaves run_config.json as it was, and a directory
    that a live run holds is refused, naming that process."""
    from jaxvlm.run_directory import open_run_directory
    from jaxvlm.train_loop import train

    out = tmp_path / "run"
    train(_run(out))
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="holds a jaxvlm run: pass --resume"):
        train(_run(out))
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="no checkpoint can be restored"):
        train(_run(out, resume=True, steps=5, model={"lm_n_blocks": 3}))
    assert snapshot(out) == before
    held = open_run_directory(out, resume=True, overwrite=False)
    try:
        with pytest.raises(BlockingIOError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            train(_run(out, resume=True, steps=5))
    finally:
        held.close()
    assert snapshot(out) == before
    summary = train(_run(out, overwrite=True, steps=2))  # start over: the previous run's outputs replaced
    assert summary["steps"] == 2 and sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [1, 2]


@pytest.mark.slow
@needs_tokenizer
def test_train_overwrite_into_a_users_directory_touches_only_run_files(tmp_path):
    from jaxvlm.train_loop import train

    d = user_dir(tmp_path)
    train(_run(d, overwrite=True, steps=1))
    assert (d / "notes.txt").read_text() == "keep"
    assert json.loads((d / "run_config.json").read_text())["steps"] == 1
    assert (d / "model" / "model.safetensors").is_file() and (d / ".jaxvlm-run").is_file()


# ---- broken models are never saved as good ---------------------------------------------------------
@pytest.mark.slow
@needs_tokenizer
def test_a_diverging_run_saves_no_non_finite_checkpoint_and_exports_nothing(tmp_path):
    """A learning rate of 1e30 makes the projector's parameters non-finite (the loss can still
    be finite at that step): the run stops naming the step, before writing that checkpoint;
    every checkpoint on disk is finite, and no model/ is exported."""
    from jaxvlm.train_loop import train

    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"(not finite after step \d|loss is nan|gradient norm is)"):
        train(_run(out, lr_mp=1e30, steps=4))
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    for step_dir in (out / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            tree = ocp.StandardCheckpointer().restore(step_dir / "state")
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree["params"]))


def test_write_checkpoint_refuses_non_finite_weights(tmp_path):
    cfg = tiny_cfg()
    tensors = {k: v.detach().numpy() for k, v in torch_ref.VisionLanguageModel(cfg).checkpoint_state().items()}
    tensors["MP.proj.weight"] = np.full_like(tensors["MP.proj.weight"], np.nan)
    with pytest.raises(CheckpointError, match="MP.proj.weight' has .* non-finite"):
        write_checkpoint(tmp_path / "out", cfg, tensors)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- strict loading ---------------------------------------------------------------------------------
def _saved(tmp_path: Path, cfg=None) -> tuple[Path, dict]:
    cfg = cfg or tiny_cfg()
    d = tmp_path / "ckpt"
    torch_ref.VisionLanguageModel(cfg).save_pretrained(d)
    return d, read_checkpoint(d)[1]


def test_a_relabelled_dtype_is_refused(tmp_path):
    """F32 bytes relabelled I32 in the header (same byte count): refused, not cast."""
    d, tensors = _saved(tmp_path)
    tensors = dict(tensors)
    tensors["MP.proj.weight"] = tensors["MP.proj.weight"].view(np.int32)
    save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    for load in (read_checkpoint, torch_ref.VisionLanguageModel.from_pretrained):
        with pytest.raises(CheckpointError, match="MP.proj.weight' has dtype int32"):
            load(d)


def test_nan_weights_are_refused_on_loading(tmp_path):
    import jaxvlm

    d, tensors = _saved(tmp_path)
    tensors = dict(tensors)
    tensors["decoder.norm.weight"] = np.full_like(tensors["decoder.norm.weight"], np.nan)
    save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    for load in (
        read_checkpoint,
        jaxvlm.VisionLanguageModel.from_pretrained,
        torch_ref.VisionLanguageModel.from_pretrained,
    ):
        with pytest.raises(CheckpointError, match="decoder.norm.weight' has 64 non-finite value"):
            load(d)


@needs_tokenizer
def test_a_tokenizer_that_does_not_fit_the_model_is_refused():
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import load_tokenizer

    small = tiny_cfg(lm_base_vocab_size=100, lm_vocab_size=166)
    tok = load_tokenizer(SMOLLM2, extra_tokens=small.extra_tokens)
    with pytest.raises(ValueError, match="base vocabulary 49152 != the model's lm_base_vocab_size 100"):
        SampleEncoder.from_config(small, tok)
    big_base = tiny_cfg(lm_vocab_size=49152 + 66)
    with pytest.raises(ValueError, match="do not fit the model's lm_vocab_size"):
        SampleEncoder.from_config(
            big_base, load_tokenizer(SMOLLM2, extra_tokens=dict(big_base.extra_tokens, more="<more>"))
        )


@pytest.mark.slow
@needs_tokenizer
def test_resume_skips_a_corrupt_latest_checkpoint(tmp_path, capsys):
    from jaxvlm.train_loop import train

    out = tmp_path / "run"
    train(_run(out, steps=3, stop_after=2))  # checkpoints 1 and 2
    for f in (out / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])
    summary = train(_run(out, steps=3, resume=True))
    err = capsys.readouterr().err
    assert "checkpoints/2 (" in err and "cannot be restored; resuming from step 1" in err
    assert summary["steps"] == 3


@needs_tokenizer
def test_every_sample_too_long_is_a_clear_error(tmp_path):
    """Every synthetic sample is longer than --max-length 16: the run says so and stops at step 1
    (not "loss is nan"), writing no checkpoint."""
    from jaxvlm.train_loop import train

    with pytest.raises(
        ValueError,
        match=r"step 1: no sample in the batch has a token to train on; \d+ sample\(s\) longer than --max-length 16 skipped",
    ):
        train(_run(tmp_path / "run", max_length=16))
    assert not any((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_text_files_that_are_not_utf8_name_the_file(tmp_path):
    from cli.generate import _batch_rows
    from jaxvlm.data import llava_dataset

    bad = tmp_path / "rows.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"rows.jsonl: not UTF-8 text"):
        _batch_rows(bad)
    with pytest.raises(ValueError, match=r"rows.jsonl: not UTF-8 text"):
        llava_dataset(bad, encoder=None)
    (tmp_path / "config.json").write_bytes('{"vit_model_type": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config.json: not UTF-8 text"):
        VLMConfig.from_json(tmp_path / "config.json")


# ---- one line, exit 2: validated in one place --------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lm_hidden_dim", 64.0, "lm_hidden_dim 64.0: must be an integer"),
        ("lm_n_blocks", 2.5, "lm_n_blocks 2.5: must be an integer"),
        ("vit_patch_size", 0, "vit_patch_size 0 must be >= 1"),
        ("vit_n_heads", 0, "vit_n_heads 0 must be >= 1"),
        ("lm_rms_eps", -1e-5, "lm_rms_eps -1e-05 must be >= 1e-12"),
        ("lm_tie_weights", "false", "lm_tie_weights 'false': must be true or false"),
        ("lm_vocab_size", 30_000_000, "lm_vocab_size 30000000 must be <= 1,048,576"),
        ("vit_img_size", 100_000, "vit_img_size 100000 must be <= 4,096"),
        ("lm_re_base", float("nan"), "lm_re_base nan: must be finite"),
    ],
)
def test_config_fields_are_checked(field, value, message, tmp_path):
    d = dict(tiny_cfg().to_dict(), **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as info:
        VLMConfig.from_json(tmp_path / "config.json")
    assert message in str(info.value) and str(tmp_path / "config.json") in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": -5}, "steps -5 must be >= 1"),
        ({"lr_mp": float("nan")}, "lr_mp nan: must be finite"),
        ({"lr_mp": float("inf")}, "lr_mp inf: must be finite"),
        ({"keep": 0}, "keep 0 must be >= 1"),
        ({"save_every": 0}, "save_every 0 must be >= 1"),
        ({"log_every": 0}, "log_every 0 must be >= 1"),
        ({"resume": "false"}, "resume 'false': must be true or false"),
        ({"dtype": "float16"}, "dtype 'float16': choose one of float32, bfloat16"),
        ({"model": {"nosuch": 1}}, "unknown VLMConfig field(s) nosuch"),
        ({"mesh_fsdp": 0}, "mesh_fsdp 0"),
    ],
)
def test_run_settings_are_checked(change, message):
    from jaxvlm.train_loop import RunConfig

    with pytest.raises(ValueError) as info:
        RunConfig(**change)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=float("inf")), dict(temperature=float("nan")), dict(temperature=0.0)]
)
def test_sampling_temperature_must_be_finite_and_positive(kwargs):
    args = dict(greedy=False, temperature=0.5, top_k=5, top_p=0.9) | kwargs
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_generation_args(tiny_cfg(), 4, 4, **args)


@pytest.mark.slow
@needs_tokenizer
def test_command_lines_refuse_bad_settings_with_one_line(tiny_dir, tmp_path):
    out = str(tmp_path / "never")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes('{"steps": 1, "preset": "caf\xe9"}'.encode("latin-1"))
    train = ("-m", "jaxvlm", "train", "--tokenizer", str(SMOLLM2), "--output-dir", out)
    cases = [
        (train + ("--save-every", "0"), "save_every 0 must be >= 1"),
        (train + ("--log-every", "0"), "log_every 0 must be >= 1"),
        (train + ("--keep", "0"), "keep 0 must be >= 1"),
        (train + ("--steps", "-5"), "steps -5 must be >= 1"),
        (train + ("--lr-mp", "nan"), "lr_mp nan: must be finite"),
        (train + ("--model", "nosuch=1"), "unknown VLMConfig field(s) nosuch"),
        (train + ("--model", "vit_img_size=abc"), "vit_img_size 'abc': must be an integer"),
        (train + ("--dtype", "float16"), "choose one of float32, bfloat16"),
        (train + ("--config", str(tmp_path / "list.json")), "must hold a JSON object, got a list"),
        (train + ("--config", str(tmp_path / "latin1.json")), "latin1.json: not UTF-8 text"),
        (("-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--temperature", "inf",
          "--max-new-tokens", "4"),
         "temperature must be a finite number > 0"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run_cli(*args)
        one_error_line(code, err, message)
    assert not Path(out).exists()
    # a user's directory as --output-dir, and a model directory whose config.json is bad
    mine = user_dir(tmp_path)
    before = snapshot(mine)
    code, _, err = run_cli("-m", "jaxvlm", "train", "--tokenizer", str(SMOLLM2), "--output-dir", str(mine))
    one_error_line(code, err, "is not a jaxvlm run directory", "--overwrite")
    assert snapshot(mine) == before
    bad = tmp_path / "bad_model"
    bad.mkdir()
    for f in tiny_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(
        json.dumps(dict(json.loads((tiny_dir / "config.json").read_text()), lm_hidden_dim=64.0))
    )
    code, _, err = run_cli("-m", "jaxvlm", "generate", "--model", str(bad), "--prompt", "hi", "--greedy")
    one_error_line(code, err, "config.json", "lm_hidden_dim 64.0: must be an integer")
    code, _, err = run_cli(*train, "--model", "lm_vocab_size=30000000")
    one_error_line(code, err, "lm_vocab_size 30000000 must be <= 1,048,576")
    picture = tmp_path / "mine.png"
    picture.write_bytes(b"the user's picture")
    code, _, err = run_cli("-m", "jaxvlm", "synthetic", "--model", str(tiny_dir), "--out", str(picture))
    one_error_line(code, err, "already exists", "--overwrite")
    assert picture.read_bytes() == b"the user's picture"


def test_broken_orbax_directory_is_one_line(tiny_dir, tmp_path):
    code, _, err = run_cli("-m", "conversion", "to-jax", str(tiny_dir), str(tmp_path / "orbax"))
    assert code == 0, err
    for f in (tmp_path / "orbax" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    for args in (("to-torch", str(tmp_path / "orbax"), str(tmp_path / "back")), ("check", str(tmp_path / "orbax"))):
        code, _, err = run_cli("-m", "conversion", *args)
        one_error_line(code, err, "cannot restore")
    assert not (tmp_path / "back").exists()


# ---- outputs are complete or absent, even under SIGKILL -------------------------------------------------
def _kill_at_random(args: list[str], delays: list[float], check) -> None:
    """Start `python -m ...args` and SIGKILL it after each delay; `check()` after each death."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in delays:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check()


@pytest.mark.slow
@needs_tokenizer
def test_sigkill_never_leaves_a_partial_generate_out(tiny_dir, tmp_path):
    batch = _batch_file(tmp_path, [{"prompt": f"question {i}"} for i in range(24)])
    out = tmp_path / "answers.jsonl"

    def check():
        if out.exists():  # complete: every row, each with an answer
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(rows) == 24 and all("answer" in r for r in rows)
            out.unlink()

    args = ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--batch", str(batch), "--out", str(out),
            "--greedy", "--max-new-tokens", "8", "--batch-size", "4"]  # fmt: skip
    _kill_at_random(args, list(np.random.default_rng(0).uniform(2.0, 12.0, 4)), check)


@pytest.mark.slow
def test_sigkill_never_leaves_a_partial_conversion(tiny_dir, tmp_path):
    dst = tmp_path / "orbax"

    def check():
        if dst.exists():  # complete: it converts back
            code, _, err = run_cli("-m", "conversion", "to-torch", str(dst), str(tmp_path / "back"))
            assert code == 0, err
            assert snapshot(tmp_path / "back")["model.safetensors"] == (tiny_dir / "model.safetensors").read_bytes()
            shutil.rmtree(dst)
            shutil.rmtree(tmp_path / "back")

    args = ["-m", "conversion", "to-jax", str(tiny_dir), str(dst)]
    _kill_at_random(args, list(np.random.default_rng(1).uniform(1.0, 8.0, 4)), check)


# ---- the same faults through the command lines: one line, exit 2, the user's files unchanged ---------
def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
@needs_tokenizer
def test_strict_loading_through_the_command_lines(tiny_dir, tmp_path):
    """Each loading fault of the in-process tests above, given to `jaxvlm generate` and `python -m
    conversion`: exit 2, one line naming the tensor, field or file; no output written."""
    relabelled = _copy_dir(tiny_dir, tmp_path / "relabelled")
    tensors = dict(read_checkpoint(relabelled)[1])
    tensors["MP.proj.weight"] = tensors["MP.proj.weight"].view(np.int32)
    save_safetensors(relabelled / "model.safetensors", tensors, metadata={"format": "pt"})
    nan = _copy_dir(tiny_dir, tmp_path / "nan")
    tensors = dict(read_checkpoint(nan)[1])
    tensors["decoder.norm.weight"] = np.full_like(tensors["decoder.norm.weight"], np.nan)
    save_safetensors(nan / "model.safetensors", tensors, metadata={"format": "pt"})
    config = json.loads((tiny_dir / "config.json").read_text())
    bad_configs = {"lm_rms_eps": (-1e-5, "lm_rms_eps -1e-05 must be >= 1e-12"),
                   "lm_tie_weights": ("false", "lm_tie_weights 'false': must be true or false")}  # fmt: skip
    for field, (value, _) in bad_configs.items():
        d = _copy_dir(tiny_dir, tmp_path / field)
        (d / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    small_vocab = tmp_path / "small_vocab"  # a 166-token model beside the 49,152-token SmolLM2 tokenizer
    torch_ref.VisionLanguageModel(tiny_cfg(lm_base_vocab_size=100, lm_vocab_size=166)).save_pretrained(small_vocab)
    for name in TOKENIZER_FILES:
        shutil.copy(SMOLLM2 / name, small_vocab / name)
    generate = ("-m", "jaxvlm", "generate", "--prompt", "hi", "--greedy", "--max-new-tokens", "2", "--model")
    cases = [
        (generate + (str(relabelled),), ("MP.proj.weight' has dtype int32",)),
        (("-m", "conversion", "to-jax", str(relabelled), str(tmp_path / "out")), ("MP.proj.weight' has dtype int32",)),
        (generate + (str(nan),), ("decoder.norm.weight' has 64 non-finite value",)),
        (("-m", "conversion", "check", str(nan)), ("decoder.norm.weight' has 64 non-finite value",)),
        (generate + (str(small_vocab),), ("base vocabulary 49152 != the model's lm_base_vocab_size 100",)),
        *[(generate + (str(tmp_path / f),), ("config.json", m)) for f, (_, m) in bad_configs.items()],
    ]
    for args, patterns in cases:
        code, out, err = run_cli(*args)
        one_error_line(code, err, *patterns)
        assert out == "", out
    assert not (tmp_path / "out").exists()
    batch = _batch_file(tmp_path, [{"prompt": "a"}, {"prompt": "b", "images": [5]}])
    answers = tmp_path / "answers.jsonl"
    code, _, err = run_cli("-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--batch", str(batch),
                           "--out", str(answers), "--greedy")  # fmt: skip
    one_error_line(code, err, "prompts.jsonl:2: 'images' must be a list of image paths")
    assert not answers.exists()


def _files(run_dir: Path) -> dict[str, bytes]:
    """The run directory's bytes, but the lock file (it holds the pid of the last process to lock)."""
    return {k: v for k, v in snapshot(run_dir).items() if k != ".jaxvlm-run.lock"}


@pytest.mark.slow
@needs_tokenizer
def test_run_directory_faults_through_the_command_line(tmp_path, jax_cache):
    """`jaxvlm train` on a run directory: a failed --resume, a directory held by a live run, and a
    corrupt latest checkpoint, as a user meets them: exit code, one line, every file's bytes."""
    from jaxvlm.run_directory import open_run_directory

    out = tmp_path / "run"
    train = ("-m", "jaxvlm", "train", "--tokenizer", str(SMOLLM2), "--output-dir", str(out), "--steps", "3",
             "--batch-size", "4", "--synthetic-size", "32", "--save-every", "1", "--max-length", "128", "--seed", "1")  # fmt: skip
    code, _, err = run_cli(*train, "--stop-after", "2", env=jax_cache)  # checkpoints 1 and 2
    assert code == 0, err[-5:]
    before = _files(out)
    code, _, err = run_cli(*train, "--resume", "--model", "lm_n_blocks=3", env=jax_cache)
    one_error_line(code, err, "--resume: no checkpoint can be restored")
    assert _files(out) == before  # run_config.json keeps the settings of the run that wrote it
    held = open_run_directory(out, resume=True, overwrite=False)
    try:
        code, _, err = run_cli(*train, "--resume", env=jax_cache)
        one_error_line(code, err, f"is in use by another run (pid {os.getpid()})")
    finally:
        held.close()
    assert _files(out) == before
    for f in (out / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])
    code, stdout, err = run_cli(*train, "--resume", env=jax_cache)
    assert code == 0, err[-5:]
    assert any("checkpoints/2 (" in line and "cannot be restored; resuming from step 1" in line for line in err), err
    assert "resumed from" in stdout and json.loads((out / "summary.json").read_text())["steps"] == 3
    # the broken one kept aside, steps 2 and 3 saved again (--keep 2 removed step 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "2.broken", "3"]
    for step in ("2", "3"):  # every checkpoint now on disk broken: stop, naming each
        for f in (out / "checkpoints" / step).rglob("*"):
            if f.is_file() and f.stat().st_size > 100:
                f.write_bytes(f.read_bytes()[:50])
    before = _files(out)
    code, _, err = run_cli(*train, "--steps", "4", "--resume", env=jax_cache)
    one_error_line(code, err, "no checkpoint can be restored", "checkpoints/3 (", "checkpoints/2 (")
    assert _files(out) == before
