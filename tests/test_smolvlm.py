"""SmolVLM (transformers' Idefics3) both ways: `from-smolvlm`, `to-smolvlm`, and the models'
outputs against `Idefics3ForConditionalGeneration` itself.

Small Idefics3 models are built offline from configs in SmolVLM-256M's proportions (vision:
12-dim heads, a 4x4-to-1 pixel shuffle as SmolVLM's 32x32 -> 8x8; language: grouped-query
attention 3:1 as SmolLM2-135M's 9:3, MLP 8/3 of the width), tied and untied, with every weight
randomised (norms and biases included) and non-default eps / rope_theta, saved with transformers'
`save_pretrained` (single file and sharded, float32 and bfloat16), converted, and run.

Tolerances (fp32, relative to max |logits| of transformers): torch_ref 1e-5, jaxvlm 1e-4, on a
left-padded batch of three prompts holding 1, 2 and 3 images in Idefics3's image string; compared
on the real (unpadded) positions, since transformers' fully masked pad rows are arbitrary.
Round trips must be byte-identical.

transformers is a test-only dependency; without it this module is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers = pytest.importorskip(
    "transformers",
    reason="transformers is not installed (test-only dependency: pip install -c constraints.txt -e '.[dev]')",
)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from conftest import assert_close, record, run_cli, to_np  # noqa: E402
from test_hf import randomize_hf_  # noqa: E402

import jaxvlm  # noqa: E402
import torch_ref  # noqa: E402
import torch_ref.generate  # noqa: E402
from conversion import load_safetensors, save_safetensors  # noqa: E402
from conversion.pretrained import read_checkpoint  # noqa: E402
from conversion.safetensors_io import CheckpointError  # noqa: E402
from conversion.smolvlm import from_smolvlm, read_smolvlm, to_smolvlm  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

IMG, PATCH, SCALE = 64, 8, 4  # 8x8 patches -> 2x2 = 4 image tokens per tile (SmolVLM: 32x32 -> 8x8)
L = (IMG // PATCH // SCALE) ** 2
V = 320
IMAGE_ID, FAKE_ID, GLOBAL_ID, ROW_COL_ID = 300, 301, 302, 303  # ids of <image>, <fake...>, <global-img>, <row_1_col_1>
VISION = dict(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMG,
    patch_size=PATCH,
    layer_norm_eps=1e-3,
)
TEXT = dict(
    model_type="llama",
    vocab_size=V,
    hidden_size=72,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    rope_theta=5000.0,
    rms_norm_eps=1e-4,
    max_position_embeddings=512,
)


def idefics3(tied: bool, seed: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(
        vision_config=VISION,
        text_config={**TEXT, "tie_word_embeddings": tied},
        scale_factor=SCALE,
        image_token_id=IMAGE_ID,
        tie_word_embeddings=tied,
    )
    model = randomize_hf_(Idefics3ForConditionalGeneration(cfg), seed)
    if tied:
        assert model.lm_head.weight is model.model.text_model.embed_tokens.weight
    else:
        assert not torch.equal(model.lm_head.weight, model.model.text_model.embed_tokens.weight)
    return model


def write_processor(directory: Path, splitting: bool = True) -> None:
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    Idefics3ImageProcessorPil(
        do_image_splitting=splitting, max_image_size={"longest_edge": IMG}, size={"longest_edge": 4 * IMG}
    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def smolvlm(tmp_path_factory):
    """{name: (directory, transformers model)} for tied / untied, single-file / sharded, fp32 / bf16."""
    root = tmp_path_factory.mktemp("smolvlm")
    out = {}
    for tied in (True, False):
        model = idefics3(tied, 30 + tied).eval()
        name = "tied" if tied else "untied"
        model.save_pretrained(root / name)
        write_processor(root / name)
        out[name] = (root / name, model)
        model.save_pretrained(root / f"{name}_sharded", max_shard_size="100KB")
        write_processor(root / f"{name}_sharded")
        assert (root / f"{name}_sharded" / "model.safetensors.index.json").is_file()
        out[f"{name}_sharded"] = (root / f"{name}_sharded", model)
    bf16 = idefics3(False, 40).to(torch.bfloat16).eval()
    bf16.save_pretrained(root / "untied_bf16")
    write_processor(root / "untied_bf16")
    out["untied_bf16"] = (root / "untied_bf16", bf16)
    return out


def image_string(rows: int, cols: int) -> list[int]:
    """Ids of Idefics3's image string (`<row_r_col_c>` all map to one id here: the model sees ids)."""
    tile = [IMAGE_ID] * L
    if rows == cols == 1:
        return [FAKE_ID, GLOBAL_ID] + tile + [FAKE_ID]
    ids = []
    for _ in range(rows):
        for _ in range(cols):
            ids += [FAKE_ID, ROW_COL_ID] + tile
        ids += [10]  # "\n"
    return ids + [10, FAKE_ID, GLOBAL_ID] + tile + [FAKE_ID]


def batch(seed: int, T: int = 160):
    """Left-padded rows with 1, 2 and 3 images (grids 1x1; 2x1 + 1x1; 1x1 + 1x2 + 1x1), random
    text around them. Returns ids int64[3, T], mask, pixels float32[N_img, 3, S, S] in [0, 1], and
    the per-row tile counts."""
    rng = np.random.default_rng(seed)
    grids = [[(1, 1)], [(2, 1), (1, 1)], [(1, 1), (1, 2), (1, 1)]]
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    tiles = []
    for b, row in enumerate(grids):
        seq = list(rng.integers(11, IMAGE_ID, size=5))
        for r, c in row:
            seq += image_string(r, c) + list(rng.integers(11, IMAGE_ID, size=int(rng.integers(3, 9))))
            tiles.append(r * c + (1 if r * c > 1 else 0))
        seq += list(rng.integers(11, IMAGE_ID, size=max(0, T - 12 * (2 - b) - len(seq))))  # row 0 most padded
        assert len(seq) <= T
        ids[b, T - len(seq) :] = seq
        mask[b, T - len(seq) :] = 1
    n = int((ids == IMAGE_ID).sum()) // L
    assert n == sum(tiles)
    pixels = rng.random((n, 3, IMG, IMG), dtype=np.float32)
    per_row = [sum(tiles[:1]), sum(tiles[1:3]), sum(tiles[3:])]
    return ids, mask, pixels, per_row


def hf_inputs(ids, mask, pixels, per_row, dtype=torch.float32):
    """transformers' layout: pixel_values [B, max images, 3, S, S] normalised as the processor
    does ((x - 0.5) / 0.5), zero-padded (Idefics3 drops all-zero images)."""
    norm = (pixels - np.float32(0.5)) / np.float32(0.5)
    pv = np.zeros((len(per_row), max(per_row), 3, IMG, IMG), np.float32)
    k = 0
    for b, n in enumerate(per_row):
        pv[b, :n] = norm[k : k + n]
        k += n
    return dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        pixel_values=torch.from_numpy(pv).to(dtype),
    )


@pytest.mark.parametrize("name", ["tied", "untied_sharded"])
def test_logits_equal_transformers(name, smolvlm, tmp_path):
    src, hf = smolvlm[name]
    cfg = from_smolvlm(src, tmp_path / "ckpt")
    assert (cfg.vlm_family, cfg.lm_tie_weights, cfg.image_token_id, cfg.n_image_tokens) == (
        "smolvlm",
        name == "tied",
        IMAGE_ID,
        L,
    )
    assert (cfg.vit_ln_eps, cfg.lm_rms_eps, cfg.lm_re_base, cfg.vlm_image_mean) == (1e-3, 1e-4, 5000, (0.5,) * 3)
    tmodel = torch_ref.VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    jmodel = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    direct = torch_ref.VisionLanguageModel.from_pretrained(src)  # the SmolVLM directory itself, converted in memory
    assert direct.cfg == cfg and all(
        torch.equal(a, b) for a, b in zip(direct.state_dict().values(), tmodel.state_dict().values())
    )
    assert jaxvlm.VisionLanguageModel.from_pretrained(src).cfg == cfg
    ids, mask, pixels, per_row = batch(0)
    with torch.no_grad():
        want = hf(**hf_inputs(ids, mask, pixels, per_row)).logits
        got_t, _ = tmodel(torch.from_numpy(ids), torch.from_numpy(pixels), torch.from_numpy(mask))
    got_j = np.asarray(jaxvlm.forward(jmodel, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
    real = mask.astype(bool)
    scale = float(np.abs(to_np(want)[real]).max())
    assert_close(f"smolvlm {name}: logits torch_ref vs transformers", to_np(got_t)[real], to_np(want)[real], 1e-5)
    assert_close(f"smolvlm {name}: logits jaxvlm vs transformers", got_j[real], to_np(want)[real], 1e-4, scale=scale)


def test_greedy_tokens_equal_transformers(smolvlm, tmp_path):
    src, hf = smolvlm["untied"]
    from_smolvlm(src, tmp_path / "ckpt")
    tmodel = torch_ref.VisionLanguageModel.from_pretrained(tmp_path / "ckpt").eval()
    jmodel = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    ids, mask, pixels, per_row = batch(1, T=120)
    N = 32
    with torch.no_grad():
        out = hf.generate(
            **hf_inputs(ids, mask, pixels, per_row),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    want = to_np(out[:, ids.shape[1] :])
    got_t = to_np(torch_ref.generate.generate(tmodel, ids, pixels, mask, max_new_tokens=N, greedy=True))
    got_j = np.asarray(jaxvlm.generate(jmodel, ids, pixels, mask, max_new_tokens=N, greedy=True))
    record(
        "smolvlm greedy tokens",
        f"{N} tokens x 3 rows: torch_ref {np.mean(got_t == want):.0%}, jaxvlm {np.mean(got_j == want):.0%} equal",
    )
    assert want.shape == (3, N)
    np.testing.assert_array_equal(got_t, want)
    np.testing.assert_array_equal(got_j, want)


def _file_tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    out = {}
    for f in files:
        out.update(load_safetensors(directory / f)[0])
    return out


@pytest.mark.parametrize("name", ["tied", "untied_sharded", "untied_bf16"])
def test_round_trip_is_byte_identical_and_loads_in_transformers(name, smolvlm, tmp_path):
    from transformers import AutoModelForImageTextToText

    src, hf = smolvlm[name]
    from_smolvlm(src, tmp_path / "ckpt")
    to_smolvlm(tmp_path / "ckpt", tmp_path / "back")
    a, b = _file_tensors(src), _file_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b), f"key sets differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    record(f"smolvlm round trip {name}", f"{len(a)} tensors byte-identical ({a[next(iter(a))].dtype})")
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "back", dtype=hf.dtype).eval()
    orig = AutoModelForImageTextToText.from_pretrained(src, dtype=hf.dtype).eval()  # loaded the same way
    assert type(back).__name__ == "Idefics3ForConditionalGeneration"
    ids, mask, pixels, per_row = batch(2)
    with torch.no_grad():
        want = orig(**hf_inputs(ids, mask, pixels, per_row, hf.dtype)).logits
        got = back(**hf_inputs(ids, mask, pixels, per_row, hf.dtype)).logits
    assert torch.equal(got, want), "the exported model must compute exactly what the source does"
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    proc = Idefics3ImageProcessorPil.from_pretrained(tmp_path / "back")
    assert (proc.max_image_size, proc.size["longest_edge"], proc.do_image_splitting) == (
        {"longest_edge": IMG},
        4 * IMG,
        True,
    )


def test_fine_tune_exports_to_transformers(smolvlm, tmp_path):
    """Three jaxvlm AdamW steps from a converted SmolVLM, saved, exported with to-smolvlm (the
    CLI): transformers gives the fine-tuned jaxvlm model's logits."""
    from transformers import AutoModelForImageTextToText

    from conversion.recipe import OptimConfig
    from jaxvlm.train import Trainer

    src, _ = smolvlm["untied"]
    from_smolvlm(src, tmp_path / "ckpt")
    model = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    ids, mask, pixels, per_row = batch(3, T=96)
    labels = np.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    labels = np.where(ids[:, 1:] == IMAGE_ID, -100, labels)
    labels = np.concatenate([labels, np.full((3, 1), -100)], axis=1)
    b = {"input_ids": ids[None], "attention_mask": mask[None], "labels": labels[None], "images": pixels[None]}
    trainer = Trainer(
        model, OptimConfig(max_training_steps=3, lr_mp=1e-3, lr_vision_backbone=1e-3, lr_language_backbone=1e-3)
    )
    state = trainer.init_state(model)
    losses = []
    for _ in range(3):
        state, m = trainer.step(state, trainer.place_batch(b))
        losses.append(float(m["loss"]))
    record("smolvlm fine-tune losses", ", ".join(f"{x:.4f}" for x in losses))
    assert losses[-1] < losses[0]
    tuned = trainer.host_model(state)
    tuned.save_pretrained(tmp_path / "tuned")
    code, _, err = run_cli("-m", "conversion", "to-smolvlm", str(tmp_path / "tuned"), str(tmp_path / "hf"))
    assert code == 0, err
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = back(**hf_inputs(ids, mask, pixels, per_row)).logits
    got = np.asarray(jaxvlm.forward(tuned, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert_close("smolvlm fine-tuned: jaxvlm vs transformers after to-smolvlm", got[real], to_np(want)[real], 1e-4)
    cfg0, t0 = read_checkpoint(tmp_path / "ckpt")
    _, t1 = read_checkpoint(tmp_path / "tuned")
    assert not np.array_equal(t0["MP.proj.weight"], t1["MP.proj.weight"]), "the steps must have changed the weights"


def test_cli_from_smolvlm_and_errors(smolvlm, tmp_path):
    src, _ = smolvlm["tied"]
    code, out, err = run_cli("-m", "conversion", "from-smolvlm", str(src), str(tmp_path / "ckpt"))
    assert code == 0, err
    assert "SmolVLM" in out and (tmp_path / "ckpt" / "model.safetensors").is_file()
    code, _, err = run_cli("-m", "conversion", "from-smolvlm", str(src), str(tmp_path / "ckpt"))
    assert code == 2 and len(err) == 1 and "not empty" in err[0], err
    # a nanoVLM-family checkpoint is not a SmolVLM
    code, _, err = run_cli("-m", "conversion", "init", str(tmp_path / "nano"))
    assert code == 0, err
    code, _, err = run_cli("-m", "conversion", "to-smolvlm", str(tmp_path / "nano"), str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "vlm_family" in err[0] and not (tmp_path / "out").exists(), err
    # a Llama directory is not a SmolVLM
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'.*idefics3"):
        read_smolvlm(bad)
    # a missing tensor is named, and nothing is written
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors, meta = load_safetensors(broken / "model.safetensors")
    del tensors["model.vision_model.post_layernorm.bias"]
    save_safetensors(broken / "model.safetensors", tensors, metadata=meta)
    code, _, err = run_cli("-m", "conversion", "from-smolvlm", str(broken), str(tmp_path / "out2"))
    err = [line for line in err if not line.startswith("WARNING")]  # "... has no tokenizer.json"
    assert code == 2 and len(err) == 1 and "post_layernorm.bias" in err[0] and not (tmp_path / "out2").exists(), err


@pytest.mark.parametrize("image_size,patch", [(IMG, PATCH), (512, 16), (384, 14), (128, 8)])
def test_idefics3_patch_positions_are_the_identity(image_size, patch):
    """nanoVLM's ViT adds position row p to patch p. Idefics3 looks position ids up with
    `torch.bucketize` on float32 fractions; for a full tile that must be the identity, as it is
    here (this test's 8x8), for SmolVLM-256M/500M (512 px / 16 = 32x32), SmolVLM-2B (384 / 14)
    and powers of two. (On some other grid sides, e.g. 19x19, it is not: see the README.)"""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=8, image_size=image_size, patch_size=patch))
    randomize_hf_(emb, 0)
    n = image_size // patch
    pixels = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        got = emb(pixels, torch.ones(1, n, n, dtype=torch.bool))
        want = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding.weight[None]
    assert torch.equal(got, want)


# ---- a SmolVLM directory as the Hub has them: tokenizer, processor, chat template --------------
SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2, COCO = SHARED / "data" / "smollm2", SHARED / "data" / "coco-mini"
needs_shared = pytest.mark.skipif(
    not (SMOLLM2 / "tokenizer.json").is_file() or not COCO.is_dir(),
    reason=f"real SmolLM2 tokenizer / COCO images not found under {SHARED / 'data'} (../shared is absent)",
)


def smolvlm_with_processor(root: Path, seed: int):
    """An Idefics3 model over the real SmolLM2 tokenizer plus SmolVLM's tokens, saved with its
    Idefics3Processor (tokenizer, image processor, chat template) as the Hub repos hold them."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from conversion.smolvlm import SMOLVLM_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    extra += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    tok.eos_token = "<end_of_utterance>"
    tile = 32  # 4x4 patches of 8, shuffle 2 -> 4 tokens; images up to 2x2 tiles + the global view
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            max_image_size={"longest_edge": tile}, size={"longest_edge": 2 * tile}
        ),
        tokenizer=tok,
        image_seq_len=4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    cfg = Idefics3Config(
        vision_config={**VISION, "image_size": tile},
        text_config={
            **TEXT,
            "vocab_size": len(tok),
            "hidden_size": 48,
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,  # a random tied head mostly repeats the last token: no test of the prompt
    )
    model = randomize_hf_(Idefics3ForConditionalGeneration(cfg), seed).eval()
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return model, processor


@needs_shared
@pytest.mark.slow
def test_generate_train_and_export_a_smolvlm_directory(tmp_path):
    """The user's path: from-smolvlm, `jaxvlm generate` (its answer is transformers' greedy answer
    to the processor's prompt), `jaxvlm train --init-from` the SmolVLM directory itself on COCO for 3 steps, to-smolvlm of the
    run's model/, and transformers' logits for the fine-tuned model equal to jaxvlm's."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf, processor = smolvlm_with_processor(tmp_path / "hf", 50)
    code, _, err = run_cli("-m", "conversion", "from-smolvlm", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert code == 0, err
    assert "no preprocessor_config" not in " ".join(err), err  # transformers 5 nests it in processor_config.json
    ckpt = read_checkpoint(tmp_path / "ckpt")[0]
    assert (ckpt.vit_img_size, ckpt.max_img_size, ckpt.n_image_tokens) == (32, 64, 4)
    image = sorted((COCO / "images").iterdir())[0]
    question = "What is in the picture?"
    answers = []
    for model_dir in (tmp_path / "ckpt", tmp_path / "hf"):  # converted, and the SmolVLM directory itself
        code, out, err = run_cli(
            "-m", "jaxvlm", "generate", "--model", str(model_dir), "--image", str(image),
            "--prompt", question, "--greedy", "--max-new-tokens", "12",
        )  # fmt: skip
        assert code == 0, err
        answers.append(out)
    assert answers[0] == answers[1]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        new = hf.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    want = processor.tokenizer.decode(new, skip_special_tokens=True)
    record("smolvlm generate CLI", f"{out.strip()!r} (transformers: {want.strip()!r})")
    assert out.strip() == want.strip() and want.strip()
    assert len(set(new.tolist())) > 2, "a degenerate answer would not show a wrong prompt"

    code, _, err = run_cli(
        "-m", "jaxvlm", "train", "--init-from", str(tmp_path / "hf"), "--data", f"coco:{COCO}",
        "--steps", "3", "--batch-size", "2", "--output-dir", str(tmp_path / "run"), "--log-every", "1",
        "--no-tensorboard", timeout=600,
    )  # fmt: skip
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 3 and all(np.isfinite(losses))
    code, _, err = run_cli("-m", "conversion", "to-smolvlm", str(tmp_path / "run" / "model"), str(tmp_path / "out"))
    assert code == 0, err
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    proc_back = AutoProcessor.from_pretrained(tmp_path / "out")
    inputs_back = proc_back(text=text, images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
    assert torch.equal(inputs_back["input_ids"], inputs["input_ids"])
    assert torch.equal(inputs_back["pixel_values"], inputs["pixel_values"])
    tuned = jaxvlm.VisionLanguageModel.from_pretrained(tmp_path / "run" / "model")
    from jaxvlm.data import SampleEncoder
    from jaxvlm.tokenizer import load_for_config

    enc = SampleEncoder.from_config(tuned.cfg, load_for_config(tuned.cfg, tmp_path / "run" / "model"))
    sample = enc.encode_prompt([str(image)], question)
    np.testing.assert_array_equal(sample["input_ids"], to_np(inputs["input_ids"][0]))
    with torch.no_grad():
        want = back(**inputs_back).logits[0]
    got = np.asarray(jaxvlm.forward(tuned, jnp.asarray(sample["input_ids"][None]), jnp.asarray(sample["images"])))[0]
    assert_close("smolvlm CLI fine-tune: jaxvlm vs transformers after to-smolvlm", got, want, 1e-4)
