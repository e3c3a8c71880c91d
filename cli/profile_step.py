"""Where the time of one jitted train step goes: jax.profiler trace + XLA's optimized HLO.

Builds a random-weight model (a preset or a config.json), the same batch as
`python -m jaxvlm bench` (every text position labelled), and jaxvlm's train step; warms up,
times a few steps, then profiles one step with `jax.profiler` (a Perfetto trace) while XLA
dumps the optimized HLO. Each executed HLO op is joined with its HLO line, so every op gets
its kind (matmul / transpose-copy / reduce / elementwise), shape and the jaxvlm source line
it came from (HLO stack frames). Time is wall time: when the runtime runs two ops at once,
each gets half of the overlap, so the shares add up to the step.

    python -m cli.profile_step                       # nanovlm-222m, batch 4 x 256, 1 image each
    python -m cli.profile_step --top 40 --out /tmp/prof   # keep the trace and the HLO there

Open OUT/trace/**/perfetto_trace.json.gz in https://ui.perfetto.dev for the timeline.
Caveat: XLA's CPU dots that run through Eigen are asynchronous; their time shows up as a
gap after the `dot` op (reported as "not inside any op").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args():
    from cli.bench import add_shape_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(p, "timed steps before the profiled one")
    p.add_argument("--top", type=int, default=30, help="rows of the per-op and per-source tables")
    p.add_argument("--out", help="directory for the trace and HLO dump (default: a temporary one)")
    p.add_argument("--report", metavar="DIR", help="only print the tables of an earlier run's --out DIR")
    return p.parse_args()


def main() -> int:
    from jaxvlm.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()  # huge-page scratch buffers, as `jaxvlm train` runs (JAXVLM_HUGE_PAGES=0: off)
    args = parse_args()
    if args.report:
        report(Path(args.report), None, args.top)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="jaxvlm-profile-"))
    dump = out / "hlo"
    # Must be set before jax initialises its backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"
    ).strip()
    import jax
    from flax import nnx

    from cli.bench import config_of, forward_flops, jax_train_setup
    from jaxvlm.options import ModelOptions
    from jaxvlm.vision_language_model import VisionLanguageModel

    cfg = config_of(args)
    trainer, state, batch = jax_train_setup(
        VisionLanguageModel(cfg, options=ModelOptions(remat=args.remat, compute_dtype=args.dtype), rngs=nnx.Rngs(0)),
        cfg,
        args.batch_size,
        args.seq_len,
        args.images_per_sample,
        seed=0,
    )

    def step():
        nonlocal state
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    flops = 3 * forward_flops(cfg, args.batch_size, args.seq_len, args.batch_size * args.images_per_sample)
    med = statistics.median(times)
    print(
        f"step: median {med:.3f} s of {[round(t, 3) for t in times]}; first call {first:.1f} s; "
        f"{flops / 1e9:.0f} model GFLOP -> {flops / med / 1e9:.0f} GFLOP/s; compiles {trainer.compiles}"
    )

    jax.profiler.start_trace(str(out / "trace"), create_perfetto_trace=True)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    print(f"profiled step: {wall:.3f} s; trace and HLO in {out}")
    report(out, wall, args.top)
    return 0


# ---- joining the trace with the HLO ---------------------------------------------------------------
def _section(hlo: str, name: str) -> str:
    m = re.search(r"\n" + name + r"\n(.*?)(?:\n[A-Z][A-Za-z]+\n|\nHloModule|\Z)", hlo, re.S)
    return m.group(1) if m else ""


def _source_of(hlo: str):
    """stack_frame_id -> 'file.py:line:function' of the innermost frame (XLA's frame tables)."""
    files = dict(re.findall(r"^(\d+) \"(.*)\"$", _section(hlo, "FileNames"), re.M))
    funcs = dict(re.findall(r"^(\d+) \"(.*)\"$", _section(hlo, "FunctionNames"), re.M))
    locs = {
        a: (b, c, d)
        for a, b, c, d in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", _section(hlo, "FileLocations"), re.M
        )
    }
    frames = dict(re.findall(r"^(\d+) \{file_location_id=(\d+)", _section(hlo, "StackFrames"), re.M))

    def where(frame_id: str) -> str:
        if frame_id not in frames or frames[frame_id] not in locs:
            return "?"
        f, fn, line = locs[frames[frame_id]]
        return f"{Path(files.get(f, '?')).name}:{line}:{funcs.get(fn, '?')}"

    return where


def _kind(instr: str, body: str) -> str:
    text = instr + body
    if " dot(" in text:
        return "matmul"
    if " convolution(" in text:
        return "convolution"
    if " reduce(" in text or " reduce-window(" in text:
        return "reduce"
    if " transpose(" in body or " copy(" in text:
        return "transpose/copy"
    return "elementwise/other"


def report(out: Path, wall_s: float | None, top: int) -> None:
    """Print the tables; wall_s None: the span from the first op's start to the last op's end."""
    trace = sorted(glob.glob(str(out / "trace/**/perfetto_trace.json.gz"), recursive=True))[-1]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo_file = sorted(glob.glob(str(out / "hlo/*jit__step.cpu_after_optimizations.txt")))[-1]
    hlo = Path(hlo_file).read_text()
    instrs = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo, re.M))
    bodies = {
        m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", hlo, re.S)
    }
    where = _source_of(hlo)

    ops = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("ph") == "X" and e["name"] in instrs]
    # Sweep: share every instant among the ops running then.
    starts, ends = collections.defaultdict(list), collections.defaultdict(list)
    for a, b, n in ops:
        starts[a].append(n)
        ends[b].append(n)
    share, running, prev = collections.defaultdict(float), collections.Counter(), None
    for t in sorted(set(starts) | set(ends)):
        if prev is not None and running:
            k = sum(running.values())
            for n, c in running.items():
                share[n] += (t - prev) * c / k
        for n in ends[t]:
            running[n] -= 1
        for n in starts[t]:
            running[n] += 1
        running, prev = +running, t

    by_kind, by_op, by_src = (collections.defaultdict(float) for _ in range(3))
    count = collections.Counter()
    for n, us in share.items():
        instr = instrs[n]
        called = re.search(r"calls=%([\w.\-]+)", instr)
        body = bodies.get(called.group(1), "") if called else ""
        kind = _kind(instr, body)
        frame = re.search(r"stack_frame_id=(\d+)", instr)
        src = where(frame.group(1)) if frame else "?"
        shape = instr.split(" ")[0]
        by_kind[kind] += us
        by_op[(kind, shape, src)] += us
        by_src[src] += us
        count[(kind, shape, src)] += 1
    covered = sum(by_kind.values()) / 1e6
    if wall_s is None:
        wall_s = (max(b for _, b, _ in ops) - min(a for a, _, _ in ops)) / 1e6
    print(
        f"\nwall {wall_s * 1e3:.0f} ms; inside ops {covered * 1e3:.0f} ms; not inside any op "
        f"(Eigen dots in flight, dispatch) {(wall_s - covered) * 1e3:.0f} ms; {len(ops)} op executions\n"
    )
    print("| kind | ms | share |\n|---|---:|---:|")
    for k, us in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"| {k} | {us / 1e3:.0f} | {us / 1e6 / wall_s:.0%} |")
    print(
        f"\ntop {top} (kind, result shape, source line):\n\n| ms | ops | kind | shape | source |\n|---:|---:|---|---|---|"
    )
    for key, us in sorted(by_op.items(), key=lambda x: -x[1])[:top]:
        print(f"| {us / 1e3:.1f} | {count[key]} | {key[0]} | `{key[1]}` | {key[2]} |")
    print(f"\ntop {top} source lines:\n\n| ms | source |\n|---:|---|")
    for src, us in sorted(by_src.items(), key=lambda x: -x[1])[:top]:
        print(f"| {us / 1e3:.1f} | {src} |")


if __name__ == "__main__":
    sys.exit(main())
