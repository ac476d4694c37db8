# The README's two commands. Each makes/uses a local virtual environment, installs what it needs
# (CPU torch 2.13.0 where no torch is present), then runs the job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.grpo_core_installed

.PHONY: demo test install bench bench-quick lint cuda memcheck clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench,lora]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m grpo_core.cli demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu" tests

bench-quick: $(STAMP)
	$(PY) -m bench --quick

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check grpo_core models bench tests examples

clean:
	rm -rf build grpo_core/kernels/_lib *.egg-info
