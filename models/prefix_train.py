"""Training forward with each prompt run once and shared by the G completions of its group.

The plain training forward runs the language model over N = B·G rows of [prompt ; completion],
so every prompt token is computed G times, forward and backward. Here, per decoder layer:

    prompt rows (B, P):   h ← h + o_proj(attn(q_p, K_p, V_p; causal, left padding masked))
                          h ← h + mlp(norm(h))                     K_p, V_p: (B, kvh, P, d) after rope
    completion rows (N, C'):
                          s = q_c · [K_p(b) ; K_c(i)]ᵀ · scale     row i of prompt b = i // G
                          out = softmax(s + mask) · [V_p(b) ; V_c(i)]
                          mask: −inf on b's left padding and on own keys after the query (causal)

which is the attention a [prompt ; completion] row computes in the plain forward, restricted to
the completion queries. Gradients reach the prompt (and the vision tower behind its embeddings)
through K_p and V_p from all G rows, once. Only C' = C − 1 completion tokens are fed: hidden[:, 0]
is the prompt's last position (predicts token 0), hidden[:, j] is completion token j − 1; the
last completion token predicts nothing. The last layer runs its prompt queries/MLP on the last
prompt position only (earlier positions of the last layer feed nothing).

Positions. The prompt uses the encoded 3-D mRoPE ids (3, B, P); completion token j of prompt b
sits at L_b + δ_b + j on all three axes (L_b real prompt length, δ_b rope delta), which is what
``get_rope_index`` gives text after the prompt (tests compare with HF's own full forward).

Cost, per layer (B·P prompt tokens, N·C' completion tokens, h heads, d head dim):
    plain:  projections + MLP on N·(P + C) tokens, attention N·h·(P+C)²·d
    here:   projections + MLP on B·P + N·C' tokens, attention B·h·P²·d + completion attention below
Two layouts for the completion attention (``LAYOUT``; "auto" picks grouped when G·C' ≤ P):
  - grouped (Hydragen-like): one sdpa row per group, its G·C' queries against
    [K_p(b) ; all G rows' own keys] with a block-diagonal causal mask: the prompt K/V are used as
    they are (no copy, read once per group); the own part costs G× its need (G·C' keys, not C'),
    hence the rule. Mask (B, 1, G·C', P + G·C').
  - rows: one sdpa row per completion, keys [K_p(b) ; K_c(i)] (N, kvh, P+C', d): the prompt K/V are
    copied per row (a zero-copy grouped matmul would hold N·h·C'·P scores, GBs at C=1024, P=1500).
    Mask (N, 1, C', P+C'), 0.3 GB in bf16 at N=64, C'=1023, P=1500.
Masks are additive (0 / −inf) in the model dtype, built once and shared by all layers. On CUDA a
masked sdpa with GQA falls back to the math kernel, so K/V heads are repeated there (as HF's own
sdpa path does): the saved K/V are then at most the plain path's, while everything else the plain
path saves for the N·P prompt tokens (hidden states, MLP activations) drops to B·P.

Measured (CPU, 1 thread, the demo shape: tiny Qwen2-VL hidden 64 × 2 layers, 8 prompts of 113
tokens, G=16, 5 completion tokens; completion_hidden forward + backward, vision tower included;
median process CPU time):
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_prefix_train
    plain 713 ms, shared/rows 87 ms (8.2x), shared/grouped 77 ms (9.3x)

Scope and fallbacks (``supported``): Qwen2-VL / Qwen2.5-VL text decoder layers with full
attention, whatever attention implementation the model was loaded with (sdpa, eager,
flash_attention_2: this path calls the layers' projections and MLP and does its own attention
through torch's sdpa, which picks its flash / memory-efficient / math kernel itself), no
attention dropout while training, layers not wrapped by FSDP2 (its per-layer unshard hooks run
only through ``layer.__call__``; this path calls the layer's modules). LoRA adapters apply (the
modules are called as they are). Gradient checkpointing is supported: each layer's shared step
(prompt rows + completion rows) is checkpointed as one unit. ``GRPO_PREFIX_TRAIN=0`` in the
environment, or ``grpo_models.prefix_train.ENABLED = False``, forces the plain path.

Deviations from the plain forward: none in the math. Left-padded prompt positions attend to
themselves only (the plain path lets them see the whole row); no real token ever reads them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ENABLED = os.environ.get("GRPO_PREFIX_TRAIN", "1") != "0"   # tests / benches flip this to compare
LAYOUT = "auto"   # completion attention: "rows" | "grouped" | "auto" (grouped when G·C' <= P; see docstring)
_TEXT_MODELS = ("Qwen2VLTextModel", "Qwen2_5_VLTextModel")


def supported(lm) -> bool:
    """True when ``lm``'s layers have the layout coded below and this path is known to match."""
    if not ENABLED or type(lm).__name__ not in _TEXT_MODELS or getattr(lm, "has_sliding_layers", False):
        return False
    if lm.training and getattr(lm.config, "attention_dropout", 0.0):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                                              # torch without FSDP2
        FSDPModule = ()
    return all(hasattr(layer.self_attn, "q_proj") and not isinstance(layer, FSDPModule) for layer in lm.layers)


@dataclass
class _Shared:
    """What every layer needs besides hidden states: rope tables and additive masks."""

    p_cos: torch.Tensor      # (B, P, d) prompt rope
    p_sin: torch.Tensor
    p_bias: torch.Tensor     # (B, 1, P, P) 0 / −inf: causal, left padding masked, diagonal kept
    c_cos: torch.Tensor      # (N, C', d) completion rope
    c_sin: torch.Tensor
    c_bias: torch.Tensor     # rows: (N, 1, C', P + C'); grouped: (B, 1, G·C', P + G·C'); 0 / −inf
    group_size: int
    grouped: bool            # completion attention layout (``_attend_rows`` / ``_attend_grouped``)


def _aligned_full(shape, last: int, dtype, device) -> torch.Tensor:
    """−inf tensor of ``shape + (last,)`` whose rows start on 8-element boundaries (CUDA's
    memory-efficient sdpa otherwise pads the mask again at every call)."""
    padded = -(-last // 8) * 8
    return torch.full((*shape, padded), float("-inf"), dtype=dtype, device=device)[..., :last]


def prompt_bias(prompt_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Prompt mask (B, P) → (B, 1, P, P): causal, left padding masked, each position sees itself."""
    b, p = prompt_mask.shape
    dev, keep = prompt_mask.device, prompt_mask.bool()
    causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()                     # (P, P)
    see = (causal & keep[:, None, :]) | torch.eye(p, dtype=torch.bool, device=dev)     # (B, P, P)
    return _aligned_full((b, 1, p), p, dtype, dev).masked_fill_(see[:, None], 0.0)


def completion_bias(prompt_mask: torch.Tensor, c: int, group_size: int, grouped: bool, dtype) -> torch.Tensor:
    """Completion queries' bias over [prompt ; own keys].

    rows:    (N, 1, c, P + c)        query j of row i sees b's real prompt and its own keys ≤ j
    grouped: (B, 1, G·c, P + G·c)    query (r, j) of group b sees b's real prompt and keys (r, ≤ j)
    """
    b, p = prompt_mask.shape
    g, dev, keep = group_size, prompt_mask.device, prompt_mask.bool()
    causal = torch.ones(c, c, dtype=torch.bool, device=dev).tril()                     # (c, c)
    if grouped:
        own = torch.block_diag(*[causal] * g)                                           # (G·c, G·c)
        see = torch.cat([keep[:, None, :].expand(b, g * c, p), own.expand(b, g * c, g * c)], -1)
        return _aligned_full((b, 1, g * c), p + g * c, dtype, dev).masked_fill_(see[:, None], 0.0)
    see = torch.cat([keep[:, None, :].expand(b, c, p), causal.expand(b, c, c)], -1)      # (B, c, P+c)
    see = see.repeat_interleave(g, 0)                                                   # (N, c, P+c)
    return _aligned_full((b * g, 1, c), p + c, dtype, dev).masked_fill_(see[:, None], 0.0)


def use_grouped(prompt_len: int, c: int, group_size: int) -> bool:
    """Grouped layout when its extra own-key work (G·c keys per query instead of c) stays below the
    prompt's share (G·c ≤ P): then it reads each prompt's K/V once per group with no copy."""
    if LAYOUT not in ("auto", "rows", "grouped"):
        raise ValueError(f"grpo_models.prefix_train.LAYOUT must be 'auto', 'rows' or 'grouped', got {LAYOUT!r}")
    return LAYOUT == "grouped" or (LAYOUT == "auto" and group_size * c <= prompt_len)


def _qkv(attn, x: torch.Tensor, cos, sin, rotate):
    """x (R, T, H) → q (R, h, T, d), k, v (R, kvh, T, d) with rope applied to q and k."""
    r, t, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(r, t, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(r, t, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(r, t, -1, d).transpose(1, 2)
    q, k = rotate(q, k, cos, sin)
    return q, k, v


def _attend(q, k, v, bias, scale: float) -> torch.Tensor:
    """sdpa with an additive mask; GQA natively on CPU, heads repeated elsewhere (see docstring)."""
    r = q.shape[1] // k.shape[1]
    if r > 1 and q.device.type != "cpu":
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)                   # (R, h, S, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=r > 1)
    return out.transpose(1, 2).flatten(2)                                             # (R, T, h·d)


def _attend_rows(q_c, k_c, v_c, k_p, v_p, sh: _Shared, scale: float) -> torch.Tensor:
    """One sdpa row per completion: keys [K_p(b) copied ; K_c(i)] (N, kvh, P+C', d) → (N, C', h·d)."""
    g = sh.group_size
    k = torch.cat([k_p.repeat_interleave(g, 0), k_c], 2)                              # (N, kvh, P+C', d)
    v = torch.cat([v_p.repeat_interleave(g, 0), v_c], 2)
    return _attend(q_c, k, v, sh.c_bias, scale)


def _attend_grouped(q_c, k_c, v_c, k_p, v_p, sh: _Shared, scale: float) -> torch.Tensor:
    """One sdpa row per group: its G·C' queries against [K_p(b) ; the G rows' own keys] → (N, C', h·d).

    Block-diagonal causal mask over the own keys; the prompt K/V are used as they are (no copy).
    """
    g, b = sh.group_size, k_p.shape[0]
    n, h, c, d = q_c.shape

    def fold(t):                                                 # (N, x, C', d) → (B, x, G·C', d)
        return t.view(b, g, t.shape[1], c, d).transpose(1, 2).reshape(b, t.shape[1], g * c, d)

    k = torch.cat([k_p, fold(k_c)], 2)                                                 # (B, kvh, P+G·C', d)
    v = torch.cat([v_p, fold(v_c)], 2)
    out = _attend(fold(q_c), k, v, sh.c_bias, scale)                                  # (B, G·C', h·d)
    return out.view(b, g, c, h * d).reshape(n, c, h * d)                              # (N, C', h·d)


def layer_step(layer, h_p: torch.Tensor, h_c: torch.Tensor, sh: _Shared, last: bool):
    """One decoder layer on prompt rows h_p (B, P, H) and completion rows h_c (N, C', H).

    ``last``: only the prompt's last position leaves this layer (its K/V are still computed for all).
    """
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    b, p, _ = h_p.shape
    q_p, k_p, v_p = _qkv(attn, layer.input_layernorm(h_p), sh.p_cos, sh.p_sin, rotate)  # (B, ·, P, d)
    rows = slice(p - 1, p) if last else slice(None)
    o_p = _attend(q_p[:, :, rows], k_p, v_p, sh.p_bias[:, :, rows], attn.scaling)      # (B, P or 1, h·d)
    h_p = h_p[:, rows] + attn.o_proj(o_p)
    h_p = h_p + layer.mlp(layer.post_attention_layernorm(h_p))
    if h_c.shape[1] == 0:
        return h_p, h_c
    q_c, k_c, v_c = _qkv(attn, layer.input_layernorm(h_c), sh.c_cos, sh.c_sin, rotate)  # (N, ·, C', d)
    attend = _attend_grouped if sh.grouped else _attend_rows
    h_c = h_c + attn.o_proj(attend(q_c, k_c, v_c, k_p, v_p, sh, attn.scaling))
    h_c = h_c + layer.mlp(layer.post_attention_layernorm(h_c))
    return h_p, h_c


def _checkpointing(lm) -> bool:
    return lm.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False)
                                                          for m in lm.layers)


def shared_prefix_hidden(lm, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, prompt_pos: torch.Tensor,
                         comp_ids: torch.Tensor, comp_start: torch.Tensor, group_size: int) -> torch.Tensor:
    """Final-normed hidden states (N, C'+1, H) of [prompt's last position ; completion tokens].

    prompt_embeds (B, P, H) (image features already in), prompt_mask (B, P) 0 on left padding,
    prompt_pos (3, B, P) mRoPE ids, comp_ids (N, C') in-vocabulary completion tokens fed as input,
    comp_start (B,) = L + δ, the rope position of completion token 0.
    """
    b, p, _ = prompt_embeds.shape
    n, c = comp_ids.shape
    g = group_size
    h_c = lm.embed_tokens(comp_ids)                                                    # (N, C', H)
    c_pos = comp_start[:, None] + torch.arange(c, device=comp_start.device)           # (B, C')
    p_cos, p_sin = lm.rotary_emb(prompt_embeds, prompt_pos)                           # (B, P, d)
    c_cos, c_sin = lm.rotary_emb(h_c, c_pos.expand(3, b, c))                          # (B, C', d)
    grouped = use_grouped(p, c, g)
    sh = _Shared(p_cos, p_sin, prompt_bias(prompt_mask, prompt_embeds.dtype), c_cos.repeat_interleave(g, 0),
                 c_sin.repeat_interleave(g, 0), completion_bias(prompt_mask, c, g, grouped, prompt_embeds.dtype),
                 g, grouped)
    h_p, ckpt = prompt_embeds, _checkpointing(lm)
    for i, layer in enumerate(lm.layers):
        last = i == len(lm.layers) - 1
        if ckpt:
            h_p, h_c = checkpoint(layer_step, layer, h_p, h_c, sh, last, use_reentrant=False)
        else:
            h_p, h_c = layer_step(layer, h_p, h_c, sh, last)
    first = h_p[:, -1:].repeat_interleave(g, 0)                                        # (N, 1, H)
    return lm.norm(torch.cat([first, h_c], 1))                                         # (N, C'+1, H)
