"""Install the three layers and build the optional CUDA library from csrc/.

    grpo_core    (grpo_core/)  the engine: math, kernels, rollout, rewards, data, trainer
    grpo_models  (models/)     the policies: Qwen2-VL / Qwen2.5-VL, a text LM, tiny offline models
    grpo_app     (grpo_app/)   the app: the `grpo` command, policy loading by name, demo, plots

The policies folder keeps the name ``models/`` of the design card but is installed as the package
``grpo_models``: a top-level ``models`` in site-packages collides with any other project's.

Pure-Python install always works (CPU torch, no compiler). The CUDA kernels in csrc/ are plain
CUDA C++ with a C ABI (no torch headers), so they build with nvcc alone, even next to a CPU-only
torch, and one build serves every torch version. They are loaded at run time with ctypes
(grpo_core/kernels/cuda.py).

Environment flags (flash-attention style):
  GRPO_CORE_SKIP_CUDA_BUILD=1   never build the CUDA library
  GRPO_CORE_FORCE_CUDA_BUILD=1  build it and fail loudly if nvcc is missing or the build fails
  GRPO_CORE_CUDA_ARCHS="80;90a" target architectures (default "80;90;90a")
  NVCC=/path/to/nvcc            compiler (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc)
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "csrc"))


def _build_cuda(out_dir):
    """Build csrc/ into out_dir; a missing compiler is a one-line warning unless forced."""
    if os.environ.get("GRPO_CORE_SKIP_CUDA_BUILD") == "1":
        return
    force = os.environ.get("GRPO_CORE_FORCE_CUDA_BUILD") == "1"
    try:
        import build_cuda  # csrc/build_cuda.py: plain nvcc driver, no torch

        path = build_cuda.build(out_dir, quiet=not force)
        if path is None and force:
            raise RuntimeError("GRPO_CORE_FORCE_CUDA_BUILD=1 but no CUDA library was built")
    except ImportError:
        print("grpo_core: warning: csrc/build_cuda.py not found; CUDA library not built")
    except Exception as exc:  # noqa: BLE001 - a failed optional build must not fail the install
        if force:
            raise
        print(f"grpo_core: warning: CUDA library not built ({exc}); the torch/triton backends still work")


class BuildPyWithCuda(build_py):
    """build_py that also drops libgrpo_core_cuda.so into grpo_core/kernels/_lib/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out_dir = os.path.join(HERE, "grpo_core", "kernels", "_lib")
        else:
            out_dir = os.path.join(self.build_lib, "grpo_core", "kernels", "_lib")
        _build_cuda(out_dir)


setup(
    name="grpo_core",
    version="0.1.0",
    description="A from-scratch GRPO engine for RL fine-tuning of vision-language models on medical VQA",
    packages=find_packages(include=["grpo_core", "grpo_core.*", "grpo_app", "grpo_app.*"]) + ["grpo_models"],
    package_dir={"grpo_models": "models"},
    package_data={"grpo_core.kernels": ["_lib/*.so"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.16",
        "transformers>=5.17,<5.25",         # 5.17: the GPU device image's (no output .cache)
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.0",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "data": ["datasets>=3.0", "pandas>=2.0", "pyarrow>=14"],  # formats hf_dataset / hf_parquet
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.5", "tensorboard>=2.14", "wandb>=0.17"],   # CI tests both reporters
        "tensorboard": ["tensorboard>=2.14"],       # run.report_to: [tensorboard]
        "wandb": ["wandb>=0.17"],                   # run.report_to: [wandb]
        "bench": ["matplotlib>=3.7"],
        "lora": ["peft>=0.13"],
    },
    entry_points={"console_scripts": ["grpo=grpo_app.cli:main"]},
    cmdclass={"build_py": BuildPyWithCuda},
)
