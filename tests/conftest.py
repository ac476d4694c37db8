"""Shared fixtures: tiny offline models built once per test session into a temporary directory.

- ``tiny_vlm_path``: random Qwen2-VL (text hidden 64 × 2 layers, vision 32 × 2 blocks, patch 14,
  merge 2: a 56×56 image → 4 image tokens; max_pixels 224²) + tokenizer + image processor config.
- ``tiny_text_lm_path``: random text-only Qwen2ForCausalLM (hidden 64 × 2) with the same tokenizer.
- ``tiny_vlm_policy`` / ``tiny_text_policy``: fp32 CPU policies loaded from those paths (shared:
  do not train them in place; load your own with ``Qwen2VLPolicy.from_pretrained`` to mutate).
- ``tiny_vlm_policy64`` / ``tiny_text_policy64``: the same in float64, for equivalence tests
  (two paths that must agree hold to ~1e-15 on any CPU there; see numerics.py).
"""

import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # numerics, helpers
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # examples.*, bench.*
from numerics import full_precision_hf  # noqa: E402

full_precision_hf()   # fp64 models compute in fp64 throughout (unchanged for fp32/bf16): numerics.py


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory):
    from grpo_models.tiny import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny_vlm")), seed=0)


@pytest.fixture(scope="session")
def tiny_text_lm_path(tmp_path_factory):
    from grpo_models.tiny import build_tiny_qwen2

    return build_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_text_lm")), seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_policy(tiny_vlm_path):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    return Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_text_policy(tiny_text_lm_path):
    from grpo_models.text_lm import TextLMPolicy

    return TextLMPolicy.from_pretrained(tiny_text_lm_path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_vlm_policy64(tiny_vlm_path):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    return Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64, device="cpu")


@pytest.fixture(scope="session")
def tiny_text_policy64(tiny_text_lm_path):
    from grpo_models.text_lm import TextLMPolicy

    return TextLMPolicy.from_pretrained(tiny_text_lm_path, dtype=torch.float64, device="cpu")
