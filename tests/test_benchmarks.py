"""Benchmarks (`jaxvlm eval --task mmstar|mc|vqa|rescore`, `jaxvlm.benchmarks`): the scoring
functions against hand-computed cases from lmms-eval's rules; the CLI's report equals the
rescoring of its own predictions file (answers chosen through a fake generator, then a real
tiny model end to end); the benchmark accuracy in training's metrics.jsonl; bad input is one
line and exit 2.

Benchmark files are built here in MMStar's published layout from the COCO images and captions
in ../shared/data/coco-mini (each question: which caption fits the image)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import randomize_torch_, run_cli, tiny_cfg

from jaxvlm import benchmarks as B

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
COCO_ROOT = SHARED / "data" / "coco-mini"
needs_data = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO_ROOT / "captions.json").is_file(),
    reason=f"real tokenizer / COCO data not found under {SHARED / 'data'} (../shared is absent)",
)


# ---- the scoring functions, no model ------------------------------------------------------------
@pytest.mark.parametrize(
    "response, letter",
    [
        ("A", "A"),
        ("(B)", "B"),  # parentheses
        ("B.", "B"),  # period (and the end)
        ("The answer is C", "C"),  # phrase, and a standalone letter at the end
        ("The correct answer is (B).", "B"),
        ("answer: D", "D"),
        ("C) a dog", "C"),  # a standalone letter at the start beats everything
        ("Both A and C are wrong; D", "D"),  # the end (9) beats "A " (space, 2)
        ("b", ""),  # case-sensitive: lower case is no answer
        ("I am not sure", ""),  # no choice letter anywhere
        ("Dog", "D"),  # the last resort: any occurrence of a choice letter
        ("", ""),
        ("   ", ""),
    ],
)
def test_letter_extraction_follows_lmms_eval(response, letter):
    assert B.extract_mcq_answer(response) == letter


def test_prompts_and_inline_options():
    q = "What is shown? Please answer yes or no.\nOptions: A: a cat, B: 1.5 dogs, C: C: tricky, D: none  "
    assert B.mmstar_prompt(q) == (
        "What is shown?\nOptions: A: a cat, B: 1.5 dogs, C: C: tricky, D: none"
        "\nAnswer with the option's letter from the given choices directly"
    )
    assert B.inline_options(q) == ("A", "B", "C", "D")
    assert B.inline_options("Pick one.\nOptions: A: yes, B: no") == ("A", "B")
    assert B.inline_options("Pick one.\n(A) red\n(B) blue\n(C) green") == ("A", "B", "C")
    assert B.inline_options("No options here. A dog.") == ()
    assert B.inline_question("Which?", ["red", "blue"]) == "Which?\nOptions: A: red, B: blue"


def test_vqa_normalisation_and_accuracy():
    assert B.normalise_vqa_answer("Two dogs.") == "2 dogs"
    assert B.normalise_vqa_answer("the cat's toy") == "cat's toy"
    assert B.normalise_vqa_answer("Isnt it") == "isn't it"
    assert B.normalise_vqa_answer("1,000") == "1000"  # a comma between digits goes
    assert B.normalise_vqa_answer("yes/no") == "yes no"  # "/" without spaces around: a space
    assert B.normalise_vqa_answer("black and white\n") == "black and white"
    # 10 humans: mean over the 10 leave-one-out subsets of min(#matching / 3, 1)
    assert B.vqa_accuracy("2", ["2"] * 10) == 1.0
    assert B.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert B.vqa_accuracy("Yes.", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert B.vqa_accuracy("A dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.9 * 1 / 3)
    assert B.vqa_accuracy("blue", ["red"] * 10) == 0.0
    assert B.vqa_accuracy("The Dog!", ["dog"]) == 1.0  # one answer: normalised exact match


def test_report_macro_means_as_lmms_eval():
    rows = [
        {"task": "mmstar", "raw_answer": raw, "gold": g, "choices": list("ABCD"), "category": c, "l2_category": l2}
        for raw, g, c, l2 in [
            ("A", "A", "x", "x1"),
            ("B", "B", "x", "x1"),
            ("C", "C", "x", "x1"),
            ("A", "B", "x", "x2"),
            ("D", "D", "y", "y1"),
        ]
    ]
    r = B.report([B.score_row(row) for row in rows])
    assert r["per_l2_category"] == {"x1": 1.0, "x2": 0.0, "y1": 1.0}
    assert r["per_category"] == {"x": 0.5, "y": 1.0}  # macro over x1, x2 (micro would be 3/4)
    assert r["overall"] == pytest.approx(2 / 3) and r["accuracy"] == 0.8 and r["n"] == 5


# ---- benchmark files built from COCO ------------------------------------------------------------
L2 = [("coarse perception", "image scene and topic")] * 3 + [("coarse perception", "image emotion")] * 2
L2 += [("fine-grained perception", "recognition")] * 3
# chosen answers for the 8 questions (gold: A B C D A B C D) and what lmms-eval extracts from each
CHOSEN = ["A", "(B)", "The answer is C", "d", "B.", "I am not sure", "C) a dog", "Dog"]
EXTRACTED = ["A", "B", "C", "", "B", "", "C", "D"]


def _coco(n: int):
    meta = json.loads((COCO_ROOT / "captions.json").read_text())["images"][:n]
    return [(COCO_ROOT / "images" / m["file_name"], m["captions"][0]) for m in meta]


def _mmstar_rows(n: int = 8) -> list[dict]:
    coco = _coco(n + 3)
    rows = []
    for i in range(n):
        gold = i % 4
        others = [c for k, (_, c) in enumerate(coco) if k != i][i % 3 : i % 3 + 3]
        options = others[:gold] + [coco[i][1]] + others[gold:]
        rows.append({
            "index": 100 + i,
            "question": B.inline_question("Which caption describes the image?", options),
            "image": coco[i][0],
            "answer": "ABCD"[gold],
            "category": L2[i][0],
            "l2_category": L2[i][1],
        })  # fmt: skip
    return rows


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    cols["image"] = pa.array(
        [
            {"bytes": Path(p).read_bytes() if isinstance(p, Path) else p, "path": Path(str(p)).name}
            for p in cols["image"]
        ],
        type=image_type,
    )
    pq.write_table(pa.table(cols), path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Even rows carry base64 images, odd rows a path relative to the file."""
    lines = []
    for k, r in enumerate(rows):
        if k % 2 == 0:
            image = base64.b64encode(r["image"].read_bytes()).decode()
        else:
            shutil.copyfile(r["image"], path.parent / r["image"].name)
            image = r["image"].name
        lines.append(json.dumps({**r, "image": image}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not (COCO_ROOT / "captions.json").is_file():
        pytest.skip(f"COCO data not found under {COCO_ROOT} (../shared is absent)")
    d = tmp_path_factory.mktemp("bench")
    rows = _mmstar_rows()
    (d / "jsonl").mkdir()
    (d / "shards").mkdir()
    _write_parquet(d / "shards" / "val-00001.parquet", rows[5:])  # sorted by name: 0000, then 0001
    _write_parquet(d / "shards" / "val-00000.parquet", rows[:5])
    return {
        "rows": rows,
        "parquet": _write_parquet(d / "mmstar.parquet", rows),
        "jsonl": _write_jsonl(d / "jsonl" / "mmstar.jsonl", rows),
        "shards": d / "shards",
        "dir": d,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found under {SMOLLM2} (../shared is absent)")
    import torch_ref

    d = tmp_path_factory.mktemp("tiny")
    # every weight randomised, so that the greedy answers are varied text, not one token repeated
    randomize_torch_(torch_ref.VisionLanguageModel(tiny_cfg()), seed=0).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(SMOLLM2 / name, d / name)
    return d


def _main(capsys, *argv) -> tuple[int, str, list[str]]:
    from cli.main import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


class FakeGenerator:
    """Stands in for `jaxvlm.evaluation.greedy_answers`: the chosen strings in order; keeps the prompts."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def __call__(self, model, tokenizer, prompts, *, batch_size, max_new_tokens):
        assert len(prompts) <= batch_size
        self.prompts.extend(prompts)
        return [self.answers[len(self.prompts) - len(prompts) + k] for k in range(len(prompts))]


@needs_data
def test_mmstar_report_is_the_rescoring_of_its_predictions(files, model_dir, tmp_path, monkeypatch, capsys):
    from jaxvlm import evaluation

    reports, prompts = {}, {}
    for name in ("parquet", "jsonl", "shards"):
        fake = FakeGenerator(CHOSEN)
        monkeypatch.setattr(evaluation, "greedy_answers", fake)
        pred = tmp_path / f"{name}.jsonl"
        code, out, err = _main(capsys, "eval", "--task", "mmstar", "--model", str(model_dir), "--data",
                               str(files[name]), "--predictions", str(pred), "--batch-size", "3", "--json")  # fmt: skip
        assert code == 0, err
        reports[name], prompts[name] = json.loads(out), fake.prompts
        rows = [json.loads(line) for line in pred.read_text().splitlines()]
        assert [r["index"] for r in rows] == [100 + i for i in range(8)]
        assert [r["raw_answer"] for r in rows] == CHOSEN
        assert [r["extracted"] for r in rows] == EXTRACTED
        assert [r["gold"] for r in rows] == list("ABCDABCD")
        assert [r["correct"] for r in rows] == [x == g for x, g in zip(EXTRACTED, "ABCDABCD")]
        assert [r["category"] for r in rows] == [c for c, _ in L2]
        code, out, err = _main(capsys, "eval", "--task", "rescore", "--predictions", str(pred), "--json")
        assert code == 0, err
        assert json.loads(out) == reports[name]

    # hand-computed: l2 scene 3/3, emotion 0/2, recognition 2/3; lmms-eval averages over l2
    r = reports["parquet"]
    assert r["per_l2_category"] == {"image emotion": 0.0, "image scene and topic": 1.0, "recognition": 2 / 3}
    assert r["per_category"] == {"coarse perception": 0.5, "fine-grained perception": 2 / 3}
    assert r["overall"] == pytest.approx(5 / 9) and r["accuracy"] == 5 / 8 and r["n"] == 8
    assert r["reference"].startswith("lmms-eval 0.7.2")
    assert reports["jsonl"] == r and reports["shards"] == r
    # the JSONL's base64 and relative-path images are the parquet's bytes: the same prompts
    for a, b in zip(prompts["parquet"], prompts["jsonl"]):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["images"], b["images"])
    text = B.mmstar_prompt(files["rows"][0]["question"])
    from conversion.pretrained import read_config
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import load_for_config

    cfg = read_config(model_dir)
    want = SampleEncoder.from_config(cfg, load_for_config(cfg, model_dir)).encode_prompt(
        [files["rows"][0]["image"]], text
    )
    assert np.array_equal(prompts["parquet"][0]["input_ids"], want["input_ids"])
    assert np.array_equal(prompts["parquet"][0]["images"], want["images"])

    # the text report, and a predictions file is never replaced without --overwrite
    monkeypatch.setattr(evaluation, "greedy_answers", FakeGenerator(CHOSEN))
    code, out, _ = _main(capsys, "eval", "--task", "mmstar", "--model", str(model_dir), "--data", str(files["parquet"]))
    assert code == 0 and "overall 55.56%" in out and "l2_category recognition: 66.67%" in out
    before = (tmp_path / "parquet.jsonl").read_bytes()
    code, _, err = _main(capsys, "eval", "--task", "mmstar", "--model", str(model_dir), "--data",
                         str(files["parquet"]), "--predictions", str(tmp_path / "parquet.jsonl"))  # fmt: skip
    assert code == 2 and len(err) == 1 and "already exists" in err[0], err
    assert (tmp_path / "parquet.jsonl").read_bytes() == before


@needs_data
def test_mc_and_vqa(files, model_dir, tmp_path, monkeypatch, capsys):
    from jaxvlm import evaluation

    coco = _coco(4)
    mc = tmp_path / "mc.jsonl"  # options as a list, and inline; letters beyond D count
    mc.write_text(
        json.dumps({"question": "Which?", "options": ["a", "b", "c", "d", "e"], "answer": "E", "category": "k",
                    "image": str(coco[0][0])}) + "\n"
        + json.dumps({"question": "Which?\nOptions: A: x, B: y", "answer": "b", "category": "k"}) + "\n"
        + json.dumps({"question": "Which?", "options": ["x", "y", "z"], "answer": "C", "category": "m"}) + "\n"
    )  # fmt: skip
    fake = FakeGenerator(["E", "B", "A"])
    monkeypatch.setattr(evaluation, "greedy_answers", fake)
    pred = tmp_path / "mc-pred.jsonl"
    code, out, err = _main(capsys, "eval", "--task", "mc", "--model", str(model_dir), "--data", str(mc),
                           "--predictions", str(pred), "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["overall"] == pytest.approx(2 / 3) and r["per_category"] == {"k": 1.0, "m": 0.0}
    assert [row["choices"] for row in map(json.loads, pred.read_text().splitlines())][0] == list("ABCDE")
    assert fake.prompts[0]["images"].shape[0] >= 1 and fake.prompts[1]["images"].shape[0] == 0
    code, out, _ = _main(capsys, "eval", "--task", "rescore", "--predictions", str(pred), "--json")
    assert code == 0 and json.loads(out) == r

    vqa = tmp_path / "vqa.jsonl"  # VQAv2's answers (dicts), plain strings, and one `answer`
    vqa.write_text(
        json.dumps({"question": "How many?", "image": str(coco[1][0]),
                    "answers": [{"answer": "2", "answer_id": k} for k in range(3)] + [{"answer": "3"}] * 7}) + "\n"
        + json.dumps({"question": "Color?", "answers": ["yes"] * 2 + ["no"] * 8}) + "\n"
        + json.dumps({"question": "What?", "answer": "dog", "image": str(coco[2][0])}) + "\n"
    )  # fmt: skip
    monkeypatch.setattr(evaluation, "greedy_answers", FakeGenerator(["Two.", "Yes", "a Dog"]))
    pred = tmp_path / "vqa-pred.jsonl"
    code, out, err = _main(capsys, "eval", "--task", "vqa", "--model", str(model_dir), "--data", str(vqa),
                           "--predictions", str(pred), "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["overall"] == pytest.approx((0.9 + 0.6 + 1.0) / 3), r  # (3 * 2/3 + 7) / 10, (2/3 + 8 * 2/3) / 10, 1
    assert [row["extracted"] for row in map(json.loads, pred.read_text().splitlines())] == ["2", "yes", "dog"]
    code, out, _ = _main(capsys, "eval", "--task", "rescore", "--predictions", str(pred), "--json")
    assert code == 0 and json.loads(out) == r


@needs_data
def test_tiny_model_end_to_end(files, model_dir, tmp_path):
    """A real run (a random tiny model, greedy, left-padded batches of 3), then its rescoring."""
    pred = tmp_path / "pred.jsonl"
    code, out, err = run_cli("-m", "jaxvlm", "eval", "--task", "mmstar", "--model", str(model_dir), "--data",
                             str(files["parquet"]), "--predictions", str(pred), "--batch-size", "3",
                             "--max-new-tokens", "4", "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == r["n"] == 8 and len({row["raw_answer"] for row in rows}) > 1  # the image matters
    assert [row["extracted"] for row in rows] == [B.extract_mcq_answer(row["raw_answer"]) for row in rows]
    assert r == B.rescore(pred)


@needs_data
def test_benchmark_accuracy_in_training_metrics(files, tmp_path):
    """`--eval-task mmstar`: metrics.jsonl's eval_mmstar_accuracy is the benchmark's overall score
    of the exported model."""
    from jaxvlm.data import SampleEncoder
    from jaxvlm.pretrained import load_nanovlm
    from jaxvlm.tokenizer import load_for_config
    from jaxvlm.train_loop import RunConfig, train

    out = tmp_path / "run"
    run = RunConfig(tokenizer=str(SMOLLM2), steps=2, batch_size=2, synthetic_size=8, max_length=128, eval_every=2,
                    eval_batches=1, eval_task="mmstar", eval_task_data=str(files["parquet"]), eval_task_limit=6,
                    log_every=1, output_dir=str(out), tensorboard=False)  # fmt: skip
    train(run)
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if "val_loss" in r]
    assert [r["step"] for r in val] == [2] and 0.0 <= val[0]["eval_mmstar_accuracy"] <= 1.0
    model = load_nanovlm(out / "model")
    tok = load_for_config(model.cfg, out / "model")
    items = B.load_benchmark("mmstar", files["parquet"], limit=6)
    report, _ = B.run_benchmark(model, tok, SampleEncoder.from_config(model.cfg, tok), "mmstar", items, batch_size=2)
    assert report["n"] == 6 and val[0]["eval_mmstar_accuracy"] == report["overall"]

    with pytest.raises(ValueError, match="eval_task and eval_task_data go together"):
        RunConfig(eval_every=2, eval_task="mmstar")
    with pytest.raises(ValueError, match="eval_task 'mmlu': choose one of"):
        RunConfig(eval_every=2, eval_task="mmlu", eval_task_data="x.jsonl")


# ---- bad input: one line, exit 2 ----------------------------------------------------------------
@needs_data
def test_bad_input_is_one_line(files, model_dir, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxvlm import evaluation

    monkeypatch.setattr(evaluation, "greedy_answers", FakeGenerator(CHOSEN))
    rows = files["rows"]
    no_cols = tmp_path / "no-cols.parquet"
    _write_parquet(no_cols, [{k: v for k, v in r.items() if k not in ("category", "l2_category")} for r in rows])
    bad_answer = _write_parquet(tmp_path / "bad-answer.parquet", [rows[0], {**rows[1], "answer": "E"}])
    two = tmp_path / "two-options.jsonl"
    image = base64.b64encode(rows[0]["image"].read_bytes()).decode()
    two.write_text(json.dumps({**rows[0], "image": image, "question": "Q?\nOptions: A: yes, B: no", "answer": "C"}))
    bad_image = _write_parquet(tmp_path / "bad-image.parquet", [rows[0], {**rows[1], "image": b"not a JPEG"}])
    missing_image = tmp_path / "missing-image.jsonl"
    missing_image.write_text(json.dumps({**rows[0], "image": "absent.jpg"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({k: pa.array([], pa.string()) for k in B.MMSTAR_COLUMNS}), empty_parquet)
    no_shards = tmp_path / "no-shards"
    no_shards.mkdir()
    mc_no_options = tmp_path / "mc.jsonl"
    mc_no_options.write_text(json.dumps({"question": "Which?", "answer": "A"}) + "\n")
    not_predictions = tmp_path / "not-predictions.jsonl"
    not_predictions.write_text(json.dumps({"index": 1}) + "\n")
    model = ["--model", str(model_dir)]
    cases = {  # argv: what the one line must say
        ("--task", "mmstar", *model, "--data", str(no_cols)): "missing column(s) category, l2_category",
        ("--task", "mmstar", *model, "--data", str(bad_answer)): "row index 101: answer 'E' is not one of its options A, B, C, D",
        ("--task", "mmstar", *model, "--data", str(two)): "row index 100: answer 'C' is not one of its options A, B",
        ("--task", "mmstar", *model, "--data", str(bad_image)): "row index 101: cannot read its image",
        ("--task", "mmstar", *model, "--data", str(missing_image)): "row index 100: image is neither a file",
        ("--task", "mmstar", *model, "--data", str(empty)): "empty, no rows",
        ("--task", "mmstar", *model, "--data", str(empty_parquet)): "empty, no rows",
        ("--task", "mmstar", *model, "--data", str(no_shards)): "no *.parquet files",
        ("--task", "mmstar", *model, "--data", str(tmp_path / "absent.parquet")): "does not exist",
        ("--task", "mmstar", *model): "needs --data FILE_OR_DIR",
        ("--task", "mc", *model, "--data", str(mc_no_options)): "row index 0: no options",
        ("--task", "mmstar", "--data", str(files["parquet"])): "needs --model",
        ("--task", "rescore",): "--task rescore needs --predictions FILE",
        ("--task", "rescore", "--predictions", str(empty)): "empty, no rows",
        ("--task", "rescore", "--predictions", str(not_predictions)): "line 1: not a predictions row",
        (*model, "--predictions", str(tmp_path / "p.jsonl")): "--predictions goes with --task",
    }  # fmt: skip
    for argv, want in cases.items():
        code, out, err = _main(capsys, "eval", *argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and want in err[0], (argv, err)
    assert not (tmp_path / "p.jsonl").exists()
    # the CLI process itself: exit 2 and one line
    code, _, err = run_cli("-m", "jaxvlm", "eval", "--task", "mmstar", *model, "--data", str(no_cols), timeout=120)
    assert code == 2 and len(err) == 1 and "missing column(s) category, l2_category" in err[0], err
