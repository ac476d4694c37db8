#!/usr/bin/env bash
# CI: the GPU device run's install path, checked here under the device image's versions, offline.
#
#   bash .ci/device_env.sh          # after `make install` (.venv); `make device-env-check`
#
# 1. A venv (ENV_DIR) with the device image's triton 3.6, transformers 5.17 and hub 1.33
#    (pip, while the network is still there). torch is .venv's 2.13 CPU build, shared through a
#    .pth line (the device has torch 2.11 with CUDA: PyPI has no CPU-only 2.11 wheel, and the CUDA
#    one with its libraries is gigabytes); the other packages come from .venv the same way,
#    behind the venv's own. numpy: the device has 2.5, which needs Python >= 3.12 (this machine
#    has 3.11), so numpy 2.4 runs with 2.5's one relevant change switched on: converting a
#    1-element array to a scalar is an error (PYTHONWARNINGS below; 2.4 warns, 2.5 raises the
#    same "only 0-dimensional arrays" error).
# 2. With no network (unshare -n; else PIP_NO_INDEX and HF offline only, said in the log):
#    bench/device_check.sh --dry-run (the preflight against setup.py, then every stage on CPU),
#    the Triton kernel tests in the interpreter under Triton 3.6, and the compile check of the
#    Triton kernels for sm_90a (the device's H100/H200) under Triton 3.6 (--quick: bf16, one H).
# Budget: <= 4 minutes on an idle 2-core machine; the seconds of each part are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BASE="${BASE_VENV:-.venv}"
# Outside the clone, so a later CI run on the same machine reuses it (rebuilt when the pins or
# the base venv change: .stamp); a fresh machine builds it (≈ 2 minutes, mostly triton's wheel).
ENV_DIR="${DEVICE_ENV_DIR:-$HOME/.cache/grpo_core/device-env}"
# as on the device (numpy: see above)
DEVICE_PKGS=(triton==3.6.0 transformers==5.17.0 huggingface-hub==1.33.0 numpy==2.4.6)
export PYTHONWARNINGS="error:Conversion of an array with ndim > 0:DeprecationWarning"
t0=$SECONDS

site() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
STAMP="${DEVICE_PKGS[*]} base=$(site "$BASE/bin/python")"
if [ "$(cat "$ENV_DIR/.stamp" 2>/dev/null)" != "$STAMP" ]; then
  "$BASE/bin/python" -m venv --clear "$ENV_DIR"
  site "$BASE/bin/python" > "$(site "$ENV_DIR/bin/python")/_base_venv.pth"
  "$ENV_DIR/bin/python" -m pip install -q --no-deps --disable-pip-version-check "${DEVICE_PKGS[@]}"
  echo "$STAMP" > "$ENV_DIR/.stamp"
fi
"$ENV_DIR/bin/python" -c "
import numpy, torch, transformers, triton
print(f'device-env: torch {torch.__version__}, triton {triton.__version__}, '
      f'transformers {transformers.__version__}, numpy {numpy.__version__}')
assert (triton.__version__, transformers.__version__) == ('3.6.0', '5.17.0')"
echo "device-env: venv ready in $((SECONDS - t0)) s"

if unshare -n true 2>/dev/null; then
  OFFLINE=(unshare -n)
  echo "device-env: no network (unshare -n)"
else
  OFFLINE=(env PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1)
  echo "device-env: unshare -n is not permitted here: PIP_NO_INDEX=1 and HF offline only"
fi
t1=$SECONDS
"${OFFLINE[@]}" env PYTHON="$ENV_DIR/bin/python" OUT="$ROOT/build/device-check-env" \
  bash bench/device_check.sh --dry-run
echo "device-env: device_check.sh --dry-run passed in $((SECONDS - t1)) s"
t2=$SECONDS
"${OFFLINE[@]}" env TRITON_INTERPRET=1 "$ENV_DIR/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_kernels_logprobs.py tests/test_kernels_linear.py
echo "device-env: Triton 3.6 interpreter kernel tests passed in $((SECONDS - t2)) s"
t3=$SECONDS
"${OFFLINE[@]}" env TRITON_INTERPRET=0 "$ENV_DIR/bin/python" -m bench.compile_check --archs 90 \
  --quick --no-csrc --out "$ROOT/build/compile-check-triton36"
echo "device-env: Triton 3.6 compile check (sm_90a) passed in $((SECONDS - t3)) s"
echo "device-env: total $((SECONDS - t0)) s"
