"""`jaxvlm train`: from files on disk to a checkpoint that answers questions.

Reads top to bottom: build the model, the data and the trainer; restore the latest checkpoint if
resuming; loop (stack A micro-batches, one jitted step, log); save every N steps and at the end;
export the weights as a nanoVLM directory with its tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion import atomic, hub
from conversion.config import PRESETS, VLMConfig
from conversion.lora import LoraSpec
from conversion.pretrained import TOKENIZER_FILE, copy_tokenizer
from conversion.recipe import IGNORE_INDEX, OptimConfig
from conversion.validation import range_problems, read_json_object, type_problems

from .data.packing import MODES as PACKING_MODES
from .kernels import CHOICES as KERNEL_CHOICES
from .options import DTYPES, MATMUL_PRECISIONS, REMAT_POLICIES, ModelOptions
from .run_directory import open_run_directory
from .sharding import MeshConfig

log = logging.getLogger(__name__)


RUN_RANGES: dict[str, tuple[float | None, float | None]] = {
    "synthetic_size": (1, None), "image_size": (8, 4096), "steps": (1, None), "batch_size": (1, None),
    "grad_accum": (1, None), "lr_mp": (0.0, None), "lr_vision_backbone": (0.0, None),
    "lr_language_backbone": (0.0, None), "max_grad_norm": (1e-12, None), "weight_decay": (0.0, None),
    "seed": (0, 2**32 - 1), "max_length": (1, None), "save_every": (1, None), "keep": (1, None),
    "log_every": (1, None), "stop_after": (0, None), "loader_workers": (0, 256), "num_processes": (1, None), "process_id": (0, None),
    "mesh_data": (-1, None), "mesh_fsdp": (-1, None), "mesh_tensor": (-1, None),
    "eval_every": (1, None), "eval_holdout": (0, None), "eval_batches": (1, None), "eval_exact_match": (0, None),
    "eval_task_limit": (1, None),
    "pack_buffer": (1, None), "stream_window": (1, None), "stream_chunk_rows": (1, None), "max_images_per_sample": (1, None), "max_images_per_pack": (1, None),
    "relevance_min_rating": (None, None), "image_correspondence_min_rating": (None, None),
    "visual_dependency_min_rating": (None, None), "formatting_min_rating": (None, None),
}  # fmt: skip
RUN_CHOICES = {
    "dtype": tuple(DTYPES),
    "on_error": ("raise", "skip"),
    "on_too_long": ("skip", "raise"),
    "preset": PRESETS,
    "kernels": KERNEL_CHOICES,
    "remat_policy": (None, *REMAT_POLICIES),
    "matmul_precision": MATMUL_PRECISIONS,
    "packing_mode": PACKING_MODES,
    "eval_task": (None, "mmstar", "mc", "vqa"),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `jaxvlm train` needs; a JSON file of these fields plus flag overrides."""

    output_dir: str = "runs/demo"
    preset: str = "tiny"  # model shape when not initialising from a checkpoint
    model: dict | None = None  # VLMConfig field overrides on the preset, e.g. {"vit_img_size": 64, ...}
    init_from: str | None = None  # a nanoVLM checkpoint directory (or Hub repo id) to start from
    init_from_hf_vision: str | None = None  # or local Hugging Face backbones (conversion.hf): a SigLIP directory
    init_from_hf_language: str | None = None  # ... and a SmolLM2 / Llama directory (its tokenizer.json is the default)
    init_from_hf_settings: str | None = None  # VLM settings for them (conversion.hf.VLM_SETTINGS): JSON object or file
    # LoRA (conversion.lora): adapters of rank lora_rank on lora_targets (comma-separated module-name
    # suffixes; default: the decoder's attention and MLP projections), everything else frozen but
    # lora_modules_to_save (e.g. MP, trained in full); writes adapter/ (PEFT's) and model/ merged.
    lora_rank: int | None = None
    lora_alpha: float | None = None  # scaling alpha / rank (default alpha = rank)
    lora_dropout: float | None = None  # on the adapters' input (default 0)
    lora_targets: str | None = None
    lora_modules_to_save: str | None = None
    lr_lora: float = 1e-4
    init_adapter: str | None = None  # a PEFT LoRA adapter directory (e.g. a run's adapter/) to start from
    tokenizer: str | None = None  # tokenizer.json or its directory (default: the init checkpoint's)
    # synthetic | llava:PATH | coco:DIR | cauldron:PATH (.json/.jsonl: read whole) | cauldron:SHARDS (a
    # .parquet file, a directory or a glob of them: streamed, jaxvlm.data.streaming)
    data: str = "synthetic"
    synthetic_size: int = 20000
    image_size: int | None = None  # synthetic picture side (default: the model's tile size)
    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    lr_mp: float = 5.12e-3
    lr_vision_backbone: float = 5e-5
    lr_language_backbone: float = 5e-5
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.01
    dtype: str = "float32"  # compute dtype; parameters and loss stay float32
    remat: bool = False
    remat_policy: str | None = None  # with remat: a jax.checkpoint_policies name (jaxvlm.options.REMAT_POLICIES)
    kernels: str = "auto"  # auto (by backend) | xla_cpu | cudnn | plain: see jaxvlm.kernels
    # float32 matmuls: highest (true float32 everywhere) | high | default (TF32 on NVIDIA GPUs); see ModelOptions
    matmul_precision: str = "highest"
    compilation_cache: str = "auto"  # auto ($XDG_CACHE_HOME/jaxvlm/xla/<machine>) | off | a directory: jaxvlm.runtime
    deterministic: bool = False  # XLA's deterministic GPU ops: exact resume on a GPU (CPUs always are)
    seed: int = 0
    max_length: int = 1024
    seq_buckets: tuple[int, ...] | None = None
    save_every: int = 100
    keep: int = 2
    log_every: int = 10
    resume: bool = False
    overwrite: bool = False  # start over in a run directory, or write into a non-empty other directory
    stop_after: int | None = (
        None  # end this invocation after this many steps (0: export the start; the schedule still spans `steps`)
    )
    loader_workers: int = 0  # processes decoding and encoding samples (0: a thread of this process)
    on_error: str = "raise"  # a sample that cannot be read: "raise" or "skip" (a blank row, counted)
    on_too_long: str = "skip"  # a sample longer than max_length: "skip" (as upstream drops them) or "raise"
    # Validation in the loop: every eval_every steps, the loss over eval_batches batches of eval_data (a --data
    # spec), or of eval_holdout rows held out of an in-memory training set (synthetic: its held-out split)
    eval_every: int | None = None
    eval_data: str | None = None
    eval_holdout: int = 0
    eval_batches: int = 8
    eval_exact_match: int = 0  # also greedy exact match on the first N eval samples (in-memory eval data)
    eval_task: str | None = None  # also a benchmark's overall score (jaxvlm.benchmarks): mmstar | mc | vqa
    eval_task_data: str | None = None  # its file (.parquet, a directory of them, .jsonl)
    eval_task_limit: int | None = None  # its first N questions only
    tensorboard: bool = True  # TensorBoard event files in OUTPUT_DIR/tensorboard (tensorboardX)
    wandb_project: str | None = None  # also log to Weights & Biases (wandb installed; WANDB_MODE=offline works)
    keep_best: bool = False  # keep the checkpoint of the best validation loss in checkpoints-best/ (best.json)
    # Packing (jaxvlm.data.packing): several samples per row of max_length tokens; batch_size counts rows.
    packing: bool = False
    packing_mode: str = "segments"  # segments: each sample sees only itself | upstream: nanoVLM's, they see each other
    pack_buffer: int = 256  # samples packed together per round
    max_images_per_sample: int | None = None  # tiles (what the ViT encodes); longer samples are skipped, counted
    max_images_per_pack: int | None = None  # tiles per packed row (default: as many as its tokens hold)
    # Streamed shards (jaxvlm.data.streaming): rows in memory and the span of the shuffle = window x chunk rows
    stream_window: int = 8  # units (row-group slices) read and shuffled together
    stream_chunk_rows: int = 128  # rows per unit at most (a whole row group of up to this many is read once)
    # Upstream's FineVision rating filters for streamed shards (a turn rated below is dropped; None: no filter)
    relevance_min_rating: float | None = 1
    image_correspondence_min_rating: float | None = 1
    visual_dependency_min_rating: float | None = 1
    formatting_min_rating: float | None = 1
    # Devices (jaxvlm.sharding): mesh axis sizes, one may be -1 = the devices the others leave.
    # Default: data parallel, every device on `data` (each holds the whole model and optimizer
    # state, no per-step all-gathers: right for a model that fits one device); a larger one
    # takes --mesh-data 1 --mesh-fsdp -1 (parameters and optimizer state split over the devices).
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    # Processes (jax.distributed); unset: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    # `batch_size` is per process: the global batch is num_processes x batch_size rows.
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def optim(self, lora: LoraSpec | None = None) -> OptimConfig:
        return OptimConfig(
            lora=lora,
            lr_lora=self.lr_lora,
            lr_mp=self.lr_mp,
            lr_vision_backbone=self.lr_vision_backbone,
            lr_language_backbone=self.lr_language_backbone,
            max_training_steps=self.steps,
            max_grad_norm=self.max_grad_norm,
            weight_decay=self.weight_decay,
        )

    def model_options(self) -> ModelOptions:
        """fp32 master weights; the compute dtype, remat and kernels as asked."""
        return ModelOptions(
            param_dtype=jnp.float32,
            compute_dtype=self.dtype,
            remat=self.remat,
            remat_policy=self.remat_policy,
            kernels=self.kernels,
            matmul_precision=self.matmul_precision,
        )

    def lora_spec(self) -> LoraSpec | None:
        """The LoRA spec of the lora_* flags (None without --lora-rank; --init-adapter: its own)."""
        if self.lora_rank is None:
            return None
        settings = {"targets": self.lora_targets, "modules_to_save": self.lora_modules_to_save}
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout or 0.0,
                        **{k: v for k, v in settings.items() if v is not None})  # fmt: skip

    def _lora_problems(self) -> list[str]:
        given = [n for n in ("lora_alpha", "lora_targets", "lora_modules_to_save") if getattr(self, n) is not None]
        if self.init_adapter is not None:
            clash = [n for n in ("lora_rank", *given) if getattr(self, n) is not None]
            return [f"init_adapter takes the adapter's own settings: drop {', '.join(clash)}"] if clash else []
        if self.lora_rank is None:
            given += ["lora_dropout"] if self.lora_dropout is not None else []
            return [f"{', '.join(given)} need lora_rank"] if given else []
        try:
            self.lora_spec()
        except ValueError as e:
            return [str(e)]
        return []

    def mesh(self) -> MeshConfig:
        return MeshConfig(data=self.mesh_data, fsdp=self.mesh_fsdp, tensor=self.mesh_tensor)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> RunConfig:
        data = read_json_object(path, what="--config")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown run config field(s): {', '.join(unknown)}")
        try:
            return cls(**{**data, **overrides})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __post_init__(self):
        if isinstance(self.seq_buckets, list):  # from JSON
            object.__setattr__(self, "seq_buckets", tuple(self.seq_buckets))
        problems = type_problems(self) + range_problems(self, RUN_RANGES)
        for name, allowed in RUN_CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                problems.append(f"{name} {value!r}: choose one of {', '.join(str(a) for a in allowed)}")
        for name in ("mesh_data", "mesh_fsdp", "mesh_tensor"):
            if getattr(self, name) == 0:
                problems.append(f"{name} 0: a mesh axis has >= 1 devices (or -1: the devices the others leave)")
        if self.seq_buckets is not None and not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.seq_buckets
        ):
            problems.append(f"seq_buckets {self.seq_buckets!r}: must be positive integers")
        if isinstance(self.model, dict):
            fields = {f.name for f in dataclasses.fields(VLMConfig)}
            unknown = sorted(set(self.model) - fields)
            if unknown:
                problems.append(f"model: unknown VLMConfig field(s) {', '.join(unknown)}")
        if isinstance(self.model, dict) and not problems and not (self.init_from or self.init_from_hf_vision):
            try:  # the model the overrides give, checked before anything is loaded or written
                VLMConfig.preset(self.preset, **self.model)
            except ValueError as e:
                problems.append(f"model: {e}")
        needs_eval = [n for n in ("keep_best", "eval_exact_match", "eval_data", "eval_holdout", "eval_task")
                      if getattr(self, n)]  # fmt: skip
        if bool(self.eval_task) != bool(self.eval_task_data):
            problems.append("eval_task and eval_task_data go together")
        if needs_eval and self.eval_every is None:
            problems.append(f"{', '.join(needs_eval)} need eval_every")
        if self.eval_data and self.eval_holdout:
            problems.append("eval_data and eval_holdout: choose one")
        problems += self._lora_problems()
        if self.remat_policy is not None and not self.remat:
            problems.append(f"remat_policy {self.remat_policy!r} needs remat")
        if problems:
            raise ValueError("invalid run settings: " + "; ".join(problems))


# ---- building blocks ---------------------------------------------------------------------------
def build_lora(run: RunConfig, model) -> LoraSpec | None:
    """Put the run's LoRA adapters on `model` (in place): fresh ones (--lora-rank, drawn with the
    seed) or --init-adapter's, checked against the model's shapes. None without LoRA."""
    from conversion.lora import read_adapter

    from .lora import add_adapters, load_adapter

    if run.init_adapter is not None:
        spec, tensors = read_adapter(run.init_adapter, model.cfg)
        if run.lora_dropout is not None:
            spec = dataclasses.replace(spec, dropout=run.lora_dropout)
        add_adapters(model, spec, seed=run.seed)
        load_adapter(model, spec, tensors, source=f"--init-adapter {run.init_adapter}")
        return spec
    spec = run.lora_spec()
    if spec is not None:
        add_adapters(model, spec, seed=run.seed)
    return spec


def build_model(run: RunConfig):
    from .pretrained import load_nanovlm
    from .vision_language_model import VisionLanguageModel

    options = run.model_options()
    if run.init_from_hf_vision or run.init_from_hf_language:
        return _model_from_hf(run, options)
    if run.init_from:
        return load_nanovlm(init_directory(run), options=options)
    cfg = VLMConfig.preset(run.preset, **(run.model or {}))
    return VisionLanguageModel(cfg, options=options, rngs=nnx.Rngs(run.seed))


def _model_from_hf(run: RunConfig, options: ModelOptions):
    """The VLM built in memory from two Hugging Face backbone directories (`conversion.hf`):
    new embedding rows and the projector drawn with `run.seed`."""
    from conversion.hf import from_hf

    from .pretrained import model_from_torch_tensors

    if not (run.init_from_hf_vision and run.init_from_hf_language) or run.init_from:
        raise ValueError("--init-from-hf-vision and --init-from-hf-language go together, and not with --init-from")
    settings = {}
    if run.init_from_hf_settings:
        text = run.init_from_hf_settings
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--init-from-hf-settings: not a JSON object: {e}") from None
        if not isinstance(settings, dict):
            raise ValueError("--init-from-hf-settings: not a JSON object")
    cfg, tensors = from_hf(run.init_from_hf_vision, run.init_from_hf_language, seed=run.seed, **settings)
    return model_from_torch_tensors(
        cfg, tensors, options=options, source=f"{run.init_from_hf_vision} + {run.init_from_hf_language}"
    )


def init_directory(run: RunConfig) -> Path:
    """The directory of `--init-from`: as given, or a Hub repo id's cached snapshot (`conversion.hub`)."""
    return hub.resolve(run.init_from, what="--init-from")


def tokenizer_path(run: RunConfig) -> Path:
    if run.tokenizer:
        return Path(run.tokenizer)
    init = init_directory(run) if run.init_from else None
    if init is not None and (init / TOKENIZER_FILE).is_file():
        return init / TOKENIZER_FILE
    if run.init_from_hf_language and (Path(run.init_from_hf_language) / TOKENIZER_FILE).is_file():
        return Path(run.init_from_hf_language) / TOKENIZER_FILE
    raise ValueError("no tokenizer: pass --tokenizer (a tokenizer.json or its directory)")


def is_streamed(spec: str) -> bool:
    """`cauldron:` shards (a .parquet file, a directory or a glob) are streamed, not read whole."""
    kind, _, path = spec.partition(":")
    return kind == "cauldron" and not path.endswith((".json", ".jsonl"))


def build_stream(run: RunConfig, *, reader_index: int = 0, reader_count: int = 1, shuffle: bool = True):
    """The `ShardStream` of `--data cauldron:SHARDS`: this process's share, upstream's rating filters."""
    from .data.streaming import ShardStream

    ratings = {
        "relevance": run.relevance_min_rating,
        "image_correspondence": run.image_correspondence_min_rating,
        "visual_dependency": run.visual_dependency_min_rating,
        "formatting": run.formatting_min_rating,
    }
    return ShardStream(
        run.data.partition(":")[2],
        seed=run.seed,
        shuffle=shuffle,
        shuffle_window=run.stream_window,
        chunk_rows=run.stream_chunk_rows,
        reader_index=reader_index,
        reader_count=reader_count,
        min_ratings=ratings,
        on_error="yield",  # the loader counts or raises, by --on-error
    )


def build_dataset(run: RunConfig, cfg: VLMConfig, encoder, split: str = "train"):
    from .data import SyntheticShapesDataset, cauldron_dataset, coco_captions_dataset, llava_dataset

    if is_streamed(run.data):
        raise ValueError(f"--data {run.data}: streamed shards are read by the training loader only")
    kind, _, path = run.data.partition(":")
    if kind == "synthetic":
        size = run.synthetic_size if split == "train" else max(200, run.synthetic_size // 20)
        return SyntheticShapesDataset(encoder, split=split, size=size, seed=run.seed, image_size=run.image_size)
    if not path:
        raise ValueError(f"--data {run.data!r}: expected synthetic, llava:PATH, cauldron:PATH or coco:DIR")
    if kind == "llava":
        return llava_dataset(path, encoder)
    if kind == "cauldron":
        return cauldron_dataset(path, encoder)
    if kind == "coco":
        return coco_captions_dataset(path, encoder)
    raise ValueError(f"--data {run.data!r}: unknown kind {kind!r} (synthetic, llava, cauldron, coco)")


def build_train_loader(run: RunConfig, cfg: VLMConfig, encoder, dataset=None):
    """The loader `jaxvlm train` reads: streamed shards or packing -> `StreamLoader` (this
    process's share of the stream); otherwise `DataLoader` over the dataset read whole
    (`dataset`, or `--data`'s)."""
    from .data.stream_loader import IndexSource, ShardSource, StreamLoader

    if dataset is None and not is_streamed(run.data):
        dataset = build_dataset(run, cfg, encoder)
    if not (run.packing or is_streamed(run.data)):
        return build_loader(run, dataset)
    pid, n_proc = jax.process_index(), jax.process_count()
    if is_streamed(run.data):
        source = ShardSource(build_stream(run, reader_index=pid, reader_count=n_proc), encoder)
    else:
        source = IndexSource(dataset, seed=run.seed, reader_index=pid, reader_count=n_proc)
    return StreamLoader(
        source,
        run.batch_size,
        max_length=run.max_length,
        packing=run.packing_mode if run.packing else None,
        pack_buffer=run.pack_buffer,
        max_images_per_sample=run.max_images_per_sample,
        max_images_per_pack=run.max_images_per_pack,
        n_image_tokens=cfg.n_image_tokens,
        seq_buckets=run.seq_buckets,
        process_count=n_proc,
        worker_processes=run.loader_workers,
        on_error=run.on_error,
        on_too_long=run.on_too_long,
        shape_group=run.grad_accum,
    )


def hold_out(dataset, n: int, seed: int):
    """(train, held out): `n` rows of an in-memory conversation dataset drawn with `seed`."""
    from .data import ConversationDataset

    if not isinstance(dataset, ConversationDataset):
        raise ValueError("--eval-holdout works on llava:, cauldron: (.json/.jsonl) and coco: data; give --eval-data")
    if not 0 < n < len(dataset):
        raise ValueError(f"--eval-holdout {n}: the dataset has {len(dataset)} rows")
    held = set(np.random.default_rng([seed, 7]).permutation(len(dataset))[:n].tolist())
    recs = dataset.records
    return (
        ConversationDataset([r for i, r in enumerate(recs) if i not in held], dataset.encoder, name=dataset.name),
        ConversationDataset([r for i, r in enumerate(recs) if i in held], dataset.encoder, name=f"{dataset.name} (held out)"),
    )  # fmt: skip


class Validation:
    """Validation loss (token-weighted, as the training loss) over the first `eval_batches`
    batches of the eval data, in the same order every time; optionally greedy exact match on its
    first `eval_exact_match` samples. On several processes each process takes its share of each
    batch and the sums are global."""

    def __init__(self, run: RunConfig, cfg: VLMConfig, encoder, dataset=None):
        self.run, self.cfg, self.encoder = run, cfg, encoder
        spec = run.eval_data
        self.dataset = dataset  # in memory (held out, synthetic's split, or --eval-data's)
        if dataset is None and spec and not is_streamed(spec):
            self.dataset = build_dataset(dataclasses.replace(run, data=spec), cfg, encoder)
        if self.dataset is None and not (spec and is_streamed(spec)):
            raise ValueError(
                "--eval-every needs --eval-data SPEC or --eval-holdout N (synthetic data uses its held-out split)"
            )
        if run.eval_exact_match and self.dataset is None:
            raise ValueError("--eval-exact-match needs in-memory eval data (not streamed shards)")
        self.benchmark = None
        if run.eval_task:  # read and checked before training starts
            from .benchmarks import load_benchmark

            self.benchmark = load_benchmark(run.eval_task, run.eval_task_data, limit=run.eval_task_limit)

    def _batches(self):
        from .data.stream_loader import ShardSource, StreamLoader

        run, n = self.run, self.run.eval_batches
        if self.dataset is not None:
            loader = build_loader(run, self.dataset, shuffle=False, drop_last=False)
            yield from (b for _, b in zip(range(min(n, len(loader))), iter(loader)))
            return
        stream = build_stream(dataclasses.replace(run, data=run.eval_data), reader_index=jax.process_index(),
                              reader_count=jax.process_count(), shuffle=False)  # fmt: skip
        loader = StreamLoader(ShardSource(stream, self.encoder), run.batch_size, max_length=run.max_length,
                              n_image_tokens=self.cfg.n_image_tokens, seq_buckets=run.seq_buckets,
                              process_count=jax.process_count(), prefetch=0, on_error=run.on_error,
                              on_too_long="skip")  # fmt: skip
        batches = loader.forever()
        yield from (b for _, b in zip(range(n), batches))
        batches.close()

    def __call__(self, trainer, state, tokenizer) -> dict:
        total = count = 0
        for batch in self._batches():
            s, c = trainer.eval_sums(state, trainer.place_batch(stack_group([batch])))
            total, count = total + s, count + c
        out = {"val_loss": total / count if count else float("nan"), "val_tokens": count}
        if self.run.eval_exact_match:
            from .evaluation import exact_match

            model = trainer.host_model(state)
            n = min(self.run.eval_exact_match, len(self.dataset))
            out["val_exact_match"] = exact_match(model, tokenizer, self.dataset, batch_size=self.run.batch_size,
                                                 limit=n)["exact_match"]  # fmt: skip
        if self.benchmark is not None:
            from .benchmarks import run_benchmark

            report, _ = run_benchmark(trainer.host_model(state), tokenizer, self.encoder, self.run.eval_task,
                                      self.benchmark, batch_size=self.run.batch_size, source=self.run.eval_task_data)  # fmt: skip
            out[f"eval_{self.run.eval_task}_accuracy"] = report["overall"]
        return out


def build_loader(run: RunConfig, dataset, *, shuffle: bool = True, drop_last: bool = True):
    from .data import DataLoader

    return DataLoader(
        dataset,
        run.batch_size,
        seq_buckets=run.seq_buckets,
        max_length=run.max_length,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=run.seed,
        shape_group=run.grad_accum if shuffle else 1,
        worker_processes=run.loader_workers,
        on_error=run.on_error,
        on_too_long=run.on_too_long,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def stack_group(micro_batches: list[dict]) -> dict:
    """A micro-batches sharing one (T, N_max) -> {input_ids, attention_mask, labels, images,
    label_positions: [A, ...]} (label_positions padded to the group's largest K)."""
    from .train import label_positions

    keys = ["input_ids", "attention_mask", "labels", "images"]
    keys += [k for k in ("segment_ids", "position_ids") if k in micro_batches[0]]  # packed rows
    group = {k: np.stack([mb[k] for mb in micro_batches]) for k in keys}
    all_labels = group["labels"].reshape(-1, group["labels"].shape[-1])
    pos = label_positions(all_labels)
    group["label_positions"] = pos.reshape(len(micro_batches), -1, pos.shape[-1])
    return group


class MetricsLog:
    """metrics.jsonl (one line per logged step) and loss_curve.png in the output directory.

    The file is replaced whole (`conversion.atomic`), never appended to: a killed run leaves the
    previous complete version. It is rewritten at most every `flush_every_s` seconds and at every
    `flush()` (each checkpoint and the end of the run), so rows lost to a kill are only ones after
    the last checkpoint, which a resumed run writes again."""

    def __init__(self, directory: Path, resume_step: int, write: bool = True, flush_every_s: float = 10.0):
        self.path = directory / "metrics.jsonl"
        self.write = write  # one writer per file: False on all but process 0
        self.flush_every_s = flush_every_s
        self._flushed = time.monotonic()
        self._pending = False
        rows = []
        if resume_step > 0 and self.path.exists():  # keep the history up to the step we resume from
            text = self.path.read_text()
            lines = text.splitlines(keepends=True)
            # a line without its newline is one a killed run was writing: not part of the history
            rows = [json.loads(line) for line in lines if line.strip() and line.endswith("\n")]
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
        self.rows = rows
        if write:
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._pending = True
        if time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.write and self._pending:
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._flushed, self._pending = time.monotonic(), False

    def plot(self, path: Path) -> None:
        from .plotting import plot_training

        if any("loss" in r for r in self.rows):
            plot_training(self.rows, path)


class TensorBoard:
    """Every metrics row as TensorBoard scalars (tensorboardX) in `directory`: `train/<name>` and
    `validation/<name>`. Event files are logs written as they go (a new file per run); the
    complete record stays metrics.jsonl."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(directory), flush_secs=10)

    def add(self, row: dict) -> None:
        step = row["step"]
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                name = f"validation/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                self.writer.add_scalar(name, v, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """Every metrics row to a Weights & Biases run (`wandb.init(project=..., dir=OUTPUT_DIR)`):
    training values under their names, validation under `val/`. Asked for with --wandb-project;
    wandb not installed is an error naming it, not a silent skip."""

    def __init__(self, project: str, run: RunConfig, out: Path):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb-project: wandb is not installed (pip install wandb)") from None
        self.run = wandb.init(project=project, config=dataclasses.asdict(run), dir=str(out), name=out.name)

    def add(self, row: dict) -> None:
        values = {
            (f"val/{k[4:]}" if k.startswith("val_") else k): v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float))
        }
        self.run.log(values, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Progress:
    """A progress bar with rate and ETA on a terminal (tqdm); plain lines every `every` steps
    otherwise (a log file)."""

    def __init__(self, total: int, every: int, start: int = 0):
        self.total, self.every, self.tty = total, max(every, 1), sys.stdout.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stdout)

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        if step % self.every == 0 or step == self.total:
            width = 24
            done = int(width * step / max(self.total, 1))
            print(f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the run ------------------------------------------------------------------------------------
def train(run: RunConfig) -> dict[str, Any]:
    """Train as `run` says; returns a summary (final loss, steps, time, tokens/s, paths).

    The output directory is checked, locked and marked first (`jaxvlm.run_directory`); every
    file written into it is complete or absent (`conversion.atomic`; orbax renames a finished
    checkpoint into place); parameters are checked finite before any checkpoint or export."""
    from .runtime import configure
    from .sharding import initialize_distributed

    configure(run.compilation_cache, run.deterministic)  # before anything compiles or starts the backend
    initialize_distributed(run.coordinator_address, run.num_processes, run.process_id)  # before any device use
    primary = jax.process_index() == 0  # writes the side files; every process writes its checkpoint shards
    out = Path(run.output_dir)
    run_dir = open_run_directory(out, resume=run.resume, overwrite=run.overwrite, primary=primary)
    try:
        return _train(run, out, primary)
    finally:
        run_dir.close()


def _train(run: RunConfig, out: Path, primary: bool) -> dict[str, Any]:
    from .data import SampleEncoder, SampleError
    from .lora import save_adapter, save_merged
    from .pretrained import save_nanovlm
    from .sharding import make_mesh
    from .tokenizer import load_for_config
    from .train import Trainer
    from .train_checkpoints import TrainCheckpoints

    if run.wandb_project:  # asked for and missing: an error before anything is built or written
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project: wandb is not installed (pip install wandb)")
    ckpt_dir = out / "checkpoints"
    if not run.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or choose a new --output-dir"
        )

    model = build_model(run)
    lora = build_lora(run, model)  # None without LoRA
    cfg = model.cfg
    tok_path = tokenizer_path(run)
    tokenizer = load_for_config(cfg, tok_path)
    encoder = SampleEncoder.from_config(cfg, tokenizer)
    train_data = None if is_streamed(run.data) else build_dataset(run, cfg, encoder)
    validation = None
    if run.eval_every:
        held = None
        if run.eval_holdout:
            train_data, held = hold_out(train_data, run.eval_holdout, run.seed)
        elif not run.eval_data and run.data.partition(":")[0] == "synthetic":
            held = build_dataset(run, cfg, encoder, split="heldout")
        validation = Validation(run, cfg, encoder, held)
    loader = build_train_loader(run, cfg, encoder, train_data)
    trainer = Trainer(model, run.optim(lora), mesh=make_mesh(run.mesh()))
    state = trainer.init_state(model)
    del model

    checkpoints = TrainCheckpoints(ckpt_dir, keep=run.keep)
    start = 0
    restored = restore_newest_good(checkpoints, state) if run.resume else None
    if restored is not None:
        state, meta = restored
        loader.load_state_dict(_own_loader_state(meta))
        start = int(meta["step"])
        print(f"resumed from {ckpt_dir / str(start)} (step {start})", flush=True)
    elif run.resume:
        print(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0", file=sys.stderr, flush=True)
    if primary:  # only once the model, the data and any checkpoint have loaded
        atomic.write_text(out / "run_config.json", json.dumps(dataclasses.asdict(run), indent=2))
    metrics = MetricsLog(out, start, write=primary)

    def check_finite(step: int, what: str) -> None:
        if not trainer.params_finite(state):
            good = checkpoints.latest_step()
            raise FloatingPointError(
                f"parameters are not finite after step {step}; {what} not written. Last good checkpoint: "
                + (str(ckpt_dir / str(good)) if good is not None else "none saved")
            )

    def save(step: int) -> None:
        check_finite(step, "checkpoint")
        meta = {"step": step, "loader": loader.state_dict(), "seed": run.seed}
        if jax.process_count() > 1:  # each process reads its own share of the data: keep every position
            meta["loaders"] = _gather_json(meta["loader"])
        # metrics.jsonl first: a kill between the two then leaves rows past the latest checkpoint, which
        # a resume drops (MetricsLog keeps rows <= its step), never a checkpoint whose rows are missing.
        metrics.flush()
        checkpoints.save(step, state, meta)

    best_ckpts = TrainCheckpoints(out / "checkpoints-best", keep=1) if run.keep_best else None
    best = {"val_loss": math.inf, "step": None}
    if run.keep_best and run.resume and (out / "best.json").is_file():
        best = json.loads((out / "best.json").read_text())
        if best["step"] is not None and best["step"] > start:  # saved after the checkpoint we resume from
            best = {"val_loss": math.inf, "step": None}

    def evaluate(step: int) -> None:
        v = validation(trainer, state, tokenizer)
        metrics.add({"step": step, **v})
        for sink in sinks:
            sink.add({"step": step, **v})
        extra = f" | exact match {v['val_exact_match']:.3f}" if "val_exact_match" in v else ""
        if run.eval_task:
            extra += f" | {run.eval_task} {v[f'eval_{run.eval_task}_accuracy']:.3f}"
        print(f"validation at step {step}: loss {v['val_loss']:.4f} over {v['val_tokens']} tokens{extra}", flush=True)
        if best_ckpts is not None and v["val_loss"] < best["val_loss"]:
            check_finite(step, "best checkpoint")
            best_ckpts.save(step, state, {"step": step, "val_loss": v["val_loss"], "seed": run.seed})
            best.update(val_loss=v["val_loss"], step=step)
            if primary:
                atomic.write_text(out / "best.json", json.dumps(best, indent=2))
        clock["last"] = time.perf_counter()  # the next step's time does not include this validation

    stop = _StopFlag()
    batches = loader.forever()
    progress = Progress(run.steps, run.log_every, start)
    sinks = []  # where metrics rows go besides metrics.jsonl (process 0 only)
    if primary and run.tensorboard:
        sinks.append(TensorBoard(out / "tensorboard"))
    if primary and run.wandb_project:
        sinks.append(Wandb(run.wandb_project, run, out))
    t_start, tokens, last = time.perf_counter(), 0, {}
    clock = {"last": t_start}

    def report(pending) -> None:
        """Read step n's metrics from the device (waits for step n only: step n + 1 is already
        queued behind it), check them, log them and print the progress line."""
        nonlocal tokens, last
        n, m, seq_len = pending
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, clock["last"] = now - clock["last"], now  # between completions: the step's time in steady state
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # nothing is saved from here on
            good = checkpoints.latest_step()
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            raise FloatingPointError(
                f"{what} at step {n}; stopped. Last good checkpoint: "
                + (str(ckpt_dir / str(good)) if good is not None else "none saved yet")
            )
        n_tok = int(m["tokens"])
        tokens += n_tok
        last = {
            "step": n,
            "loss": loss,
            "grad_norm": grad_norm,
            "tokens": n_tok,
            "tokens_per_s": n_tok / dt,
            "step_time_s": dt,
            "seq_len": seq_len,
            "skipped_too_long": loader.stats["too_long"],  # so far, whole run (as of the batch being built)
            "skipped_unreadable": loader.stats["errors"],
            **{k: float(v) for k, v in m.items() if k.startswith("lr_")},
        }
        if n % run.log_every == 0 or n == run.steps:
            metrics.add(last)
            for sink in sinks:
                sink.add(last)
        progress.update(n, f"loss {loss:.4f} | {n_tok / dt:,.0f} tok/s | compiles {trainer.compiles}")

    step = start
    pending = None  # (step, its metrics still on the device, sequence length): read one step late
    try:
        end = run.steps if run.stop_after is None else min(run.steps, start + run.stop_after)
        while step < end and not stop.requested:
            # assembled (and sent) while the previous step runs: the device is never left waiting
            try:
                group = stack_group([next(batches) for _ in range(run.grad_accum)])
            except SampleError:  # a sample that cannot be read (--on-error raise): keep the steps done
                if pending is not None:
                    report(pending)
                    pending = None
                if step > start and checkpoints.latest_step() != step:
                    save(step)
                    print(f"a sample cannot be read: saved a checkpoint at step {step} (--resume with "
                          "--on-error skip goes on past it)", file=sys.stderr, flush=True)  # fmt: skip
                raise
            if not np.any(group["labels"] != IGNORE_INDEX):
                raise ValueError(
                    f"step {step + 1}: no sample in the batch has a token to train on; " + _skipped(loader, run)
                )
            state, m = trainer.step(state, trainer.place_batch(group))  # dispatched, not waited for
            step += 1
            if pending is not None:
                report(pending)
            pending = (step, m, int(group["input_ids"].shape[-1]))
            if validation is not None and (step % run.eval_every == 0 or step == run.steps):
                report(pending)
                pending = None
                evaluate(step)
            if step % run.save_every == 0 and step < end:
                if pending is not None:
                    report(pending)  # a checkpoint only of a step whose loss was checked
                    pending = None
                save(step)
        if pending is not None:
            report(pending)
            pending = None
        progress.close()
        if stop.requested:
            print(f"interrupted: saving a checkpoint at step {step} before exiting", flush=True)
        if checkpoints.latest_step() != step:  # already saved (a periodic save, or resuming a finished run)
            save(step)
    finally:
        stop.restore()
        checkpoints.close()
        for sink in sinks:
            sink.close()
        if best_ckpts is not None:
            best_ckpts.close()
        batches.close()  # the prefetch thread stops first, then the worker processes
        loader.close()
        metrics.flush()  # a run that stopped on an error keeps the rows up to it
    elapsed = time.perf_counter() - t_start

    final = out / "model"
    check_finite(step, "model")
    final_model = trainer.host_model(state)  # gathered from every process's shards
    summary = {
        "steps": step,
        "final_loss": last.get("loss"),
        "train_time_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "compiles": trainer.compiles,
        "model_dir": str(final),
        "interrupted": stop.requested,
        "signal": stop.signal,
        "skipped_samples": {"too_long": loader.stats["too_long"], "unreadable": loader.stats["errors"]},
    }
    if validation is not None:
        summary["validation"] = next((r for r in reversed(metrics.rows) if "val_loss" in r), None)
    if best_ckpts is not None:
        summary["best"] = {**best, "checkpoint": str(out / "checkpoints-best" / str(best["step"]))}
    if loader.stats["too_long"] or loader.stats["errors"]:
        print("note: " + _skipped(loader, run), file=sys.stderr, flush=True)
    if primary:
        with atomic.atomic_directory(final, replace=True) as tmp:
            if lora is None:
                save_nanovlm(final_model, tmp)
            else:  # the adapters merged: a plain nanoVLM checkpoint every loader reads
                save_merged(final_model, lora, tmp)
            copy_tokenizer(tok_path, tmp, replace=False)
        if lora is not None:  # PEFT's adapter directory: adapter_config.json + adapter_model.safetensors
            save_adapter(final_model, lora, out / "adapter")
        metrics.flush()
        metrics.plot(out / "loss_curve.png")
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (a collective: all processes call it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.int32(data.size))))
    padded = np.zeros(n, np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), n)
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def _own_loader_state(meta: dict) -> dict:
    """This process's loader position in a checkpoint's meta (`loaders` when saved by several)."""
    if "loaders" not in meta:
        return meta["loader"]
    if len(meta["loaders"]) != jax.process_count():
        raise ValueError(
            f"cannot resume: the checkpoint was saved by {len(meta['loaders'])} processes, this run has "
            f"{jax.process_count()} (each reads its own share of the data)"
        )
    return meta["loaders"][jax.process_index()]


def _skipped(loader, run: RunConfig) -> str:
    st = loader.stats
    return (
        f"{st['too_long']} sample(s) longer than --max-length {run.max_length} skipped, "
        f"{st['errors']} unreadable sample(s) skipped (--on-error {run.on_error}) so far"
    )


def restore_newest_good(checkpoints, state):
    """(state, meta) of the newest checkpoint that restores, saying which newer ones are broken
    (renamed STEP.broken); None when there is no checkpoint; raises naming every broken one when
    none restores."""
    steps = sorted(checkpoints.manager.all_steps(), reverse=True)
    if not steps:
        return None
    broken = []
    for step in steps:
        try:
            restored = checkpoints.restore(state, step)
        except Exception as e:  # orbax raises many types; name the checkpoint and go on to an older one
            broken.append(f"{checkpoints.directory / str(step)} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        for b in broken:
            print(f"warning: checkpoint {b} cannot be restored; resuming from step {step}", file=sys.stderr, flush=True)
        if broken:  # kept for inspection under a name that is not a step, so the run can save those steps again
            for bad in steps[: steps.index(step)]:
                src = checkpoints.directory / str(bad)
                dst = checkpoints.directory / f"{bad}.broken"
                n = 1
                while dst.exists():
                    dst, n = checkpoints.directory / f"{bad}.broken-{n}", n + 1
                src.rename(dst)
            checkpoints.manager.reload()
        return restored
    raise ValueError("--resume: no checkpoint can be restored: " + "; ".join(broken))


class _StopFlag:
    """SIGTERM / Ctrl-C ask the loop to stop after the current step (a checkpoint is then saved)."""

    def __init__(self):
        self.requested = False
        self.signal = None  # the signal number that asked to stop
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
