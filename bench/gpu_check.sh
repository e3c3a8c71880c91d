#!/usr/bin/env bash
# The one-shot GPU check: on a fresh GPU machine that has jax with CUDA, torch, flax, optax and orbax
# (no network), install jaxvlm without dependencies and run every phase of cli/gpu_check.py
# (parity subset, bf16 train step vs torch_ref eager and compiled, remat at twice the batch,
# decode, fp32), each time-boxed, in under 8 minutes, writing one JSON.
#
#   bash bench/gpu_check.sh [OUT_DIR] [cli.gpu_check options, e.g. --budget 400 --smoke]
#
# OUT_DIR defaults to $OUT (the device tool's folder) or ./gpu-check-out. Exit 0 when every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
[ $# -gt 0 ] && shift
mkdir -p "$out"
if [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
    || echo "gpu_check: pip install -e . failed (see $out/install.log); running from the checkout" >&2
fi
exec python -m cli.gpu_check --out "$out" "$@"
