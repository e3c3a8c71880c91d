"""Contrastive pretraining of the vision tower on image-caption pairs: CLIP's InfoNCE and
SigLIP's sigmoid loss; mirrors `torch_ref/contrastive.py` (same names).

    jaxvlm pretrain-vision --data coco:../shared/data/coco-mini --loss siglip --output-dir RUN

The towers (Radford et al. 2021, CLIP; Zhai et al. 2023, SigLIP):
- image: the VLM's own `vision_encoder` (the ViT jaxvlm builds), its output mean-pooled over the
  patches, then `image_proj` Linear(D, E, no bias);
- text: the VLM's own `decoder` (token embedding + blocks + final norm, causal), its hidden
  states mean-pooled over the real tokens (attention_mask 1), then `text_proj` Linear(H, E, no
  bias). Both projections are drawn N(0, width^-1/2), as CLIP's `visual.proj` / `text_projection`;
- both embeddings L2-normalised; a learned temperature `logit_scale` = t' (the scale is exp(t')),
  and for SigLIP a learned bias `logit_bias` = b.

Losses over a batch of B pairs (x_i, y_j unit embeddings):
- infonce: logits = min(exp(t'), 100) x_i.y_j (CLIP: t' starts at log(1/0.07), the scale is
  clamped at 100); the mean of the image->text and text->image cross-entropies.
- siglip: logits = exp(t') x_i.y_j + b (t' starts at log(10), b at -10);
  L = -1/B sum_i sum_j log sigmoid(z_ij logits_ij), z = +1 on the diagonal, -1 elsewhere.
  On a mesh, `siglip_loss_sharded` computes it per device chunk, never forming the [B, B]
  matrix: each device holds B/n images and texts, and the text chunks travel round a ring
  (`jax.lax.ppermute`), n - 1 hops, as the SigLIP paper's chunked implementation does.

After training the run writes `model/`, a nanoVLM checkpoint whose ViT and decoder are the
trained towers (the projector as initialised): `jaxvlm train --init-from RUN/model` starts a VLM
from it; and `contrastive_heads.safetensors` (the projections, t' and b, torch layout):
`load_contrastive(RUN)` rebuilds the trained model in either framework, so its embeddings,
recall and zero-shot scores can be recomputed.
Shapes: B pairs, N patches, D vision width, H language width, T text length, E embedding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import atomic
from conversion.config import VLMConfig
from conversion.validation import range_problems, type_problems

from .language_model import LanguageModel
from .layers import Linear
from .options import ModelOptions
from .sharding import logical
from .vision_language_model import embed_tokens
from .vision_transformer import ViT

log = logging.getLogger(__name__)

LOSSES = ("siglip", "infonce")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(t') at 100
INIT_LOGIT_SCALE = {"infonce": math.log(1 / 0.07), "siglip": math.log(10.0)}
INIT_LOGIT_BIAS = -10.0  # SigLIP's b
NORM_EPS = 1e-12  # x / max(||x||, eps), torch's F.normalize


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    return loss


# ---- the losses (functions of the embeddings) --------------------------------------------------
def siglip_logits(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array) -> jax.Array:
    """float[B_i, E], float[B_t, E], scalars -> float32[B_i, B_t] = exp(t') x.y + b."""
    return jnp.exp(logit_scale) * (img.astype(jnp.float32) @ txt.astype(jnp.float32).T) + logit_bias


def siglip_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array) -> jax.Array:
    """SigLIP's sigmoid loss of B matching pairs: -1/B sum_ij log sigmoid(z_ij logits_ij)."""
    B = img.shape[0]
    z = 2.0 * jnp.eye(B, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * siglip_logits(img, txt, logit_scale, logit_bias))) / B


def infonce_loss(img: jax.Array, txt: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies."""
    scale = jnp.minimum(jnp.exp(logit_scale), MAX_LOGIT_SCALE)
    logits = scale * (img.astype(jnp.float32) @ txt.astype(jnp.float32).T)  # (B, B)
    diag = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return (i2t + t2i) / 2


def siglip_loss_sharded(img, txt, logit_scale, logit_bias, mesh: jax.sharding.Mesh, axis: str = "data"):
    """`siglip_loss` on a mesh, per device chunk: device d holds images and texts d*b..(d+1)*b-1
    (b = B / n, n = the `axis` size); it scores its images against its own texts (the positives
    on the diagonal), then passes its text chunk to the next device and scores the chunk it
    received, n - 1 times, so it sees every text once and never more than a [b, b] block.
    The sums are added over the devices (psum) and divided by the global B."""
    n = mesh.shape[axis]
    if img.shape[0] % n:
        raise ValueError(f"batch of {img.shape[0]} pairs does not split over {n} devices")
    ring = [(d, (d + 1) % n) for d in range(n)]

    def local(img_c, txt_c, t, b):
        eye = jnp.eye(img_c.shape[0], dtype=jnp.float32)
        total = jnp.sum(jax.nn.log_sigmoid((2.0 * eye - 1.0) * siglip_logits(img_c, txt_c, t, b)))
        for _ in range(n - 1):  # a static loop over the ring's hops: only negatives from here on
            txt_c = jax.lax.ppermute(txt_c, axis, ring)
            total = total + jnp.sum(jax.nn.log_sigmoid(-siglip_logits(img_c, txt_c, t, b)))
        return -jax.lax.psum(total, axis) / (img_c.shape[0] * n)

    P = jax.sharding.PartitionSpec
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=P())(
        img, txt, logit_scale, logit_bias
    )


def l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), NORM_EPS)


# ---- the model ---------------------------------------------------------------------------------
def _projection(d_in: int, d_out: int, options: ModelOptions, rngs: nnx.Rngs) -> Linear:
    return Linear(
        d_in,
        d_out,
        use_bias=False,
        kernel_init=nnx.initializers.normal(stddev=d_in**-0.5),  # CLIP's projections
        dtype=options.compute_dtype,
        param_dtype=options.param_dtype,
        rngs=rngs,
        kernel_metadata=logical("embed", None),
        kernels=options.select_kernels(),
    )


class ContrastiveModel(nnx.Module):
    """The two towers and the loss's parameters; see the module docstring.

    `vision_encoder` / `decoder`: a VLM's own modules (shared, so training them trains the VLM),
    or None to build fresh ones from `cfg`. `embed_dim` E: default the language width H."""

    def __init__(
        self,
        cfg: VLMConfig,
        loss: str,
        *,
        embed_dim: int | None = None,
        options: ModelOptions = ModelOptions(),
        rngs: nnx.Rngs,
        vision_encoder: ViT | None = None,
        decoder: LanguageModel | None = None,
    ):
        self.loss_name = check_loss(loss)
        self.cfg = cfg
        E = embed_dim or cfg.lm_hidden_dim
        self.options = options
        self.vision_encoder = vision_encoder if vision_encoder is not None else ViT(cfg, options, rngs=rngs)
        self.decoder = decoder if decoder is not None else LanguageModel(cfg, options, rngs=rngs)
        self.image_proj = _projection(cfg.vit_hidden_dim, E, options, rngs)
        self.text_proj = _projection(cfg.lm_hidden_dim, E, options, rngs)
        self.logit_scale = nnx.Param(jnp.asarray(INIT_LOGIT_SCALE[loss], jnp.float32))
        self.logit_bias = nnx.Param(jnp.asarray(INIT_LOGIT_BIAS, jnp.float32)) if loss == "siglip" else None

    def encode_images(self, images: jax.Array) -> jax.Array:
        """float[B, 3, S, S] in [0, 1] -> unit float32[B, E] (mean over the N patches, projected)."""
        with self.options.precision():
            pooled = jnp.mean(self.vision_encoder(images).astype(jnp.float32), axis=1)  # (B, D)
            return l2_normalise(self.image_proj(pooled))

    def encode_texts(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """int[B, T], int[B, T] (1 real, 0 padding) -> unit float32[B, E] (mean over real tokens)."""
        with self.options.precision():
            hidden = self.decoder(embed_tokens(self.decoder.token_embedding, input_ids), attention_mask)  # (B, T, H)
            m = attention_mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
            return l2_normalise(self.text_proj(pooled))

    def loss_of(self, img: jax.Array, txt: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """The configured loss of unit embeddings float[B, E] (SigLIP per device chunk on `mesh`)."""
        if self.loss_name == "infonce":
            return infonce_loss(img, txt, self.logit_scale[...])
        if mesh is not None and mesh.shape.get("data", 1) > 1:
            return siglip_loss_sharded(img, txt, self.logit_scale[...], self.logit_bias[...], mesh)
        return siglip_loss(img, txt, self.logit_scale[...], self.logit_bias[...])

    def __call__(self, images, input_ids, attention_mask, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """The loss float32[] of B pairs (image i goes with text i)."""
        return self.loss_of(self.encode_images(images), self.encode_texts(input_ids, attention_mask), mesh)


def head_tensors(model: ContrastiveModel) -> dict[str, np.ndarray]:
    """The heads (projections, t', b) in torch layout: `conversion.pretrained.write_contrastive_heads`'s tensors."""
    out = {
        "image_proj.weight": np.asarray(model.image_proj.kernel[...]).T,
        "text_proj.weight": np.asarray(model.text_proj.kernel[...]).T,
        "logit_scale": np.asarray(model.logit_scale[...]),
    }
    if model.logit_bias is not None:
        out["logit_bias"] = np.asarray(model.logit_bias[...])
    return out


def load_contrastive(run_dir: str | Path, *, options: ModelOptions = ModelOptions()) -> ContrastiveModel:
    """The trained ContrastiveModel of a `jaxvlm pretrain-vision` run directory: the towers from
    `RUN/model` (a nanoVLM checkpoint), the heads from `RUN/contrastive_heads.safetensors`; its
    embeddings, recall and zero-shot scores are the run's (`evaluate`)."""
    from conversion.pretrained import HEADS_FILE, read_contrastive_heads

    from .pretrained import load_nanovlm

    run_dir = Path(run_dir)
    vlm = load_nanovlm(run_dir / "model", options=options)
    loss, embed_dim, tensors = read_contrastive_heads(run_dir / HEADS_FILE, vlm.cfg)
    model = ContrastiveModel(vlm.cfg, loss, embed_dim=embed_dim, options=options, rngs=nnx.Rngs(0),
                             vision_encoder=vlm.vision_encoder, decoder=vlm.decoder)  # fmt: skip
    pdt = options.param_dtype
    model.image_proj.kernel[...] = jnp.asarray(tensors["image_proj.weight"].T, pdt)
    model.text_proj.kernel[...] = jnp.asarray(tensors["text_proj.weight"].T, pdt)
    model.logit_scale[...] = jnp.asarray(tensors["logit_scale"], jnp.float32)
    if loss == "siglip":
        model.logit_bias[...] = jnp.asarray(tensors["logit_bias"], jnp.float32)
    return model


# ---- retrieval and zero-shot metrics (numpy) ---------------------------------------------------
def retrieval_recall(img_emb, txt_emb, txt_image: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways. img_emb float[N, E], txt_emb float[M, E], txt_image int[M]: the image
    each text describes. image->text: an image is a hit at k when one of its texts is among its
    k most similar texts; text->image: a text is a hit when its image is among its k nearest."""
    sims = np.asarray(img_emb, np.float64) @ np.asarray(txt_emb, np.float64).T  # (N, M)
    owner = np.asarray(txt_image)
    out = {}
    for k in ks:
        top_t = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (N, k) text indices
        out[f"i2t_recall@{k}"] = float(np.mean([np.any(owner[row] == i) for i, row in enumerate(top_t)]))
        top_i = np.argsort(-sims.T, axis=1, kind="stable")[:, :k]  # (M, k) image indices
        out[f"t2i_recall@{k}"] = float(np.mean([owner[j] in row for j, row in enumerate(top_i)]))
    return out


def retrieval_chance(n_images: int, txt_image: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """The recall a random ranking gets in expectation (the level to beat)."""
    owner = np.asarray(txt_image)
    M = len(owner)
    out = {}
    for k in ks:
        kk = min(k, M)
        # image->text: P(none of its c texts in a random k of M) = C(M-c, k) / C(M, k)
        miss = [math.comb(M - int(np.sum(owner == i)), kk) / math.comb(M, kk) for i in range(n_images)]
        out[f"i2t_recall@{k}"] = float(1 - np.mean(miss))
        out[f"t2i_recall@{k}"] = min(k, n_images) / n_images
    return out


# COCO's 80 object categories (their published names); the zero-shot classes are those of them
# that the held-out captions mention. A caption mentions a category when it contains the name or
# its plural as whole words; "person" also by the people words below.
CATEGORY_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
PERSON_WORDS = ("man", "men", "woman", "women", "people", "person", "persons", "boy", "girl", "child", "children")
ZERO_SHOT_PROMPT = "a photo of a {}"


def _plurals(name: str) -> set[str]:
    return {name, name + "s", name + "es"} | ({name[:-1] + "ies"} if name.endswith("y") else set())


def caption_categories(captions: Sequence[str]) -> set[str]:
    """The COCO category names `captions` mention (see `COCO_CATEGORIES`)."""
    found = set()
    for cap in captions:
        words = re.findall(r"[a-z]+", cap.lower())
        text = " " + " ".join(words) + " "
        for name in sorted(CATEGORY_NAMES, key=lambda n: -n.count(" ")):  # "hot dog" before "dog"
            for form in _plurals(name):
                if f" {form} " in text:
                    found.add(name)
                    text = text.replace(f" {form} ", " | ")
        if any(w in PERSON_WORDS for w in words):
            found.add("person")
    return found


def zero_shot_accuracy(img_emb, class_emb, labels: Sequence[set[int]]) -> dict[str, float]:
    """Top-1 zero-shot classification: an image counts as right when its most similar class
    prompt names one of its categories; images with no category are left out. Chance: the mean
    share of the classes that are right for an image."""
    keep = [i for i, lab in enumerate(labels) if lab]
    if not keep:
        return {"zero_shot_accuracy": float("nan"), "zero_shot_chance": float("nan"), "zero_shot_images": 0}
    sims = np.asarray(img_emb, np.float64)[keep] @ np.asarray(class_emb, np.float64).T
    pred = np.argmax(sims, axis=1)
    right = [int(p) in labels[i] for p, i in zip(pred, keep)]
    n_cls = sims.shape[1]
    return {
        "zero_shot_accuracy": float(np.mean(right)),
        "zero_shot_chance": float(np.mean([len(labels[i]) / n_cls for i in keep])),
        "zero_shot_images": len(keep),
    }


# ---- data: image-caption pairs -----------------------------------------------------------------
@dataclasses.dataclass
class Pairs:
    """Images (one view each) and their captions: images float32[N, 3, S, S], captions[i] the
    captions of image i, names[i] its file."""

    images: np.ndarray
    captions: list[list[str]]
    names: list[str]

    def subset(self, idx: Sequence[int]) -> Pairs:
        idx = list(idx)
        return Pairs(self.images[idx], [self.captions[i] for i in idx], [self.names[i] for i in idx])


def image_view(src, side: int) -> np.ndarray:
    """One image as nanoVLM sees it without splitting: RGB, bicubic resize to side x side,
    float32[3, side, side] in [0, 1]."""
    from PIL import Image

    from .image_processing import load_image

    im = load_image(src).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)


def load_pairs(spec: str, cfg: VLMConfig, tokenizer) -> Pairs:
    """`coco:DIR` (captions.json + images/, read by `jaxvlm.data.coco_captions_dataset`, every
    caption) grouped by image. An empty or unreadable dataset is a ValueError."""
    from .data import SampleEncoder, coco_captions_dataset

    kind, _, path = spec.partition(":")
    if kind != "coco" or not path:
        raise ValueError(f"--data {spec!r}: pretrain-vision reads image-caption pairs: coco:DIR")
    ds = coco_captions_dataset(path, SampleEncoder.from_config(cfg, tokenizer), captions="all")
    by_image: dict[str, list[str]] = {}
    refs = {}
    for rec in ds.records:
        ref = rec.images[0]
        key = str(ref) if not isinstance(ref, bytes) else rec.source
        refs[key] = ref
        by_image.setdefault(key, []).append(rec.messages[1]["content"])
    names = list(by_image)
    images = np.stack([image_view(refs[n], cfg.vit_img_size) for n in names])
    return Pairs(images, [by_image[n] for n in names], [Path(n).name for n in names])


def encode_captions(tokenizer, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids int32[M, T], mask int32[M, T]): each caption's ids + EOS, cut to T = max_len
    tokens (the EOS kept), left-padded with the pad id as nanoVLM pads."""
    ids = np.full((len(captions), max_len), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(captions), max_len), np.int32)
    for r, cap in enumerate(captions):
        toks = tokenizer.encode(cap)[: max_len - 1] + [tokenizer.eos_token_id]
        ids[r, max_len - len(toks) :] = toks
        mask[r, max_len - len(toks) :] = 1
    return ids, mask


# ---- the run -----------------------------------------------------------------------------------
PRETRAIN_RANGES = {
    "steps": (1, None), "batch_size": (2, None), "lr": (0.0, None), "weight_decay": (0.0, None),
    "holdout": (1, None), "holdout_captions": (0, None), "seed": (0, 2**32 - 1), "embed_dim": (1, None), "max_text_len": (2, None),
    "eval_every": (1, None), "log_every": (1, None), "max_grad_norm": (1e-12, None),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything `jaxvlm pretrain-vision` needs (flags of the same names)."""

    data: str = ""  # coco:DIR
    output_dir: str = "runs/pretrain-vision"
    loss: str = "siglip"  # siglip | infonce
    preset: str = "tiny"  # model shape when not initialising from a checkpoint
    model: dict | None = None  # VLMConfig overrides of the preset
    init_from: str | None = None  # a nanoVLM checkpoint directory (or Hub repo id) to start from
    tokenizer: str | None = None  # default: --init-from's tokenizer.json
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices only
    max_grad_norm: float = 1.0
    holdout: int = 10  # images held out (with all their captions): recall and zero-shot on unseen images
    holdout_captions: int = 1  # and the last N captions of every training image: recall on unseen captions
    seed: int = 0
    embed_dim: int | None = None  # E, default the language width
    max_text_len: int = 32
    augment: bool = False  # random flips and shifts of the training images (`augment`)
    eval_every: int | None = None  # also evaluate every N steps (always at the end)
    log_every: int = 10
    overwrite: bool = False

    def __post_init__(self):
        problems = type_problems(self) + range_problems(self, PRETRAIN_RANGES)
        if self.loss not in LOSSES:  # one line naming the choices, not argparse's usage block
            problems.append(f"loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if not self.data:
            problems.append("data: give --data coco:DIR (image-caption pairs)")
        if self.batch_size == 1:
            problems = [p for p in problems if not p.startswith("batch_size")]
            problems.append("batch_size 1: a contrastive loss needs >= 2 pairs per batch (the others are negatives)")
        if problems:
            raise ValueError("invalid pretrain-vision settings: " + "; ".join(problems))

    def run_config(self):
        """The `jaxvlm train` RunConfig that builds the same VLM (`train_loop.build_model`)."""
        from .train_loop import RunConfig

        return RunConfig(output_dir=self.output_dir, preset=self.preset, model=self.model, init_from=self.init_from,
                         tokenizer=self.tokenizer, seed=self.seed)  # fmt: skip


def split_pairs(pairs: Pairs, holdout: int, holdout_captions: int, seed: int) -> tuple[Pairs, Pairs, Pairs | None]:
    """(train, unseen images, unseen captions): `holdout` images with all their captions, drawn
    with `seed`; then the last `holdout_captions` captions of each remaining image that has more
    than that many (None when 0 or no image has), which training never sees."""
    n = len(pairs.names)
    if not 0 < holdout < n:
        raise ValueError(f"--holdout {holdout}: the data has {n} images (hold out at least 1, train on at least 1)")
    order = np.random.default_rng([seed, 11]).permutation(n)
    held = set(order[:holdout].tolist())
    train = pairs.subset([i for i in range(n) if i not in held])
    images = pairs.subset(sorted(held))
    if not holdout_captions:
        return train, images, None
    k = holdout_captions
    split = [i for i, cs in enumerate(train.captions) if len(cs) > k]
    if not split:
        return train, images, None
    captions = train.subset(split)
    captions.captions = [cs[-k:] for cs in captions.captions]
    train.captions = [cs[:-k] if len(cs) > k else cs for cs in train.captions]
    return train, images, captions


def evaluate(model: ContrastiveModel, held: Pairs, tokenizer, max_text_len: int, zero_shot: bool = True) -> dict:
    """Recall@1/5 both ways over `held`'s images and every caption of theirs, and (`zero_shot`)
    zero-shot accuracy over the COCO categories their captions mention; with chance levels."""
    caps = [c for cs in held.captions for c in cs]
    owner = [i for i, cs in enumerate(held.captions) for _ in cs]
    img = _in_chunks(_encode_images, model, held.images)
    txt = _in_chunks(_encode_texts, model, *encode_captions(tokenizer, caps, max_text_len))
    out = retrieval_recall(img, txt, owner)
    out.update({f"chance_{k}": v for k, v in retrieval_chance(len(held.names), owner).items()})
    classes = sorted(set().union(*(caption_categories(cs) for cs in held.captions)))
    if classes and zero_shot:
        prompts = encode_captions(tokenizer, [ZERO_SHOT_PROMPT.format(c) for c in classes], max_text_len)
        cls = _in_chunks(_encode_texts, model, *prompts)
        labels = [{classes.index(c) for c in caption_categories(cs)} for cs in held.captions]
        out.update(zero_shot_accuracy(img, cls, labels))
        out["zero_shot_classes"] = len(classes)
    return out


EVAL_CHUNK = 64  # rows encoded per call in evaluation (the last chunk zero-padded: one compile)


def _in_chunks(encode, model, *arrays: np.ndarray) -> np.ndarray:
    """`encode(model, *arrays)` over row chunks of EVAL_CHUNK -> float32[rows, E] on the host."""
    n, out = arrays[0].shape[0], []
    for start in range(0, n, EVAL_CHUNK):
        part = [a[start : start + EVAL_CHUNK] for a in arrays]
        rows = part[0].shape[0]
        part = [np.concatenate([p, np.zeros((EVAL_CHUNK - rows, *p.shape[1:]), p.dtype)]) for p in part]
        out.append(np.asarray(encode(model, *map(jnp.asarray, part)))[:rows])
    return np.concatenate(out)


@nnx.jit
def _encode_images(model, images):
    return model.encode_images(images)


@nnx.jit
def _encode_texts(model, ids, mask):
    return model.encode_texts(ids, mask)


def _optimizer(model: ContrastiveModel, cfg: PretrainConfig):
    import optax

    warmup = max(1, cfg.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), cfg.lr * 0.1)

    def decay_mask(params):  # matrices only: not norms, biases, the temperature or the bias b
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param), schedule


def _batches(train: Pairs, tokenizer, cfg: PretrainConfig):
    """Forever: batches of `batch_size` distinct training images (an epoch is a permutation), each
    with one of its captions drawn at random. (images, ids, mask)."""
    rng = np.random.default_rng([cfg.seed, 13])
    n = len(train.names)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            caps = [train.captions[i][rng.integers(len(train.captions[i]))] for i in idx]
            ids, mask = encode_captions(tokenizer, caps, cfg.max_text_len)
            images = train.images[idx]
            yield (augment(images, rng) if cfg.augment else images), ids, mask


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float[B, 3, S, S] -> the same, each image flipped left-right with probability 1/2 and
    shifted by up to S/8 pixels each way (reflect padding, then a random S x S crop): the
    CIFAR-style augmentation, so a small model does not memorise a few dozen photos."""
    B, _, S, _ = images.shape
    pad = max(1, S // 8)
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.empty_like(images)
    for b in range(B):
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        crop = padded[b, :, dy : dy + S, dx : dx + S]
        out[b] = crop[:, :, ::-1] if rng.random() < 0.5 else crop
    return out


def pretrain_vision(cfg: PretrainConfig, *, return_model: bool = False):
    """Train the VLM's ViT (and its decoder as the text tower) contrastively; see the module
    docstring. Writes into `cfg.output_dir` (a run directory, `jaxvlm.run_directory`):
    metrics.jsonl, summary.json, run_config.json, loss_curve.png and model/. Returns the summary;
    `return_model`: return (summary, the trained ContrastiveModel) instead.
    The inputs (model, tokenizer, data, batch size) are checked before anything is written."""
    from .run_directory import open_run_directory
    from .runtime import configure
    from .tokenizer import load_for_config
    from .train_loop import build_model, tokenizer_path

    configure()
    run = cfg.run_config()
    vlm = build_model(run)  # the VLM whose towers are trained (shared modules)
    tok_path = tokenizer_path(run)
    tokenizer = load_for_config(vlm.cfg, tok_path)
    train, held, held_caps = split_pairs(
        load_pairs(cfg.data, vlm.cfg, tokenizer), cfg.holdout, cfg.holdout_captions, cfg.seed
    )
    if cfg.batch_size > len(train.names):
        raise ValueError(
            f"--batch-size {cfg.batch_size}: only {len(train.names)} training images (a batch holds distinct images)"
        )
    n_dev = jax.device_count()
    if n_dev > 1 and cfg.batch_size % n_dev:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over the {n_dev} devices")
    out = Path(cfg.output_dir)
    run_dir = open_run_directory(out, resume=False, overwrite=cfg.overwrite)
    try:
        summary, model = _pretrain(cfg, out, vlm, tokenizer, tok_path, train, held, held_caps)
    finally:
        run_dir.close()
    return (summary, model) if return_model else summary


def _pretrain(cfg: PretrainConfig, out: Path, vlm, tokenizer, tok_path, train: Pairs, held: Pairs, held_caps):
    from conversion.pretrained import HEADS_FILE, check_values, copy_tokenizer, write_contrastive_heads

    from .pretrained import save_nanovlm
    from .sharding import MeshConfig, make_mesh, use_mesh
    from .train_loop import MetricsLog

    n_dev = jax.device_count()
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1)) if n_dev > 1 else None  # data parallel
    model = ContrastiveModel(vlm.cfg, cfg.loss, embed_dim=cfg.embed_dim, options=vlm.options,
                             rngs=nnx.Rngs(cfg.seed + 1), vision_encoder=vlm.vision_encoder,
                             decoder=vlm.decoder)  # fmt: skip
    optimizer, schedule = _optimizer(model, cfg)
    atomic.write_text(out / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    metrics = MetricsLog(out, 0)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, images, ids, mask):
        loss, grads = nnx.value_and_grad(lambda m: m(images, ids, mask, mesh))(model)
        optimizer.update(model, grads)
        return loss

    def place(x):
        if mesh is None:
            return jnp.asarray(x)
        spec = jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    def evaluate_all(step_n: int) -> dict:
        """{"images": unseen images, "captions": unseen captions of training images}, logged."""
        result = {"images": evaluate(model, held, tokenizer, cfg.max_text_len)}
        if held_caps is not None:
            result["captions"] = evaluate(model, held_caps, tokenizer, cfg.max_text_len, zero_shot=False)
        metrics.add({"step": step_n, **{f"val_{split}_{k}": v for split, r in result.items() for k, v in r.items()}})
        for split, r in result.items():
            recalls = [k for k in r if "recall" in k and not k.startswith("chance")]
            shown = ", ".join(f"{k} {r[k]:.3f} (chance {r['chance_' + k]:.3f})" for k in recalls)
            if "zero_shot_accuracy" in r:
                shown += f", zero-shot {r['zero_shot_accuracy']:.3f} (chance {r['zero_shot_chance']:.3f})"
            print(f"held out at step {step_n}, unseen {split}: {shown}", flush=True)
        return result

    t0, batches, losses = time.perf_counter(), _batches(train, tokenizer, cfg), []
    start = last_eval = evaluate_all(0)
    for n in range(1, cfg.steps + 1):
        images, ids, mask = next(batches)
        with use_mesh(mesh):  # activations pinned to the batch axis; SigLIP by device chunks
            loss = float(step(model, optimizer, place(images), place(ids), place(mask)))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {n}; stopped, nothing exported")
        losses.append(loss)
        if n % cfg.log_every == 0 or n == cfg.steps:
            row = {"step": n, "loss": loss, "lr_all": float(schedule(n - 1)),
                   "logit_scale": float(jnp.exp(model.logit_scale[...]))}  # fmt: skip
            if model.logit_bias is not None:
                row["logit_bias"] = float(model.logit_bias[...])
            metrics.add(row)
            print(f"step {n}/{cfg.steps}: loss {loss:.4f}", flush=True)
        if (cfg.eval_every and n % cfg.eval_every == 0) or n == cfg.steps:
            last_eval = evaluate_all(n)
    elapsed = time.perf_counter() - t0
    metrics.flush()
    final = out / "model"
    heads = head_tensors(model)
    check_values(heads, source="the trained contrastive heads")  # finite, before anything of the result is written
    with atomic.atomic_directory(final, replace=True) as tmp:
        save_nanovlm(vlm, tmp)  # the VLM whose vision_encoder and decoder were just trained
        copy_tokenizer(tok_path, tmp, replace=False)
    embed_dim = heads["image_proj.weight"].shape[0]
    write_contrastive_heads(out / HEADS_FILE, vlm.cfg, heads, loss=cfg.loss, embed_dim=embed_dim)
    metrics.plot(out / "loss_curve.png")
    summary = {
        "loss": cfg.loss,
        "steps": cfg.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "train_images": len(train.names),
        "train_captions": sum(len(c) for c in train.captions),
        "heldout_images": len(held.names),
        "heldout_image_captions": sum(len(c) for c in held.captions),
        "heldout_captions": 0 if held_caps is None else sum(len(c) for c in held_caps.captions),
        "start": start,
        "heldout": last_eval,
        "train_time_s": elapsed,
        "devices": n_dev,
        "model_dir": str(final),
        "heads_file": str(out / HEADS_FILE),
    }
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary, model
