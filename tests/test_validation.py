"""Validation in the training loop (`--eval-every`): the loss it logs is the loss `jaxvlm eval`'s
`mean_loss` computes on the exported model over the same batches; `--keep-best` keeps the
checkpoint of the best validation loss; held-out rows never reach the training loader; bad
settings are one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxvlm.train_loop import RunConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
COCO_ROOT = SHARED / "data" / "coco-mini"
needs_data = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
    reason=f"real tokenizer / COCO data not found under {SHARED / 'data'} (../shared is absent)",
)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_data
def test_validation_loss_is_the_exported_models_loss_and_best_is_kept(tmp_path):
    from jaxvlm.data import DataLoader
    from jaxvlm.evaluation import mean_loss
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.train_loop import build_dataset, hold_out

    out = tmp_path / "run"
    run = RunConfig(data=f"coco:{COCO_ROOT}", tokenizer=str(SMOLLM2), steps=6, batch_size=4, max_length=128,
                    eval_every=2, eval_holdout=10, eval_batches=2, keep_best=True, log_every=1, lr_mp=5e-3,
                    output_dir=str(out), seed=2)  # fmt: skip
    summary = train(run)
    val = [r for r in rows(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    best = json.loads((out / "best.json").read_text())
    want = min(val, key=lambda r: r["val_loss"])
    assert best == {"val_loss": want["val_loss"], "step": want["step"]}
    assert [p.name for p in (out / "checkpoints-best").iterdir()] == [str(want["step"])]
    assert summary["best"]["step"] == want["step"]

    # the last validation equals mean_loss of the exported model on the same held-out batches
    model = load_nanovlm(out / "model")
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import load_tokenizer

    enc = SampleEncoder.from_config(model.cfg, load_tokenizer(SMOLLM2, extra_tokens=model.cfg.extra_tokens))
    train_ds, held = hold_out(build_dataset(run, model.cfg, enc), 10, run.seed)
    assert len(held) == 10 and len(train_ds) == 41
    assert not {r.source for r in held.records} & {r.source for r in train_ds.records}
    loader = DataLoader(held, 4, max_length=128, shuffle=False, drop_last=False, seed=run.seed)
    ref = mean_loss(model, loader, max_batches=2)
    assert abs(val[-1]["val_loss"] - ref) <= 1e-5 * abs(ref), f"validation {val[-1]['val_loss']} vs mean_loss {ref}"


def test_validation_settings_are_checked_in_one_place():
    with pytest.raises(ValueError, match="keep_best need eval_every"):
        RunConfig(keep_best=True)
    with pytest.raises(ValueError, match="eval_data and eval_holdout: choose one"):
        RunConfig(eval_every=5, eval_data="coco:x", eval_holdout=3)
    with pytest.raises(ValueError, match="eval_every 0"):
        RunConfig(eval_every=0)


@needs_data
def test_validation_needs_eval_data_for_non_synthetic_runs(tmp_path):
    run = RunConfig(data=f"coco:{COCO_ROOT}", tokenizer=str(SMOLLM2), steps=2, batch_size=2, eval_every=1,
                    output_dir=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match="--eval-every needs --eval-data SPEC or --eval-holdout N"):
        train(run)


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files (TFRecord framing: length, crc, Event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at : at + 8])
            event = Event.FromString(raw[at + 12 : at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@needs_data
def test_tensorboard_events_and_the_plot_carry_the_metrics(tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    train(RunConfig(tokenizer=str(SMOLLM2), steps=4, batch_size=4, synthetic_size=64, eval_every=2, eval_batches=1,
                    log_every=1, output_dir=str(out)))  # fmt: skip
    got = _scalars(out / "tensorboard")
    logged = rows(out)
    want_loss = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [s for s, _ in got["train/loss"]] == [s for s, _ in want_loss] == [1, 2, 3, 4]
    assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(got["train/loss"], want_loss))  # float32 there
    assert [s for s, _ in got["validation/loss"]] == [2, 4]
    assert {"train/lr_mp", "train/tokens_per_s", "train/grad_norm"} <= set(got)
    with Image.open(out / "loss_curve.png") as im:
        assert im.size[0] > 500 and im.size[1] > 500


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB log framing: 32 KiB blocks of
    [crc u32, length u16, type u8] records after a 7-byte header; full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    at, buf, out = 7, b"", []
    while at + 7 <= len(raw):
        if 32768 - at % 32768 < 7:
            at += 32768 - at % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[at : at + 7])
        data, at = raw[at + 7 : at + 7 + n], at + 7 + n
        if kind in (1, 4):
            record = pb.Record.FromString(buf + data if kind == 4 else data)
            if record.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind in (2, 3):
            buf = data if kind == 2 else buf + data
    return out


@needs_data
def test_wandb_offline_run_gets_every_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (it is in the dev extras)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(RunConfig(tokenizer=str(SMOLLM2), steps=4, batch_size=4, synthetic_size=64, eval_every=2, eval_batches=1,
                    log_every=1, output_dir=str(out), wandb_project="jaxvlm-test"))  # fmt: skip
    history = _wandb_history(out)
    logged = rows(out)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == [r["loss"] for r in logged if "loss" in r]
    assert [h["val/loss"] for h in history if "val/loss" in h] == [r["val_loss"] for r in logged if "val_loss" in r]


def test_wandb_asked_for_but_missing_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="wandb is not installed"):
        train(RunConfig(steps=1, wandb_project="p", output_dir=str(tmp_path / "run"), tokenizer=str(SMOLLM2)))
    assert not (tmp_path / "run" / "checkpoints").exists()
