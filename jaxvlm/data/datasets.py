"""Conversation datasets on local files: LLaVA JSON/JSONL, Cauldron-style JSONL/parquet, COCO captions.

Every dataset here is a list of `Record`s (image references + chat messages) that is checked
when it is built and turned into arrays only when indexed, by a `SampleEncoder`:

    ds = llava_dataset("train.json", encoder)
    ds[i] -> {"input_ids": int32[T], "attention_mask": int32[T], "labels": int32[T],
              "images": float32[n, 3, S, S], "grids": [(n_h, n_w), ...]}

Rows without an answer, with a malformed conversation or naming a missing image file are an
error when the dataset is built, or - with `on_error="skip"` - dropped and counted in
`ds.n_skipped`. An image that exists but cannot be decoded is only found when the sample is
built: `ds[i]` raises `SampleError` (a ValueError) and the loader's own `on_error` decides. A
dataset left with no rows is a ValueError. Cauldron rows can be filtered by their FineVision
ratings (`min_ratings`, see `parse_cauldron_row`); rows left with no turn are dropped and
counted in `ds.n_filtered`. Sharded parquet too large for memory: `jaxvlm.data.streaming`.

Imports neither jax nor torch.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from conversion.validation import read_utf8

from .encoding import SampleEncoder, SampleError

log = logging.getLogger(__name__)

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ON_ERROR = ("raise", "skip")
# FineVision's per-turn rating columns, by the name upstream gives their minimum (`{name}_min_rating`).
RATING_COLUMNS = MappingProxyType(
    {
        "relevance": "relevance_ratings",
        "image_correspondence": "image_correspondence_ratings",
        "visual_dependency": "visual_dependency_ratings",
        "formatting": "formatting_ratings",
    }
)
# Upstream nanoVLM's minimums (models/config.py TrainConfig.*_min_rating, data/datasets.py
# BaseDataset): 1 for every column, so only turns rated below 1 are dropped.
UPSTREAM_MIN_RATINGS = MappingProxyType({name: 1 for name in RATING_COLUMNS})
_ORIENTATION_SWAPS = {5, 6, 7, 8}  # EXIF orientations that exchange width and height


@dataclass(frozen=True)
class Record:
    """One sample before encoding: image references (paths or encoded bytes) and ChatML messages."""

    images: tuple[Path | bytes, ...]
    messages: tuple[Mapping[str, str], ...]
    source: str  # "file:row" for error messages


class ConversationDataset:
    """Random-access dataset of `Record`s, encoded on indexing. See the module docstring."""

    def __init__(
        self,
        records: Iterable[Record],
        encoder: SampleEncoder,
        *,
        name: str = "dataset",
        n_skipped: int = 0,
        n_filtered: int = 0,
    ):
        self.records = list(records)
        self.encoder = encoder
        self.name = name
        self.n_skipped = n_skipped
        self.n_filtered = n_filtered
        self._shapes: dict[int, tuple[int, int]] = {}
        if not self.records:
            why = [f"{n_skipped} invalid rows skipped"] if n_skipped else []
            why += [f"{n_filtered} rows filtered out by their ratings"] if n_filtered else []
            raise ValueError(f"{name}: the dataset is empty" + (f" ({', '.join(why)})" if why else ""))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        try:
            return self.encoder.encode(rec.images, rec.messages)
        except SampleError as e:
            raise SampleError(f"{rec.source}: {e}") from None

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def pad_token_id(self) -> int:
        return self.encoder.pad_token_id

    @property
    def max_tiles_per_sample(self) -> int:
        """Upper bound on the tiles of any one sample."""
        most = max(len(r.images) for r in self.records)
        return most * self.encoder.image_processor.max_tiles

    def sample_shape(self, i: int) -> tuple[int, int]:
        """(T, n tiles) of sample i computed from the image headers and the text, without decoding
        pixels; the loader uses it to agree on batch shapes across hosts."""
        if i not in self._shapes:
            self._shapes[i] = record_shape(self.encoder, self.records[i])
        return self._shapes[i]

    def __repr__(self) -> str:
        return f"ConversationDataset({self.name!r}, {len(self)} samples, {self.n_skipped} skipped)"


def record_shape(encoder: SampleEncoder, rec: Record) -> tuple[int, int]:
    """(tokens, tiles) of `rec` encoded by `encoder`, from its text and image headers only."""
    grids = [encoder.image_processor.grid(*_image_size(ref, rec.source)) for ref in rec.images]
    return encoder.num_tokens(grids, rec.messages), sum(encoder.tiles_per_image(g) for g in grids)


def _image_size(ref: Path | bytes, source: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # header unreadable: the same error the sample itself would raise
        raise SampleError(
            f"{source}: cannot read image header of {ref if not isinstance(ref, bytes) else '<bytes>'}: {e}"
        ) from None
    return (h, w) if orientation in _ORIENTATION_SWAPS else (w, h)


# ---- file readers ----------------------------------------------------------------------------
def _read_rows(path: Path) -> list[Any]:
    """Rows of a .json (array or one object), .jsonl or .parquet file."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"{path}: reading parquet needs pyarrow, which is not installed; convert the file to JSONL"
            ) from None
        return pq.read_table(path).to_pylist()
    text = read_utf8(path)
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines under another suffix
        else:
            return data if isinstance(data, list) else [data]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
    return rows


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _image_ref(x, base: Path, source: str) -> Path | bytes:
    if isinstance(x, Mapping):  # parquet / HF datasets image struct {"bytes", "path"}
        if x.get("bytes"):
            return bytes(x["bytes"])
        if not x.get("path"):
            raise SampleError(f"{source}: an image has neither bytes nor a path")
        x = x.get("path")
    if isinstance(x, (bytes, bytearray)):
        return bytes(x)
    if not isinstance(x, str) or not x:
        raise SampleError(f"{source}: bad image reference {x!r}")
    p = Path(x)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise SampleError(f"{source}: image file not found: {p}")
    return p


def _check_messages(messages: list[dict], source: str) -> None:
    for k, m in enumerate(messages):
        if not isinstance(m.get("content"), str):
            raise SampleError(f"{source}: message {k} ({m.get('role')}) has no text")
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or all(not m["content"].strip() for m in answers):
        raise SampleError(f"{source}: no assistant answer")
    if not any(m["role"] == "user" for m in messages):
        raise SampleError(f"{source}: no user message")


def _build(rows: Sequence[Any], parse, encoder: SampleEncoder, on_error: str, name: str) -> ConversationDataset:
    """Records of `rows` through `parse(row, source) -> (images, messages)`, or None for a row
    that is not trained on (every turn filtered out by its ratings)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    records, skipped, filtered = [], 0, 0
    for n, row in enumerate(rows):
        source = f"{name}:{n}"
        try:
            if not isinstance(row, Mapping):
                raise SampleError(f"{source}: a row must be a JSON object, got {type(row).__name__}")
            parsed = parse(row, source)
            if parsed is None:
                filtered += 1
                continue
            images, messages = parsed
            _check_messages(messages, source)
            records.append(Record(tuple(images), tuple(messages), source))
        except SampleError as e:
            if on_error == "raise":
                raise
            skipped += 1
            log.warning("skipping %s", e)
    if skipped:
        log.warning("%s: skipped %d of %d rows", name, skipped, len(rows))
    if filtered:
        log.info("%s: %d of %d rows have no turn left after the rating filter", name, filtered, len(rows))
    return ConversationDataset(records, encoder, name=name, n_skipped=skipped, n_filtered=filtered)


def _strip_placeholder(text: str) -> str:
    """LLaVA's `<image>` placeholder (with the newline that joins it) is replaced by the image string."""
    for form in ("<image>\n", "\n<image>", "<image>"):
        text = text.replace(form, "")
    return text


def llava_dataset(
    path: str | Path, encoder: SampleEncoder, *, image_root: str | Path | None = None, on_error: str = "raise"
) -> ConversationDataset:
    """LLaVA-style rows: {"image": "a.jpg" | ["a.jpg", ...] (optional), "conversations":
    [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}, ...]}, in a .json array or
    .jsonl. Image paths are relative to `image_root` (default: the file's directory). `<image>`
    placeholders are removed; the image string goes at the start of the first user message."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent

    def parse(row, source):
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise SampleError(f"{source}: no 'conversations' list")
        messages = []
        for turn in conv:
            speaker = turn.get("from") if isinstance(turn, Mapping) else None
            if not isinstance(speaker, str) or speaker.lower() not in LLAVA_ROLES:
                raise SampleError(f"{source}: a turn must have 'from' in {sorted(LLAVA_ROLES)}, got {turn!r}")
            value = turn.get("value")
            role = LLAVA_ROLES[speaker.lower()]
            if isinstance(value, str) and role == "user":
                value = _strip_placeholder(value)
            messages.append({"role": role, "content": value})
        return [_image_ref(x, base, source) for x in _as_list(row.get("image"))], messages

    return _build(_read_rows(path), parse, encoder, on_error, str(path))


def check_min_ratings(min_ratings: Mapping[str, float | None] | None) -> dict[str, float]:
    """`min_ratings` validated: {name: minimum} for the names of `RATING_COLUMNS` that filter.
    None, and names given None, do not filter; an unknown name or a non-number is a ValueError."""
    out = {}
    for name, minimum in (min_ratings or {}).items():
        if name not in RATING_COLUMNS:
            raise ValueError(f"min_ratings: unknown rating {name!r} (known: {', '.join(RATING_COLUMNS)})")
        if minimum is None:
            continue
        if isinstance(minimum, bool) or not isinstance(minimum, (int, float)):
            raise ValueError(f"min_ratings[{name!r}] must be a number or None, got {minimum!r}")
        out[name] = minimum
    return out


def _rating(ratings, turn: int, column: str, source: str):
    """Turn `turn`'s rating in one column's list, or None (no list, no entry, or null)."""
    if ratings is None:
        return None
    if not isinstance(ratings, (list, tuple)):
        raise SampleError(f"{source}: {column} must be a list, got {type(ratings).__name__}")
    value = ratings[turn] if turn < len(ratings) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SampleError(f"{source}: {column}[{turn}] must be a number or null, got {value!r}")
    return value


def parse_cauldron_row(
    row: Mapping[str, Any], source: str, *, base: Path, min_ratings: Mapping[str, float] | None = None
) -> tuple[list[Path | bytes], list[dict[str, str]], int]:
    """One Cauldron / FineVision row -> (image refs, ChatML messages, turns dropped by ratings).

    `row`: {"images": [paths or {"bytes", "path"}] or None, "texts": [{"user", "assistant"}, ...],
    optionally the rating columns of `RATING_COLUMNS`: one rating per turn}. As upstream's
    `_get_messages`, turn t is dropped when a present column's rating for it is below that
    column's entry in `min_ratings` (validated by `check_min_ratings`); a null rating, a column
    that is absent or null, and a list too short to rate turn t keep it. Messages are [] exactly
    when every turn was dropped (the images are then not looked at). Relative image paths are
    under `base`. A malformed row is a SampleError; `_check_messages` is the caller's.
    """
    texts = row.get("texts")
    if not isinstance(texts, (list, tuple)) or not texts:
        raise SampleError(f"{source}: no 'texts' list")
    messages, dropped, minimums = [], 0, min_ratings or {}
    for turn, t in enumerate(texts):
        if not isinstance(t, Mapping):
            raise SampleError(f"{source}: a 'texts' entry must be an object, got {t!r}")
        ratings = [
            (_rating(row.get(RATING_COLUMNS[k]), turn, RATING_COLUMNS[k], source), m) for k, m in minimums.items()
        ]
        if any(r is not None and r < m for r, m in ratings):
            dropped += 1
            continue
        messages.append({"role": "user", "content": t.get("user")})
        messages.append({"role": "assistant", "content": t.get("assistant")})
    if not messages:
        return [], [], dropped
    return [_image_ref(x, base, source) for x in _as_list(row.get("images"))], messages, dropped


def cauldron_dataset(
    path: str | Path,
    encoder: SampleEncoder,
    *,
    image_root: str | Path | None = None,
    on_error: str = "raise",
    min_ratings: Mapping[str, float | None] | None = None,
) -> ConversationDataset:
    """Cauldron-style rows: {"images": [paths or {"bytes", "path"}], "texts": [{"user": ...,
    "assistant": ...}, ...]} from .jsonl/.json (or .parquet when pyarrow is installed).
    `min_ratings` (e.g. `UPSTREAM_MIN_RATINGS`) applies upstream's per-turn rating filter (see
    `parse_cauldron_row`); the default None applies none. For sharded parquet too large to hold
    in memory, use `jaxvlm.data.streaming.ShardStream`."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    minimums = check_min_ratings(min_ratings)

    def parse(row, source):
        images, messages, _ = parse_cauldron_row(row, source, base=base, min_ratings=minimums)
        return (images, messages) if messages else None

    return _build(_read_rows(path), parse, encoder, on_error, str(path))


def coco_captions_dataset(
    root: str | Path,
    encoder: SampleEncoder,
    *,
    prompt: str = "Describe the image.",
    captions: str = "first",
    split: str | None = None,
    on_error: str = "raise",
) -> ConversationDataset:
    """COCO captions as (image, `prompt` -> caption) samples.

    `root` holds `captions.json` ({"images": [{"file_name", "split", "captions": [...]}, ...]})
    and `images/`. `captions="first"`: one sample per image; `"all"`: one per (image, caption).
    `split` keeps only images of that COCO split ("train2017" / "val2017")."""
    root = Path(root)
    index = root / "captions.json"
    if not index.is_file():
        raise FileNotFoundError(f"COCO captions index not found: {index}")
    if captions not in ("first", "all"):
        raise ValueError(f"captions must be 'first' or 'all', got {captions!r}")
    try:
        data = json.loads(read_utf8(index))
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{index}: expected an object with an 'images' list")
    rows = []
    for im in images:
        if split is not None and im.get("split") != split:
            continue
        caps = _as_list(im.get("captions")) or [None]
        for cap in caps[:1] if captions == "first" else caps:
            rows.append({"file_name": im.get("file_name"), "caption": cap})

    def parse(row, source):
        ref = _image_ref(row["file_name"], root / "images", source)
        return [ref], [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["caption"]}]

    return _build(rows, parse, encoder, on_error, str(index))
