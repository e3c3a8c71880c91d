"""The nanoVLM tokenizer: a Hugging Face `tokenizer.json` plus the VLM's extra tokens and ChatML.

Upstream builds its tokenizer with `transformers.AutoTokenizer.from_pretrained(name,
extra_special_tokens=cfg.vlm_extra_tokens, chat_template=cfg.lm_chat_template)` and sets
`pad_token = eos_token`. This module gives the same ids with the `tokenizers` library alone:

- the extra tokens are appended as special tokens after the base vocabulary, in the order
  given, so with SmolLM2 `<|image|>` = 49152, `<|global_image|>` = 49153,
  `<row_1_col_1>` = 49154 ... `<row_8_col_8>` = 49217 (docs/conventions.md, "Tokenizer and prompts");
- the chat template is the fixed ChatML template of `VLMConfig.lm_chat_template`, written out
  in Python (no jinja2): per message `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then
  `<|im_start|>assistant\\n` when a generation prompt is asked for. The template stored in the
  tokenizer's own `tokenizer_config.json` (SmolLM2-Instruct's adds a default system prompt) is
  ignored, as upstream overrides it too;
- EOS is the `eos_token` of `tokenizer_config.json` (or `special_tokens_map.json`) when one
  is present - `<|im_end|>` for the Instruct tokenizers - else `<|endoftext|>`; pad = EOS.

The SmolVLM family (`cfg.vlm_family == "smolvlm"`, `SmolVLMTokenizer`) differs in three ways:
its `tokenizer.json` already holds the image tokens at their own ids (looked up, never added);
its chat format is SmolVLM-Instruct's (`jaxvlm.smolvlm_processing.render_smolvlm_chat`:
`<|im_start|>User: ...<end_of_utterance>\nAssistant: ...`); EOS defaults to
`<end_of_utterance>`. `from_config(cfg, path)` returns the right one; both offer the same
interface (`family` says which).

Imports neither jax nor torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from conversion.config import CHATML_TEMPLATE, DEFAULT_EXTRA_TOKENS, smolvlm_extra_tokens
from conversion.pretrained import SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from conversion.smolvlm import SMOLVLM_CHAT_TEMPLATE

from .smolvlm_processing import END_OF_UTTERANCE, render_smolvlm_chat

log = logging.getLogger(__name__)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
FALLBACK_EOS = "<|endoftext|>"


def _as_pairs(extra_tokens: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = extra_tokens.items() if isinstance(extra_tokens, Mapping) else extra_tokens
    pairs = tuple((str(name), str(token)) for name, token in items)
    names = [n for n, _ in pairs]
    tokens = [t for _, t in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"extra tokens have duplicate names: {names}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"extra tokens have duplicate token strings: {tokens}")
    if any(not t for t in tokens):
        raise ValueError("extra tokens must be non-empty strings")
    return pairs


class Tokenizer:
    """A `tokenizers.Tokenizer` with nanoVLM's extra tokens, ChatML template and EOS/pad ids.

    Build it with `load_tokenizer(path)` or `from_config(cfg, path)`, not directly.
    """

    family = "nanovlm"
    assistant_prefix = f"{IM_START}assistant\n"  # what the loss mask skips in an assistant turn

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        base_vocab_size: int,
        extra_tokens: tuple[tuple[str, str], ...],
        eos_token: str,
        source: str,
    ):
        self.backend = backend
        self.base_vocab_size = base_vocab_size
        self.extra_tokens: dict[str, str] = dict(extra_tokens)
        self.source = source
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"{source}: eos token {eos_token!r} is not in the vocabulary")
        self.eos_token = eos_token
        self._eos_id = eos_id
        # `<|im_start|>assistant\n`: the prefix that the loss mask skips (upstream's prefix_len).
        self.assistant_prefix_ids: list[int] = self.encode(self.assistant_prefix)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus every added token (49152 + 66 = 49218 for SmolLM2 + defaults)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def extra_token_ids(self) -> dict[str, int]:
        return {name: self.base_vocab_size + i for i, name in enumerate(self.extra_tokens)}

    @property
    def image_token(self) -> str:
        if "image_token" not in self.extra_tokens:
            raise ValueError("this tokenizer has no extra token named 'image_token'")
        return self.extra_tokens["image_token"]

    @property
    def image_token_id(self) -> int:
        _ = self.image_token  # raises if absent
        return self.extra_token_ids["image_token"]

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    @property
    def pad_token_id(self) -> int:
        """Upstream sets pad = EOS."""
        return self._eos_id

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no BOS/EOS is added, special and extra tokens in the text are parsed."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or an integer array); `skip_special_tokens` drops the special
        tokens, the extra tokens included."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------
    @staticmethod
    def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The ChatML text (`VLMConfig.lm_chat_template` rendered without jinja2)."""
        parts = []
        for k, m in enumerate(messages):
            try:
                role, content = m["role"], m["content"]
            except (KeyError, TypeError):
                raise ValueError(f"message {k} must be a mapping with 'role' and 'content', got {m!r}") from None
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(
                    f"message {k}: 'role' and 'content' must be strings, got {type(role).__name__} and {type(content).__name__}"
                )
            parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """ChatML ids (or text with `tokenize=False`) of `messages` [{"role", "content"}, ...],
        as `transformers`' `apply_chat_template(..., add_special_tokens=False)` gives them."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], np.ndarray]:
        """(ids, bool[T] mask of the tokens to train on) of a whole conversation.

        Upstream's rule: each message is tokenized on its own (ChatML segments), and in an
        assistant segment everything after `<|im_start|>assistant\n` is trained on - the answer,
        its `<|im_end|>` and the newline after it. Raises ValueError if the segments do not add
        up to the conversation (upstream would silently misalign the mask).
        """
        ids = self.apply_chat_template(messages)
        mask = np.zeros(len(ids), bool)
        prefix_len = len(self.assistant_prefix_ids)
        cursor = 0
        for m in messages:
            seg_len = len(self.apply_chat_template([m]))
            if m["role"] == "assistant":
                mask[cursor + prefix_len : cursor + seg_len] = True
            cursor += seg_len
        if cursor != len(ids):
            raise ValueError(f"the conversation tokenizes to {len(ids)} ids but its messages to {cursor}")
        return ids, mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, extra_tokens={len(self.extra_tokens)}, "
            f"eos={self.eos_token!r})"
        )


class SmolVLMTokenizer(Tokenizer):
    """SmolVLM's tokenizer: the image tokens at the ids its `tokenizer.json` gives them, and
    SmolVLM-Instruct's chat format (`render_smolvlm_chat`).

    Messages' content may be a str or a list of parts ({"type": "text", "text"} / {"type":
    "image"}, an image part optionally carrying its "image_string"), as the template takes them.
    Build it with `load_smolvlm_tokenizer(path)` or `from_config(cfg, path)`.
    """

    family = "smolvlm"
    assistant_prefix = "Assistant:"

    def __init__(self, backend: tokenizers.Tokenizer, *, extra_tokens, eos_token: str, source: str):
        ids = {name: backend.token_to_id(token) for name, token in extra_tokens}
        self._extra_ids = {name: int(i) for name, i in ids.items()}
        vocab = backend.get_vocab(with_added_tokens=True)
        self.max_id = max(vocab.values()) if vocab else -1
        super().__init__(
            backend,
            base_vocab_size=backend.get_vocab_size(with_added_tokens=False),
            extra_tokens=extra_tokens,
            eos_token=eos_token,
            source=source,
        )

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the embedding rows the tokenizer needs)."""
        return max(self.max_id + 1, self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def extra_token_ids(self) -> dict[str, int]:
        return dict(self._extra_ids)

    @staticmethod
    def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The SmolVLM-Instruct text of `messages` (`SMOLVLM_CHAT_TEMPLATE` without jinja2)."""
        return render_smolvlm_chat(messages, add_generation_prompt)[0]

    def apply_chat_template(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """SmolVLM ids (or text with `tokenize=False`) of `messages`, as `Idefics3Processor` gives
        them for the text of its chat template (its tokenizer adds no BOS/EOS)."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode_conversation(self, messages: Sequence[Mapping]) -> tuple[list[int], np.ndarray]:
        """(ids, bool[T] mask): the tokens that start inside an assistant answer - after its
        `Assistant:` through its `<end_of_utterance>` (not the newline after it) - are trained on.
        Found from the character offsets of the whole text, so no per-message tokenization has
        to add up."""
        text, spans = render_smolvlm_chat(messages)
        enc = self.backend.encode(text, add_special_tokens=False)
        starts = np.asarray([a for a, _ in enc.offsets], np.int64)
        mask = np.zeros(len(enc.ids), bool)
        for a, b in spans:
            mask |= (starts >= a) & (starts < b)
        return list(enc.ids), mask


def _find_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_FILE
        if not candidate.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in directory {path}")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _read_eos(directory: Path) -> str | None:
    """`eos_token` from tokenizer_config.json, else special_tokens_map.json (a str or {"content": ...})."""
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):
        f = directory / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from None
        eos = d.get("eos_token") if isinstance(d, dict) else None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def load_tokenizer(
    path: str | Path,
    extra_tokens: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    chat_template: str | None = None,
    *,
    eos_token: str | None = None,
) -> Tokenizer:
    """Load a Hugging Face `tokenizer.json` (the file or its directory) and add the VLM tokens.

    Args:
      path: `tokenizer.json`, or a directory holding it (and optionally tokenizer_config.json /
        special_tokens_map.json, read for the EOS token).
      extra_tokens: name -> token, in id order; default `conversion.config.DEFAULT_EXTRA_TOKENS`
        (66 tokens). Pass `{}` for none. Each token must get id base + its index: a token that
        already exists elsewhere in the vocabulary is an error.
      chat_template: None or `VLMConfig.lm_chat_template`; only that ChatML template is implemented.
      eos_token: overrides the EOS found in the config files.
    Raises:
      FileNotFoundError naming the path; ValueError if the file is not a tokenizer.
    """
    if chat_template is not None and " ".join(chat_template.split()) != " ".join(CHATML_TEMPLATE.split()):
        raise ValueError(
            "only the ChatML chat template (VLMConfig.lm_chat_template) is implemented; got a different template"
        )
    file = _find_file(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None

    pairs = _as_pairs(DEFAULT_EXTRA_TOKENS if extra_tokens is None else extra_tokens)
    size_before = backend.get_vocab_size(with_added_tokens=True)
    # A tokenizer saved with (some of) the extra tokens already at its end keeps their ids.
    already = next(
        k
        for k in range(len(pairs), -1, -1)
        if all(backend.token_to_id(t) == size_before - k + i for i, (_, t) in enumerate(pairs[:k]))
    )
    base = size_before - already
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for _, t in pairs])
    for i, (name, token) in enumerate(pairs):
        got = backend.token_to_id(token)
        if got != base + i:
            raise ValueError(
                f"{file}: extra token {name}={token!r} got id {got}, expected {base + i} (base vocabulary {base} + index {i}); "
                "it collides with a token already in the vocabulary or the extra tokens are in a different order"
            )

    if eos_token is None:
        eos_token = _read_eos(file.parent)
    if eos_token is None:
        eos_token = FALLBACK_EOS
        log.info("%s: no eos_token in tokenizer_config.json/special_tokens_map.json, using %s", file, FALLBACK_EOS)
    return Tokenizer(backend, base_vocab_size=base, extra_tokens=pairs, eos_token=eos_token, source=str(file))


def load_smolvlm_tokenizer(
    path: str | Path,
    extra_tokens: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    *,
    eos_token: str | None = None,
) -> SmolVLMTokenizer:
    """Load SmolVLM's `tokenizer.json` (the file or its directory); nothing is added to it.

    Args:
      path: `tokenizer.json`, or a directory holding it (and tokenizer_config.json /
        special_tokens_map.json, read for the EOS token).
      extra_tokens: name -> token of the image tokens, which must all be in the vocabulary;
        default `conversion.config.smolvlm_extra_tokens()`.
      eos_token: overrides the EOS of the config files (default there: `<end_of_utterance>`).
    Raises:
      FileNotFoundError naming the path; ValueError naming every missing token.
    """
    file = _find_file(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None
    pairs = _as_pairs(smolvlm_extra_tokens() if extra_tokens is None else extra_tokens)
    missing = [f"{name}={token!r}" for name, token in pairs if backend.token_to_id(token) is None]
    if backend.token_to_id(END_OF_UTTERANCE) is None:
        missing.append(repr(END_OF_UTTERANCE))
    if missing:
        raise ValueError(
            f"{file}: not a SmolVLM tokenizer, these tokens are not in its vocabulary: {', '.join(missing)}"
        )
    if eos_token is None:
        eos_token = _read_eos(file.parent) or END_OF_UTTERANCE
    if eos_token != END_OF_UTTERANCE:
        log.warning("%s: EOS is %s, but SmolVLM's turns end with %s", file, eos_token, END_OF_UTTERANCE)
    return SmolVLMTokenizer(backend, extra_tokens=pairs, eos_token=eos_token, source=str(file))


def _same_template(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def load_for_config(cfg, path: str | Path) -> Tokenizer:
    """The tokenizer of a model of config `cfg`, not yet checked to fit it (`from_config` checks):
    nanoVLM: `load_tokenizer(path, extra_tokens=cfg.extra_tokens)`; SmolVLM: `load_smolvlm_tokenizer`
    with the config's image tokens (its chat format is fixed: `lm_chat_template` must be unset -
    the ChatML default - or SmolVLM's)."""
    if cfg.vlm_family == "smolvlm":
        if not any(_same_template(cfg.lm_chat_template, t) for t in (CHATML_TEMPLATE, SMOLVLM_CHAT_TEMPLATE)):
            raise ValueError(
                "vlm_family 'smolvlm' uses SmolVLM-Instruct's chat template; the config's lm_chat_template is another one"
            )
        return load_smolvlm_tokenizer(path, cfg.vlm_extra_tokens)
    return load_tokenizer(path, extra_tokens=cfg.extra_tokens)


def from_config(cfg, path: str | Path) -> Tokenizer:
    """The tokenizer of a `VLMConfig`, checked to fit the model (`check_fits`): for nanoVLM
    `load_tokenizer` with the config's extra tokens and chat template, for SmolVLM
    (`vlm_family == "smolvlm"`) `load_smolvlm_tokenizer`."""
    if cfg.vlm_family == "smolvlm":
        tok = load_for_config(cfg, path)
    else:
        tok = load_tokenizer(path, cfg.vlm_extra_tokens, cfg.lm_chat_template)
    check_fits(cfg, tok)
    return tok


def check_fits(cfg, tok: Tokenizer) -> None:
    """Raise unless the tokenizer's ids are the model's: the same family, the same base
    vocabulary (nanoVLM), every id below `lm_vocab_size`, the image token at the config's id.
    Otherwise ids past the embedding table would be clamped when generating and give NaN losses
    when training."""
    if tok.family != cfg.vlm_family:
        raise ValueError(
            f"tokenizer {tok.source}: a {tok.family} tokenizer for a {cfg.vlm_family} model "
            "(load it with jaxvlm.tokenizer.from_config)"
        )
    if tok.family == "smolvlm":
        names = {name for name, _ in cfg.vlm_extra_tokens}
        if names - set(tok.extra_tokens):
            raise ValueError(
                f"tokenizer {tok.source}: lacks the model's extra tokens {sorted(names - set(tok.extra_tokens))}"
            )
    elif tok.base_vocab_size != cfg.lm_base_vocab_size:
        raise ValueError(
            f"tokenizer {tok.source}: base vocabulary {tok.base_vocab_size} != the model's lm_base_vocab_size "
            f"{cfg.lm_base_vocab_size}: not this model's tokenizer"
        )
    if tok.vocab_size > cfg.lm_vocab_size:
        raise ValueError(
            f"tokenizer {tok.source}: {tok.vocab_size} tokens do not fit the model's lm_vocab_size {cfg.lm_vocab_size}"
        )
    if tok.image_token_id != cfg.image_token_id:
        raise ValueError(
            f"tokenizer {tok.source}: image token id {tok.image_token_id} != the model's {cfg.image_token_id}"
        )
