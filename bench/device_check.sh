#!/usr/bin/env bash
# The one prepared GPU run, on the bare, offline device machine (bench/device_check.py says what
# it measures). Its python3 has torch, triton, peft, pandas, pytest ... but transformers 5.17,
# below setup.py's >=5.20,<5.25, and pip there reaches no registry: the wheels travel along.
#
# Prepare once, on a machine with pip access, in the repository root (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl transformers==5.24.0 regex==2026.11.19
#   (transformers 5.24 needs regex >= 2025.10.22, tokenizers 0.23.x, huggingface-hub >= 1.31 and
#    safetensors >= 0.8: the device has the last three.)
#   make cuda      # optional: build/cuda/ is used there if it runs, else built there for the GPU
#
# Run there with .whl and build/cuda carried along:
#   bash bench/device_check.sh            # results in $OUT (the device tool's folder) or
#                                         # bench/results/device-check/; extra args go to the script
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/device-check}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check.sh: installing the carried wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "device_check.sh: no .whl/ carried; using the machine's packages as they are"
fi
# The project itself: editable, no dependencies, no network; the CUDA library is left to the
# cuda-lib stage (carried, or built for this GPU only). A failed install falls back to the tree.
GRPO_CORE_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || export PYTHONPATH="$PWD:$PYTHONPATH"
python3 -m bench.device_check --out "$OUT_DIR" --pack "$@"
