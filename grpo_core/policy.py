"""What the engine needs from a policy (text-only LM or VLM), and nothing more.

The rollout engine, the trainer and the evaluator talk to a policy only through this protocol;
the engine never imports a policy implementation (the Qwen2-VL one lives in the policies layer,
the ``models/`` folder, which imports this protocol; the app layer picks one by name).

Data flow and shapes (B prompts, G samples per prompt, N = B·G sequences, P prompt length,
C completion length, H hidden size, V vocab size):

    prompts ──encode──► Encoded (input_ids (B, P) left-padded, attention_mask (B, P), extras:
                        pixel_values / image_grid_thw kept in per-image order)
    Encoded ──prefill──► last logits (B, V) fp32, DecodeState for B rows
    DecodeState ──expand(G)──► DecodeState for N rows, prompt-major (row i → prompt i // G)
    DecodeState, tokens (N,) ──decode_step──► logits (N, V) fp32, DecodeState (one token longer)
    Encoded, completion ids (N, C) ──completion_hidden──► hidden (N, C, H):
        row j is the last hidden state that *predicts* completion token j (the prompt's last
        position for j = 0, completion token j − 1 after that), so
        log p(c_j) = log_softmax((hidden[:, j] @ lm_head_weight.T + lm_head_bias) / T)[c_j].

Decode state: opaque to the engine. The Qwen2-VL policy uses a small dataclass (cache: a
transformers ``DynamicCache``; attention_mask (N, T) growing one 1-column per step; next_position
(N,) = real prompt length + steps so far + mRoPE delta; rope_deltas (N, 1)). ``expand`` and
``decode_step`` update the cache in place: after a call, only the returned state is valid.
``prefill`` / ``decode_step`` run without autograd and return raw logits (``lm_head_bias`` not
added); ``completion_hidden`` is differentiable (it is the training forward).

``lm_head_bias`` is (V,) fp32 with −inf at token ids the sampler must never emit (a VLM's
vision special tokens) and 0 elsewhere, or None. The sampler adds it to the decode logits and
the trainer passes it to the fused loss, so sampling and training score the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol, Sequence, runtime_checkable

import torch

PROMPT_WRAPPERS = ("chat", "plain")   # how a policy wraps Prompt.text: chat template (instruct) or bare (base)


@dataclass
class Prompt:
    """One prompt: the user-turn text (already holding the task instructions) and its images.

    The policy wraps ``text`` in its own template (chat template for instruct models, a plain
    template for base models) and inserts one image placeholder per image before the text.
    """

    text: str
    images: list = field(default_factory=list)   # PIL images (RGB after encode), in order
    system: str | None = None                     # optional system turn (chat template only)


@runtime_checkable
class Encoded(Protocol):
    """A batch of encoded prompts. Implementations are dataclasses of tensors."""

    input_ids: torch.Tensor        # (B, P) int64, left-padded
    attention_mask: torch.Tensor   # (B, P) int64, 0 on left padding

    def select(self, prompt_idx: Sequence[int]) -> "Encoded":
        """Sub-batch of prompts (repeats allowed), keeping every per-image tensor aligned with its prompt."""
        ...

    def to(self, device) -> "Encoded": ...


@runtime_checkable
class Policy(Protocol):
    model: torch.nn.Module                 # the trainable module (parameters, train/eval, grads)
    eos_token_ids: tuple[int, ...]         # any of these ends a completion
    pad_token_id: int                      # fills completions after EOS
    vocab_size: int                        # V: rows of lm_head_weight

    @property
    def device(self) -> torch.device: ...

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection (a live parameter: gradients flow into it)."""
        ...

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        """(V,) fp32 additive mask (−inf on never-sampled ids) or None."""
        ...

    def encode(self, prompts: Sequence[Prompt]) -> Encoded:
        """Template, tokenize and preprocess images for B prompts → Encoded (B rows, on CPU).

        Row b is prompts[b], always: the trainer pairs records and completions by position, so
        a prompt the policy cannot take (e.g. over its max_prompt_len) is an error, never dropped.
        """
        ...

    def prefill(self, enc: Encoded) -> tuple[torch.Tensor, Any]:
        """Run the prompts once → (next-token logits (B, V) fp32, decode state for B rows)."""
        ...

    def expand(self, state: Any, group_size: int) -> Any:
        """Fan a B-row decode state out to B·G rows (prompt-major, repeat_interleave)."""
        ...

    def decode_step(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Append tokens (N,) to every row → (next-token logits (N, V) fp32, new state)."""
        ...

    def completion_hidden(
        self, enc: Encoded, completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        """Teacher-forced forward of prompt + completion → hidden (N, C, H) aligned as above.

        ``enc`` has B rows; ``completion_ids`` has N = B·G rows in prompt-major order. Each prompt
        (and its images) is encoded by the vision tower once and shared by its G rows.
        """
        ...

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Completion ids (N, C) → texts (special tokens removed, stops at mask)."""
        ...

    def disable_adapters(self) -> ContextManager:
        """Context in which the policy acts as its reference model (LoRA adapters off).

        Policies without adapters raise NotImplementedError; the trainer then keeps a frozen copy.
        """
        ...

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Write the policy so its ``from_pretrained(path)`` loads it; ``dtype``: floating weights cast
        to it on the way out (the training run keeps fp32 masters; an export may be bf16)."""
        ...
