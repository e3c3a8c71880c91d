"""The mapping table, the transforms, round trips between the frameworks and file formats, and
compatibility with upstream nanoVLM's checkpoint directory (keys, dtypes, shapes, metadata,
config.json fields, save_model / load_model).

Round trips are bit-exact (np.array_equal and the same dtype), never approximately equal.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import (
    UPSTREAM_CONFIG_FIELDS,
    checkpoint_arrays,
    random_torch_vlm,
    record,
    tiny_cfg,
    to_np,
    upstream_config_dict,
)
from flax import nnx

import jaxvlm
import torch_ref
from conversion import (
    CheckpointError,
    VLMConfig,
    expected_shapes,
    jax_to_torch,
    load_safetensors,
    mapping,
    save_safetensors,
    torch_to_jax,
)
from conversion.mapping import CONV2D, IDENTITY, LINEAR, TRANSFORMS
from jaxvlm.options import ModelOptions
from jaxvlm.pretrained import (
    abstract_model,
    flat_state,
    load_flat_state,
    load_orbax,
    model_from_torch_tensors,
    save_orbax,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
CONFIGS = {
    "tiny-tied": lambda: tiny_cfg(),
    "tiny-untied": lambda: tiny_cfg(lm_tie_weights=False),
    "nanovlm-222m": VLMConfig.nanovlm_222m,
    "nanovlm-460m": VLMConfig.nanovlm_460m,
}


def _meta_torch(cfg):
    """torch_ref's module tree and state shapes without allocating weights."""
    with torch.device("meta"):
        return torch_ref.VisionLanguageModel(cfg)


def _assert_same_arrays(name, got: dict, want: dict):
    assert set(got) == set(want), f"{name}: keys differ: {sorted(set(got) ^ set(want), key=str)[:5]}"
    bad_dtype = [k for k in want if np.asarray(got[k]).dtype != np.asarray(want[k]).dtype]
    bad_value = [k for k in want if not np.array_equal(np.asarray(got[k]), np.asarray(want[k]))]
    record(
        name, f"{len(want)} tensors, {len(bad_value)} not bit-exact, {len(bad_dtype)} with another dtype (tol: exact)"
    )
    assert not bad_dtype, (
        f"{name}: dtype changed for {[(k, str(np.asarray(got[k]).dtype), str(np.asarray(want[k]).dtype)) for k in bad_dtype][:5]}"
    )
    assert not bad_value, f"{name}: not bit-exact: {bad_value[:5]}"


def _random_jax_model(cfg, seed, options=ModelOptions()):
    """A jaxvlm model with every variable random (norm scales and biases included)."""
    model = jaxvlm.VisionLanguageModel(cfg, options=options, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    flat = {p: rng.standard_normal(v.shape).astype(v.dtype) for p, v in flat_state(model).items()}
    load_flat_state(model, flat, source="random")
    return model, flat


# ---- the table -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mapping_covers_every_key_exactly_once(name):
    cfg = CONFIGS[name]()
    entries = mapping(cfg)
    torch_keys = [e.torch_key for e in entries]
    jax_paths = [e.jax_path for e in entries]
    assert len(set(torch_keys)) == len(torch_keys), "a checkpoint key appears in two entries"
    assert len(set(jax_paths)) == len(jax_paths), "a jaxvlm path appears in two entries"

    # torch side: the file keys are the state dict minus the tied embedding alias
    tmodel = _meta_torch(cfg)
    state = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    file_keys = set(state) - ({"decoder.token_embedding.weight"} if cfg.lm_tie_weights else set())
    assert set(torch_keys) == file_keys, f"mapping vs torch_ref: {sorted(set(torch_keys) ^ file_keys)}"
    assert {e.torch_key: e.torch_shape for e in entries} == {k: state[k] for k in file_keys}
    assert set(expected_shapes(cfg)) | ({"decoder.token_embedding.weight"} if cfg.lm_tie_weights else set()) == set(
        state
    )
    assert "decoder.rotary_embd.inv_freq" in state and "decoder.head.weight" in state

    # jax side: every variable of the NNX state (params and buffers), with its shape
    jstate = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
    assert set(jax_paths) == set(jstate), f"mapping vs jaxvlm: {sorted(set(jax_paths) ^ set(jstate), key=str)}"
    assert all(e.jax_shape == jstate[e.jax_path] for e in entries)
    record(
        f"mapping[{name}]",
        f"{len(entries)} entries = {len(file_keys)} file keys = {len(jstate)} NNX variables, each once",
    )


def test_transforms_are_the_layouts_and_invert():
    rng = np.random.default_rng(0)
    # LINEAR: torch y = x W^T with W [out, in]; jax y = x K with K [in, out]
    W = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    assert np.allclose(x @ W.T, x @ LINEAR.to_jax(W), rtol=0, atol=1e-6)
    y_t = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(W))
    y_j = nnx.Linear(3, 5, use_bias=False, rngs=nnx.Rngs(0))
    y_j.kernel.set_value(jnp.asarray(LINEAR.to_jax(W)))
    assert np.allclose(to_np(y_t), np.asarray(y_j(jnp.asarray(x))), rtol=0, atol=1e-6)
    # CONV2D: torch Conv2d weight [out, in, kh, kw] (NCHW) == lax conv with HWIO kernel (NHWC),
    # with kh != kw so that swapping the spatial axes would be caught
    Wc = rng.standard_normal((6, 3, 2, 3)).astype(np.float32)
    img = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    out_t = to_np(torch.nn.functional.conv2d(torch.from_numpy(img), torch.from_numpy(Wc), stride=(2, 3)))
    out_j = jax.lax.conv_general_dilated(
        jnp.asarray(img.transpose(0, 2, 3, 1)),
        jnp.asarray(CONV2D.to_jax(Wc)),
        (2, 3),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    assert np.allclose(out_t, np.asarray(out_j).transpose(0, 3, 1, 2), rtol=0, atol=1e-5)
    # every named transform: to_torch inverts to_jax bit-exactly, and jax_shape predicts the shape
    for t, ndim in ((IDENTITY, 3), (LINEAR, 2), (CONV2D, 4)):
        assert t in TRANSFORMS
        for dtype in (np.float32, BF16):
            a = rng.standard_normal(tuple(range(2, 2 + ndim))).astype(dtype)
            j = t.to_jax(a)
            assert j.shape == t.jax_shape(a.shape)
            back = t.to_torch(j)
            assert back.dtype == a.dtype and np.array_equal(back, a)
            assert np.array_equal(t.to_jax(t.to_torch(j)), j)


def test_conversion_is_strict():
    cfg = tiny_cfg()
    tensors = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
    torch_to_jax(cfg, tensors)
    bad = dict(tensors)
    del bad["MP.proj.weight"]
    bad["MP.proj.bias"] = np.zeros(64, np.float32)
    bad["decoder.norm.weight"] = np.zeros(65, np.float32)
    with pytest.raises(CheckpointError) as e:
        torch_to_jax(cfg, bad)
    msg = str(e.value)
    assert (
        "MP.proj.weight" in msg
        and "MP.proj.bias" in msg
        and "decoder.norm.weight" in msg
        and "(65,)" in msg
        and "(64,)" in msg
    )
    flat = torch_to_jax(cfg, tensors)
    del flat[("decoder", "norm", "weight")]
    with pytest.raises(CheckpointError, match="decoder.norm.weight"):
        jax_to_torch(cfg, flat)


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mapping_round_trip_on_arrays(dtype, tie):
    """conversion alone: checkpoint tensors -> {jax path: array} -> checkpoint tensors."""
    cfg = tiny_cfg(lm_tie_weights=tie)
    rng = np.random.default_rng(0)
    tensors = {
        k: rng.standard_normal(s).astype(np.dtype(dtype) if dtype == "float32" else BF16)
        for k, s in expected_shapes(cfg).items()
    }
    flat = torch_to_jax(cfg, tensors)
    assert all(flat[e.jax_path].shape == e.jax_shape for e in mapping(cfg))
    _assert_same_arrays(f"mapping torch_to_jax -> jax_to_torch [{dtype}, tied={tie}]", jax_to_torch(cfg, flat), tensors)
    _assert_same_arrays(
        f"mapping jax_to_torch -> torch_to_jax [{dtype}, tied={tie}]", torch_to_jax(cfg, jax_to_torch(cfg, flat)), flat
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_torch_jax_torch_round_trip(dtype, tie, tmp_path):
    cfg = tiny_cfg(lm_tie_weights=tie)
    tensors = checkpoint_arrays(random_torch_vlm(cfg, 0))
    if dtype == "bfloat16":
        tensors = {k: v.astype(BF16) for k, v in tensors.items()}
    # through a safetensors file (bf16 as ml_dtypes arrays)
    save_safetensors(tmp_path / "w.safetensors", tensors)
    loaded, _ = load_safetensors(tmp_path / "w.safetensors")
    _assert_same_arrays(f"safetensors save/load [{dtype}, tied={tie}]", loaded, tensors)
    model = model_from_torch_tensors(cfg, loaded, options=ModelOptions(param_dtype=jnp.dtype(dtype)))
    back = jax_to_torch(cfg, flat_state(model))
    # values must survive whatever the storage dtype of each jaxvlm variable
    bad = [k for k in tensors if not np.array_equal(back[k].astype(np.float32), tensors[k].astype(np.float32))]
    assert not bad, f"torch -> jax -> torch [{dtype}]: values changed for {bad[:5]}"
    _assert_same_arrays(f"torch -> jax -> torch [{dtype}, tied={tie}]", back, tensors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_jax_torch_jax_round_trip(dtype, tie, tmp_path):
    cfg = tiny_cfg(lm_tie_weights=tie)
    model, flat = _random_jax_model(cfg, 1, ModelOptions(param_dtype=jnp.dtype(dtype)))
    tensors = jax_to_torch(cfg, flat)
    save_safetensors(tmp_path / "w.safetensors", tensors)
    loaded, _ = load_safetensors(tmp_path / "w.safetensors")
    back = flat_state(model_from_torch_tensors(cfg, loaded, options=ModelOptions(param_dtype=jnp.dtype(dtype))))
    _assert_same_arrays(f"jax -> torch -> jax [{dtype}, tied={tie}]", back, flat)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_jaxvlm_save_pretrained_torch_ref_and_back(tie, tmp_path):
    cfg = tiny_cfg(lm_tie_weights=tie)
    model, flat = _random_jax_model(cfg, 2)
    model.save_pretrained(tmp_path / "jax")
    tmodel = torch_ref.VisionLanguageModel.from_pretrained(tmp_path / "jax")
    assert tmodel.cfg == cfg
    _assert_same_arrays(
        f"jaxvlm save_pretrained -> torch_ref.from_pretrained [tied={tie}]",
        checkpoint_arrays(tmodel),
        jax_to_torch(cfg, flat),
    )
    if tie:
        assert tmodel.decoder.head.weight is tmodel.decoder.token_embedding.weight
    tmodel.save_pretrained(tmp_path / "torch")
    back = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "torch")
    assert back.cfg == cfg
    _assert_same_arrays(
        f"... -> torch_ref.save_pretrained -> jaxvlm.from_pretrained [tied={tie}]", flat_state(back), flat
    )
    assert json.loads((tmp_path / "jax" / "config.json").read_text()) == json.loads(
        (tmp_path / "torch" / "config.json").read_text()
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(dtype, tmp_path):
    cfg = tiny_cfg()
    model, flat = _random_jax_model(cfg, 3, ModelOptions(param_dtype=jnp.dtype(dtype)))
    save_orbax(model, tmp_path / "orbax")
    back = load_orbax(tmp_path / "orbax", options=ModelOptions(param_dtype=jnp.dtype(dtype)))
    assert back.cfg == cfg
    _assert_same_arrays(f"orbax save/load [{dtype}]", flat_state(back), flat)
    with pytest.raises(CheckpointError, match="already exists"):
        save_orbax(model, tmp_path / "orbax")


# ---- upstream's directory format -------------------------------------------------------------------
def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header.pop("__metadata__", None), header


@pytest.mark.parametrize("writer", ["torch_ref", "jaxvlm"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_checkpoint_directory_is_upstreams_format(writer, tie, tmp_path):
    cfg = tiny_cfg(lm_tie_weights=tie)
    if writer == "torch_ref":
        random_torch_vlm(cfg, 0).save_pretrained(tmp_path)
    else:
        _random_jax_model(cfg, 0)[0].save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    metadata, header = _header(tmp_path / "model.safetensors")
    assert metadata == {"format": "pt"}
    want = expected_shapes(cfg)
    assert set(header) == set(want)
    assert {k: tuple(v["shape"]) for k, v in header.items()} == want
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert "decoder.rotary_embd.inv_freq" in header and "decoder.head.weight" in header
    assert ("decoder.token_embedding.weight" in header) == (not tie)
    d = json.loads((tmp_path / "config.json").read_text())
    assert list(d) == UPSTREAM_CONFIG_FIELDS, (
        f"config.json fields differ from upstream's: {sorted(set(d) ^ set(UPSTREAM_CONFIG_FIELDS))}"
    )
    assert d == upstream_config_dict(cfg)
    record(
        f"directory format [{writer}, tied={tie}]",
        f"{len(header)} tensors F32, metadata {metadata}, {len(d)} config fields = upstream's",
    )


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_checkpoint_written_by_upstream_loads(tie, tmp_path):
    """Upstream's save_pretrained is `json.dumps(asdict(cfg))` + `safetensors.torch.save_model`;
    torch_ref has upstream's module tree, so save_model on it writes what upstream writes."""
    cfg = tiny_cfg(lm_tie_weights=tie)
    tmodel = random_torch_vlm(cfg, 4)
    safetensors.torch.save_model(tmodel, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(upstream_config_dict(cfg), indent=4))
    _, header = _header(tmp_path / "model.safetensors")
    assert set(header) == set(expected_shapes(cfg)), "save_model's key choice differs from the spec (tied: head only)"
    want = checkpoint_arrays(tmodel)
    t2 = torch_ref.VisionLanguageModel.from_pretrained(tmp_path)
    _assert_same_arrays(f"upstream-written checkpoint -> torch_ref [tied={tie}]", checkpoint_arrays(t2), want)
    assert t2.cfg == cfg
    j = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path)
    assert j.cfg == cfg
    _assert_same_arrays(f"upstream-written checkpoint -> jaxvlm [tied={tie}]", jax_to_torch(cfg, flat_state(j)), want)


@pytest.mark.parametrize("writer", ["torch_ref", "jaxvlm"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_our_checkpoint_loads_in_upstream(writer, tie, tmp_path):
    """Upstream's from_pretrained is `VLMConfig(**json)` + `safetensors.torch.load_model(model, path)`."""
    cfg = tiny_cfg(lm_tie_weights=tie)
    if writer == "torch_ref":
        src = random_torch_vlm(cfg, 5)
        src.save_pretrained(tmp_path)
        want = checkpoint_arrays(src)
    else:
        model, flat = _random_jax_model(cfg, 5)
        model.save_pretrained(tmp_path)
        want = jax_to_torch(cfg, flat)
    fresh = torch_ref.VisionLanguageModel(cfg)
    missing, unexpected = safetensors.torch.load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    _assert_same_arrays(
        f"{writer} checkpoint -> safetensors.torch.load_model(strict) [tied={tie}]", checkpoint_arrays(fresh), want
    )
    d = json.loads((tmp_path / "config.json").read_text())
    assert set(d) == set(UPSTREAM_CONFIG_FIELDS)  # upstream's VLMConfig(**d) accepts exactly these


# ---- torch_ref's module tree is upstream's ---------------------------------------------------------
# Upstream's class for every module that holds tensors (models/*.py), and those tensors:
# (class name, parameters, persistent buffers). Upstream's tensor-free modules (Dropout, the
# GELU module) have no state and torch_ref drops them.
_LIN_B, _LIN = ("Linear", ("weight", "bias"), ()), ("Linear", ("weight",), ())
_LN = ("LayerNorm", ("weight", "bias"), ())
_RMS = ("RMSNorm", ("weight",), ())
UPSTREAM_TREE = {
    "": ("VisionLanguageModel", (), ()),
    "vision_encoder": ("ViT", (), ()),
    "vision_encoder.patch_embedding": ("ViTPatchEmbeddings", ("position_embedding",), ()),
    "vision_encoder.patch_embedding.conv": ("Conv2d", ("weight", "bias"), ()),
    "vision_encoder.blocks": ("ModuleList", (), ()),
    "vision_encoder.blocks.#": ("ViTBlock", (), ()),
    "vision_encoder.blocks.#.ln1": _LN,
    "vision_encoder.blocks.#.ln2": _LN,
    "vision_encoder.blocks.#.attn": ("ViTMultiHeadAttention", (), ()),
    "vision_encoder.blocks.#.attn.qkv_proj": _LIN_B,
    "vision_encoder.blocks.#.attn.out_proj": _LIN_B,
    "vision_encoder.blocks.#.mlp": ("ViTMLP", (), ()),
    "vision_encoder.blocks.#.mlp.fc1": _LIN_B,
    "vision_encoder.blocks.#.mlp.fc2": _LIN_B,
    "vision_encoder.layer_norm": _LN,
    "decoder": ("LanguageModel", (), ()),
    "decoder.token_embedding": ("Embedding", ("weight",), ()),
    "decoder.rotary_embd": ("RotaryEmbedding", (), ("inv_freq",)),
    "decoder.blocks": ("ModuleList", (), ()),
    "decoder.blocks.#": ("LanguageModelBlock", (), ()),
    "decoder.blocks.#.mlp": ("LanguageModelMLP", (), ()),
    "decoder.blocks.#.mlp.gate_proj": _LIN,
    "decoder.blocks.#.mlp.up_proj": _LIN,
    "decoder.blocks.#.mlp.down_proj": _LIN,
    "decoder.blocks.#.attn": ("LanguageModelGroupedQueryAttention", (), ()),
    "decoder.blocks.#.attn.q_proj": _LIN,
    "decoder.blocks.#.attn.k_proj": _LIN,
    "decoder.blocks.#.attn.v_proj": _LIN,
    "decoder.blocks.#.attn.out_proj": _LIN,
    "decoder.blocks.#.norm1": _RMS,
    "decoder.blocks.#.norm2": _RMS,
    "decoder.norm": _RMS,
    "decoder.head": _LIN,
    "MP": ("ModalityProjector", (), ()),
    "MP.proj": _LIN,
}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_torch_ref_module_tree_is_upstreams(tie):
    cfg = tiny_cfg(lm_tie_weights=tie)
    tmodel = torch_ref.VisionLanguageModel(cfg)
    seen = set()
    for name, m in tmodel.named_modules(remove_duplicate=False):
        pattern = re.sub(r"\.\d+(?=\.|$)", ".#", name)
        assert pattern in UPSTREAM_TREE, f"torch_ref module {name!r} ({type(m).__name__}) has no upstream counterpart"
        cls, params, buffers = UPSTREAM_TREE[pattern]
        assert type(m).__name__ == cls, f"{name}: {type(m).__name__}, upstream {cls}"
        assert tuple(n for n, _ in m.named_parameters(recurse=False, remove_duplicate=False)) == params, name
        persistent = tuple(n for n, _ in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set)
        assert persistent == buffers, f"{name}: persistent buffers {persistent}, upstream {buffers}"
        assert all(n not in m._non_persistent_buffers_set for n in buffers)
        seen.add(pattern)
    assert seen == set(UPSTREAM_TREE)
    assert (tmodel.decoder.head.weight is tmodel.decoder.token_embedding.weight) == tie
    # upstream's layer hyperparameters that the state dict does not show
    assert tmodel.vision_encoder.patch_embedding.conv.stride == (cfg.vit_patch_size,) * 2
    assert tmodel.vision_encoder.patch_embedding.conv.padding == "valid"
    assert all(ln.eps == cfg.vit_ln_eps for ln in tmodel.modules() if isinstance(ln, torch.nn.LayerNorm))
    assert all(type(n).__name__ != "RMSNorm" or n.eps == cfg.lm_rms_eps for n in tmodel.modules())
