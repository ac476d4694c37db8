"""Policies for grpo_core (anything satisfying ``grpo_core.policy.Policy``) and tiny offline factories.

- ``models.qwen2_vl.Qwen2VLPolicy``: Qwen2-VL / Qwen2.5-VL checkpoints (``from_pretrained(path, ...)``).
- ``models.text_lm.TextLMPolicy``: text-only causal LMs (Qwen2ForCausalLM, ...), same protocol.
- ``models.tiny``: tiny random Qwen2-VL / Qwen2.5-VL / Qwen2 + local tokenizer, and the Qwen2-VL-2B config.

Imports are lazy so ``import models`` stays cheap (transformers loads on first use).
"""

import importlib

_LAZY = {
    "Qwen2VLPolicy": "models.qwen2_vl",
    "Qwen2VLEncoded": "models.qwen2_vl_encode",
    "TextLMPolicy": "models.text_lm",
    "DecodeState": "models.policy_utils",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
