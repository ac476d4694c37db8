"""Pieces shared by the HF-backed policies (Qwen2-VL and text-only): the chat template fallback,
decode state, attention backend choice, LoRA wrapping and merged saving, completion decoding."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Qwen-style chat template (one image placeholder per image item, default system turn): used by the
# policies when a checkpoint's tokenizer ships no chat template, and given to the tiny offline tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

@dataclass
class DecodeState:
    """KV cache plus what a decode step needs to place the next token (N rows).

    ``decode_step`` extends the cache in place: after a step, only the returned state is valid.
    """

    cache: Any                      # transformers Cache (DynamicCache) holding N rows
    attention_mask: torch.Tensor    # (N, T) int64: prompt mask (0 on left pad) + one 1-column per step
    next_position: torch.Tensor     # (N,) int64 rope position of the next token: real length + step + rope delta
    rope_deltas: torch.Tensor       # (N, 1) int64 mRoPE delta (0 for text models)

    def __len__(self) -> int:
        return self.attention_mask.shape[0]


@functools.lru_cache(maxsize=None)
def _growing_layer_class():
    """``GrowingLayer`` is built lazily so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views of a buffer with spare columns.

        ``DynamicLayer.update`` re-concatenates the whole cache every decode step (an O(T) copy per
        token: the largest cost of a small model's decode step on CPU). Here a step writes its new
        column in place; a full buffer grows by ×1.25 (≥ 64 columns), so copies are amortised.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int = 1):
            super().__init__()
            self.lazy_initialization(keys, values)
            self._adopt(keys, values, repeats)

        def _adopt(self, keys, values, repeats=1):
            """Content := (B, h, T, d) keys/values with each row repeated ``repeats``× (prompt-major)."""
            b, h, t, d = keys.shape
            cap = t + max(64, t // 4)
            self._kbuf = keys.new_empty(b * repeats, h, cap, d)                  # (N, h, cap, d)
            self._vbuf = values.new_empty(b * repeats, h, cap, d)
            self._kbuf.view(b, repeats, h, cap, d)[:, :, :, :t] = keys[:, None]  # one copy fans out
            self._vbuf.view(b, repeats, h, cap, d)[:, :, :, :t] = values[:, None]
            self._set_len(t)

        def _set_len(self, t):
            self._len = t
            self.keys, self.values = self._kbuf[:, :, :t], self._vbuf[:, :, :t]  # views, no copy

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys.data_ptr() != self._kbuf.data_ptr() or self.keys.shape[-2] != self._len:
                self._adopt(self.keys, self.values)       # replaced by crop / select / reorder
            end = self._len + key_states.shape[-2]
            if end > self._kbuf.shape[-2]:
                self._adopt(self.keys, self.values)       # full: fresh buffer with spare columns
            self._kbuf[:, :, self._len:end] = key_states
            self._vbuf[:, :, self._len:end] = value_states
            self._set_len(end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    return GrowingLayer


def cache_of(out) -> Any:
    """The KV cache a model output returns: ``out.cache`` (newer transformers, e.g. 5.24) or
    ``out.past_key_values`` (older ones, e.g. 5.17: the GPU device image's)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def cache_arg(module, cache) -> dict:
    """``{name: cache}`` for ``module(...)``: the forward's ``cache`` argument, or
    ``past_key_values`` where an older transformers (e.g. 5.17) still calls it that."""
    return {_cache_arg_name(type(module)): cache}


@functools.lru_cache(maxsize=None)
def _cache_arg_name(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def expand_state(state: DecodeState, group_size: int) -> DecodeState:
    """B rows → B·G rows, prompt-major (row i comes from prompt i // G). The cache is repeated in place.

    Plain (non-sliding) DynamicCache layers are swapped for growing ones, so decode steps append in
    place; any other cache type falls back to ``batch_repeat_interleave``.
    """
    layers = getattr(state.cache, "layers", None)
    if layers and all(type(l).__name__ == "DynamicLayer" and l.keys is not None and l.keys.dim() == 4 for l in layers):
        grow = _growing_layer_class()
        state.cache.layers = [grow(l.keys, l.values, group_size) for l in layers]
    elif group_size > 1:
        state.cache.batch_repeat_interleave(group_size)
    if group_size == 1:
        return state
    return DecodeState(
        cache=state.cache,
        attention_mask=state.attention_mask.repeat_interleave(group_size, 0),  # (N, T)
        next_position=state.next_position.repeat_interleave(group_size, 0),    # (N,)
        rope_deltas=state.rope_deltas.repeat_interleave(group_size, 0),        # (N, 1)
    )


def pick_attn_implementation(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 on CUDA in 16-bit when flash_attn imports, else sdpa (or what was asked).

    This picks the attention of the plain HF paths only: the vision tower (its per-image varlen
    attention is what flash_attn's kernels are for), the prompt prefill and the plain fallback
    forward. The shared-prefix training forward and decode (prefix_train / prefix_decode) do their
    own attention through torch's sdpa whatever is picked here, so installing flash_attn no longer
    switches them off. Which is faster per path on a given GPU: bench/bench_prefix_train.py
    (``make device-check`` runs it on the GPU)."""
    if requested is not None:
        return requested
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def apply_lora(model: torch.nn.Module, lora: dict | Any, include_vision: bool = False) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA. ``lora`` is a LoraConfig or its kwargs.

    Target module names become a regex that skips any module path containing ``visual`` (the
    vision tower shares names such as ``gate_proj`` in Qwen2.5-VL) unless ``include_vision``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("lora=... needs peft: pip install 'grpo_core[lora]'") from exc
    cfg = dict(lora) if isinstance(lora, dict) else lora.to_dict()
    include_vision = cfg.pop("include_vision", include_vision)
    targets = cfg.get("target_modules") or DEFAULT_LORA_TARGETS
    if not isinstance(targets, str):  # a list of names: restrict to the language model
        names = "|".join(re.escape(t) for t in targets)
        targets = rf".*\.({names})$" if include_vision else rf"^(?!.*visual).*\.({names})$"
    cfg["target_modules"] = targets
    cfg.setdefault("task_type", "CAUSAL_LM")
    keep = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in keep})
    return get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def disable_adapters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    if not is_peft(model):
        raise NotImplementedError("this policy has no LoRA adapters; keep a frozen reference copy instead")
    return model.disable_adapter()


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta added (out of place: the live weights are untouched)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    deltas = {}
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer):
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    d = mod.get_delta_weight(adapter)
                    deltas[name] = deltas.get(name, 0) + d
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for name, delta in deltas.items():
        key = f"{name}.weight"
        acc = torch.promote_types(out[key].dtype, torch.float32)       # bf16 weights: add in fp32; fp64 stays fp64
        out[key] = (out[key].to(acc) + delta.to(acc)).to(out[key].dtype)
    return out


def save_model(model: torch.nn.Module, path: str, dtype: torch.dtype | None = None) -> None:
    """save_pretrained as plain transformers safetensors (LoRA merged into the weights); ``dtype``:
    floating tensors written in that dtype (None: as stored, e.g. fp32 masters beside a bf16 base)."""
    os.makedirs(path, exist_ok=True)
    base = model.get_base_model() if is_peft(model) else model
    state = merged_state_dict(model) if is_peft(model) else None
    if dtype is not None:
        state = cast_state(state if state is not None else model.state_dict(), dtype)
    base.save_pretrained(path, state_dict=state)


def cast_state(state: dict, dtype: torch.dtype) -> dict:
    """A state dict with its floating tensors in ``dtype`` (integer buffers untouched)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def decode_completions(tokenizer, ids: torch.Tensor, mask: torch.Tensor | None, eos_ids) -> list[str]:
    """(N, C) ids → N strings: tokens where mask is 1 (or up to the first EOS), special tokens dropped."""
    ids_l = ids.tolist()
    if mask is not None:
        rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids_l, mask.tolist())]
    else:
        eos = set(eos_ids)
        rows = []
        for r in ids_l:
            cut = next((j for j, t in enumerate(r) if t in eos), len(r))
            rows.append(r[:cut])
    vocab = len(tokenizer)
    rows = [[t for t in r if 0 <= t < vocab] for r in rows]  # lm_head padding rows have no text
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
