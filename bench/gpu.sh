#!/usr/bin/env bash
# One-command device check (under 8 minutes): forward fp32 / bf16 / torch.compile at batch 64 and
# 256, the scoring pipeline on local 1024² JPEGs, a few training steps; a short table last.
# Without a GPU it runs the same on the CPU with batches 8 and 32.
#     bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PY" bench/gpu_check.py "$@"
