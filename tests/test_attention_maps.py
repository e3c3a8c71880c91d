"""Attention maps (`jaxvlm.attention_maps`, `torch_ref.attention_maps`, `jaxvlm generate --attention-map`).

What is checked:
- the decoder's and the ViT's probabilities: shapes, rows of real queries summing to 1 (1e-6),
  exactly 0 on padded and on future keys; jaxvlm equal to torch_ref's (fp32, every weight random,
  norms and biases included; 1e-5 absolute on probabilities, PROB_TOL);
- that they are the weights the model used: the decoder rebuilt with weights @ V in place of its
  attention kernel gives the model's logits (1e-5 relative to max|logits|, REBUILT_TOL), both
  frameworks, and each ViT layer's weights @ V through out_proj gives that layer's attention output;
- ViT rollout: jaxvlm vs torch_ref, rows sum to 1, and a case with a closed form;
- image-token maps: known answers (one token's weight lands on its s x s patch block of its tile;
  a global-view token spreads over the whole image), and the tile layout agreeing with the
  nanoVLM and SmolVLM image processors' actual tiles;
- the CLI end to end on a real COCO image with a tiny model: a decodable PNG of the image's size
  for both maps, refusal to overwrite, and one clear line with exit 2 for each bad value.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SHARED, SMOLLM2, make_batch, random_torch_vlm, record, run_cli, tiny_cfg, to_np
from flax import nnx
from PIL import Image

import jaxvlm
import torch_ref.attention_maps as tam
from conversion.config import LEGACY_EXTRA_TOKENS
from jaxvlm import attention_maps as am
from jaxvlm.attention import attention_bias

PROB_TOL = 1e-5  # absolute, on probabilities: jaxvlm vs torch_ref, fp32
ROW_TOL = 1e-6  # |sum of a real query's row - 1|
REBUILT_TOL = 1e-5  # relative to max|reference|: logits / layer outputs rebuilt from the weights
COCO = SHARED / "data" / "coco-mini"


def _pair(cfg, seed, tmp_path):
    tmodel = random_torch_vlm(cfg, seed)
    tmodel.save_pretrained(tmp_path / f"ckpt{seed}")
    return tmodel, jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / f"ckpt{seed}")


def _max_abs(name, got, want, tol):
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
    record(name, f"max|diff| {err:.2e} (tol {tol:.0e} absolute)")
    assert err <= tol, f"{name}: max|diff| {err:.2e} > {tol:.0e}"


def _check_rows(name, w, mask):
    """w float[n_l, B, nh, T, T]: real queries' rows sum to 1, padded / future keys get exactly 0."""
    w = np.asarray(w, np.float64)
    real = mask.astype(bool)  # (B, T)
    rows = w.sum(-1).transpose(1, 3, 0, 2)  # (B, T, n_l, nh)
    err = float(np.abs(rows[real] - 1.0).max())
    record(f"{name} row sums", f"max|sum - 1| {err:.2e} over real queries (tol {ROW_TOL:.0e})")
    assert err <= ROW_TOL, f"{name}: a real query's row sums to 1 +- {err:.2e} (tol {ROW_TOL:.0e})"
    T = w.shape[-1]
    future = np.triu(np.ones((T, T), bool), 1)
    assert np.all(w[..., future] == 0.0), f"{name}: weight on future keys"
    for b in range(w.shape[1]):
        on_pad = w[:, b][:, :, real[b]][..., ~real[b]]  # real queries x padded keys
        assert on_pad.size == 0 or np.all(on_pad == 0.0), f"{name}: row {b} gives weight to padded keys"
    assert np.all(w >= 0.0)


# ---- probabilities: jaxvlm vs torch_ref, normalisation -------------------------------------------
@pytest.mark.parametrize("seed", (0, 1))
def test_decoder_attention_matches_torch_ref(seed, tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair(cfg, seed, tmp_path)
    T = 48
    ids, images, mask = make_batch(cfg, [(0, 2), (13, 1), (T - 3, 0)], T, seed)
    wj = np.asarray(am.decoder_attention(jmodel, ids, mask, images))
    wt = to_np(tam.decoder_attention(tmodel, ids, mask, images))
    assert wj.shape == (cfg.lm_n_blocks, 3, cfg.lm_n_heads, T, T) == wt.shape
    _max_abs(f"decoder attention[seed={seed}] jaxvlm vs torch_ref", wj, wt, PROB_TOL)
    _check_rows(f"decoder attention[seed={seed}] jaxvlm", wj, mask)
    _check_rows(f"decoder attention[seed={seed}] torch_ref", wt, mask)
    # grouped-query heads: the two query heads of one kv head differ (their q differ) but are real rows
    assert np.abs(wj[:, :, 0] - wj[:, :, 1]).max() > 1e-3


@pytest.mark.parametrize("seed", (0, 1))
def test_vit_attention_and_rollout_match_torch_ref(seed, tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair(cfg, seed, tmp_path)
    images = np.random.default_rng(seed).random((3, 3, cfg.vit_img_size, cfg.vit_img_size), dtype=np.float32)
    vj = np.asarray(am.vit_attention(jmodel, images))
    vt = to_np(tam.vit_attention(tmodel, images))
    N = cfg.vit_n_patches
    assert vj.shape == (cfg.vit_n_blocks, 3, cfg.vit_n_heads, N, N) == vt.shape
    _max_abs(f"vit attention[seed={seed}] jaxvlm vs torch_ref", vj, vt, PROB_TOL)
    err = float(np.abs(vj.astype(np.float64).sum(-1) - 1).max())
    record(f"vit attention[seed={seed}] row sums", f"max|sum - 1| {err:.2e} (tol {ROW_TOL:.0e})")
    assert err <= ROW_TOL and (vj > 0).all(), f"vit attention: rows sum to 1 +- {err:.2e}; bidirectional, no zeros"
    rj = am.attention_rollout(vj)
    rt = to_np(tam.attention_rollout(torch.from_numpy(vt)))
    assert rj.shape == (3, N, N)
    _max_abs(f"vit rollout[seed={seed}] jaxvlm vs torch_ref", rj, rt, PROB_TOL)
    assert np.abs(rj.sum(-1) - 1).max() <= ROW_TOL
    rel = am.rollout_relevance(rj)
    side = cfg.vit_img_size // cfg.vit_patch_size
    assert rel.shape == (3, side, side) and np.abs(rel.sum((1, 2)) - 1).max() <= ROW_TOL


def test_rollout_closed_form():
    """Uniform attention U (N x N, 1/N each) in both layers: 0.5 U + 0.5 I per layer, and since
    U U = U the two-layer product is 0.75 U + 0.25 I exactly."""
    N = 9
    w = np.full((2, 1, 3, N, N), 1.0 / N)
    want = 0.75 * np.full((N, N), 1.0 / N) + 0.25 * np.eye(N)
    err = float(np.abs(am.attention_rollout(w)[0] - want).max())
    assert err <= 1e-15, f"rollout of uniform attention: max|diff| {err:.2e}"
    err_t = float(np.abs(to_np(tam.attention_rollout(torch.from_numpy(w)))[0] - want).max())
    assert err_t <= 1e-15, f"torch_ref rollout of uniform attention: max|diff| {err_t:.2e}"
    np.testing.assert_allclose(am.rollout_relevance(am.attention_rollout(w)), np.full((1, 3, 3), 1 / N), atol=1e-15)


def test_rollout_map_places_tiles_and_global_view():
    """A 2 x 2 split nanoVLM image (global view first), 4 x 4 patches per tile. Every tile's
    rollout flows only from its patch 5 (row 1, column 1), the global view's only from its patch 0:
    the tiles' mosaic (sum 1) and the global view (sum 1) count half each, so each tile's patch
    lands as 1/8 on its own cell and the global patch as 1/8 spread over its 2 x 2 cells."""
    cfg = tiny_cfg()
    N = cfg.vit_n_patches
    rollout = np.zeros((5, N, N))
    rollout[0, :, 0] = 1.0
    rollout[1:, :, 5] = 1.0
    want = np.zeros((8, 8))
    want[0:2, 0:2] = 0.5 / 4
    for r, c in ((1, 1), (1, 5), (5, 1), (5, 5)):
        want[r, c] += 0.5 / 4
    np.testing.assert_allclose(am.rollout_map(rollout, cfg, (2, 2)), want, rtol=0, atol=1e-15)
    unsplit = am.rollout_map(rollout[1:2], cfg, (1, 1))
    assert unsplit.shape == (4, 4) and unsplit[1, 1] == 1.0 and unsplit.sum() == 1.0


# ---- the weights are the ones the model used -----------------------------------------------------
@nnx.jit
def _jax_rebuilt_logits(model, ids, images, weights):
    """The decoder's forward with each block's attention replaced by out_proj(weights @ V)."""
    dec = model.decoder
    x = model.embed(ids, images)
    B, T, H = x.shape
    cos, sin = dec.rotary_embd(jnp.arange(T)[None])
    with dec.options.precision():
        for block, w in zip(dec.blocks, weights):
            _, _, v = block.attn.project_qkv(block.norm1(x), cos, sin)  # (B, T, nkv, hd)
            v = jnp.repeat(v, block.attn.n_heads // block.attn.n_kv_heads, axis=2)
            y = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, T, H)
            x = x + block.attn.out_proj(y)
            x = x + block.mlp(block.norm2(x))
        return dec.logits(dec.norm(x))


@nnx.jit
def _jax_vit_layers(model, images, weights):
    """Per ViT layer (its attention output, out_proj(weights @ V) from the same input)."""
    vit = model.vision_encoder
    x = vit.patch_embedding(vit.normalise(images))
    pairs = []
    for block, w in zip(vit.blocks, weights):
        h = block.ln1(x)
        _, _, v = block.attn.project_qkv(h)
        pairs.append((block.attn(h), block.attn.out_proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(x.shape))))
        x = block(x)
    return pairs


def _torch_rebuilt_logits(model, ids, images, weights):
    dec = model.decoder
    with torch.no_grad():
        x = model.embed(torch.as_tensor(ids), torch.as_tensor(images))
        B, T, H = x.shape
        cos, sin = dec.rotary_embd(torch.arange(T)[None].expand(B, -1))
        for block, w in zip(dec.blocks, weights):
            _, _, v = block.attn.project_qkv(block.norm1(x), cos, sin)  # (B, nkv, T, hd)
            v = v.repeat_interleave(block.attn.n_heads // block.attn.n_kv_heads, dim=1)
            x = x + block.attn.out_proj((w @ v).transpose(1, 2).reshape(B, T, H))
            x = x + block.mlp(block.norm2(x))
        return to_np(dec.head(dec.norm(x)))


def _rel(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    record(name, f"max|diff| {err:.2e} = {err / scale:.2e} x max|ref| {scale:.3g} (tol {tol:.0e} relative)")
    assert err <= tol * scale, f"{name}: max|diff| {err:.2e} = {err / scale:.2e} relative (tol {tol:.0e})"


def test_weights_rebuild_the_models_output(tmp_path):
    cfg = tiny_cfg()
    tmodel, jmodel = _pair(cfg, 2, tmp_path)
    ids, images, mask = make_batch(cfg, [(0, 1), (21, 2)], 56, 2)
    wj = am.decoder_attention(jmodel, ids, mask, images)
    want = np.asarray(jaxvlm.forward(jmodel, ids, images, mask))
    _rel(
        "decoder rebuilt from weights @ V, jaxvlm",
        _jax_rebuilt_logits(jmodel, jnp.asarray(ids), jnp.asarray(images), wj),
        want,
        REBUILT_TOL,
    )
    wt = tam.decoder_attention(tmodel, ids, mask, images)
    with torch.no_grad():
        want_t = to_np(tmodel(ids, images, mask)[0])
    _rel(
        "decoder rebuilt from weights @ V, torch_ref",
        _torch_rebuilt_logits(tmodel, ids, images, wt),
        want_t,
        REBUILT_TOL,
    )
    # a row attends: the real rows' weights are not uniform (the test above is not vacuous)
    assert float(np.asarray(wj)[:, 0, :, -1].max()) > 2.0 / ids.shape[1]
    # ViT: each layer's weights @ V through out_proj equal that layer's attention output
    layers = _jax_vit_layers(jmodel, jnp.asarray(images), am.vit_attention(jmodel, images))
    for i, (want_i, rebuilt) in enumerate(layers):
        _rel(f"vit layer {i} rebuilt from weights @ V", rebuilt, want_i, REBUILT_TOL)


def test_bias_is_the_models():
    """The probabilities use `attention_bias` exactly as the kernels do: causal + left padding."""
    mask = jnp.asarray([[0, 1, 1]])
    b = np.asarray(attention_bias(mask, causal=True, q_len=3, k_len=3))[0, 0]
    q = jnp.zeros((1, 3, 2, 4))
    w = np.asarray(am.attention_probabilities(q, jnp.zeros((1, 3, 1, 4)), jnp.asarray(b)[None, None]))
    np.testing.assert_array_equal(w[0, 0], [[1, 0, 0], [0, 1, 0], [0, 0.5, 0.5]])


# ---- image-token maps: known answers --------------------------------------------------------------
def _one_hot_weights(T, query, key):
    w = np.zeros((1, 1, 1, T, T))
    w[0, 0, 0, query, key] = 1.0
    return w


def _ids_with_tiles(cfg, n_tiles, lead=3, tail=2):
    L = cfg.n_image_tokens
    ids = np.concatenate([np.full(lead, 5), np.full(n_tiles * L, cfg.image_token_id), np.full(tail, 7)])
    return ids[None]


@pytest.mark.parametrize("family", ("nanovlm", "smolvlm"))
def test_image_token_map_puts_a_tokens_weight_on_its_patch_block(family):
    """tiny: 32 px tiles of 8 px patches (4 x 4), s = 2: 4 tokens per tile on a 2 x 2 grid, each
    a 2 x 2 patch block. A 2 x 2 image grid: 5 tiles, the global view first (nanoVLM) or last
    (SmolVLM). All weight on tile (1, 0)'s token 1 (block row 0, column 1) must land on patches
    rows 4..5, columns 2..3 of the 8 x 8 image map; a global-view token's weight on a quarter of
    the image."""
    cfg = tiny_cfg(vlm_family=family) if family == "nanovlm" else _smol_cfg()
    L, side = cfg.n_image_tokens, cfg.vit_img_size // cfg.vit_patch_size
    assert (L, side, cfg.mp_pixel_shuffle_factor) == (4, 4, 2)
    ids = _ids_with_tiles(cfg, 5)
    T, first = ids.shape[1], 3
    tile_index = {"nanovlm": 1 + 2, "smolvlm": 2}[family]  # tile (1, 0) in token order
    w = _one_hot_weights(T, T - 1, first + tile_index * L + 1)
    heat = am.image_token_map(w, ids, cfg, (2, 2), query=T - 1)
    assert heat.shape == (8, 8)
    want = np.zeros((8, 8))
    want[4:6, 2:4] = 0.25  # one token's mass spread over its 4 patches
    np.testing.assert_array_equal(heat, want)
    # the global view's token 2 (block row 1, column 0): the lower-left quarter of the image
    glob = {"nanovlm": 0, "smolvlm": 4}[family]
    w = _one_hot_weights(T, T - 1, first + glob * L + 2)
    heat = am.image_token_map(w, ids, cfg, (2, 2), query=T - 1)
    want = np.zeros((8, 8))
    want[4:8, 0:4] = 1 / 16
    np.testing.assert_array_equal(heat, want)
    # text keys carry no image weight; the map's sum is the attention on image tokens
    w = _one_hot_weights(T, T - 1, 0) * 0.5 + _one_hot_weights(T, T - 1, first) * 0.5
    assert am.image_token_map(w, ids, cfg, (2, 2), query=T - 1).sum() == 0.5


def test_image_token_map_unsplit_and_per_layer():
    """A nanoVLM-222M-style config (one token kind, no splitting): one tile covering the image;
    layer / head selection picks the right slice."""
    cfg = tiny_cfg(vlm_extra_tokens=LEGACY_EXTRA_TOKENS, extra_token_amount=1, lm_vocab_size=49153)
    ids = _ids_with_tiles(cfg, 1)
    T = ids.shape[1]
    w = np.zeros((2, 1, 2, T, T))
    w[1, 0, 1, T - 1, 3 + 3] = 1.0  # layer 1, head 1: image token 3 = block (1, 1)
    heat = am.image_token_map(w, ids, cfg, (1, 1), query=T - 1, layer=1, head=1)
    want = np.zeros((4, 4))
    want[2:4, 2:4] = 0.25
    np.testing.assert_array_equal(heat, want)
    mean = am.image_token_map(w, ids, cfg, query=T - 1)
    np.testing.assert_allclose(mean, want / 4, atol=0)
    assert am.image_token_map(w, ids, cfg, query=T - 1, layer=0).sum() == 0
    with pytest.raises(ValueError, match="layers 0..1"):
        am.image_token_map(w, ids, cfg, query=T - 1, layer=2)
    with pytest.raises(ValueError, match="outside the sequence"):
        am.image_token_map(w, ids, cfg, query=T)


def _smol_cfg():
    from conversion.config import smolvlm_extra_tokens

    # tiny (tile 32, 4 x 4 patches, s = 2), SmolVLM's tokens and processor; longest edge 64
    return tiny_cfg(
        vlm_family="smolvlm",
        vlm_extra_tokens=smolvlm_extra_tokens(),
        vlm_image_token_id=49153,
        lm_vocab_size=49152 + 40,
        max_img_size=64,
    )


@pytest.mark.parametrize("family", ("nanovlm", "smolvlm"))
def test_tile_layout_matches_the_processor(family):
    """Each tile the processor cuts is the block of the resized image that `tile_layout` says."""
    from jaxvlm.image_processing import processor_for

    cfg = tiny_cfg() if family == "nanovlm" else _smol_cfg()
    proc = processor_for(cfg)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8), "RGB")
    tiles, grid = proc(picture)
    layout = am.tile_layout(cfg, grid, tiles.shape[0])
    assert grid[0] * grid[1] > 1, f"the picture was not split: grid {grid}"
    S = cfg.vit_img_size
    mosaic = np.zeros((3, grid[0] * S, grid[1] * S), np.float32)
    for tile, (r, c, rows, cols) in zip(tiles, layout):
        if (rows, cols) == (1, 1):
            mosaic[:, r * S : (r + 1) * S, c * S : (c + 1) * S] = tile
    views = [t for t in layout if (t[2], t[3]) != (1, 1)]
    assert views == [(0, 0, *grid)], layout
    # the mosaic of the tiles is the processor's resized image (the tiles cover it all, in place)
    if family == "nanovlm":
        want = np.asarray(proc.resize(picture), np.float32).transpose(2, 0, 1) / 255
    else:
        from jaxvlm.smolvlm_processing import _fit_longest_edge, _resize, _tile_multiple, _to_float

        im = _resize(picture, *_fit_longest_edge(picture.height, picture.width, cfg.max_img_size))
        want = _to_float(_resize(im, *_tile_multiple(im.height, im.width, S)))
    assert want.shape == mosaic.shape
    np.testing.assert_array_equal(mosaic, want)


def test_resampler_has_no_image_map():
    cfg = tiny_cfg()
    fake = type("C", (), {"mp_type": "resampler", "n_image_tokens": 4, "image_token_id": cfg.image_token_id})()
    with pytest.raises(ValueError, match="learned queries"):
        am.image_token_weights(np.zeros(3), np.zeros(3, int), fake)


def test_overlay_keeps_the_image_size():
    picture = Image.new("RGB", (37, 21), (10, 200, 30))
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    out = np.asarray(am.overlay(picture, heat), np.int64)
    assert out.shape == (21, 37, 3)
    assert np.abs(out[0, 0] - out[-1, -1]).sum() > 50  # the hot corner is coloured differently


# ---- the command line ------------------------------------------------------------------------------
needs_data = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not (COCO / "captions.json").is_file(),
    reason=f"SmolLM2 tokenizer / COCO-mini not found under {SHARED / 'data'} (../shared is absent)",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("tiny_attention")
    random_torch_vlm(tiny_cfg(lm_max_length=128), 0).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (SMOLLM2 / name).is_file():
            shutil.copyfile(SMOLLM2 / name, d / name)
    return d


def _coco_image(k=0):
    meta = json.loads((COCO / "captions.json").read_text())["images"][k]
    return COCO / "images" / meta["file_name"], (meta["width"], meta["height"])


@pytest.mark.slow  # two CLI processes (~25 s on 2 cores)
@needs_data
def test_cli_writes_overlays_and_refuses_to_overwrite(tiny_dir, tmp_path):
    image, size = _coco_image()
    out, roll = tmp_path / "map.png", tmp_path / "rollout.png"
    argv = ["-m", "jaxvlm", "generate", "--model", str(tiny_dir), "--image", str(image), "--prompt", "What is this?",
            "--greedy", "--max-new-tokens", "3", "--attention-map", str(out), "--vit-rollout", str(roll),
            "--attention-layer", "1", "--attention-head", "2"]  # fmt: skip
    code, stdout, err = run_cli(*argv)
    assert code == 0, err
    assert any("attention map of generated token 0" in line and "layer 1, head 2" in line for line in err), err
    for path in (out, roll):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == size and im.mode == "RGB"
            pixels = np.asarray(im)
        with Image.open(image) as src:
            original = np.asarray(src.convert("RGB"), np.float64)
        assert np.abs(pixels - original).max() > 20, f"{path.name}: no heat map drawn over the image"
    assert not list(tmp_path.glob(".tmp-*"))
    before = out.read_bytes()
    code, _, err = run_cli(*argv[:-4])  # the same outputs again, no --overwrite
    assert code == 2 and len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0], err
    assert out.read_bytes() == before


@needs_data
def test_cli_bad_values_one_line_nothing_written(tiny_dir, tmp_path, capsys):
    from cli.main import main

    image, _ = _coco_image()
    out = tmp_path / "map.png"
    base = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--greedy", "--max-new-tokens", "2"]
    cases = {
        "token beyond the generated ones": (["--image", str(image), "--attention-map", str(out), "--attention-token", "2"], "--attention-token 2: choose a generated token, 0..1"),
        "layer out of range": (["--image", str(image), "--attention-map", str(out), "--attention-layer", "2"], "--attention-layer 2: the decoder has layers 0..1"),
        "layer not a number": (["--image", str(image), "--attention-map", str(out), "--attention-layer", "last"], "give a layer number"),
        "head out of range": (["--image", str(image), "--attention-map", str(out), "--attention-head", "4"], "--attention-head 4: the decoder has query heads 0..3"),
        "head not a number": (["--image", str(image), "--attention-map", str(out), "--attention-head", "-1"], "give a head number"),
        "head without a map": (["--image", str(image), "--attention-head", "0"], "--attention-head goes with --attention-map"),
        "two images": (["--image", str(image), "--image", str(image), "--attention-map", str(out)], "map one image; 2 --image"),
        "no image": (["--attention-map", str(out)], "map one image; 0 --image"),
        "token without a map": (["--image", str(image), "--attention-token", "0"], "--attention-token goes with --attention-map"),
        "same file twice": (["--image", str(image), "--attention-map", str(out), "--vit-rollout", str(out)], "the same file"),
        "the image itself": (["--image", str(image), "--attention-map", str(image), "--overwrite"], "is also an input"),
    }  # fmt: skip
    for name, (extra, message) in cases.items():
        capsys.readouterr()
        code = main(base + extra)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2, f"{name}: exit {code}"
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], f"{name}: {err}"
        assert not out.exists() and not list(tmp_path.iterdir()), f"{name}: wrote {list(tmp_path.iterdir())}"


@needs_data
def test_token_beyond_an_early_eos_is_refused(tiny_dir, tmp_path):
    """A row that stopped at EOS after 1 token has no token 1 to map (checked after generating)."""
    import argparse

    from cli.generate import _load, _write_attention

    image, _ = _coco_image()
    args = argparse.Namespace(model=str(tiny_dir), tokenizer=None, image=[str(image)], attention_map=str(tmp_path / "m.png"),
                              vit_rollout=None, attention_token=1, attention_layer="mean", attention_head="mean")  # fmt: skip
    model, tokenizer, encoder = _load(args)
    prompt = encoder.encode_prompt(args.image, "hi")
    eos = tokenizer.eos_token_id
    with pytest.raises(ValueError, match=r"only 1 token\(s\) were generated"):
        _write_attention(model, tokenizer, encoder, prompt, np.array([[eos, eos, eos]]), args)
    assert not list(tmp_path.iterdir())
    # token 0 of the same row is mapped: its PNG is the image's size
    args.attention_token = 0
    _write_attention(model, tokenizer, encoder, prompt, np.array([[eos, eos, eos]]), args)
    with Image.open(tmp_path / "m.png") as im, Image.open(image) as src:
        assert im.size == src.size


@needs_data
def test_unsplit_nanovlm_222m_style_model(tmp_path, capsys):
    """The one-token, no-splitting generation of nanoVLM (222M's extra tokens): the image is one
    tile covering all of it; the map is written at the JPEG's size."""
    import shutil

    from cli.main import main

    cfg = tiny_cfg(vlm_extra_tokens=LEGACY_EXTRA_TOKENS, extra_token_amount=1, lm_vocab_size=49153, max_img_size=32)
    d = tmp_path / "legacy"
    random_torch_vlm(cfg, 4).save_pretrained(d)
    shutil.copyfile(SMOLLM2 / "tokenizer.json", d / "tokenizer.json")
    image, size = _coco_image(1)
    out = tmp_path / "map.png"
    argv = ["generate", "--model", str(d), "--image", str(image), "--prompt", "What is this?", "--greedy",
            "--max-new-tokens", "2", "--attention-map", str(out), "--attention-token", "0"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "attention map of generated token 0" in err, err
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == size
