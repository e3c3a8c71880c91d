"""The weight-mapping table between nanoVLM checkpoints (PyTorch layout) and jaxvlm (NNX).

Both frameworks use the same module paths (`decoder.blocks.3.attn.q_proj`); only the leaf
names and layouts differ by kind of module. So the table lists every module once with its
kind, and each kind lists its leaves as (torch name, jax name, named transform). Both
directions read this one table; every transform is paired with its inverse and nothing is
ever guessed from an array's ndim.

Keys here are the keys of the *checkpoint file*: with tied embeddings the file stores only
`decoder.head.weight`, which is jaxvlm's `decoder.token_embedding.embedding`.

Symbols: D vision width, H language width, V vocabulary, P patch size, N patches,
I_v/I_l MLP widths, hd language head dim, kv language kv heads, s pixel-shuffle factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .config import RESAMPLER_MLP_RATIO, VLMConfig
from .safetensors_io import CheckpointError

JaxPath = tuple  # e.g. ("decoder", "blocks", 3, "attn", "q_proj", "kernel")


@dataclass(frozen=True)
class Transform:
    """A layout change torch -> jax and its inverse. `axes` is the permutation to_jax applies."""

    name: str
    axes: tuple[int, ...] | None  # None: identity

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        return x if self.axes is None else np.transpose(x, self.axes)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return x if self.axes is None else np.transpose(x, np.argsort(self.axes))

    def jax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        return torch_shape if self.axes is None else tuple(torch_shape[a] for a in self.axes)


IDENTITY = Transform("identity", None)
LINEAR = Transform("linear", (1, 0))  # torch [out, in] <-> jax kernel [in, out]
CONV2D = Transform("conv2d", (2, 3, 1, 0))  # torch [out, in, kh, kw] <-> jax kernel [kh, kw, in, out]
TRANSFORMS = (IDENTITY, LINEAR, CONV2D)


@dataclass(frozen=True)
class Leaf:
    torch: str  # "" when the module path is itself the tensor (a bare parameter or buffer)
    jax: str
    transform: Transform


# Kinds of module: the leaves each one has, torch name -> jax name.
KINDS: dict[str, tuple[Leaf, ...]] = {
    "linear": (Leaf("weight", "kernel", LINEAR), Leaf("bias", "bias", IDENTITY)),
    "linear_nobias": (Leaf("weight", "kernel", LINEAR),),
    "conv": (Leaf("weight", "kernel", CONV2D), Leaf("bias", "bias", IDENTITY)),
    "layernorm": (Leaf("weight", "scale", IDENTITY), Leaf("bias", "bias", IDENTITY)),
    "rmsnorm": (Leaf("weight", "weight", IDENTITY),),
    "embedding": (Leaf("weight", "embedding", IDENTITY),),
    "tensor": (Leaf("", "", IDENTITY),),  # nn.Parameter / persistent buffer <-> nnx.Variable
}


def _module_table(cfg: VLMConfig) -> Iterator[tuple[str, str, tuple[tuple[int, ...], ...]]]:
    """(module path, kind, torch shapes of its leaves in KINDS order), one row per module."""
    D, H, V = cfg.vit_hidden_dim, cfg.lm_hidden_dim, cfg.lm_vocab_size
    P, N = cfg.vit_patch_size, cfg.vit_n_patches
    kv = cfg.lm_n_kv_heads * cfg.lm_head_dim
    yield "vision_encoder.patch_embedding.conv", "conv", ((D, 3, P, P), (D,))
    yield "vision_encoder.patch_embedding.position_embedding", "tensor", ((1, N, D),)
    for i in range(cfg.vit_n_blocks):
        b = f"vision_encoder.blocks.{i}"
        yield f"{b}.ln1", "layernorm", ((D,), (D,))
        yield f"{b}.attn.qkv_proj", "linear", ((3 * D, D), (3 * D,))
        yield f"{b}.attn.out_proj", "linear", ((D, D), (D,))
        yield f"{b}.ln2", "layernorm", ((D,), (D,))
        yield f"{b}.mlp.fc1", "linear", ((cfg.vit_inter_dim, D), (cfg.vit_inter_dim,))
        yield f"{b}.mlp.fc2", "linear", ((D, cfg.vit_inter_dim), (D,))
    yield "vision_encoder.layer_norm", "layernorm", ((D,), (D,))
    yield from _projector_table(cfg)
    if not cfg.lm_tie_weights:
        yield "decoder.token_embedding", "embedding", ((V, H),)
    yield "decoder.rotary_embd.inv_freq", "tensor", ((cfg.lm_head_dim // 2,),)
    for i in range(cfg.lm_n_blocks):
        b = f"decoder.blocks.{i}"
        yield f"{b}.norm1", "rmsnorm", ((H,),)
        yield f"{b}.attn.q_proj", "linear_nobias", ((H, H),)
        yield f"{b}.attn.k_proj", "linear_nobias", ((kv, H),)
        yield f"{b}.attn.v_proj", "linear_nobias", ((kv, H),)
        yield f"{b}.attn.out_proj", "linear_nobias", ((H, H),)
        yield f"{b}.norm2", "rmsnorm", ((H,),)
        yield f"{b}.mlp.gate_proj", "linear_nobias", ((cfg.lm_inter_dim, H),)
        yield f"{b}.mlp.up_proj", "linear_nobias", ((cfg.lm_inter_dim, H),)
        yield f"{b}.mlp.down_proj", "linear_nobias", ((H, cfg.lm_inter_dim),)
    yield "decoder.norm", "rmsnorm", ((H,),)
    yield "decoder.head", "linear_nobias", ((V, H),)


def _projector_table(cfg: VLMConfig) -> Iterator[tuple[str, str, tuple[tuple[int, ...], ...]]]:
    """The projector's rows, by `cfg.mp_type` (jaxvlm/modality_projector.py). C = s*s*D its
    input width, Q the resampler's queries; pixel_shuffle_linear is nanoVLM's one `MP.proj`."""
    H, C = cfg.lm_hidden_dim, cfg.mp_input_dim
    if cfg.projector == "mlp":
        yield "MP.fc1", "linear", ((H, C), (H,))
        yield "MP.fc2", "linear", ((H, H), (H,))
        return
    if cfg.projector == "resampler":
        R = RESAMPLER_MLP_RATIO * C
        yield "MP.latents", "tensor", ((cfg.mp_resampler_queries, C),)
        for i in range(cfg.mp_resampler_layers):
            b = f"MP.blocks.{i}"
            yield f"{b}.ln_media", "layernorm", ((C,), (C,))
            yield f"{b}.ln_latents", "layernorm", ((C,), (C,))
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                yield f"{b}.attn.{name}", "linear_nobias", ((C, C),)
            yield f"{b}.ln_mlp", "layernorm", ((C,), (C,))
            yield f"{b}.mlp.fc1", "linear_nobias", ((R, C),)
            yield f"{b}.mlp.fc2", "linear_nobias", ((C, R),)
        yield "MP.layer_norm", "layernorm", ((C,), (C,))
    yield "MP.proj", "linear_nobias", ((H, C),)


@dataclass(frozen=True)
class Entry:
    """One tensor: its checkpoint key and torch shape, its jaxvlm path, and the transform between."""

    torch_key: str
    torch_shape: tuple[int, ...]
    jax_path: JaxPath
    transform: Transform

    @property
    def jax_shape(self) -> tuple[int, ...]:
        return self.transform.jax_shape(self.torch_shape)


def _jax_path(module: str, leaf: str) -> JaxPath:
    parts = [int(p) if p.isdigit() else p for p in module.split(".")]
    return tuple(parts + ([leaf] if leaf else []))


def mapping(cfg: VLMConfig) -> list[Entry]:
    """Every tensor of a checkpoint for `cfg`, exactly once, in checkpoint order."""
    entries = []
    for module, kind, shapes in _module_table(cfg):
        leaves = KINDS[kind]
        assert len(leaves) == len(shapes), (module, kind)
        for leaf, shape in zip(leaves, shapes):
            key = f"{module}.{leaf.torch}" if leaf.torch else module
            path = _jax_path(module, leaf.jax)
            if cfg.lm_tie_weights and module == "decoder.head":
                # Tied: the file stores the shared tensor once, under the head's name; in jaxvlm
                # it is the embedding table (same [V, H] layout), used transposed as the head.
                path, transform = ("decoder", "token_embedding", "embedding"), IDENTITY
            else:
                transform = leaf.transform
            entries.append(Entry(key, tuple(shape), path, transform))
    return entries


def expected_shapes(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint's key set and torch-layout shapes (what upstream's save_pretrained writes)."""
    return {e.torch_key: e.torch_shape for e in mapping(cfg)}


def check_keys(expected: dict, actual: dict, *, source: str, shape_of: Callable = np.shape) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key (all at once)."""
    problems = []
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    if missing:
        problems.append(f"missing key(s): {', '.join(map(_fmt, missing))}")
    if unexpected:
        problems.append(f"unexpected key(s): {', '.join(map(_fmt, unexpected))}")
    for k in expected:
        if k in actual and tuple(shape_of(actual[k])) != tuple(expected[k]):
            problems.append(
                f"{_fmt(k)} has shape {tuple(shape_of(actual[k]))}, the config expects {tuple(expected[k])}"
            )
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _fmt(k) -> str:
    return ".".join(map(str, k)) if isinstance(k, tuple) else str(k)


def torch_to_jax(
    cfg: VLMConfig, tensors: dict[str, np.ndarray], *, source: str = "checkpoint"
) -> dict[JaxPath, np.ndarray]:
    """Checkpoint tensors (torch layout, file keys) -> {jaxvlm path: array}. Strict."""
    table = mapping(cfg)
    check_keys({e.torch_key: e.torch_shape for e in table}, tensors, source=source)
    return {e.jax_path: e.transform.to_jax(tensors[e.torch_key]) for e in table}


def jax_to_torch(
    cfg: VLMConfig, flat: dict[JaxPath, np.ndarray], *, source: str = "jaxvlm state"
) -> dict[str, np.ndarray]:
    """{jaxvlm path: array} -> checkpoint tensors (torch layout, file keys). Strict."""
    table = mapping(cfg)
    check_keys({e.jax_path: e.jax_shape for e in table}, flat, source=source)
    return {e.torch_key: np.ascontiguousarray(e.transform.to_torch(np.asarray(flat[e.jax_path]))) for e in table}


# ---- transformers' Idefics3 (SmolVLM) names ------------------------------------------------
# The same checkpoint keys under the names transformers' `Idefics3ForConditionalGeneration`
# saves. One row per checkpoint key: the Idefics3 key(s) and how they combine. Used by
# `conversion.smolvlm` in both directions.
HF_SAME = "same"  # the one tensor as is
HF_UNSQUEEZE = "unsqueeze0"  # Idefics3's [N, D] position Embedding <-> nanoVLM's [1, N, D] Parameter
HF_CONCAT = "concat0"  # Idefics3's separate q, k, v <-> nanoVLM's fused qkv_proj (that order, axis 0)


@dataclass(frozen=True)
class HFEntry:
    torch_key: str
    hf_keys: tuple[str, ...]
    op: str


_IDEFICS3_VIT_BLOCK = (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))  # fmt: skip
_IDEFICS3_LM_BLOCK = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
                      ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
                      ("attn.v_proj", "self_attn.v_proj"), ("attn.out_proj", "self_attn.o_proj"),
                      ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
                      ("mlp.down_proj", "mlp.down_proj"))  # fmt: skip


def idefics3_mapping(cfg: VLMConfig) -> list[HFEntry]:
    """Every checkpoint key of `cfg` with its Idefics3 key(s), in checkpoint order.

    `decoder.rotary_embd.inv_freq` has no Idefics3 counterpart (transformers computes it from
    rope_theta) and is not listed. Tied: the file's `decoder.head.weight` is Idefics3's
    `model.text_model.embed_tokens.weight` (which transformers saves alone for a tied model);
    untied: `decoder.token_embedding.weight` is the embedding and `decoder.head.weight` `lm_head.weight`.
    """
    if cfg.projector != "pixel_shuffle_linear":
        raise CheckpointError(
            f"mp_type {cfg.mp_type!r}: SmolVLM (Idefics3) has only the pixel-shuffle linear projector; "
            "a checkpoint with another projector cannot be written as or read from SmolVLM"
        )
    v, t = "model.vision_model.", "model.text_model."
    rows = {
        "vision_encoder.patch_embedding.conv.weight": ((f"{v}embeddings.patch_embedding.weight",), HF_SAME),
        "vision_encoder.patch_embedding.conv.bias": ((f"{v}embeddings.patch_embedding.bias",), HF_SAME),
        "vision_encoder.patch_embedding.position_embedding": (
            (f"{v}embeddings.position_embedding.weight",),
            HF_UNSQUEEZE,
        ),
        "vision_encoder.layer_norm.weight": ((f"{v}post_layernorm.weight",), HF_SAME),
        "vision_encoder.layer_norm.bias": ((f"{v}post_layernorm.bias",), HF_SAME),
        "MP.proj.weight": (("model.connector.modality_projection.proj.weight",), HF_SAME),
        "decoder.norm.weight": ((f"{t}norm.weight",), HF_SAME),
        "decoder.token_embedding.weight": ((f"{t}embed_tokens.weight",), HF_SAME),
        "decoder.head.weight": (((f"{t}embed_tokens.weight",) if cfg.lm_tie_weights else ("lm_head.weight",)), HF_SAME),
    }
    for i in range(cfg.vit_n_blocks):
        ours, theirs = f"vision_encoder.blocks.{i}.", f"{v}encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            for a, b in _IDEFICS3_VIT_BLOCK:
                rows[f"{ours}{a}.{leaf}"] = ((f"{theirs}{b}.{leaf}",), HF_SAME)
            rows[f"{ours}attn.qkv_proj.{leaf}"] = (
                tuple(f"{theirs}self_attn.{p}.{leaf}" for p in ("q_proj", "k_proj", "v_proj")),
                HF_CONCAT,
            )
    for i in range(cfg.lm_n_blocks):
        for a, b in _IDEFICS3_LM_BLOCK:
            rows[f"decoder.blocks.{i}.{a}.weight"] = ((f"{t}layers.{i}.{b}.weight",), HF_SAME)
    out = []
    for e in mapping(cfg):
        if e.torch_key == "decoder.rotary_embd.inv_freq":
            continue
        hf_keys, op = rows[e.torch_key]
        out.append(HFEntry(e.torch_key, hf_keys, op))
    return out


def hf_to_checkpoint(cfg: VLMConfig, hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Idefics3 tensors (keys as `idefics3_mapping` names them) -> checkpoint tensors, bit-exact
    (no dtype change). The caller checks the key set and shapes first."""
    out = {}
    for e in idefics3_mapping(cfg):
        parts = [hf[k] for k in e.hf_keys]
        if e.op == HF_CONCAT:
            out[e.torch_key] = np.concatenate(parts, axis=0)
        elif e.op == HF_UNSQUEEZE:
            out[e.torch_key] = parts[0][None]
        else:
            out[e.torch_key] = parts[0]
    return out


def checkpoint_to_hf(cfg: VLMConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> Idefics3 tensors, the inverse of `hf_to_checkpoint`, bit-exact."""
    out = {}
    for e in idefics3_mapping(cfg):
        x = np.asarray(tensors[e.torch_key])
        if e.op == HF_CONCAT:
            for k, part in zip(e.hf_keys, np.split(x, len(e.hf_keys), axis=0)):
                out[k] = np.ascontiguousarray(part)
        elif e.op == HF_UNSQUEEZE:
            out[e.hf_keys[0]] = np.ascontiguousarray(x[0])
        else:
            out[e.hf_keys[0]] = np.ascontiguousarray(x)
    return out


def idefics3_shapes(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
    """The Idefics3 file's key set and shapes for `cfg` (what transformers saves)."""
    shapes = {}
    for e, entry in zip(
        idefics3_mapping(cfg), (x for x in mapping(cfg) if x.torch_key != "decoder.rotary_embd.inv_freq")
    ):
        shape = entry.torch_shape
        if e.op == HF_CONCAT:
            shape = (shape[0] // len(e.hf_keys),) + tuple(shape[1:])
        elif e.op == HF_UNSQUEEZE:
            shape = tuple(shape[1:])
        for k in e.hf_keys:
            shapes[k] = tuple(shape)
    return shapes
