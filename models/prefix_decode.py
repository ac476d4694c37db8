"""Decode with each prompt's KV cache shared by the G samples of its group (decode-only path).

After prefill the prompt keys/values stay as B rows; the N = B·G sampled rows append their own
tokens to per-row buffers. A decode token's attention over [its prompt ; its own completion] is
one softmax over both score blocks:

    s_pre = q · K_prompt(b)ᵀ · scale      the G·r queries of group b vs its prompt keys: one matmul
    s_own = q · K_own(i)ᵀ · scale         (r = query heads per KV head, GQA)
    p = softmax([s_pre ; s_own]),   out = p_pre · V_prompt(b) + p_own · V_own(i)

This is the attention over a fanned-out cache, computed differently (Hydragen-style shared
prefix): the prompt K/V are read once per group instead of G times per step and never copied G
times (prompt KV memory is B rows, not B·G). On the CPU rollout bench, reading the G copies of
the prompt KV was the largest cost of a decode step.

Two ways to run a step, the same math:
  - eager (``decode_layers``, the reference): attends to the stored columns as a slice.
  - fixed shapes (``decode_layers_static``): the completion K/V buffers hold the whole budget
    (``reserve``), the new column is written at a device-side index and the own block is masked
    (column j counts iff j ≤ length), positions and length advance in place. Nothing depends on a
    host value, so ``StepRunner`` can replay it as one CUDA graph per batch shape, or compile it.
Finished rows leave the batch through ``select`` (whole groups dropped, the survivors' rows kept).
Either way the layers run as the modules (the reference, below) or, once a state is planned, as
plain calls on weights prepared for the chunk (``lean_step``: fused projections, rotary tables).

Scope: Qwen2-VL and Qwen2.5-VL text decoder layers (the same layout: pre-norm, q/k/v/o
projections, rotary from the model's own ``apply_rotary_pos_emb``, MLP), whatever attention
implementation the model was loaded with (the attention here is its own); the layers' modules
are called as they are, so LoRA adapters apply.
The policy uses this path only where it is known to match (``supported``); tests check greedy
decoding against HF ``generate`` token for token and log-probs against a teacher-forced forward.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from . import lean_step


@dataclass
class PrefixDecodeState:
    """Decode state for N = B·G rows whose first P positions (the prompt) are shared per group."""

    prefix_k: list            # per layer (B, kvh, P, d): prompt keys, one copy per prompt
    prefix_v: list            # per layer (B, kvh, P, d)
    prefix_mask: torch.Tensor  # (B, 1, 1, P) bool: False on left padding
    own_k: list               # per layer (N, kvh, cap, d): buffers for each row's completion keys
    own_v: list               # per layer (N, kvh, cap, d)
    length: int               # completion tokens stored in own_k / own_v
    next_position: torch.Tensor  # (N,) int64 rope position of the next token (L + δ + step)
    group_size: int           # G (rows per prompt; after ``select``, slots per kept prompt)
    column: torch.Tensor | None = None  # (1,) int64 on device: ``length`` for the fixed-shape step
    runner: object | None = None  # step_runner.StepRunner: how steps run (None: eager reference)
    prefix_bias: torch.Tensor | None = None  # (B·kvh, 1, P) fp32 0 / −inf: mask added to scores
    lean: object | None = None    # lean_step.LeanWeights: layers as plain calls (None: the modules)

    def __post_init__(self):
        if self.prefix_bias is None:
            self.prefix_bias = prefix_bias(self.prefix_mask, self.prefix_k[0].shape[1])

    def __len__(self) -> int:
        return self.next_position.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, P + length) int64, as ``DecodeState.attention_mask`` (built on demand; decode does
        not use it)."""
        prompt = self.prefix_mask[:, 0, 0].long().repeat_interleave(self.group_size, 0)  # (N, P)
        return torch.cat([prompt, prompt.new_ones(prompt.shape[0], self.length)], 1)


_TEXT_MODELS = ("Qwen2VLTextModel", "Qwen2_5_VLTextModel")


def supported(lm) -> bool:
    """True for a Qwen2-VL / Qwen2.5-VL text model with plain full attention (the layout coded
    below)."""
    return (type(lm).__name__ in _TEXT_MODELS and not getattr(lm, "has_sliding_layers", False)
            and all(hasattr(layer.self_attn, "q_proj") for layer in lm.layers))


def from_prefill(cache, attention_mask: torch.Tensor, next_position: torch.Tensor, group_size: int,
                 spare: int = 64) -> PrefixDecodeState:
    """B-row prefill cache + prompt mask (B, P) → a state for B·G rows (prompt-major)."""
    keys = [layer.keys.contiguous() for layer in cache.layers]          # (B, kvh, P, d) each
    values = [layer.values.contiguous() for layer in cache.layers]      # (a no-op for HF's cache)
    n = keys[0].shape[0] * group_size
    own = lambda t: t.new_empty(n, t.shape[1], spare, t.shape[3])  # noqa: E731  (N, kvh, cap, d)
    return PrefixDecodeState(
        prefix_k=keys, prefix_v=values, prefix_mask=attention_mask.bool()[:, None, None, :],
        own_k=[own(k) for k in keys], own_v=[own(v) for v in values], length=0,
        next_position=next_position.repeat_interleave(group_size), group_size=group_size,
    )


def reserve(state: PrefixDecodeState, capacity: int) -> PrefixDecodeState:
    """Size the completion buffers for ``capacity`` decode steps, once (before the first step)."""
    if state.length:
        raise ValueError(f"prefix_decode.reserve: the state already holds {state.length} steps; "
                         "reserve right after expand")
    cap = max(1, capacity)
    # zeros, not empty: a masked column has probability 0, and 0 · garbage (NaN) would be NaN
    state.own_k = [k.new_zeros(*k.shape[:2], cap, k.shape[3]) for k in state.own_k]
    state.own_v = [v.new_zeros(*v.shape[:2], cap, v.shape[3]) for v in state.own_v]
    state.column = torch.zeros(1, dtype=torch.long, device=state.next_position.device)
    return state


def select(state: PrefixDecodeState, prompts: torch.Tensor, rows: torch.Tensor, group_size: int
           ) -> PrefixDecodeState:
    """Keep prompts (b',) and rows (b'·g',) of the state: row slot j of the result is old row
    rows[j] and must belong to prompt prompts[j // g'] (prompt-major, g' = ``group_size``).
    K/V are copied into fresh (smaller) buffers; the runner is not kept (shapes changed)."""
    pick = lambda xs, idx: [x.index_select(0, idx) for x in xs]          # noqa: E731
    return PrefixDecodeState(
        prefix_k=pick(state.prefix_k, prompts), prefix_v=pick(state.prefix_v, prompts),
        prefix_mask=state.prefix_mask.index_select(0, prompts),
        own_k=pick(state.own_k, rows), own_v=pick(state.own_v, rows), length=state.length,
        next_position=state.next_position.index_select(0, rows), group_size=group_size,
        column=None if state.column is None else state.column.clone(), lean=state.lean,
    )


def _append(state: PrefixDecodeState, i: int, k: torch.Tensor, v: torch.Tensor):
    """Write this step's (N, kvh, 1, d) key/value at column ``length`` → the stored columns (views).

    A full buffer (a caller that did not ``reserve`` the budget) moves to one 1.25× larger."""
    t = state.length
    if t >= state.own_k[i].shape[2]:
        extra = max(64, t // 4)
        grow = lambda b: torch.cat([b, b.new_empty(*b.shape[:2], extra, b.shape[3])], 2)  # noqa
        state.own_k[i], state.own_v[i] = grow(state.own_k[i]), grow(state.own_v[i])
    state.own_k[i][:, :, t:t + 1] = k
    state.own_v[i][:, :, t:t + 1] = v
    return state.own_k[i][:, :, :t + 1], state.own_v[i][:, :, :t + 1], None   # (N, kvh, t+1, d)


def _write_static(state: PrefixDecodeState, i: int, k: torch.Tensor, v: torch.Tensor):
    """Fixed shapes: write at the device-side column, return whole buffers + the own-column mask."""
    state.own_k[i].index_copy_(2, state.column, k.to(state.own_k[i].dtype))   # (N, kvh, cap, d)
    state.own_v[i].index_copy_(2, state.column, v.to(state.own_v[i].dtype))
    cap = state.own_k[i].shape[2]
    valid = torch.arange(cap, device=k.device) <= state.column           # (cap,) j ≤ length
    return state.own_k[i], state.own_v[i], valid.view(1, 1, 1, cap)


def shared_prefix_attention(q, pk, pv, pbias, ok, ov, group_size: int, scale: float,
                            own_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (N, h, 1, d); prompt K/V (B, kvh, P, d) + additive bias (B·kvh, 1, P) (``prefix_bias``);
    own K/V (N, kvh, t, d) [+ own_mask (1, 1, 1, t), False: column not written yet] → (N, h·d)."""
    if torch.is_autocast_enabled(q.device.type):                         # fp32 scores: no autocast
        with torch.autocast(q.device.type, enabled=False):
            return _shared_prefix_attention(q, pk, pv, pbias, ok, ov, group_size, scale, own_mask)
    return _shared_prefix_attention(q, pk, pv, pbias, ok, ov, group_size, scale, own_mask)


def prefix_bias(pmask: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Bool mask (B, 1, 1, P) → additive fp32 bias (B·kvh, 1, P): 0 where attended, −inf on left
    padding, one row per (prompt, KV head): the batch layout of the prompt block's scores."""
    b, p = pmask.shape[0], pmask.shape[-1]
    bias = torch.zeros((b, kv_heads, 1, p), dtype=torch.float32, device=pmask.device)
    return bias.masked_fill_(~pmask.view(b, 1, 1, p), float("-inf")).view(b * kv_heads, 1, p)


def _shared_prefix_attention(q, pk, pv, pbias, ok, ov, group_size, scale, own_mask):
    """Scores and softmax in the group layout (B·kvh, G·r, ·), as batched 3-D GEMMs: the large
    prompt block needs no transpose (its bias added by the GEMM itself); only the small own block
    (t columns) and the (N, h, d) output change layout.

    Scores, softmax and outputs are ≥ fp32 (as flash / sdpa kernels). A bf16 / fp16 cache on a GPU
    is read as stored (``_direct``): GEMMs with fp32 results, the probabilities cast to the cache's
    dtype for p·V (as flash attention and HF's eager attention do). Elsewhere the operands are
    cast to fp32 first, which for the fixed-shape step's whole-budget own K/V buffers would write
    and read an fp32 copy of the cache every layer and step: ~2× the bytes a 2B decode step must
    move (bench/decode_bound.py)."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    n, h, _, d = q.shape
    b, kvh, p, _ = pk.shape
    g, r, t = group_size, h // kvh, ok.shape[2]                          # head j: KV head j // r
    direct = _direct(q, pk, ok)
    if direct:                                         # read as stored; scale the fp32 scores
        mm, kv, q = _bmm_f32, (lambda x: x), q.contiguous()
    else:                                              # fp32 operands; q scaled once (exact-ish)
        mm, kv, q = torch.bmm, (lambda x: _as(x, acc)), _as(q, acc) * scale
    q_grp = q.view(b, g, kvh, r, d).transpose(1, 2).reshape(b * kvh, g * r, d)  # (B·kvh, G·r, d)
    k_pre = kv(pk).view(b * kvh, p, d).transpose(1, 2)                   # (B·kvh, d, P)
    k_own = kv(ok).reshape(n * kvh, t, d).transpose(1, 2)                # (N·kvh, d, t)
    s_own = mm(q.view(n * kvh, r, d), k_own)                             # (N·kvh, r, t)
    if direct:                                   # s_pre (B·kvh, G·r, P) + bias, both scaled here
        s_pre, s_own = torch.add(pbias, mm(q_grp, k_pre), alpha=scale), s_own.mul_(scale)
    else:                                        # the bias added by the GEMM (q already scaled)
        s_pre = torch.baddbmm(_as(pbias, acc), q_grp, k_pre)
    if own_mask is not None:
        s_own = s_own.masked_fill_(~own_mask.view(1, 1, t), float("-inf"))
    s_own = s_own.view(b, g, kvh, r, t).transpose(1, 2).reshape(b * kvh, g * r, t)  # group layout
    probs = torch.softmax(torch.cat([s_pre, s_own], -1), dim=-1)         # (B·kvh, G·r, P+t)
    if direct:
        probs = probs.to(pv.dtype)
    o_pre = mm(probs[..., :p], kv(pv).view(b * kvh, p, d))               # (B·kvh, G·r, d)
    p_own = probs[..., p:].reshape(b, kvh, g, r, t).transpose(1, 2).reshape(n * kvh, r, t)
    o_own = mm(p_own, kv(ov).reshape(n * kvh, t, d))                     # (N·kvh, r, d)
    out = torch.add(o_own.view(b, g, kvh, r, d), o_pre.view(b, kvh, g, r, d).transpose(1, 2))
    return _as(out.view(n, h * d), dtype)                                # heads in HF order


_LOW = (torch.bfloat16, torch.float16)


def _direct(q, pk, ok) -> bool:
    """A bf16 / fp16 cache on a GPU whose torch has fp32-result GEMMs (``bmm(..., out_dtype)``)."""
    return (q.device.type == "cuda" and q.dtype in _LOW and pk.dtype == ok.dtype == q.dtype
            and _out_dtype_gemms(q.device, q.dtype))


@functools.cache
def _out_dtype_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """Probed once per device and dtype, outside any graph capture (a graph's first step is a plain
    warm-up run), on the operand layouts the attention uses (a column slice on the left, a
    transposed view on the right, and plain ones). An error or a wrong result: the cast path."""
    a = torch.linspace(-2, 2, 2 * 3 * 12, device=device).view(2, 3, 12).to(dtype)
    b = torch.linspace(3, -1, 2 * 5 * 8, device=device).view(2, 5, 8).to(dtype)
    pairs = [(a[..., :8], b.transpose(1, 2)),
             (a[..., :8].contiguous(), b.transpose(1, 2).contiguous())]
    try:
        got = [_bmm_f32(x, y) for x, y in pairs]
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    want = torch.bmm(a[..., :8].float(), b.float().transpose(1, 2))   # bf16 · bf16 in fp32
    close = lambda g: torch.allclose(g, want, rtol=1e-5, atol=1e-5)  # noqa: E731
    return all(g.dtype == torch.float32 and close(g) for g in got)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched GEMM of bf16 / fp16 operands with an fp32 result (fp32 accumulation)."""
    return torch.bmm(a, b, out_dtype=torch.float32)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the dispatcher call when it is one already (a decode step makes
    dozens of these no-op casts: each costs more than the check)."""
    return x if x.dtype == dtype else x.to(dtype)


@torch.no_grad()
def decode_layers(lm, state: PrefixDecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens (N,) through ``lm``'s decoder layers → last hidden (N, 1, H); appends to the state."""
    if state.lean is not None and state.length > state.lean.steps:     # past the planned budget
        state.lean = None                                                # (rotary tables): modules
    hidden = _layers(lm, state, tokens, _append)
    state.length += 1
    state.next_position = state.next_position + 1
    return hidden


@torch.no_grad()
def decode_layers_static(lm, state: PrefixDecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """``decode_layers`` with fixed shapes (needs ``reserve``): every update in place, no host value
    read, so a CUDA graph can replay it. The caller advances ``state.length`` (a host int)."""
    hidden = _layers(lm, state, tokens, _write_static)
    state.column.add_(1)
    state.next_position.add_(1)
    return hidden


def _layers(lm, state: PrefixDecodeState, tokens: torch.Tensor, write) -> torch.Tensor:
    """The decoder layers for one token per row; ``write(state, i, k, v)`` stores layer i's K/V and
    returns (own K, own V, own mask or None) to attend to. With ``state.lean`` the same math runs
    as plain calls on prepared weights (``lean_step``); below, the modules (the reference)."""
    if state.lean is not None:
        return lean_step.layers(state.lean, state, tokens, write, shared_prefix_attention)
    n = tokens.shape[0]
    rotate = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    cfg = lm.config
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    hidden = lm.embed_tokens(tokens.view(n, 1))                          # (N, 1, H)
    pos = state.next_position.view(1, n, 1).expand(3, n, 1)      # (3, N, 1) text token: t = h = w
    cos, sin = lm.rotary_emb(hidden, pos)                                # (N, 1, d) each
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)                                # (N, 1, H)
        d = attn.head_dim
        q = attn.q_proj(x).view(n, 1, nh, d).transpose(1, 2)             # (N, nh, 1, d)
        k = attn.k_proj(x).view(n, 1, kvh, d).transpose(1, 2)            # (N, kvh, 1, d)
        v = attn.v_proj(x).view(n, 1, kvh, d).transpose(1, 2)
        q, k = rotate(q, k, cos, sin)
        ok, ov, own_mask = write(state, i, k, v)
        o = shared_prefix_attention(q, state.prefix_k[i], state.prefix_v[i], state.prefix_bias,
                                    ok, ov, state.group_size, attn.scaling, own_mask)  # (N, nh·d)

        hidden = hidden + attn.o_proj(o.view(n, 1, nh * d))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return lm.norm(hidden)                                               # (N, 1, H)
