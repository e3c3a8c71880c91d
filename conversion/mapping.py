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

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .config import VLMConfig
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
    yield "MP.proj", "linear_nobias", ((H, cfg.mp_input_dim),)
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
