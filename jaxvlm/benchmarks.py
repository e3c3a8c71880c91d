"""Standard benchmarks for `jaxvlm eval --task mmstar|mc|vqa` and `--eval-task` in training.

Reproduces lmms-eval 0.7.2 (github.com/EvolvingLMMs-Lab/lmms-eval, commit
75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3; the files below last changed in 7a69a9a1):

- MMStar (`lmms_eval/tasks/mmstar/utils.py`, `_default_template_yaml`): the prompt is the
  question, stripped, with " Please answer yes or no." removed and the default post prompt
  "\\nAnswer with the option's letter from the given choices directly" appended (no full stop:
  the yaml has none); the letter is `extract_mcq_answer(response, choices=A-D)`
  (`lmms_eval/tasks/_task_utils/mcq_extract.py`, reproduced below rule for rule; note it is
  case-sensitive: "b" is no answer); the gold letter is `answer.strip().upper()`. A category's
  score and the overall score ("average") are *macro* means: the mean over l2 categories of
  each l2 category's accuracy (`mmstar_aggregate_results`). The report also gives the plain
  share of questions answered correctly (`accuracy`).
- VQA (`lmms_eval/tasks/vqav2/utils.py`, `_task_utils/vqa_eval_metric.py`, which follow the
  official VQA evaluation script, github.com/GT-Vision-Lab/VQA `vqaEval.py`): prompt
  "{question}\\nAnswer the question using a single word or phrase."; the answer and the human
  answers go through the punctuation, number-word, article and contraction normalisation; the
  score is the mean over leave-one-human-out subsets of min(#matching others / 3, 1). Unlike the
  official script, lmms-eval normalises even when all human answers agree; we follow lmms-eval.
  One human answer (a plain `answer` column) scores normalised exact match, 1 or 0 (the
  formula would cap it at 0).
- mc, a generic multiple-choice format (no lmms-eval task of its own): options given as a list
  are written inline in MMStar's form ("\\nOptions: A: ..., B: ..."), so the prompt is MMStar's;
  the letter is extracted with the question's own letters; the scores are plain shares.

Inputs (`read_rows`): a .parquet file, a directory (every *.parquet in it, sorted) or a .jsonl
file. MMStar columns: index, question (options inline), image, answer (a letter), category,
l2_category. `image` is MMStar's parquet struct {bytes, path} (bytes, or a path relative to the
file when bytes is null), raw bytes, or in JSONL a base64 string (a data: URI prefix is allowed)
or a path relative to the file (a string that names an existing file is a path). mc: question,
answer, options (a list) or inline options, optional index, image, category, l2_category. vqa:
question, answers (a list of strings or of {"answer": ...} as VQAv2 has them) or answer,
optional index, image, category.

The scoring functions are framework-free (a predictions row is rescored from its raw answer by
`score_row`); `run_benchmark` is the generation loop (`jaxvlm.evaluation.greedy_answers`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = ("mmstar", "mc", "vqa")
REFERENCE = "lmms-eval 0.7.2 @ 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3"

MMSTAR_CHOICES = ("A", "B", "C", "D")  # lmms-eval's exact_match extracts among these for every question
MMSTAR_COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
MMSTAR_REPLACE_PROMPT = " Please answer yes or no."
VQA_POST_PROMPT = "\nAnswer the question using a single word or phrase."


# ---- multiple choice: prompt and letter extraction (lmms-eval mcq_extract.py) -------------------
def mmstar_prompt(question: str) -> str:
    """lmms-eval's `mmstar_doc_to_text` with the default pre prompt ("") and post prompt."""
    return question.strip().replace(MMSTAR_REPLACE_PROMPT, "") + MC_POST_PROMPT


def inline_question(question: str, options: Sequence[str]) -> str:
    """A question with its options written inline as MMStar writes them."""
    listed = ", ".join(f"{chr(ord('A') + k)}: {str(o).strip()}" for k, o in enumerate(options))
    return f"{question.rstrip()}\nOptions: {listed}"


_OPTION_LETTER = re.compile(r"(?:^|[\s,;(])\(?([A-Z])[:.)](?=\s|$)")


def inline_options(question: str) -> tuple[str, ...]:
    """The option letters written in a question ("Options: A: ..., B: ..." or lines "A. ..."):
    the run A, B, C, ... of letters found after the last "Options:" (else anywhere); () if
    fewer than two."""
    at = question.lower().rfind("options:")
    found = set(_OPTION_LETTER.findall(question[at + len("options:") :] if at >= 0 else question))
    letters = []
    for k in range(26):
        if chr(ord("A") + k) not in found:
            break
        letters.append(chr(ord("A") + k))
    return tuple(letters) if len(letters) >= 2 else ()


_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
# higher = more confident that this is the intended answer
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                    "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip


def extract_mcq_answer(response: str, choices: Sequence[str] = MMSTAR_CHOICES) -> str:
    """The choice letter in a free-form answer, "" if none: lmms-eval's `extract_mcq_answer`.

    Candidates in each format ("(B)", "B.", "B:", "B)", "B ", after a phrase such as "the answer
    is", a standalone letter at the start or the end; any occurrence only when nothing else
    matched); the highest-priority format wins, then the later position. Case-sensitive.
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    candidates: list[tuple[str, int, str]] = []
    for fmt, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                         ("space", "{} ")):  # fmt: skip
        for ch in choices:
            if pattern.format(ch) in text:
                candidates.append((ch, text.rfind(pattern.format(ch)), fmt))
    text_lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = text_lower.find(phrase)
        if idx != -1:
            for ch in choices:
                pos = text.find(ch, idx + len(phrase))
                if pos != -1:
                    candidates.append((ch, pos, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not candidates:
        return ""
    candidates.sort(key=lambda c: (_FORMAT_PRIORITY[c[2]], c[1]), reverse=True)
    return candidates[0][0]


# ---- VQA accuracy (lmms-eval vqa_eval_metric.py = the official VQA normalisation) ---------------
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, its "(?!<=" typo included
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")  # fmt: skip


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official script passes re.UNICODE (32) where `sub` takes its count: at most 32 stripped
    return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalise_vqa_answer(text: str) -> str:
    """Newlines and tabs to spaces, strip, then punctuation, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """mean over k of min(#{j != k: answers[j] == prediction} / 3, 1), all normalised; with a
    single answer, normalised exact match."""
    pred = normalise_vqa_answer(prediction)
    gold = [normalise_vqa_answer(a) for a in answers]
    if len(gold) == 1:
        return float(pred == gold[0])
    accs = []
    for k in range(len(gold)):
        matching = sum(1 for j, a in enumerate(gold) if j != k and a == pred)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs)


# ---- a predictions row and the report -----------------------------------------------------------
def score_row(row: dict) -> dict:
    """The row with `extracted` and `score` (and `correct` for multiple choice) computed from its
    task, raw answer and gold answer (and choices)."""
    raw = row["raw_answer"]
    if row["task"] == "vqa":
        return {**row, "extracted": normalise_vqa_answer(raw), "score": vqa_accuracy(raw, row["gold"])}
    letter = extract_mcq_answer(raw, row["choices"])
    correct = letter == row["gold"]
    return {**row, "extracted": letter, "correct": correct, "score": float(correct)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def report(rows: Sequence[dict]) -> dict[str, Any]:
    """Overall and per-category scores of scored rows of one task. MMStar: lmms-eval's macro
    means over l2 categories (overall, per category) and per-l2 accuracy; mc and vqa: means."""
    if not rows:
        raise ValueError("no predictions to score")
    task = rows[0]["task"]
    by_l2: dict[str, list[float]] = defaultdict(list)
    by_cat: dict[str, list[float]] = defaultdict(list)
    l2_of_cat: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("category") is not None:
            by_cat[r["category"]].append(r["score"])
        if r.get("l2_category") is not None:
            by_l2[r["l2_category"]].append(r["score"])
            if r.get("category") is not None:
                l2_of_cat[r["category"]].add(r["l2_category"])
    per_l2 = {k: _mean(v) for k, v in sorted(by_l2.items())}
    out: dict[str, Any] = {"task": task, "n": len(rows)}
    if task == "mmstar":
        out["overall"] = _mean(list(per_l2.values()))
        out["accuracy"] = _mean([r["score"] for r in rows])
        out["per_category"] = {c: _mean([per_l2[k] for k in sorted(l2_of_cat[c])]) for c in sorted(by_cat)}
        out["reference"] = REFERENCE
    else:
        out["overall"] = _mean([r["score"] for r in rows])
        out["per_category"] = {k: _mean(v) for k, v in sorted(by_cat.items())}
    out["per_l2_category"] = per_l2
    return out


def rescore(path: str | Path) -> dict[str, Any]:
    """The report of a predictions file (`jaxvlm eval --predictions`), recomputed from its raw answers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--predictions {path} does not exist")
    rows = _read_jsonl(path, what="predictions")
    if len({r["task"] for r in rows}) > 1:
        raise ValueError(f"{path}: predictions of several tasks")
    return report(rows)


# ---- reading a benchmark file -------------------------------------------------------------------
def _read_jsonl(path: Path, *, what: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object per line")
            if what == "predictions":
                try:
                    row = score_row(row)
                except (KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"{path} line {n}: not a predictions row ({type(e).__name__}: {e})") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty, no rows")
    return rows


def read_rows(path: str | Path, columns: Sequence[str] = ()) -> tuple[list[dict], Path]:
    """The rows of a .parquet file, a directory of them (sorted) or a .jsonl file, and the
    directory relative image paths start from; raises if a required column is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"--data {path}: no *.parquet files in the directory")
    elif path.suffix == ".parquet":
        files = [path]
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path, what="data")
        for n, row in enumerate(rows, 1):
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{path} row {n}: missing column(s) {', '.join(missing)}")
        return rows, path.parent
    else:
        raise ValueError(f"--data {path}: expected a .parquet file, a directory of them or a .jsonl file")
    import pyarrow.parquet as pq

    rows = []
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises its own types for a corrupt or foreign file
            raise ValueError(f"{f}: not a readable parquet file ({e})") from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {', '.join(missing)}")
        rows.extend(table.to_pylist())
    if not rows:
        raise ValueError(f"--data {path}: empty, no rows")
    return rows, (path if path.is_dir() else path.parent)


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: its prompt text, its image (bytes, a path or None) and what scores it."""

    index: Any
    prompt: str
    image: bytes | Path | None
    gold: str | list[str]
    choices: tuple[str, ...] = ()
    category: str | None = None
    l2_category: str | None = None


def _image(value, base: Path, where: str) -> bytes | Path | None:
    if isinstance(value, dict):  # {bytes, path}, as `datasets` stores an Image feature
        if value.get("bytes") is not None:
            return _image(value["bytes"], base, where)
        value = value.get("path")
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if len(value) < 4096 and (base / value).is_file():
            return base / value
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: image is neither a file (relative to {base}) nor base64") from None
    raise ValueError(
        f"{where}: image must be bytes, a {{bytes, path}} struct, a path or base64, got {type(value).__name__}"
    )


def load_benchmark(task: str, path: str | Path, *, limit: int | None = None) -> list[Item]:
    """The questions of a benchmark file, checked: columns, answers among the options."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    required = {"mmstar": MMSTAR_COLUMNS, "mc": ("question", "answer"), "vqa": ("question",)}[task]
    rows, base = read_rows(path, required)
    items = []
    for n, row in enumerate(rows[:limit]):
        index = row.get("index", n)
        where = f"{path}: row index {index}"
        question = row["question"]
        if not isinstance(question, str):
            raise ValueError(f"{where}: question must be a string")
        image = _image(row.get("image"), base, where)
        if task == "mmstar" and image is None:
            raise ValueError(f"{where}: no image")
        category, l2 = row.get("category"), row.get("l2_category")
        if task == "vqa":
            answers = row.get("answers")
            if answers is None:
                answers = [row["answer"]] if row.get("answer") is not None else None
            if answers is None:
                raise ValueError(f"{where}: no answers (give 'answers', a list, or 'answer')")
            gold = [a["answer"] if isinstance(a, dict) else a for a in answers]
            if not gold or not all(isinstance(a, str) for a in gold):
                raise ValueError(f"{where}: answers must be a non-empty list of strings")
            prompt = f"{question}{VQA_POST_PROMPT}"
            items.append(Item(index, prompt, image, gold, (), category, l2))
            continue
        if task == "mc" and row.get("options") is not None:
            if not isinstance(row["options"], list) or len(row["options"]) < 2:
                raise ValueError(f"{where}: options must be a list of at least two")
            question = inline_question(question, row["options"])
        letters = inline_options(question)
        if task == "mc" and not letters:
            raise ValueError(f"{where}: no options (give 'options', a list, or 'Options: A: ..., B: ...' inline)")
        answer = row["answer"]
        gold = answer.strip().upper() if isinstance(answer, str) else answer
        if gold not in (letters or MMSTAR_CHOICES):
            raise ValueError(
                f"{where}: answer {answer!r} is not one of its options {', '.join(letters or MMSTAR_CHOICES)}"
            )
        choices = MMSTAR_CHOICES if task == "mmstar" else letters
        items.append(Item(index, mmstar_prompt(question), image, gold, choices, category, l2))
    return items


# ---- the generation loop ------------------------------------------------------------------------
def run_benchmark(
    model,
    tokenizer,
    encoder,
    task: str,
    items: Sequence[Item],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    source: str = "",
) -> tuple[dict[str, Any], list[dict]]:
    """Greedy answers to every item, scored: (report, predictions rows). `source` names the
    data in errors."""
    from . import evaluation
    from .data import SampleError

    rows = []
    for start in range(0, len(items), batch_size):  # prompts (and their pixels) one batch at a time
        chunk = items[start : start + batch_size]
        prompts = []
        for item in chunk:
            try:
                prompts.append(encoder.encode_prompt([item.image] if item.image is not None else [], item.prompt))
            except SampleError as e:
                raise ValueError(f"{source}: row index {item.index}: cannot read its image ({e})") from None
        texts = evaluation.greedy_answers(
            model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        for item, text in zip(chunk, texts):
            row = {"task": task, "index": item.index, "raw_answer": text, "gold": item.gold}
            if task != "vqa":
                row["choices"] = list(item.choices)
            row.update(category=item.category, l2_category=item.l2_category)
            rows.append(score_row(row))
    return report(rows), rows


def write_predictions(path: Path, rows: Sequence[dict]) -> None:
    """One JSON object per line, written atomically (the caller has checked `path` may be written)."""
    from conversion.atomic import atomic_file

    with atomic_file(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
