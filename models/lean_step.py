"""The decode step's layers as plain function calls on weights prepared once per rollout chunk.

``prefix_decode._layers`` (the reference) calls each layer's modules: per layer and token that is
~60 small tensor ops and ~15 ``nn.Module`` calls, and the rotary tables are rebuilt every step.
For a small model on a CPU (the rollout bench's tiny model: 32 rows × hidden 128) a decode step
is that per-call overhead, not arithmetic. ``prepare`` gathers, once per chunk:

    q/k/v → one (nh + 2·kvh)·d × H matrix   x @ [Wq; Wk; Wv]ᵀ + [bq; bk; bv] = [q | k | v]
    gate/up → one 2·I × H matrix           x @ [Wg; Wu]ᵀ = [g | u]
    rotary cos / sin for every position the chunk can reach (lm.rotary_emb, called once)

and ``layers`` then runs a step in ~35 ops per layer: fused RMSNorm (``F.rms_norm``), the fused
projections, RoPE as x·cos + swap_halves(x)·sin± on q and k together (sin± = [−sin₁, sin₂], so
swap_halves(x)·sin± = rotate_half(x)·sin exactly), the same shared-prefix attention.

Same math as the reference up to rounding (F.rms_norm and the fused GEMMs sum in another order):
tests check greedy tokens against HF ``generate`` and the reference step's logits.

Fusion copies the q/k/v and gate/up weights; it is done only when the copies are small
(≤ ``FUSE_MAX_BYTES``), i.e. exactly where per-call overhead dominates. A projection that is not a
plain ``nn.Linear`` (a LoRA adapter, a quantized layer) is called as its module, unfused, so the
adapter applies; the prepared weights are views of the live parameters or copies made this chunk,
so they always hold the current policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

FUSE_MAX_BYTES = 64 * 2**20   # copies above this: call the projections one by one (no copy)


@dataclass
class LeanLayer:
    norm1: tuple                 # (weight (H,), eps) of input_layernorm
    qkv: Callable                # x (N, H) → (N, (nh + 2·kvh)·d)
    o: Callable                  # (N, nh·d) → (N, H)
    norm2: tuple                 # post_attention_layernorm
    gate_up: Callable            # x (N, H) → (N, 2·I): [gate | up]
    down: Callable               # (N, I) → (N, H)
    act: Callable                # the MLP's activation (SiLU for Qwen2-VL)
    scale: float                 # attention scaling (1/√d)


@dataclass
class LeanWeights:
    layers: list                 # LeanLayer per decoder layer
    embed: torch.Tensor          # (V, H) token embedding
    norm: tuple                  # final norm (weight, eps)
    cos: torch.Tensor            # (L, d) rotary cos for positions first .. first + L − 1
    sin_pm: torch.Tensor         # (L, d) [−sin₁, sin₂]
    first: int                   # the first tabled position
    steps: int                   # decode steps the tables cover (the planned capacity)
    heads: tuple                 # (nh, kvh, d)
    fused: bool                  # q/k/v and gate/up stacked into one GEMM each (plain Linears)


def _plain(mod) -> bool:
    return type(mod) is torch.nn.Linear


def _call(mod) -> Callable:
    """A plain Linear as F.linear on its (live) weight; anything else (LoRA, ...) as its module."""
    if _plain(mod):
        w, b = mod.weight, mod.bias
        return lambda x: F.linear(x, w, b)
    return mod


def _fused(mods) -> Callable:
    """Linears with the same input → one GEMM on their stacked weights (a copy, made now)."""
    w = torch.cat([m.weight for m in mods])
    b = None if all(m.bias is None for m in mods) else torch.cat(
        [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    return lambda x: F.linear(x, w, b)


def _joined(mods) -> Callable:
    """Linears with the same input, called one by one, outputs side by side."""
    calls = [_call(m) for m in mods]
    return lambda x: torch.cat([c(x) for c in calls], -1)


def _fuse_bytes(lm) -> int:
    total = 0
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


@torch.no_grad()
def prepare(lm, next_position: torch.Tensor, steps: int) -> LeanWeights:
    """``lm``'s decoder weights for ``layers``; rotary tables for ``steps`` decode steps of rows
    whose next positions are ``next_position`` (N,) (one host read, at planning time)."""
    first, last = int(next_position.min()), int(next_position.max()) + steps
    fuse = _fuse_bytes(lm) <= FUSE_MAX_BYTES
    fused = True
    layers = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_mods, gu_mods = (a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)
        fuse_qkv, fuse_gu = (fuse and all(map(_plain, mods)) for mods in (qkv_mods, gu_mods))
        fused &= fuse_qkv and fuse_gu
        layers.append(LeanLayer(
            norm1=_norm(layer.input_layernorm),
            qkv=_fused(qkv_mods) if fuse_qkv else _joined(qkv_mods),
            o=_call(a.o_proj), norm2=_norm(layer.post_attention_layernorm),
            gate_up=_fused(gu_mods) if fuse_gu else _joined(gu_mods),
            down=_call(m.down_proj), act=_activation(m), scale=a.scaling,
        ))
    cfg, emb = lm.config, lm.embed_tokens.weight
    d = lm.layers[0].self_attn.head_dim
    pos = torch.arange(first, last + 1, device=emb.device)               # (L,)
    cos, sin = lm.rotary_emb(emb[:1, None], pos.view(1, 1, -1).expand(3, 1, -1))  # (1, L, d) each
    sign = torch.ones(d, dtype=sin.dtype, device=sin.device)
    sign[: d // 2] = -1
    return LeanWeights(layers=layers, embed=emb, norm=_norm(lm.norm), cos=cos[0],
                       sin_pm=sin[0] * sign, first=first, steps=steps,
                       heads=(cfg.num_attention_heads, cfg.num_key_value_heads, d), fused=fused)


def _activation(mlp) -> Callable:
    return F.silu if getattr(mlp.config, "hidden_act", None) == "silu" else mlp.act_fn


def _norm(mod) -> tuple:
    return mod.weight, mod.variance_epsilon


def rms_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
    """Qwen2 RMSNorm: weight · (x / √(mean(x²) + eps)) in fp32, cast back to x's dtype first."""
    weight, eps = norm
    if x.dtype == weight.dtype == torch.float32:                         # one op, the same products
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * y.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_pm: torch.Tensor) -> torch.Tensor:
    """x (N, heads, d), cos / sin± (N, 1, d) → x·cos + rotate_half(x)·sin (rotate_half(x) =
    [−x₂, x₁] = swap_halves(x) · [−1, 1], the sign folded into sin±)."""
    n, h, d = x.shape
    swapped = x.view(n, h, 2, d // 2).flip(2).view(n, h, d)
    return torch.addcmul(x * cos, swapped, sin_pm)


def layers(weights: LeanWeights, state, tokens: torch.Tensor, write, attention) -> torch.Tensor:
    """Tokens (N,) → final-normed hidden (N, 1, H), as ``prefix_decode._layers``; ``write`` stores
    a layer's K/V, ``attention`` is ``prefix_decode.shared_prefix_attention``."""
    n = tokens.shape[0]
    nh, kvh, d = weights.heads
    hidden = F.embedding(tokens, weights.embed)                          # (N, H)
    at = state.next_position - weights.first                             # (N,) table rows
    cos = weights.cos.index_select(0, at).view(n, 1, d)                  # (N, 1, d)
    sin_pm = weights.sin_pm.index_select(0, at).view(n, 1, d)
    for i, lw in enumerate(weights.layers):
        y = lw.qkv(rms_norm(hidden, lw.norm1))                           # (N, (nh + 2·kvh)·d)
        qk = rope(y[:, :(nh + kvh) * d].reshape(n, nh + kvh, d), cos, sin_pm)  # (N, nh + kvh, d)
        q, k = qk[:, :nh].view(n, nh, 1, d), qk[:, nh:].view(n, kvh, 1, d)
        v = y[:, (nh + kvh) * d:].reshape(n, kvh, 1, d)
        ok, ov, own_mask = write(state, i, k, v)
        o = attention(q, state.prefix_k[i], state.prefix_v[i], state.prefix_bias, ok, ov,
                      state.group_size, lw.scale, own_mask)              # (N, nh·d)
        hidden = hidden + lw.o(o)
        gate, up = lw.gate_up(rms_norm(hidden, lw.norm2)).chunk(2, -1)   # (N, I) each
        hidden = hidden + lw.down(lw.act(gate) * up)
    return rms_norm(hidden, weights.norm).view(n, 1, -1)                 # (N, 1, H)
