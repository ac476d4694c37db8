"""Policies for grpo_core (anything satisfying ``grpo_core.policy.Policy``) and tiny offline factories.

- ``grpo_models.qwen2_vl.Qwen2VLPolicy``: Qwen2-VL / Qwen2.5-VL checkpoints (``from_pretrained(path, ...)``).
- ``grpo_models.text_lm.TextLMPolicy``: text-only causal LMs (Qwen2ForCausalLM, ...), same protocol.
- ``grpo_models.tiny``: tiny random Qwen2-VL / Qwen2.5-VL / Qwen2 + local tokenizer, and the Qwen2-VL-2B config.

Imports are lazy so ``import grpo_models`` stays cheap (transformers loads on first use).
"""

import importlib

_LAZY = {
    "Qwen2VLPolicy": "grpo_models.qwen2_vl",
    "Qwen2VLEncoded": "grpo_models.qwen2_vl_encode",
    "TextLMPolicy": "grpo_models.text_lm",
    "DecodeState": "grpo_models.policy_utils",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grpo_models' has no attribute {name!r}")
