"""A text-only causal LM (Qwen2ForCausalLM and kin) as a ``grpo_core.policy.Policy``.

Same protocol and state as ``Qwen2VLPolicy`` minus images: ``Prompt.images`` must be empty.
Positions are 1-D: a left-padded row's real tokens sit at 0 … L−1 (what ``generate`` does with
``attention_mask.cumsum(-1) − 1``), completion token j at L + j. ``Encoded.position_ids`` is
(1, B, P) and ``rope_deltas`` is 0, so the rollout state has the same fields as the VLM's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch
from grpo_models.qwen2_vl_encode import Qwen2VLEncoded, left_pad

from grpo_core.policy import Prompt
from grpo_models import policy_utils as pu

TextEncoded = Qwen2VLEncoded  # pixel_values / image_grid_thw stay None


class TextLMPolicy:
    """A causal LM checkpoint wrapped for GRPO (text prompts only). Build with ``from_pretrained``."""

    def __init__(self, model, tokenizer, *, template: str = "chat",
                 max_prompt_len: int | None = None):
        if template not in ("chat", "plain"):
            raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
        self.model = model
        self._hf = model.get_base_model() if pu.is_peft(model) else model
        self._body, self._head = self._hf.model, self._hf.lm_head
        self.tokenizer = tokenizer
        self.template, self.max_prompt_len = template, max_prompt_len
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        eos = [i for i in eos if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
        self.eos_token_ids = tuple(sorted(set(eos) or {tokenizer.eos_token_id}))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.vocab_size = self._head.weight.shape[0]

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, device=None, template: str = "chat",
                        attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                        lora: dict | None = None,
                        max_prompt_len: int | None = None) -> "TextLMPolicy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = pu.default_dtype(dtype, dev)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, attn_implementation=pu.pick_attn_implementation(attn_implementation, dev, dt)
        ).to(dev)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model = pu.apply_lora(model, lora)
        return cls(model, AutoTokenizer.from_pretrained(path), template=template,
                   max_prompt_len=max_prompt_len)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        pu.save_model(self.model, path, dtype)
        self.tokenizer.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self._head.weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._head.weight                                    # (V, H)

    @property
    def lm_head_bias(self) -> None:
        return None                                                 # nothing is forbidden in a text model

    def disable_adapters(self) -> AbstractContextManager:
        return pu.disable_adapters(self.model)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        return pu.decode_completions(self.tokenizer, ids, mask, self.eos_token_ids)

    # ------------------------------------------------------------------ encode
    def _render(self, p: Prompt) -> str:
        if self.template == "plain":
            return (f"{p.system}\n" if p.system else "") + p.text + "\n"
        messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
            {"role": "user", "content": p.text}]
        if self.tokenizer.chat_template is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      chat_template=pu.CHAT_TEMPLATE)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: Sequence[Prompt]) -> TextEncoded:
        for i, p in enumerate(prompts):
            if p.images:
                raise ValueError(f"prompt {i} has {len(p.images)} images but TextLMPolicy is text-only; "
                                 "use grpo_models.qwen2_vl.Qwen2VLPolicy for image prompts")
        rows = [self.tokenizer(self._render(p), add_special_tokens=False)["input_ids"] for p in prompts]
        # row b is prompts[b]: a long prompt is an error, never dropped
        long = [i for i, r in enumerate(rows) if self.max_prompt_len and len(r) > self.max_prompt_len]
        if long:
            raise ValueError(f"prompt {long[0]} is {len(rows[long[0]])} tokens > max_prompt_len="
                             f"{self.max_prompt_len}; shorten it or raise max_prompt_len")
        input_ids, mask = left_pad(rows, self.pad_token_id)                      # (B, P)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[None]                  # (1, B, P)
        b = len(rows)
        return TextEncoded(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                           rope_deltas=torch.zeros(b, 1, dtype=torch.long), num_images=torch.zeros(b, dtype=torch.long),
                           prompt_index=torch.arange(b))

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def prefill(self, enc: TextEncoded) -> tuple[torch.Tensor, pu.DecodeState]:
        enc = enc.to(self.device)
        out = self._body(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         position_ids=enc.position_ids[0], use_cache=True)
        state = pu.DecodeState(pu.cache_of(out), enc.attention_mask, enc.prompt_lengths.clone(),
                               enc.rope_deltas)
        return self._head(out.last_hidden_state[:, -1]).float(), state   # (B, V) fp32

    def expand(self, state: pu.DecodeState, group_size: int) -> pu.DecodeState:
        return pu.expand_state(state, group_size)

    @torch.no_grad()
    def decode_step(self, state: pu.DecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, pu.DecodeState]:
        n = tokens.shape[0]
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(n, 1)], 1)  # (N, T+1)
        out = self._body(input_ids=tokens.view(n, 1), attention_mask=mask,
                         position_ids=state.next_position.view(n, 1),
                         **pu.cache_arg(self._body, state.cache), use_cache=True)
        new = pu.DecodeState(pu.cache_of(out), mask, state.next_position + 1, state.rope_deltas)
        return self._head(out.last_hidden_state[:, -1]).float(), new

    # ------------------------------------------------------------------ training
    def completion_hidden(self, enc: TextEncoded, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                          group_size: int) -> torch.Tensor:
        """hidden (N, C, H), hidden[:, j] predicts completion_ids[:, j] (see ``Qwen2VLPolicy``)."""
        enc = enc.to(self.device)
        b, p = enc.input_ids.shape
        n, c = completion_ids.shape
        if n != b * group_size:
            raise ValueError(f"completion_ids has {n} rows but enc has {b} prompts × group_size {group_size}")
        comp = completion_ids.to(self.device)
        comp = comp.masked_fill((comp < 0) | (comp >= self.vocab_size), self.pad_token_id)
        ids = torch.cat([enc.input_ids.repeat_interleave(group_size, 0), comp], 1)           # (N, P+C)
        mask = torch.cat([enc.attention_mask.repeat_interleave(group_size, 0),
                          enc.attention_mask.new_ones(n, c)], 1)                             # (N, P+C)
        comp_pos = enc.prompt_lengths[:, None] + torch.arange(c, device=self.device)        # (B, C)
        pos = torch.cat([enc.position_ids[0], comp_pos], 1).repeat_interleave(group_size, 0)  # (N, P+C)
        hidden = self._body(input_ids=ids, attention_mask=mask, position_ids=pos,
                            use_cache=False).last_hidden_state                              # (N, P+C, H)
        return hidden[:, p - 1: p - 1 + c]                                                   # (N, C, H)
