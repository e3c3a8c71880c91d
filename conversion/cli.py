"""`python -m conversion {to-jax,to-torch,check,init}`: move weights between frameworks and prove
they agree.

  to-jax SRC DST    nanoVLM directory (config.json + model.safetensors) -> orbax checkpoint of
                    the NNX state (DST/config.json + DST/state/). Needs no torch.
  to-torch SRC DST  the reverse. Needs no torch either: safetensors are written from numpy.
  check DIR         load DIR (either format) in torch_ref and jaxvlm, run both on the same
                    inputs (random, or --image/--prompt), print max|diff|, mean KL and top-1
                    agreement of the logits; exit 1 above tolerance.
  init DST          write a randomly initialised nanoVLM directory for a preset.

Errors print one line naming the problem and exit 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from .config import PRESETS, VLMConfig


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _is_orbax_dir(path: Path) -> bool:
    from jaxvlm.checkpoint import ORBAX_STATE_DIR

    return (path / ORBAX_STATE_DIR).is_dir() and not (path / WEIGHTS_FILE).is_file()


def _fresh_output_dir(dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"output directory {dst} is not empty")


def cmd_to_jax(args) -> int:
    from jaxvlm.checkpoint import load_nanovlm, save_orbax

    src, dst = Path(args.src), Path(args.dst)
    _fresh_output_dir(dst)
    model = load_nanovlm(src)
    save_orbax(model, dst)
    _copy_tokenizer(src, dst)
    print(f"wrote orbax checkpoint {dst} ({_n_params(model.cfg)} tensors from {src / WEIGHTS_FILE})")
    return 0


def cmd_to_torch(args) -> int:
    from jaxvlm.checkpoint import load_orbax, save_nanovlm

    src, dst = Path(args.src), Path(args.dst)
    _fresh_output_dir(dst)
    model = load_orbax(src)
    save_nanovlm(model, dst)
    _copy_tokenizer(src, dst)
    print(f"wrote nanoVLM checkpoint {dst} ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return 0


def _n_params(cfg: VLMConfig) -> int:
    from .mapping import mapping

    return len(mapping(cfg))


def cmd_init(args) -> int:
    import jax
    from flax import nnx

    from jaxvlm.checkpoint import save_nanovlm
    from jaxvlm.vision_language_model import VisionLanguageModel

    dst = Path(args.dst)
    _fresh_output_dir(dst)
    cfg = VLMConfig.preset(args.preset)
    model = VisionLanguageModel(cfg, rngs=nnx.Rngs(args.seed))
    save_nanovlm(model, dst)
    print(f"wrote randomly initialised {args.preset} checkpoint to {dst}")
    return 0


def cmd_check(args) -> int:
    from .parity import compare_frameworks

    report = compare_frameworks(
        Path(args.dir), image=args.image, prompt=args.prompt, tokenizer=args.tokenizer,
        batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
    )
    ok = report["max_abs_diff"] <= args.tol * report["logit_scale"]
    if args.json:
        print(json.dumps({**report, "tolerance": args.tol, "ok": ok}))
    else:
        print(f"inputs        : {report['inputs']}")
        print(f"logit scale   : {report['logit_scale']:.4g} (max |logits|, torch_ref)")
        print(f"max |diff|    : {report['max_abs_diff']:.3e} ({report['max_abs_diff'] / report['logit_scale']:.2e} relative; tolerance {args.tol:.0e})")
        print(f"mean KL       : {report['mean_kl']:.3e} nats (torch_ref || jaxvlm)")
        print(f"top-1 agree   : {report['top1_agreement'] * 100:.2f}% of {report['n_positions']} positions")
        print("OK" if ok else "FAIL: the frameworks disagree beyond tolerance")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("to-jax", help="nanoVLM directory -> orbax checkpoint of the NNX state")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_to_jax)
    s = sub.add_parser("to-torch", help="orbax checkpoint of the NNX state -> nanoVLM directory")
    s.add_argument("src"), s.add_argument("dst")
    s.set_defaults(func=cmd_to_torch)
    s = sub.add_parser("check", help="run a checkpoint in both frameworks and compare the logits")
    s.add_argument("dir", help="nanoVLM directory or orbax checkpoint written by to-jax")
    s.add_argument("--image", action="append", help="image file (repeatable); needs --prompt")
    s.add_argument("--prompt", help="user prompt; the image tokens are inserted as upstream does")
    s.add_argument("--tokenizer", help="tokenizer.json or its directory (default: DIR/tokenizer.json)")
    s.add_argument("--batch-size", type=int, default=3, help="row b carries b %% 3 images")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tol", type=float, default=1e-4, help="max |diff| relative to max |logits|")
    s.add_argument("--json", action="store_true", help="print the report as one JSON line")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("init", help="write a randomly initialised nanoVLM directory")
    s.add_argument("dst")
    s.add_argument("--preset", choices=PRESETS, default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as e:  # CheckpointError is a ValueError
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
