#!/usr/bin/env bash
# The one prepared GPU run, on the bare, offline device machine (bench/device_check.py says what
# it measures). Its python3 has torch 2.11, triton 3.6, transformers 5.17, peft, pandas, pytest ...
# and pip there reaches no registry: whatever setup.py needs beyond that travels as wheels in .whl/.
#
#   make device-check                 # = this script (never builds a venv: no network there)
#   bash bench/device_check.sh [--only bench-step,learn] [...]   # extra args go to device_check.py
#
# First seconds: bench/device_preflight.py checks this Python against setup.py's install_requires
# (after installing any carried .whl/*.whl into $SITE); if something is missing it stops (exit 3)
# and prints the exact `pip download` line (or `make device-wheels WHEELS=...`) to run on a machine
# with pip access. Carried along: .whl (if any) and build/cuda (optional: `make cuda`; built there
# for the GPU otherwise). Results in $OUT (the device tool's folder) or bench/results/device-check/.
# PYTHON=/path/to/python picks the interpreter (default python3; make passes .venv's if present).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
OUT_DIR="${OUT:-bench/results/device-check}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl \
    || { echo "device_check.sh: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" bench/device_preflight.py || exit 3
# The project itself runs from the tree, not installed (nothing to fetch, no interpreter's
# site-packages changed): grpo_core, grpo_app and grpo_models (a shim package pointing at models/).
# The CUDA library is the cuda-lib stage's (carried build/cuda, or built for this GPU only).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m bench.device_check --out "$OUT_DIR" --pack "$@"
