#!/usr/bin/env bash
# The README's main job: train a tiny VLM from scratch on the built-in synthetic shapes dataset
# (CPU, a few minutes), report its held-out exact-match accuracy, then ask it about one image.
# OUT (default runs/demo) and SHARED (default ../shared) can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/demo}
SHARED=${SHARED:-../shared}
TOKENIZER="$SHARED/data/smollm2"
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "demo: the SmolLM2 tokenizer is not at $TOKENIZER (set SHARED=...)" >&2; exit 2; }
rm -rf "$OUT"
start=$(date +%s)

python -m jaxvlm train --config configs/demo.json --output-dir "$OUT" --tokenizer "$TOKENIZER"
python -m jaxvlm eval --model "$OUT/model" --data synthetic --split heldout --limit 1000 --batch-size 64

python -m jaxvlm synthetic --model "$OUT/model" --split heldout --index 3 --out "$OUT/example.png" | tee "$OUT/example.json"
question=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['question'])" "$OUT/example.json")
echo "Q: $question"
echo -n "A: "
python -m jaxvlm generate --model "$OUT/model" --image "$OUT/example.png" --prompt "$question" --greedy --max-new-tokens 8
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT"
