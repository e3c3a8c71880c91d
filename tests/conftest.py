"""Shared test machinery: numerics settings, weight randomisation, the torch -> NNX submodule
copy helper (through `conversion.mapping`'s transforms), batch builders and the parity report.

Every parity number a test measures goes through `assert_close`, which states the tolerance in
the assert, reports the size of a miss and records the number (`name: max|diff| ...`): printed
inline with `-s`, and as one end-of-run section by `pytest_terminal_summary` unless `-q`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

# fp32 on CPU, and fp32 matmuls at full precision on every backend (house style rule 8).
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from conversion.config import VLMConfig  # noqa: E402
from conversion.mapping import KINDS, mapping  # noqa: E402
from jaxvlm import host_memory  # noqa: E402

torch.set_default_dtype(torch.float32)

# CLI child processes start with huge-page scratch buffers already on, as `jaxvlm train` would
# re-execute itself to get them: one interpreter start per CLI call instead of two. The
# re-execution itself is tested in test_host_memory.py.
if host_memory.huge_pages_possible():
    os.environ.update(host_memory.with_huge_pages(dict(os.environ)))

# The persistent compilation cache that runs use by default (jaxvlm.runtime) goes to a directory
# of this test session, not the user's ~/.cache; the CLI children inherit it.
if "JAXVLM_TEST_KEEP_XDG_CACHE" not in os.environ:
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxvlm-tests-xdg-cache-")

SEEDS = (0, 1, 2)

# ---- the parity report ------------------------------------------------------------------------
_RESULTS: list[tuple[str, str]] = []


def record(name: str, text: str) -> None:
    """Print one measured number (visible with -s) and keep it for the end-of-run table."""
    line = f"{name}: {text}"
    print(line)
    _RESULTS.append((name, text))


def pytest_terminal_summary(terminalreporter, config):
    """The measured numbers in one section at the end (not with -q: then use -s to see them)."""
    if not _RESULTS or config.option.verbose < 0:
        return
    terminalreporter.section("parity numbers (measured)")
    for name, text in _RESULTS:
        terminalreporter.write_line(f"{name}: {text}")


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_close(name: str, got, want, rel_tol: float, *, scale: float | None = None) -> float:
    """Assert max|got - want| <= rel_tol * scale (scale defaults to max|want|). Returns the
    relative error. Both arrays must be finite and the reference must not be all zeros, so a
    comparison of two empty or degenerate outputs cannot pass by accident."""
    got, want = to_np(got).astype(np.float64), to_np(want).astype(np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(want).all(), f"{name}: the reference has non-finite values"
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite values"
    if scale is None:
        scale = float(np.abs(want).max())
    assert scale > 0, f"{name}: the reference is all zeros; the comparison would be vacuous"
    err = float(np.abs(got - want).max())
    rel = err / scale
    record(name, f"max|diff| {err:.2e} = {rel:.2e} x max|ref| {scale:.3g} (tol {rel_tol:.0e} relative)")
    assert err <= rel_tol * scale, (
        f"{name}: max|diff| {err:.2e} = {rel:.2e} relative (tol {rel_tol:.0e}), max|ref| {scale:.3g}"
    )
    return rel


# ---- configs ----------------------------------------------------------------------------------
def tiny_cfg(**overrides) -> VLMConfig:
    return VLMConfig.tiny(**overrides)


# ---- weight randomisation ---------------------------------------------------------------------
def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__ == "RMSNorm"


@torch.no_grad()
def randomize_torch_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter of `module` (norms, biases and the ViT position embedding
    included) with seeded random values scaled so activations stay O(1): matrices
    N(0, 1/fan_in), biases N(0, 0.3^2), norm weights N(1, 0.3^2), embeddings N(0, 1).
    A shared (tied) parameter is drawn once. Buffers (RoPE inv_freq) are left as built.
    Raises if a parameter is of a kind it does not know, so nothing stays at its init."""
    g = torch.Generator().manual_seed(seed)

    def normal(p, mean, std):
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul(std).add(mean).to(p.dtype))

    done: set[int] = set()
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in done:
                continue
            done.add(id(p))
            if isinstance(m, nn.Linear) and pname == "weight":
                normal(p, 0.0, m.in_features**-0.5)
            elif isinstance(m, nn.Conv2d) and pname == "weight":
                normal(p, 0.0, (p.shape[1] * p.shape[2] * p.shape[3]) ** -0.5)
            elif isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and pname == "bias":
                normal(p, 0.0, 0.3)
            elif (isinstance(m, nn.LayerNorm) or _is_rmsnorm(m)) and pname == "weight":
                normal(p, 1.0, 0.3)
            elif isinstance(m, nn.Embedding) and pname == "weight":
                normal(p, 0.0, 1.0)
            elif pname == "position_embedding":
                normal(p, 0.0, 0.5)
            elif pname == "latents":  # the resampler's learned queries (modality_projector.py)
                normal(p, 0.0, 1.0)
            else:
                raise AssertionError(f"randomize_torch_: unknown parameter {mname}.{pname} of {type(m).__name__}")
    n_params = len({id(p) for p in module.parameters()})
    assert len(done) == n_params
    return module


# ---- torch submodule -> NNX submodule, through the mapping table's transforms -----------------
def module_kind(m: nn.Module) -> str:
    """The `conversion.mapping.KINDS` kind of a torch module, by module type (never by ndim)."""
    if isinstance(m, nn.Linear):
        return "linear" if m.bias is not None else "linear_nobias"
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if _is_rmsnorm(m):
        return "rmsnorm"
    return "tensor"  # a bare nn.Parameter / persistent buffer held by a container module


def _split_path(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split(".") if p)


def torch_to_nnx_flat(
    tmod: nn.Module, *, cfg: VLMConfig | None = None, prefix: str | None = None
) -> dict[tuple, np.ndarray]:
    """{NNX path relative to the submodule: array} for every parameter and persistent buffer of
    `tmod`, each leaf found in `KINDS[kind]` by its torch name and transformed with that leaf's
    named transform. A tied head (a Linear whose weight is an already-seen tensor) is skipped:
    jaxvlm has no separate head then.

    With `cfg` and `prefix` (the submodule's path in the whole model), every leaf is also looked
    up in `conversion.mapping(cfg)` and must agree with its Entry (same transform, same path)."""
    entries = {e.torch_key: e for e in mapping(cfg)} if cfg is not None else None
    by_path = {e.jax_path: e for e in mapping(cfg)} if cfg is not None else None
    flat: dict[tuple, np.ndarray] = {}
    seen: set[int] = set()
    n_tensors = 0
    for mname, m in tmod.named_modules():
        direct = list(m.named_parameters(recurse=False))
        direct += [(n, b) for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set]
        if not direct:
            continue
        kind = module_kind(m)
        if kind.startswith("linear") and id(m.weight) in seen:
            continue  # tied head
        leaves = {leaf.torch: leaf for leaf in KINDS[kind]}
        if kind != "tensor":
            assert {n for n, _ in direct} == set(leaves), (
                f"{mname}: tensors {[n for n, _ in direct]} != kind {kind} leaves {list(leaves)}"
            )
        for tname, t in direct:
            seen.add(id(t))
            n_tensors += 1
            if kind == "tensor":
                leaf, module_path = leaves[""], f"{mname}.{tname}" if mname else tname
            else:
                leaf, module_path = leaves[tname], mname
            path = _split_path(module_path) + ((leaf.jax,) if leaf.jax else ())
            flat[path] = leaf.transform.to_jax(to_np(t))
            if entries is not None:
                key = ".".join(p for p in (prefix, mname, tname) if p)
                full_path = _split_path(prefix or "") + path
                entry = entries.get(key)
                if entry is None:  # tied: the file stores the embedding once, as the head
                    entry = by_path[full_path]
                    assert cfg.lm_tie_weights and entry.torch_key == "decoder.head.weight", (
                        f"{key} is not in the mapping"
                    )
                assert entry.transform == leaf.transform, (
                    f"{key}: mapping says {entry.transform.name}, kind {kind} says {leaf.transform.name}"
                )
                assert entry.jax_path == full_path, f"{key}: {entry.jax_path} != {full_path}"
    assert len(flat) == n_tensors, "two torch tensors mapped to one NNX path"
    return flat


def copy_torch_to_nnx(tmod: nn.Module, jmod, *, cfg: VLMConfig | None = None, prefix: str | None = None):
    """Copy a torch submodule's weights into the matching NNX submodule (identical attribute
    paths) via `jaxvlm.pretrained.load_flat_state`, which is strict: every NNX variable must be
    set, with its exact shape, and no path may be left over."""
    from jaxvlm.pretrained import load_flat_state

    load_flat_state(jmod, torch_to_nnx_flat(tmod, cfg=cfg, prefix=prefix), source=f"torch {type(tmod).__name__}")
    return jmod


# ---- whole models ----------------------------------------------------------------------------
def random_torch_vlm(cfg: VLMConfig, seed: int):
    import torch_ref

    torch.manual_seed(seed)
    return randomize_torch_(torch_ref.VisionLanguageModel(cfg).eval(), seed)


def checkpoint_arrays(tmodel) -> dict[str, np.ndarray]:
    """The checkpoint-file tensors of a torch_ref model as numpy (tied head stored once)."""
    return {k: to_np(v).copy() for k, v in tmodel.checkpoint_state().items()}


def state_arrays_f64(tmodel) -> dict[str, np.ndarray]:
    """Every state_dict tensor of a torch module as float64 numpy, for the numpy oracle."""
    return {k: to_np(v).astype(np.float64) for k, v in tmodel.state_dict().items()}


# ---- batches ----------------------------------------------------------------------------------
def make_batch(cfg: VLMConfig, rows: list[tuple[int, int]], T: int, seed: int, *, pad_id: int = 0):
    """Left-padded batch. rows: (n_pad, n_images) per sample. Real tokens are random text ids
    (never the image token) with each image's L image tokens placed at random spots, each run
    preceded by the global-image token when the config has one, as the processor does.
    Returns (input_ids int64[B, T], images float32[N_img, 3, S, S] in [0, 1] or None,
    attention_mask int64[B, T])."""
    rng = np.random.default_rng(seed)
    L, img_id = cfg.n_image_tokens, cfg.image_token_id
    names = [n for n, _ in cfg.vlm_extra_tokens]
    glob = cfg.lm_base_vocab_size + names.index("global_image_token") if "global_image_token" in names else None
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    n_img_total = 0
    for b, (n_pad, n_img) in enumerate(rows):
        n_real = T - n_pad
        run = L + (1 if glob is not None else 0)
        assert n_real >= n_img * run, "row too short for its images"
        text = rng.integers(0, cfg.lm_base_vocab_size, size=n_real)
        starts = np.sort(rng.choice(n_real - n_img * run + 1, size=n_img, replace=True)) + np.arange(n_img) * run
        for s in starts:
            if glob is not None:
                text[s] = glob
                s += 1
            text[s : s + L] = img_id
        ids[b, n_pad:] = text
        mask[b, n_pad:] = 1
        n_img_total += n_img
    assert int((ids == img_id).sum()) == n_img_total * L
    images = rng.random((n_img_total, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32) if n_img_total else None
    return ids, images, mask


# ---- upstream facts (docs/conventions.md, "Config", and upstream's models/*.py) ---------------------------
# The fields of upstream's current VLMConfig, i.e. the keys of the config.json its
# save_pretrained writes (`json.dumps(asdict(cfg))`), in upstream's order.
UPSTREAM_CONFIG_FIELDS = (
    "vit_hidden_dim vit_inter_dim vit_patch_size vit_img_size vit_n_heads vit_dropout vit_n_blocks "
    "vit_ln_eps vit_cls_flag vit_model_type lm_hidden_dim lm_inter_dim lm_rms_eps lm_re_base "
    "lm_max_position_embeddings lm_base_vocab_size extra_token_amount lm_vocab_size lm_n_heads "
    "lm_n_kv_heads lm_dropout lm_n_blocks lm_attn_scaling lm_max_length lm_use_tokens lm_tie_weights "
    "lm_model_type lm_tokenizer lm_chat_template mp_pixel_shuffle_factor mp_image_token_length "
    "max_img_size resize_to_max_side_len vlm_extra_tokens vlm_load_backbone_weights "
    "vlm_checkpoint_path hf_repo_name"
).split()


def upstream_config_dict(cfg: VLMConfig) -> dict:
    """What upstream's `asdict(cfg)` gives for the same configuration (extra tokens as a dict)."""
    d = {name: getattr(cfg, name) for name in UPSTREAM_CONFIG_FIELDS}
    d["vlm_extra_tokens"] = dict(cfg.vlm_extra_tokens)
    return d


# ---- bad-input and fault tests (tests/test_bad_input_*.py) -------------------------------------
SHARED = ROOT.parent / "shared"
SMOLLM2 = SHARED / "data" / "smollm2"
needs_tokenizer = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file(),
    reason=f"SmolLM2 tokenizer not found under {SMOLLM2} (../shared is absent)",
)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes): to show that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def truncate(path: Path, keep: float = 0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def fail_weights(monkeypatch):
    """safetensors writes half of the file, then the disk is full."""
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def save_file(arrays, filename, metadata=None):
        real(arrays, filename, metadata=metadata)
        truncate(Path(filename))
        raise ENOSPC

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def run_cli(*args, env=None, timeout=240):
    """Run `python -m ...` from the repository root; (exit code, stdout, stderr lines)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    return p.returncode, p.stdout, [line for line in p.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's training runs (same shapes)."""
    d = tmp_path_factory.mktemp("jax_cache")
    return {
        "JAX_COMPILATION_CACHE_DIR": str(d),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
