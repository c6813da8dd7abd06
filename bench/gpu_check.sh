#!/usr/bin/env bash
# The one prepared GPU check: run it when a GPU is lent (`--dry` runs it on CPU, as the
# tests do, so it cannot rot). Figures go to $OUT/gpu_check.json where $OUT is set (the
# device tool brings back only what is written there), else bench/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -n "${OUT:-}" ]; then set -- --out "$OUT/gpu_check.json" "$@"; fi
exec "$PY" bench/gpu_check.py "$@"
