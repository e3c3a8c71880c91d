"""Packing vs length buckets, and the streamed loader's memory, measured side by side in one run.

    python -m cli.bench_packing --tokenizer ../shared/data/smollm2 --coco ../shared/data/coco-mini

1. A realistic length mix is written as Cauldron parquet shards in a temporary directory: COCO
   photos with one caption (short), with three caption turns, and LLaVA-style conversations
   (the caption plus long questions and answers). The same stream of samples is trained for
   `--steps` steps of the tiny model with `--packing` (segments) and without (power-of-two
   length buckets), one sample per row; reported: real (non-padding) tokens per step, per
   second (the median step: steps that compile a new length bucket are left out), and the
   fraction of each batch that is real.
2. Peak RSS of a process that streams and packs `--rss-rows` rows (10x as many shards as the
   small run; the photos as 96 px thumbnails) vs a tenth of them: it must stay flat (memory is one shuffle window and one
   round of packing, not the dataset).
The machine is named in the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mix_rows(coco: Path, n: int) -> list[dict]:
    index = json.loads((coco / "captions.json").read_text())["images"]
    rows = []
    for k in range(n):
        im = index[k % len(index)]
        jpeg = (coco / "images" / im["file_name"]).read_bytes()
        caps = im["captions"]
        kind = k % 3
        if kind == 0:
            texts = [{"user": "Describe the image.", "assistant": caps[0]}]
        elif kind == 1:
            texts = [
                {"user": "Describe the image." if j == 0 else "And again?", "assistant": c}
                for j, c in enumerate(caps[:3])
            ]
        else:
            texts = [
                {"user": "What is happening in this picture? Give a detailed account of every object you can see, "
                 "their colours, positions and what they might be used for.",
                 "assistant": " ".join(caps) + " " + " ".join(reversed(caps))},
                {"user": "Is there anything unusual about the scene?", "assistant": caps[-1] + " Nothing else stands out."},
            ]  # fmt: skip
        rows.append({"images": [jpeg], "texts": texts})
    return rows


def _thumbnail(jpeg: bytes, side: int = 96) -> bytes:
    """The photo at most `side` px (a few KB): 100k rows stay a few hundred MB on disk."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def train_rate(shards: Path, tokenizer: str, packing: bool, steps: int, out: Path) -> dict:
    from jaxvlm.train_loop import RunConfig, train

    run = RunConfig(
        data=f"cauldron:{shards}", tokenizer=tokenizer, packing=packing, steps=steps, batch_size=4,
        max_length=512, log_every=1, save_every=10**6, output_dir=str(out), lr_mp=1e-3, seed=0,
    )  # fmt: skip
    summary = train(run)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]  # past compiles
    tokens = sum(r["tokens"] for r in rows)
    slots = sum(r["seq_len"] * run.batch_size for r in rows)
    # the median step's rate: a step that compiled a new length bucket (unpacked) is not steady state
    rate = statistics.median(r["tokens"] / r["step_time_s"] for r in rows)
    return {"packing": packing, "real_tokens_per_s": rate, "real_tokens_per_step": tokens / len(rows),
            "real_fraction": tokens / slots, "steps_timed": len(rows), "final_loss": summary["final_loss"]}  # fmt: skip


RSS_CHILD = r"""
import json, re, sys, time
from conversion.config import VLMConfig
from jaxvlm.data import SampleEncoder
from jaxvlm.data.stream_loader import ShardSource, StreamLoader
from jaxvlm.data.streaming import ShardStream
from jaxvlm.tokenizer import load_tokenizer
shards, tokenizer, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = VLMConfig.tiny()
enc = SampleEncoder.from_config(cfg, load_tokenizer(tokenizer, extra_tokens=cfg.extra_tokens))
stream = ShardStream(shards, seed=0, on_error="yield")
loader = StreamLoader(ShardSource(stream, enc), 8, max_length=512, packing="segments",
                      n_image_tokens=cfg.n_image_tokens, prefetch=2)
t0 = time.perf_counter()
for batch in loader.forever():
    if loader.stats["samples"] >= rows:
        break
# VmHWM (this process image's peak RSS): ru_maxrss would carry the parent's peak across fork + exec
hwm = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"rows": loader.stats["samples"], "peak_rss_mib": hwm / 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cli.bench_packing", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--coco", required=True, help="the coco-mini directory (captions.json, images/)")
    p.add_argument("--rows", type=int, default=600, help="rows of the training mix")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rss-rows", type=int, default=100_000)
    args = p.parse_args(argv)
    from cli.bench import cpu_model
    from jaxvlm.data.streaming import write_cauldron_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cauldron_shards(mix_rows(Path(args.coco), args.rows), tmp / "mix", rows_per_shard=200, row_group_size=50)
        results = [
            train_rate(tmp / "mix", args.tokenizer, packing, args.steps, tmp / f"run{packing}")
            for packing in (False, True)
        ]
        print(f"CPU: {cpu_model()}")
        print("| rows | real tokens / step | real tokens / s | real fraction of the batch |")
        print("|---|---:|---:|---:|")
        for r in results:
            name = "packed (segments), 512" if r["packing"] else "one sample per row, buckets"
            print(
                f"| {name} | {r['real_tokens_per_step']:.0f} | {r['real_tokens_per_s']:.0f} | {r['real_fraction']:.2f} |"
            )
        print(
            f"packing gain in real tokens/s: {results[1]['real_tokens_per_s'] / results[0]['real_tokens_per_s']:.2f}x"
        )

        small = max(args.rss_rows // 10, 1)
        jpeg_rows = [{**r, "images": [_thumbnail(r["images"][0])]} for r in mix_rows(Path(args.coco), 51)]
        big = tmp / "big"
        t0 = time.perf_counter()
        write_cauldron_shards(
            (jpeg_rows[k % 51] for k in range(args.rss_rows)), big, rows_per_shard=1000, row_group_size=100
        )
        print(f"wrote {args.rss_rows} rows in {time.perf_counter() - t0:.0f} s")
        for n in (small, args.rss_rows):
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(big), args.tokenizer, str(n)], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"streamed and packed {r['rows']} rows: peak RSS {r['peak_rss_mib']:.0f} MiB ({r['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
