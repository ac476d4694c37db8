# Every target makes/uses a local virtual environment (.venv; CPU torch 2.13.0 where no torch is
# present) and installs the project into it (editable, with the dev/bench/lora/data extras). The
# README's two commands are `make demo` and `make test`; `make help` lists every target.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.grpo_core_installed
.DEFAULT_GOAL := install      # a bare `make` sets up .venv (and the grpo command in .venv/bin)

.PHONY: help demo test test-numerics cpu-info install bench bench-quick lint cuda memcheck compile-check device-check device-check-dry device-wheels device-env-check clean

help:  ## this list of targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1|\2/' \
	  | awk -F'|' '{printf "%-24s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench,lora,data]"
	touch $(STAMP)

install: $(STAMP)  ## the .venv with this package (editable); then: source .venv/bin/activate

demo: $(STAMP)  ## the CPU demo: a tiny Qwen2-VL learns a synthetic scan task with GRPO
	$(PY) -m grpo_app demo

test: $(STAMP)  ## the CPU test tier (what CI runs)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" tests

# The numerically sensitive tests again under other CPUs' kernel paths, so a result that holds
# only on this machine's SIMD width fails here rather than on the next machine. Each profile
# restricts ATen (ATEN_CPU_CAPABILITY), MKL (BLAS) and oneDNN to that instruction set; a profile
# this CPU lacks is capped by the libraries to what it has.
NUMERICS_PROFILES ?= default avx2
MKL_ISA_default := SSE4_2
MKL_ISA_avx2    := AVX2
MKL_ISA_avx512  := AVX512
DNN_ISA_default := SSE41
DNN_ISA_avx2    := AVX2
DNN_ISA_avx512  := AVX512_CORE
test-numerics: $(STAMP)  ## the numerics tests under other CPUs' kernel paths
	@for p in $(NUMERICS_PROFILES); do \
	  echo "== numerics under ATEN_CPU_CAPABILITY=$$p"; \
	  ATEN_CPU_CAPABILITY=$$p MKL_ENABLE_INSTRUCTIONS=$(MKL_ISA_$$p) ONEDNN_MAX_CPU_ISA=$(DNN_ISA_$$p) \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -m "numerics and not gpu" tests || exit 1; \
	done

# What machine this is: the first lines of a CI log, so a failure says where it came from.
cpu-info: $(STAMP)  ## what machine this is (CPU, cores, torch threads)
	@echo "cpu: $$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($$(nproc) cores)"
	@$(PY) -c "import os, torch; print(f'torch {torch.__version__}: cpu capability {torch.backends.cpu.get_cpu_capability()}, ' \
	  f'{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get(\"OMP_NUM_THREADS\", \"unset\")}), ' \
	  f'ATEN_CPU_CAPABILITY={os.environ.get(\"ATEN_CPU_CAPABILITY\", \"unset\")}')"

bench-quick: $(STAMP)  ## CPU benchmark smoke run (small shapes)
	$(PY) -m bench --quick

bench: $(STAMP)  ## the full benchmark suite (on a GPU)
	$(PY) -m bench

lint: $(STAMP)  ## ruff over the code
	$(PY) -m ruff check grpo_core grpo_app models grpo_models bench tests examples

# The CUDA library (csrc/) into build/cuda/, where grpo_core/kernels/cuda.py finds it. Plain
# Python + nvcc; GRPO_CORE_CUDA_ARCHS="80;90a" picks architectures (default 80;90;90a).
cuda:  ## build the CUDA library (csrc/) into build/cuda/
	$(PYTHON) csrc/build_cuda.py --out build/cuda

# GPU tier of the CUDA kernels under compute-sanitizer memcheck (needs a GPU and the CUDA toolkit's
# compute-sanitizer; COMPUTE_SANITIZER=/path overrides). No caching allocator: every tensor is
# its own allocation, so an out-of-bounds access cannot hide inside a cached block.
memcheck: cuda $(STAMP)  ## the CUDA kernels' GPU tests under compute-sanitizer
	GRPO_CORE_CUDA_LIB=build/cuda/libgrpo_core_cuda.so PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
	$${COMPUTE_SANITIZER:-compute-sanitizer} --tool memcheck --error-exitcode 1 \
	$(PY) -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_gpu.py

# Every Triton kernel variant and csrc/ compiled for sm_80 and sm_90a without a GPU; the table of
# registers, spills and load widths goes to bench/results/compile/ (bench/compile_check.py).
compile-check: $(STAMP)  ## compile every Triton / CUDA kernel for sm_80 and sm_90a, no GPU
	TRITON_INTERPRET=0 $(PY) -m bench.compile_check

# The one prepared GPU run (bench/device_check.py): tests, benchmarks, peak memory, one folder.
# It builds no venv (the device machine is offline): bench/device_check.sh with .venv's python
# where one exists here, else python3; it stops in seconds, naming the wheels to carry, if needed.
# DEVICE_CHECK_ARGS="--only learn" reruns one stage on a warm machine.
device-check:  ## the one prepared GPU run (works on the bare offline GPU machine)
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash bench/device_check.sh $(DEVICE_CHECK_ARGS)

# The wheels the device lacks (bench/device_wheels.txt, or WHEELS="spec ...") into .whl/, here.
WHEELS ?= $(shell grep -v '^\s*\(#\|$$\)' bench/device_wheels.txt)
device-wheels:  ## fetch the wheels the GPU machine lacks into .whl/ (here, online)
	$(PYTHON) bench/device_preflight.py --download $(foreach w,$(WHEELS),'$(w)')

# The same script on CPU with tiny shapes: checks the script itself.
device-check-dry: $(STAMP)  ## the device-check script on CPU with tiny shapes
	$(PY) -m bench.device_check --dry-run

# CI: the device run's install path under the device image's versions (triton 3.6, transformers
# 5.17, numpy 2.5's scalar rule), offline: the .sh dry run and the Triton kernel tests.
device-env-check: $(STAMP)  ## CI: the device run under the device image's versions, offline
	BASE_VENV=$(VENV) bash .ci/device_env.sh

clean:  ## remove build outputs
	rm -rf build grpo_core/kernels/_lib *.egg-info
