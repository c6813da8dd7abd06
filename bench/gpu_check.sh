#!/usr/bin/env bash
# The one prepared GPU check: run it when a GPU is lent (`--dry` runs it on CPU, as the
# tests do, so it cannot rot). Figures go to bench/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py "$@"
