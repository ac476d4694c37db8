"""Qwen2-VL (and Qwen2.5-VL) as a ``grpo_core.policy.Policy``.

The engine sees three paths through the model, all built from the same two pieces — prompt
embeddings with image features scattered in (``_prompt_embeds``) and the language model run on
embeddings with explicit 3-D mRoPE positions (``_lm``):

- rollout: ``prefill`` (B prompts, vision tower once) → ``expand(G)`` (KV cache repeated) →
  ``decode_step`` (one token for N rows: embedding lookup, decoder layers, lm_head on one position);
- training: ``completion_hidden`` (vision tower and language model run each prompt once; the G
  completions attend to its shared K/V: ``grpo_models.prefix_train``; plain fallback: prompt embeddings
  repeated G times, completion embeddings appended, one forward, completion positions kept).

Positions. Qwen2-VL's mRoPE gives image tokens (t, h, w) positions; text after an image continues at
max(previous) + 1, so a prompt of real length L ends at position L − 1 + δ (δ = rope delta ≤ 0).
Completion token j therefore sits at L + δ + j on all three axes. ``encode`` computes prompt
positions once with ``get_rope_index``; no step ever recomputes them.

Deviations from ``model.generate`` / ``model(**inputs)``: none in the math (tests compare logits to
the HF full forward). We bypass ``Qwen2VLProcessor`` (needs torchvision) — see ``qwen2_vl_encode``.
"""

from __future__ import annotations

import os
import weakref
from contextlib import AbstractContextManager
from typing import Sequence

import torch
from grpo_models.qwen2_vl_encode import (
    VISION_TOKENS,
    Qwen2VLEncoded,
    expand_image_pads,
    left_pad,
    load_image,
    process_images,
    render_prompt,
)

from grpo_core.policy import Prompt
from grpo_models import lean_step, prefix_decode, prefix_train, step_runner, vision_patch
from grpo_models import policy_utils as pu


class Qwen2VLPolicy:
    """A Qwen2-VL / Qwen2.5-VL checkpoint wrapped for GRPO. Build with ``from_pretrained``."""

    def __init__(self, model, tokenizer, image_processor, *, template: str = "chat",
                 max_prompt_len: int | None = None):
        self.model = model                                    # HF module, or its peft wrapper with LoRA
        self._hf = model.get_base_model() if pu.is_peft(model) else model
        core = self._hf.model
        if not (hasattr(core, "visual") and hasattr(core, "language_model")):
            raise TypeError(f"{type(self._hf).__name__} is not a Qwen2-VL-style model (no .model.visual / "
                            ".model.language_model)")
        self._core, self._lm, self._head = core, core.language_model, self._hf.lm_head
        vision_patch.use_gemm_patch_embed(core.visual)   # patch Conv3d as its GEMM, same weights
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.max_prompt_len = template, max_prompt_len
        self.chat_template = None if tokenizer.chat_template else _fallback_chat_template()

        cfg = self._hf.config
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision_config.spatial_merge_size
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.eos_token_ids = tuple(sorted({i for i in ids.values() if i is not None and i >= 0}))
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else ids["<|endoftext|>"]
        self.vocab_size = self._head.weight.shape[0]
        self._never = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        self._bias = None

    # ------------------------------------------------------------------ construction / saving
    @classmethod
    def from_pretrained(cls, path: str, *, dtype=None, device=None, template: str = "chat",
                        attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                        lora: dict | None = None, freeze_vision: bool = False, min_pixels: int | None = None,
                        max_pixels: int | None = None,
                        max_prompt_len: int | None = None) -> "Qwen2VLPolicy":
        """Load model + tokenizer + image processor from a local directory (or hub id if cached).

        dtype: None → bf16 on CUDA, fp32 on CPU. attn_implementation: None → flash_attention_2 when
        flash_attn imports (CUDA, 16-bit), else sdpa. lora: peft LoraConfig kwargs (vision tower
        excluded unless ``include_vision=True``). min/max_pixels override the image processor.
        """
        from transformers import (
            AutoModelForImageTextToText,
            AutoTokenizer,
            Qwen2VLImageProcessorPil,
        )

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = pu.default_dtype(dtype, dev)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dt, attn_implementation=pu.pick_attn_implementation(attn_implementation, dev, dt)
        ).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        else:
            image_processor = Qwen2VLImageProcessorPil()
        size = dict(image_processor.size)
        size["shortest_edge"] = min_pixels or size.get("shortest_edge")
        size["longest_edge"] = max_pixels or size.get("longest_edge")
        image_processor.size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
        if freeze_vision:
            model.model.visual.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            model = pu.apply_lora(model, lora)
        return cls(model, tokenizer, image_processor, template=template, max_prompt_len=max_prompt_len,
                   )

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        """Model (safetensors, LoRA merged) + tokenizer + image processor: ``from_pretrained(path)`` round-trips."""
        pu.save_model(self.model, path, dtype)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    # ------------------------------------------------------------------ protocol attributes
    @property
    def device(self) -> torch.device:
        return self._head.weight.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._head.weight                                           # (V, H) live parameter

    @property
    def lm_head_bias(self) -> torch.Tensor:
        """(V,) fp32: −inf on the vision special tokens (never sampled), 0 elsewhere."""
        if self._bias is None or self._bias.device != self.device:
            bias = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
            bias[[i for i in self._never if i is not None and 0 <= i < self.vocab_size]] = float("-inf")
            self._bias = bias
        return self._bias

    def disable_adapters(self) -> AbstractContextManager:
        return pu.disable_adapters(self.model)

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        return pu.decode_completions(self.tokenizer, ids, mask, self.eos_token_ids)

    # ------------------------------------------------------------------ encode
    def encode(self, prompts: Sequence[Prompt]) -> Qwen2VLEncoded:
        """Template + tokenize + image preprocessing for B prompts → ``Qwen2VLEncoded`` on CPU.

        A prompt longer than ``max_prompt_len`` tokens (after image expansion) is an error: row b is
        always prompts[b] (the trainer pairs records and completions by position).
        """
        max_px = self.image_processor.size["longest_edge"]
        images = [[load_image(im, f"prompt {i} image {j}", max_px) for j, im in enumerate(p.images)]
                  for i, p in enumerate(prompts)]
        flat = [im for ims in images for im in ims]
        pixel_values, grid = process_images(self.image_processor, flat)
        per_image = (grid.prod(-1) // self.merge_size**2).tolist() if grid is not None else []

        rows, first = [], 0
        for i, (p, ims) in enumerate(zip(prompts, images)):
            text = render_prompt(self.tokenizer, p.text, len(ims), p.system, self.template, self.chat_template)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(expand_image_pads(ids, self.image_token_id, per_image[first:first + len(ims)], f"prompt {i}"))
            first += len(ims)
        input_ids, attention_mask = left_pad(rows, self.pad_token_id)     # (B, P), (B, P)
        position_ids, rope_deltas = self._rope_index(input_ids, attention_mask, grid)
        enc = Qwen2VLEncoded(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, rope_deltas=rope_deltas,
            num_images=torch.tensor([len(ims) for ims in images], dtype=torch.long),
            prompt_index=torch.arange(len(prompts)), pixel_values=pixel_values, image_grid_thw=grid,
        )
        return self._check_lengths(enc, [len(r) for r in rows])

    def _check_lengths(self, enc: Qwen2VLEncoded, lengths: list[int]) -> Qwen2VLEncoded:
        if self.max_prompt_len is None:
            return enc
        long = [i for i, n in enumerate(lengths) if n > self.max_prompt_len]
        if not long:
            return enc
        i = long[0]
        raise ValueError(f"prompt {i} is {lengths[i]} tokens after image expansion > "
                         f"max_prompt_len={self.max_prompt_len} ({len(long)} prompts too long); "
                         "lower max_pixels, shorten the text, or raise max_prompt_len.")

    @torch.no_grad()
    def _rope_index(self, input_ids, attention_mask, grid):
        """mRoPE positions (3, B, P) and deltas (B, 1) from HF's ``get_rope_index`` (CPU, once per prompt)."""
        mm_types = (input_ids == self.image_token_id).int()               # 1 on image tokens, 0 on text
        pos, deltas = self._core.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid,
                                                attention_mask=attention_mask)
        return pos.long(), deltas.long().view(-1, 1)

    # ------------------------------------------------------------------ shared pieces
    def _prompt_embeds(self, enc: Qwen2VLEncoded) -> torch.Tensor:
        """Token embeddings (B, P, H) with vision-tower features in the ``<|image_pad|>`` slots."""
        embeds = self._lm.embed_tokens(enc.input_ids)                      # (B, P, H)
        if enc.pixel_values is None:
            return embeds
        feats = self._core.get_image_features(enc.pixel_values, enc.image_grid_thw).pooler_output
        feats = torch.cat(list(feats), 0).to(embeds.dtype)                 # (Σ image tokens, H)
        slots = enc.input_ids == self.image_token_id                       # (B, P)
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but {feats.shape[0]} image features: "
                             "input_ids and image_grid_thw are out of step (was the Encoded sliced by hand?)")
        return embeds.masked_scatter(slots.unsqueeze(-1), feats)

    def _logits_last(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden[:, -1]).float()                           # (N, V) fp32

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def prefill(self, enc: Qwen2VLEncoded) -> tuple[torch.Tensor, pu.DecodeState]:
        enc = enc.to(self.device)
        out = self._lm(inputs_embeds=self._prompt_embeds(enc), attention_mask=enc.attention_mask,
                       position_ids=enc.position_ids, use_cache=True)
        state = pu.DecodeState(
            cache=pu.cache_of(out), attention_mask=enc.attention_mask,
            next_position=enc.prompt_lengths + enc.rope_deltas[:, 0],      # (B,) = L + δ
            rope_deltas=enc.rope_deltas,
        )
        return self._logits_last(out.last_hidden_state), state

    def expand(self, state: pu.DecodeState, group_size: int):
        """B → B·G rows. Where supported, the prompt KV stays one copy per prompt, shared by its G
        rows (``grpo_models.prefix_decode``: the decode step then reads it once per group)."""
        if prefix_decode.supported(self._lm) and state.attention_mask.shape[1] == state.cache.get_seq_length():
            return prefix_decode.from_prefill(state.cache, state.attention_mask, state.next_position, group_size)
        return pu.expand_state(state, group_size)

    def plan_decode(self, state, capacity: int, graphs: str = "auto", compile: str = "auto"):
        """Size the decode buffers for ``capacity`` steps, once, and pick how steps run
        (``rollout.graphs`` / ``rollout.compile``: ``grpo_models.step_runner``). Optional protocol
        method; a state it cannot plan (not shared-prefix) is returned unchanged."""
        if not isinstance(state, prefix_decode.PrefixDecodeState):
            return state
        prefix_decode.reserve(state, capacity)
        if os.environ.get("GRPO_LEAN_DECODE", "1") != "0":    # 0: the modules (the reference)
            state.lean = lean_step.prepare(self._lm, state.next_position, capacity)
        return self._with_runner(state, step_runner.resolve(graphs, compile, self.device))

    def compact_state(self, state, prompts: torch.Tensor, rows: torch.Tensor, group_size: int):
        """Keep prompts (b',) and rows (b'·g') of a decode state (finished rows leave the batch);
        None where this state cannot be compacted. Optional protocol method."""
        if not isinstance(state, prefix_decode.PrefixDecodeState):
            return None
        new = prefix_decode.select(state, prompts.to(self.device), rows.to(self.device), group_size)
        return self._with_runner(new, state.runner.mode if state.runner is not None else None)

    def _with_runner(self, state, mode: str | None):
        """Attach a fixed-shape step runner; it holds the state weakly (no state ↔ runner cycle, so
        a finished chunk's K/V buffers and graph are freed at once, not at the next gc)."""
        if mode is not None:
            layers, ref = prefix_decode.decode_layers_static, weakref.ref(state)
            step = lambda tok: self._logits_last(layers(self._lm, ref(), tok))  # noqa: E731
            state.runner = step_runner.StepRunner(step, mode, [state.column, state.next_position])
        return state

    @torch.no_grad()
    def decode_step(self, state, tokens: torch.Tensor):
        n = tokens.shape[0]
        if isinstance(state, prefix_decode.PrefixDecodeState):
            if state.runner is not None:                                   # graph / compiled
                logits = state.runner(tokens)
                state.length += 1
                return logits, state
            return self._logits_last(prefix_decode.decode_layers(self._lm, state, tokens)), state
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(n, 1)], 1)  # (N, T+1)
        pos = state.next_position.view(1, n, 1).expand(3, n, 1)                           # (3, N, 1)
        out = self._lm(input_ids=tokens.view(n, 1), attention_mask=mask, position_ids=pos,
                       **pu.cache_arg(self._lm, state.cache), use_cache=True)
        new = pu.DecodeState(pu.cache_of(out), mask, state.next_position + 1, state.rope_deltas)
        return self._logits_last(out.last_hidden_state), new

    # ------------------------------------------------------------------ training
    def completion_hidden(self, enc: Qwen2VLEncoded, completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, group_size: int) -> torch.Tensor:
        """Teacher-forced hidden states (N, C, H); hidden[:, j] predicts completion_ids[:, j].

        Vision tower and prompt embeddings run once per prompt (B), then repeat G times, so
        gradients of all G rows accumulate into the shared image features. Completion positions
        attend causally to every earlier completion token, as in the rollout (the mask only decides
        which positions count in the loss; tokens after EOS never influence earlier positions).
        Out-of-vocabulary ids (e.g. -100 padding) are read as pad_token_id.

        Where ``prefix_train.supported`` (Qwen2-VL / Qwen2.5-VL layers, not FSDP2-wrapped) the language
        model also runs each prompt once and shares its K/V with the G completions
        (``grpo_models.prefix_train``); ``GRPO_PREFIX_TRAIN=0`` forces the plain path below.
        """
        enc = enc.to(self.device)
        b, p = enc.input_ids.shape
        n, c = completion_ids.shape
        if n != b * group_size:
            raise ValueError(f"completion_ids has {n} rows but enc has {b} prompts × group_size {group_size}")
        ids = completion_ids.to(self.device)
        ids = ids.masked_fill((ids < 0) | (ids >= self.vocab_size), self.pad_token_id)  # e.g. -100 padding
        start = enc.prompt_lengths + enc.rope_deltas[:, 0]                           # (B,) = L + δ
        if c > 0 and prefix_train.supported(self._lm):                                # prompt once per group
            return prefix_train.shared_prefix_hidden(self._lm, self._prompt_embeds(enc), enc.attention_mask,
                                                     enc.position_ids, ids[:, :-1], start, group_size)
        prompt = self._prompt_embeds(enc).repeat_interleave(group_size, 0)          # (N, P, H)
        embeds = torch.cat([prompt, self._lm.embed_tokens(ids)], 1)                  # (N, P+C, H)
        mask = torch.cat([enc.attention_mask.repeat_interleave(group_size, 0),
                          enc.attention_mask.new_ones(n, c)], 1)                     # (N, P+C)
        comp_pos = start[:, None] + torch.arange(c, device=self.device)              # (B, C)
        pos = torch.cat([enc.position_ids, comp_pos.expand(3, b, c)], -1)            # (3, B, P+C)
        pos = pos.repeat_interleave(group_size, 1)                                   # (3, N, P+C)
        hidden = self._lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                          use_cache=False).last_hidden_state                         # (N, P+C, H)
        # position P-1 (last prompt token) predicts completion token 0; P+j-1 predicts token j
        return hidden[:, p - 1: p - 1 + c]                                           # (N, C, H)


def _fallback_chat_template() -> str:
    """Qwen chat format for checkpoints whose tokenizer ships no chat template."""
    return pu.CHAT_TEMPLATE
