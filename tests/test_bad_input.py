"""Bad input, case by case: each gives one clear error naming the problem, and nothing is
written or corrupted. Checkpoint files (nanoVLM and Hugging Face), images (corrupt, empty,
decompression bombs, every PIL mode), context length, image-token counts, datasets, NaN loss,
a full disk, and the two command lines (one line on stderr, exit 2; a traceback only with
--debug). Cases already covered elsewhere (tests/test_checkpoint_errors.py, test_data.py,
test_generate.py) are repeated here only where this file checks something more: the message
at the command line, or that nothing was written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_batch, tiny_cfg
from PIL import Image

import torch_ref
from conversion import CheckpointError, read_checkpoint, save_safetensors, write_checkpoint
from conversion.hf import _language_expected, _vision_expected, build_from_hf

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


# ---- Hugging Face backbone directories written with numpy (no transformers needed) ----------
VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
LANGUAGE = dict(
    model_type="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    hidden_act="silu",
)
SETTINGS = dict(mp_pixel_shuffle_factor=2, max_img_size=64)


def write_hf(directory: Path, config: dict, expected: dict, *, shards: int = 1) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected.items()}
    if shards == 1:
        save_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_safetensors(directory / name, {k: tensors[k] for k in part}, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture()
def hf(tmp_path):
    """(vision dir, language dir (2 shards), output dir that must stay absent)."""
    v = write_hf(tmp_path / "siglip", VISION, _vision_expected(VISION, ""))
    lang = dict(LANGUAGE, num_key_value_heads=2)
    l_dir = write_hf(tmp_path / "llama", lang, _language_expected(lang), shards=2)
    return v, l_dir, tmp_path / "out"


def test_the_numpy_backbones_build(hf):
    v, l_dir, out = hf
    cfg = build_from_hf(v, l_dir, out, **SETTINGS)
    assert read_checkpoint(out)[0] == cfg


def _config(d: Path, **changes):
    c = json.loads((d / "config.json").read_text())
    for k, val in changes.items():
        if val is None:
            c.pop(k, None)
        else:
            c[k] = val
    (d / "config.json").write_text(json.dumps(c))


def _truncate(path: Path, keep: float = 0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _shard(d: Path, i: int = 1) -> Path:
    return sorted(d.glob("model-*.safetensors"))[i]


# (which backbone, corruption, regexes the message must match)
HF_CASES = {
    "truncated_vision_file": (
        "v",
        lambda d: _truncate(d / "model.safetensors"),
        [r"siglip/model\.safetensors is not a valid safetensors file", "truncated"],
    ),
    "truncated_language_shard": (
        "l",
        lambda d: _truncate(_shard(d)),
        [r"model-00002-of-00002\.safetensors is not a valid safetensors file"],
    ),
    "garbage_header": (
        "l",
        lambda d: _shard(d, 0).write_bytes(struct.pack("<Q", 12) + b"{not json!!}"),
        [r"model-00001-of-00002\.safetensors is not a valid safetensors file: header is not JSON"],
    ),
    "empty_weights_file": (
        "v",
        lambda d: (d / "model.safetensors").write_bytes(b""),
        [r"model\.safetensors is not a valid safetensors file \(0 bytes\)"],
    ),
    "missing_shard": (
        "l",
        lambda d: _shard(d).unlink(),
        [r"weights file not found: .*model-00002-of-00002\.safetensors"],
    ),
    "index_lists_absent_key": (
        "l",
        lambda d: (d / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        **json.loads((d / "model.safetensors.index.json").read_text())["weight_map"],
                        "model.layers.9.mlp.up_proj.weight": _shard(d).name,
                    }
                }
            )
        ),
        [
            r"model\.safetensors\.index\.json: the weight_map lists key\(s\) missing from their shard: model\.layers\.9\.mlp\.up_proj\.weight"
        ],
    ),
    "no_weights": (
        "v",
        lambda d: (d / "model.safetensors").unlink(),
        [r"siglip has neither model\.safetensors nor model\.safetensors\.index\.json"],
    ),
    "only_pytorch_bin": (
        "v",
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        [r"found pytorch_model\.bin: only safetensors"],
    ),
    "no_config": ("l", lambda d: (d / "config.json").unlink(), [r"llama has no config\.json"]),
    "config_not_json": (
        "v",
        lambda d: (d / "config.json").write_text("{oops"),
        [r"siglip/config\.json is not valid JSON"],
    ),
    # config.json disagreeing with the weights
    "more_layers_than_weights": (
        "l",
        lambda d: _config(d, num_hidden_layers=3),
        [r"missing key\(s\): model\.layers\.2\.self_attn\.q_proj\.weight", r"llama/config\.json"],
    ),
    "fewer_layers_than_weights": (
        "v",
        lambda d: _config(d, num_hidden_layers=1),
        [r"unexpected key\(s\): encoder\.layers\.1\.layer_norm1\.bias", r"siglip/config\.json"],
    ),
    "hidden_size_disagrees": (
        "l",
        lambda d: _config(d, hidden_size=96),
        [
            r"model\.embed_tokens\.weight \(in model-0000\d-of-00002\.safetensors\) has shape \(320, 64\), .*llama/config\.json implies \(320, 96\)"
        ],
    ),
    "image_size_disagrees": (
        "v",
        lambda d: _config(d, image_size=64),
        [
            r"embeddings\.position_embedding\.weight \(in model\.safetensors\) has shape \(16, 32\), .*siglip/config\.json implies \(64, 32\)"
        ],
    ),
    "untied_without_lm_head": (
        "l",
        lambda d: _config(d, tie_word_embeddings=False),
        [r"missing key\(s\): lm_head\.weight"],
    ),
    # fields missing or features nanoVLM does not have
    "missing_field": (
        "l",
        lambda d: _config(d, hidden_size=None),
        [r"llama/config\.json: missing config field\(s\): hidden_size"],
    ),
    "wrong_model_type": (
        "l",
        lambda d: _config(d, model_type="mistral"),
        [r"unsupported language model_type 'mistral'"],
    ),
    "vision_dir_is_not_siglip": (
        "v",
        lambda d: _config(d, model_type="clip_vision_model"),
        [r"unsupported vision model_type 'clip_vision_model'"],
    ),
    "siglip2_naflex": (
        "v",
        lambda d: _config(d, model_type="siglip2_vision_model"),
        [r"SigLIP2 NaFlex.* not supported"],
    ),
    "rope_scaling": (
        "l",
        lambda d: _config(d, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        [r"rope_scaling rope_type 'linear' is not supported"],
    ),
    "attention_bias": (
        "l",
        lambda d: _config(d, attention_bias=True),
        [r"not supported: attention_bias / mlp_bias true"],
    ),
    "other_activation": (
        "v",
        lambda d: _config(d, hidden_act="gelu"),
        [r"hidden_act 'gelu' is not supported.*gelu_pytorch_tanh"],
    ),
    "odd_head_dim": (
        "l",
        lambda d: _config(d, head_dim=32),
        [r"head_dim 32 with hidden_size 64 and num_attention_heads 4"],
    ),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_backbone(case, hf):
    which, corrupt, patterns = HF_CASES[case]
    v, l_dir, out = hf
    corrupt(v if which == "v" else l_dir)
    with pytest.raises(CheckpointError) as info:
        build_from_hf(v, l_dir, out, **SETTINGS)
    msg = str(info.value)
    print(f"{case}: {msg[:200]}")
    for pattern in patterns:
        assert __import__("re").search(pattern, msg), f"{case}: {pattern!r} not in {msg}"
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert not out.exists() and not list(out.parent.glob(".out.tmp-*")), f"{case}: something was written"


@pytest.mark.parametrize(
    "settings,pattern",
    [
        (
            {"mp_pixel_shuffle_factor": 3, "max_img_size": 64},
            r"patch grid side 4 is not divisible by mp_pixel_shuffle_factor 3",
        ),
        ({**SETTINGS, "mp_image_token_length": 9}, r"mp_image_token_length 9 != .* = 4"),
        ({"mp_pixel_shuffle_factor": 2}, r"max_img_size 2048 gives a 64x64 tile grid .* use max_img_size <= 256"),
        (
            {**SETTINGS, "vit_img_size": 64},
            r"position embeddings are for image_size 32; vit_img_size 64 would need them interpolated",
        ),
        ({**SETTINGS, "max_img_size": 48}, r"max_img_size 48 must be a multiple of the tile size 32"),
        (
            {**SETTINGS, "lm_hidden_dim": 8},
            r"unknown VLM setting\(s\): lm_hidden_dim .*architecture numbers come from the backbones",
        ),
    ],
    ids=["shuffle_factor", "token_length", "too_many_tiles", "image_size", "max_img_size", "architecture_field"],
)
def test_bad_vlm_settings(settings, pattern, hf):
    v, l_dir, out = hf
    with pytest.raises(ValueError, match=pattern):
        build_from_hf(v, l_dir, out, **settings)
    assert not out.exists()


@needs_tokenizer
def test_hf_tokenizer_that_does_not_fit(hf):
    v, l_dir, out = hf
    shutil.copyfile(SMOLLM2 / "tokenizer.json", l_dir / "tokenizer.json")
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json has 49152 tokens but .*config\.json has vocab_size 320"
    ):
        build_from_hf(v, l_dir, out, **SETTINGS)
    (l_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 17}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a Hugging Face tokenizer\.json"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert not out.exists()


def test_from_hf_output_directory_must_be_empty(hf):
    v, l_dir, out = hf
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert snapshot(out) == {"keep.txt": b"mine"}


# ---- a full disk ----------------------------------------------------------------------------
def _tensors(cfg, seed):
    rng = np.random.default_rng(seed)
    from conversion import expected_shapes

    return {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}


def _fail_weights(monkeypatch):
    """safetensors writes half of the file, then the disk is full."""
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def save_file(arrays, filename, metadata=None):
        real(arrays, filename, metadata=metadata)
        _truncate(Path(filename))
        raise ENOSPC

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def _fail_config(monkeypatch):
    """The config's temp file gets half its text, then the disk is full."""
    real = Path.write_text

    def write_text(self, data, *a, **k):
        if self.name.startswith(".config.json.tmp"):
            real(self, data[: len(data) // 2], *a, **k)
            raise ENOSPC
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("fail", [_fail_weights, _fail_config], ids=["weights", "config"])
def test_write_checkpoint_disk_full_keeps_the_previous_files(fail, tmp_path, monkeypatch):
    old_cfg, new_cfg = tiny_cfg(), tiny_cfg(lm_tie_weights=False)  # the new checkpoint has another key set
    write_checkpoint(tmp_path, old_cfg, _tensors(old_cfg, 0))
    before = snapshot(tmp_path)
    fail(monkeypatch)
    with pytest.raises(OSError) as info:
        write_checkpoint(tmp_path, new_cfg, _tensors(new_cfg, 1))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(tmp_path) == before, "a failed write changed or left files"
    assert read_checkpoint(tmp_path)[0] == old_cfg


def test_from_hf_disk_full_leaves_nothing(hf, monkeypatch):
    v, l_dir, out = hf
    _fail_weights(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        build_from_hf(v, l_dir, out, **SETTINGS)
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["llama", "siglip"]


def test_training_checkpoint_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete: a
    full disk mid-write leaves the previous step as the latest, untouched and restorable, and
    the partial directory is never taken for a checkpoint."""
    import jax.numpy as jnp
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    from jaxvlm.train_checkpoints import TrainCheckpoints

    state = {"w": jnp.arange(6.0), "b": jnp.ones((2, 2))}
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    ckpts.save(1, state, {"step": 1})
    before = snapshot(tmp_path / "1")

    async def full_disk(self, x, directory):
        (directory / self._filename).write_text(json.dumps(x)[:3])
        raise ENOSPC

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpts.save(2, {"w": state["w"] + 1, "b": state["b"]}, {"step": 2})
    monkeypatch.undo()
    ckpts.close()
    assert snapshot(tmp_path / "1") == before
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    assert ckpts.latest_step() == 1 and ckpts.manager.all_steps() == [1]
    restored, meta = ckpts.restore(state)
    assert meta == {"step": 1} and np.array_equal(restored["w"], state["w"])
    ckpts.close()
    # the partial step stays on disk under orbax's temporary name (replaced when step 2 is saved
    # again: see test_train_disk_full_during_a_checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]


# ---- images ---------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _png(size=(40, 24)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty_file": (b"", r"empty image (file|bytes)"),
    "text_file": (b"this is not an image\n" * 10, r"not an image file"),
    "truncated_png": (_png()[:120], r"corrupt image data|cannot read image"),
    "corrupt_png_body": (
        _png()[:60] + b"\x00" * 500 + _png()[-60:],
        r"corrupt image data|cannot read image|not an image file",
    ),
    "bomb_over_pil_limit": (_png_header_only(100_000, 100_000), r"refusing to decode a possible decompression bomb"),
    "bomb_over_our_limit": (
        _png_header_only(10_000, 9_000),
        r"10000x9000 = 90000000 pixels exceeds the limit of 89478485",
    ),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_files(case, tmp_path):
    from jaxvlm.image_processing import ImageProcessor

    data, pattern = BAD_IMAGES[case]
    path = tmp_path / f"{case}.png"
    path.write_bytes(data)
    proc = ImageProcessor(32, 64, False, True)
    with pytest.raises(ValueError, match=pattern) as info:
        proc(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=pattern):
        proc(data)  # the same bytes from memory
    assert path.read_bytes() == data


def _mode_image(mode: str, rng) -> Image.Image:
    """A random 40 x 16 image in `mode` (a 1 x 2 tile grid), built from arrays where PIL allows it."""
    h, w = 16, 40
    u8 = lambda c: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)  # noqa: E731
    if mode == "1":
        return Image.fromarray(u8(1) > 127)
    if mode in ("L", "P"):
        return Image.fromarray(u8(1), "L") if mode == "L" else Image.fromarray(u8(3), "RGB").convert("P")
    if mode in ("LA", "RGB", "RGBA", "CMYK"):
        return Image.fromarray(u8(len(mode)), mode)
    if mode == "PA":
        return Image.fromarray(u8(4), "RGBA").convert("PA")
    if mode == "La":
        return Image.fromarray(u8(2), "LA").convert("La")
    if mode == "RGBa":
        return Image.fromarray(u8(4), "RGBA").convert("RGBa")
    if mode == "YCbCr":
        return Image.fromarray(u8(3), "RGB").convert("YCbCr")
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32), "I")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))  # mode I;16
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    raise AssertionError(mode)


def _expected_rgb(im: Image.Image) -> np.ndarray:
    """uint8[H, W, 3] the processor should see, computed independently of jaxvlm."""
    a = np.asarray(im)
    if im.mode == "I;16":
        g = np.round(a.astype(np.float64) * 255 / 65535)
    elif im.mode == "I":
        g = np.round(np.clip(a, 0, 65535) * 255 / 65535) if a.max() > 255 else a
    elif im.mode == "F":
        g = np.round(a.astype(np.float64) * 255)
    elif im.mode == "La":
        return np.asarray(im.convert("LA").convert("RGB"))
    else:
        return np.asarray(im.convert("RGB"))
    g = np.clip(g, 0, 255).astype(np.uint8)
    return np.stack([g] * 3, axis=-1)


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "F"]
FILE_FORMAT = {
    "1": "PNG",
    "L": "PNG",
    "LA": "PNG",
    "P": "PNG",
    "PA": "TIFF",
    "RGB": "PNG",
    "RGBA": "PNG",
    "CMYK": "TIFF",
    "YCbCr": "TIFF",
    "I": "TIFF",
    "I;16": "PNG",
    "F": "TIFF",
}


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb_tiles(mode, tmp_path):
    from jaxvlm.image_processing import ImageProcessor, load_image

    im = _mode_image(mode, np.random.default_rng(MODES.index(mode)))
    assert im.mode == mode
    proc = ImageProcessor(32, 64, False, True)
    tiles, grid = proc(im)
    assert grid == (1, 2) and tiles.shape == (3, 3, 32, 32) and tiles.dtype == np.float32
    assert np.isfinite(tiles).all() and tiles.min() >= 0 and tiles.max() <= 1
    want, _ = proc(Image.fromarray(_expected_rgb(im), "RGB"))
    assert np.array_equal(tiles, want), f"{mode}: the tiles are not those of its RGB version"
    if mode in ("L", "1", "I", "I;16", "F"):  # grey stays grey
        assert np.array_equal(tiles[:, 0], tiles[:, 1]) and np.array_equal(tiles[:, 1], tiles[:, 2])
    if mode in ("I;16", "I", "F"):  # scaled, not clipped to white
        assert 0.2 < float(tiles.mean()) < 0.8, f"{mode}: mean {tiles.mean():.3f}"
    if mode in FILE_FORMAT:  # the same through a file on disk
        path = tmp_path / f"img.{FILE_FORMAT[mode].lower()}"
        im.save(path, FILE_FORMAT[mode])
        assert Image.open(path).mode in (mode, "I;16", "P")
        assert load_image(path).mode == "RGB"
        from_file, _ = proc(path)
        assert np.array_equal(from_file, tiles), f"{mode}: the file gives other pixels than the image in memory"


# ---- context length, image tokens -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models():
    cfg = tiny_cfg(lm_max_length=64)
    tmodel = torch_ref.VisionLanguageModel(cfg).eval()
    from jaxvlm.pretrained import model_from_torch_tensors

    jmodel = model_from_torch_tensors(cfg, {k: v.numpy() for k, v in tmodel.checkpoint_state().items()})
    return cfg, tmodel, jmodel


def test_generation_beyond_the_context_raises(tiny_models):
    from jaxvlm.generate import generate

    cfg, tmodel, jmodel = tiny_models
    for name, gen in (("jaxvlm", lambda *a, **k: generate(jmodel, *a, **k)), ("torch_ref", tmodel.generate)):
        for T, n in ((60, 5), (65, 0), (64, 1)):
            with pytest.raises(
                ValueError,
                match=rf"prompt length {T} \+ max_new_tokens {n} = {T + n} exceeds the model context lm_max_length = 64",
            ):
                gen(np.full((1, T), 7), None, None, max_new_tokens=n, greedy=True)
        assert np.asarray(gen(np.full((1, 60), 7), None, None, max_new_tokens=4, greedy=True)).shape == (1, 4), name


@pytest.mark.parametrize(
    "rows,n_images",
    [([(0, 2)], 1), ([(0, 1)], 2), ([(0, 0)], 1), ([(0, 1)], 0)],
    ids=["fewer_images", "more_images", "images_without_tokens", "tokens_without_images"],
)
def test_image_token_count_mismatch_raises_in_both_frameworks(rows, n_images, tiny_models):
    cfg, tmodel, jmodel = tiny_models
    ids, _, mask = make_batch(cfg, rows, 40, 0)
    images = np.random.default_rng(0).random((n_images, 3, 32, 32), dtype=np.float32) if n_images else None
    n_tokens = int((ids == cfg.image_token_id).sum())
    pattern = rf"the prompt has {n_tokens} image tokens \(id 49152\) but {n_images} image\(s\) x 4 tokens each = {4 * n_images}"
    with pytest.raises(ValueError, match=pattern):
        tmodel(ids, images, mask)
    with pytest.raises(ValueError, match=pattern):
        jmodel(ids, images, mask)


# ---- datasets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found under {SMOLLM2}")
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import from_config

    cfg = tiny_cfg(max_img_size=32)
    return SampleEncoder.from_config(cfg, from_config(cfg, SMOLLM2))


def _llava(tmp_path, rows, name="d.json"):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name


def _row(q="What is it?", a="A square."):
    turns = [{"from": "human", "value": "<image>\n" + q}] + ([{"from": "gpt", "value": a}] if a is not None else [])
    return {"image": "a.png", "conversations": turns}


def test_empty_dataset(tmp_path, encoder):
    from jaxvlm.data import DataLoader, llava_dataset

    for name, text in (("empty.json", "[]"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: the dataset is empty"):
            llava_dataset(tmp_path / name, encoder)
    with pytest.raises(ValueError, match="the dataset is empty"):
        DataLoader([], 2)


def test_rows_without_answers(tmp_path, encoder):
    from jaxvlm.data import llava_dataset

    path = _llava(tmp_path, [_row(), _row(a=None), _row(a="   ")])
    with pytest.raises(ValueError, match=r"d\.json:1: no assistant answer"):
        llava_dataset(path, encoder)
    ds = llava_dataset(path, encoder, on_error="skip")
    assert (len(ds), ds.n_skipped) == (1, 2)
    only_bad = _llava(tmp_path, [_row(a=None), _row(a="")], "bad.json")
    with pytest.raises(ValueError, match=r"bad\.json: the dataset is empty \(2 invalid rows skipped\)"):
        llava_dataset(only_bad, encoder, on_error="skip")


def test_samples_beyond_the_context_are_skipped_or_raise(tmp_path, encoder):
    from jaxvlm.data import DataLoader, llava_dataset

    long_answer = " ".join(["word"] * 200)
    ds = llava_dataset(_llava(tmp_path, [_row(), _row(a=long_answer), _row(), _row(q=long_answer)]), encoder)
    lengths = [len(ds[i]["input_ids"]) for i in range(4)]
    assert lengths[0] <= 64 < min(lengths[1], lengths[3])
    loader = DataLoader(ds, 2, seq_buckets=(32, 64), shuffle=False, prefetch=0)
    batches = list(loader)
    assert loader.stats["too_long"] == 2 and loader.stats["blank_rows"] == 2
    for b in batches:
        assert b["input_ids"].shape[1] <= 64 and b["attention_mask"][1].sum() == 0 and np.all(b["labels"][1] == -100)
    with pytest.raises(ValueError, match=rf"sample 1 has {lengths[1]} tokens, more than the largest bucket 64"):
        list(DataLoader(ds, 2, seq_buckets=(32, 64), shuffle=False, prefetch=0, on_too_long="raise"))


def test_unreadable_images_in_a_dataset(tmp_path, encoder):
    from jaxvlm.data import SampleError, llava_dataset

    rows = [_row(), {**_row(), "image": "bomb.png"}, {**_row(), "image": "text.png"}, {**_row(), "image": "absent.png"}]
    path = _llava(tmp_path, rows)
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match=r"d\.json:3: image file not found: .*absent\.png"):
        llava_dataset(path, encoder)
    ds = llava_dataset(path, encoder, on_error="skip")
    assert len(ds) == 3
    with pytest.raises(
        SampleError, match=r"d\.json:1: image 0: .*bomb\.png: refusing to decode a possible decompression bomb"
    ):
        ds[1]
    with pytest.raises(SampleError, match=r"d\.json:2: image 0: .*text\.png: not an image file"):
        ds[2]


# ---- the command lines ----------------------------------------------------------------------
def run_cli(*args, env=None, timeout=240):
    """Run `python -m ...` from the repository root; (exit code, stdout, stderr lines)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    return p.returncode, p.stdout, [line for line in p.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch_ref.VisionLanguageModel(tiny_cfg(lm_max_length=64)).save_pretrained(d)
    if (SMOLLM2 / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(SMOLLM2 / name, d / name)
    return d


def _cli_cases(tiny_dir: Path, tmp: Path):
    broken = tmp / "broken"
    shutil.copytree(tiny_dir, broken)
    _truncate(broken / "model.safetensors")
    mismatch = tmp / "mismatch"
    shutil.copytree(tiny_dir, mismatch)
    c = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**c, "lm_inter_dim": 96}))
    no_tok = tmp / "no_tokenizer"
    shutil.copytree(tiny_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    llama = write_hf(tmp / "llama", LANGUAGE, _language_expected(LANGUAGE))
    return {  # name: (argv, regex for the one line, paths that must not appear)
        "conversion to-jax truncated": (
            ["-m", "conversion", "to-jax", str(broken), str(tmp / "o1")],
            r"^error: .*broken/model\.safetensors is not a valid safetensors file",
            [tmp / "o1"],
        ),
        "conversion check config mismatch": (
            ["-m", "conversion", "check", str(mismatch)],
            r"^error: .*mlp\.gate_proj\.weight has shape \(160, 64\), the config expects \(96, 64\)",
            [],
        ),
        "conversion from-hf swapped directories": (
            ["-m", "conversion", "from-hf", "--vision", str(llama), "--language", str(llama), "--out", str(tmp / "o2")],
            r"^error: .*llama/config\.json: unsupported vision model_type 'llama'",
            [tmp / "o2"],
        ),
        "conversion from-hf no directory": (
            [
                "-m",
                "conversion",
                "from-hf",
                "--vision",
                str(tmp / "nope"),
                "--language",
                str(llama),
                "--out",
                str(tmp / "o3"),
            ],
            r"^error: vision backbone directory not found: .*nope$",
            [tmp / "o3"],
        ),
        "jaxvlm train bad init": (
            [
                "-m",
                "jaxvlm",
                "train",
                "--init-from",
                str(mismatch),
                "--output-dir",
                str(tmp / "run1"),
                "--tokenizer",
                str(SMOLLM2),
            ],
            r"^error: .*mismatch/model\.safetensors .*lm_inter_dim|^error: .*shape \(160, 64\)",
            [],
        ),
        "jaxvlm train no tokenizer": (
            ["-m", "jaxvlm", "train", "--init-from", str(no_tok), "--output-dir", str(tmp / "run2")],
            r"^error: no tokenizer: pass --tokenizer",
            [],
        ),
        "jaxvlm generate no tokenizer": (
            ["-m", "jaxvlm", "generate", "--model", str(no_tok), "--prompt", "hi"],
            r"^error: no tokenizer\.json in directory .*no_tokenizer$",
            [],
        ),
        "jaxvlm eval missing model": (
            ["-m", "jaxvlm", "eval", "--model", str(tmp / "absent")],
            r"^error: checkpoint directory not found: .*absent$",
            [],
        ),
        "jaxvlm generate too long": (
            ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "100"],
            r"^error: prompt length \d+ \+ max_new_tokens 100 = \d+ exceeds the model context lm_max_length = 64$",
            [],
        ),
        "jaxvlm generate corrupt image": (
            ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--prompt", "hi", "--image", str(tmp / "text.png")],
            r"^error: .*text\.png: not an image file",
            [],
        ),
    }


@needs_tokenizer
def test_command_lines_print_one_line(tiny_dir, tmp_path):
    (tmp_path / "text.png").write_text("not a picture")
    for name, (argv, pattern, absent) in _cli_cases(tiny_dir, tmp_path).items():
        code, out, err = run_cli(*argv)
        print(f"{name}: exit {code}: {err}")
        assert code == 2, f"{name}: exit code {code}, stderr {err}"
        assert len(err) == 1, f"{name}: expected one line on stderr, got {len(err)}:\n" + "\n".join(err)
        assert __import__("re").search(pattern, err[0]), f"{name}: {pattern!r} does not match {err[0]!r}"
        assert "Traceback" not in out + err[0]
        for p in absent:
            assert not p.exists(), f"{name}: {p} was written"
    code, _, err = run_cli("-m", "jaxvlm", "--debug", "eval", "--model", str(tmp_path / "absent"))
    assert code != 0 and err[0].startswith("Traceback") and "CheckpointError" in err[-1]
    code, _, err = run_cli("-m", "conversion", "--debug", "to-jax", str(tmp_path / "absent"), str(tmp_path / "o"))
    assert code != 0 and err[0].startswith("Traceback") and "CheckpointError" in err[-1]


# ---- training runs that go wrong ------------------------------------------------------------
TRAIN = [
    "-m",
    "jaxvlm",
    "train",
    "--tokenizer",
    str(SMOLLM2),
    "--steps",
    "5",
    "--batch-size",
    "4",
    "--synthetic-size",
    "64",
    "--save-every",
    "1",
    "--log-every",
    "1",
    "--max-length",
    "128",
    "--keep",
    "3",
]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's training runs (same shapes)."""
    d = tmp_path_factory.mktemp("jax_cache")
    return {
        "JAX_COMPILATION_CACHE_DIR": str(d),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


@needs_tokenizer
def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, jax_cache):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        *TRAIN,
        "--output-dir",
        str(out),
        "--lr-mp",
        "1e6",
        "--lr-language-backbone",
        "1e6",
        "--lr-vision-backbone",
        "1e6",
        env=jax_cache,
    )
    print(err)
    assert code == 2 and len(err) == 1, err
    m = __import__("re").match(
        r"^error: loss is (nan|inf|-inf) at step (\d+); stopped\. Last good checkpoint: (.*)$", err[0]
    )
    assert m, err[0]
    bad_step, good = int(m.group(2)), Path(m.group(3))
    assert _steps(out / "checkpoints") == list(range(max(1, bad_step - 3), bad_step)), "a checkpoint after the bad step"
    assert good == out / "checkpoints" / str(bad_step - 1)
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        params = c.restore(good.absolute() / "state")["params"]
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), "the kept checkpoint is not finite"


SITECUSTOMIZE = """
import errno, json, os
_at = int(os.environ.get("JAXVLM_TEST_ENOSPC_AT_SAVE", "0"))
if _at:  # test-only: the _at-th orbax JSON write fills the disk half way through
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as _jh
    _real, _count = _jh.JsonCheckpointHandler._save_fn, [0]
    async def _save_fn(self, x, directory):
        _count[0] += 1
        if _count[0] == _at:
            (directory / self._filename).write_text(json.dumps(x)[:5])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))
        return await _real(self, x, directory)
    _jh.JsonCheckpointHandler._save_fn = _save_fn
"""


@needs_tokenizer
def test_train_disk_full_during_a_checkpoint(tmp_path, jax_cache):
    """`jaxvlm train` with the disk full at the 3rd checkpoint: exit 2 naming the OSError; the
    checkpoints before it are intact and `--resume` finishes the run from step 2.

    stderr is exactly that one line: the CLI silences absl and exits without interpreter
    teardown, where the aborted save's orbax threads would print tracebacks."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "run"
    env = {**jax_cache, "JAXVLM_TEST_ENOSPC_AT_SAVE": "3", "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    code, _, err = run_cli(*TRAIN, "--output-dir", str(out), env=env)
    assert code == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: [Errno 28] No space left on device")
        and "3.orbax-checkpoint-tmp" in errors[0]
    )
    assert _steps(out / "checkpoints") == [1, 2] and not (out / "model").exists()
    code, stdout, err_resume = run_cli(*TRAIN, "--output-dir", str(out), "--resume", env=jax_cache)
    assert code == 0, err_resume
    assert f"resumed from {out / 'checkpoints' / '2'} (step 2)" in stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    assert not list((out / "checkpoints").glob("*tmp*")), "orbax's partial directory was left behind"
    assert len(err) == 1, f"stderr has {len(err)} lines, not one: {err[:3]}"
