"""Triton fused linear log-probs: logp = log softmax((h Wᵀ + b) / T)[y] without full logits.

Forward (``_linear_fwd_kernel``), grid = token blocks × vocab splits: the program (i, k) takes
BLOCK_M compacted valid tokens and the k-th of S contiguous vocab ranges. For each BLOCK_V tile of
its range it computes the (BLOCK_M, BLOCK_V) logits tile on chip with ``tl.dot`` over BLOCK_K
slices of H, adds the bias (may be −inf: a never-sampled id), divides by T, and folds the tile into
an online softmax (running max m, Σ e^(z−m) = l, Σ e^(z−m)·z = s per row, as in
triton_logprobs.py). It writes its partial (m, l, s, z_y) per token; ``_combine`` merges the S
partials (a few (S, M) torch ops):

    m = max_k m_k,   l = Σ_k e^(m_k − m) l_k,   s = Σ_k e^(m_k − m) s_k,   lse = m + log l,
    logp = z_y − lse,   H = lse − s / l            (z_y: only the split holding the label adds it)

Why split the vocab: with one program per 64 tokens, 4,096 tokens make 64 programs for 132 SMs;
S is chosen so that token blocks × S ≥ 2 programs per SM (``_vocab_splits``), so a short rollout
fills the GPU too. S = 1 when the tokens alone fill it.

Backward, in token chunks of C rows:
  1. ``_linear_dz_kernel`` (grid: token blocks × vocab tiles) recomputes each logits tile on chip
     and writes dz = (g (1[j = y] − p_j) − g_H p_j (log p_j + H)) / T into a (C, V) buffer in the
     input dtype, bf16 for fp16 inputs (fp16 flushes p_j·g to 0 at realistic g:
     ``torch_backend.dz_dtype``) (the g_H term only in the ENT_GRAD variant);
  2. dh_chunk = dz @ W and dW += dzᵀ @ h_chunk run as tensor-core GEMMs (cuBLAS via torch); dW is
     accumulated in fp32 with an fp32 GEMM output (``torch_backend.add_matmul_``), so no partial
     gradient is rounded to bf16.
Why not everything on chip: dh needs, per token block, an accumulator over the whole H (1,536 for
Qwen2-VL-2B: far beyond registers; flash-attention's trick works because its head dim is ≤ 256),
and accumulating dh/dW with atomics would re-add each element ~V/BLOCK_V (≈1,200) times. A bounded
(C, V) buffer is the cheaper trade: it never holds the full (M, V) logits, and C is chosen so it
stays under ``DZ_BUFFER_BYTES``.

Offsets: row offsets are formed in int64 (``offs_m.to(tl.int64) * stride_h``): tokens × H passes
2^31 at 1.4 M tokens for H = 1,536, which one call reaches when the trainer sends a whole rollout.

Cost model (M valid tokens, H hidden, V vocab, e bytes/element):
    forward : 2·M·V·H FLOPs; reads M·H·e + ⌈M/BLOCK_M⌉·V·H·e (W per token block, mostly L2),
              writes 16·S·M bytes of partials. No M·V traffic at all.
    backward: 2·M·V·H (recompute) + 4·M·V·H (two GEMMs) FLOPs; M·V·e written and read twice
              (the dz buffer), dW accumulated in fp32 (V·H·4 per chunk).

Interpreter (TRITON_INTERPRET=1): operands are cast to fp32 before ``tl.dot`` (CAST_F32), where
the dot is exact; on a GPU bf16/fp16 operands stay native (tensor cores) and fp32 uses "ieee".
"""

import os

import torch
import triton
import triton.language as tl

from grpo_core.kernels import triton_interpreter
from grpo_core.kernels.torch_backend import add_matmul_, dz_dtype, matmul_into

triton_interpreter.fix()         # Triton 3.6's CPU interpreter under numpy ≥ 2.5 (no-op on a GPU)

_NEG_BIG = tl.constexpr(-1e38)  # finite start for the running max: an all −inf tile gives 0, not NaN
DZ_BUFFER_BYTES = 1 << 29       # ≤ 512 MiB for the backward dz chunk (C, V)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_PROGRAMS = None             # forward programs wanted; None = 2 per SM on a GPU, 1 in the interpreter


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, m_ok, v_ok, H, stride_h, stride_w, temperature,
                 HAS_BIAS: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 tile of (h Wᵀ + b) / T; −inf outside the vocab."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    a_rows = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h                       # (BM, 1) int64 offsets
    b_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_w                       # (1, BV)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        b = tl.load(b_cols + offs_k[:, None], mask=v_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BV) = Wᵀ
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0)[None, :]
    z = acc / temperature
    return tl.where(v_ok[None, :], z, -float("inf"))


@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, ys_ptr, part_ptr, M, V, H, stride_h, stride_w, v_per_split,
                       temperature, HAS_BIAS: tl.constexpr, WANT_ENT: tl.constexpr, CAST_F32: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Program (i, k): tokens [i·BLOCK_M, (i+1)·BLOCK_M) × vocab [k·v_per_split, (k+1)·v_per_split).
    Writes part[0..3, k, token] = m, l, s, z_y (s only with WANT_ENT)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    m_ok = offs_m < M
    y = tl.load(ys_ptr + offs_m, mask=m_ok, other=-1)
    m_i = tl.full((BLOCK_M,), _NEG_BIG, tl.float32)             # running max per token
    l_i = tl.zeros((BLOCK_M,), tl.float32)                      # running Σ e^(z − m)
    s_i = tl.zeros((BLOCK_M,), tl.float32)                      # running Σ e^(z − m)·z
    z_y = tl.zeros((BLOCK_M,), tl.float32)                      # the label's logit (0 if not here)
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, m_ok, v_ok, H, stride_h, stride_w,
                         temperature, HAS_BIAS, CAST_F32, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(z - m_new[:, None])                          # 0 where z = −inf
        l_i = l_i * alpha + tl.sum(e, axis=1)
        if WANT_ENT:
            s_i = s_i * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), axis=1)
        z_y += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        m_i = m_new
    part = part_ptr + split * M + offs_m                        # part is (4, S, M) fp32
    stride_q = tl.num_programs(1) * M
    tl.store(part, m_i, mask=m_ok)
    tl.store(part + stride_q, l_i, mask=m_ok)
    if WANT_ENT:
        tl.store(part + 2 * stride_q, s_i, mask=m_ok)
    tl.store(part + 3 * stride_q, z_y, mask=m_ok)


@triton.jit
def _linear_dz_kernel(h_ptr, w_ptr, b_ptr, ys_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr, dz_ptr, M, V, H,
                      stride_h, stride_w, temperature, HAS_BIAS: tl.constexpr, ENT_GRAD: tl.constexpr,
                      CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    m_ok = offs_m < M
    v_ok = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, m_ok, v_ok, H, stride_h, stride_w,
                     temperature, HAS_BIAS, CAST_F32, DOT_PREC, BLOCK_M, BLOCK_V, BLOCK_K)
    y = tl.load(ys_ptr + offs_m, mask=m_ok, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
    scale = tl.load(g_ptr + offs_m, mask=m_ok, other=0.0) / temperature             # g / T
    logp = z - lse[:, None]                                                          # log p tile
    p = tl.exp(logp)                                                                 # softmax tile
    dz = (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - p) * scale[:, None]    # (BM, BV)
    if ENT_GRAD:                                             # − g_H p (log p + H) / T; 0 where p = 0
        h = tl.load(ent_ptr + offs_m, mask=m_ok, other=0.0)
        scale_h = tl.load(gent_ptr + offs_m, mask=m_ok, other=0.0) / temperature
        dz -= tl.where(p > 0, p * (logp + h[:, None]), 0.0) * scale_h[:, None]
    dz_rows = dz_ptr + offs_m.to(tl.int64)[:, None] * V                              # int64: C·V may pass 2^31
    tl.store(dz_rows + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m_ok[:, None] & v_ok[None, :])


def _config(h: torch.Tensor):
    """Tile sizes, warps and dot flags. GPU bf16/fp16: 64 × 128 × 64 tiles on 8 warps (the fp32
    accumulator tile is 32 registers per thread, leaving room for the softmax; 4 warps sat at 255
    registers); fp32 (no tensor-core "ieee" dot: plain FMA): 32 × 64 × 32, so nothing spills.
    Interpreter: fewer, larger numpy ops."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret:
        return dict(CAST_F32=True, DOT_PREC="ieee", BLOCK_M=16, BLOCK_V=128, BLOCK_K=64, num_warps=4)
    if h.dtype == torch.float32:
        return dict(CAST_F32=True, DOT_PREC="ieee", BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4)
    return dict(CAST_F32=False, DOT_PREC="tf32", BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8)


def _vocab_splits(token_blocks: int, V: int, block_v: int, device: torch.device) -> int:
    """S vocab ranges so that token_blocks · S ≥ MIN_PROGRAMS (default 2 per SM), each range
    at least 4 vocab tiles long so the partials stay a small fraction of the work."""
    want = MIN_PROGRAMS
    if want is None:
        want = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    most = max(1, triton.cdiv(V, 4 * block_v))
    return max(1, min(triton.cdiv(want, token_blocks), most))


def _combine(part: torch.Tensor, want_entropy: bool):
    """part (4, S, M) = per-split m, l, s, z_y → logp, lse, entropy-or-None, each (M,)."""
    m_k, l_k, s_k, zy_k = part
    m = m_k.amax(0)                                                              # (M,)
    w = torch.exp(m_k - m)                                                       # (S, M), ≤ 1
    l = (w * l_k).sum(0)
    lse = m + torch.log(l)
    logp = zy_k.sum(0) - lse
    ent = lse - (w * s_k).sum(0) / l if want_entropy else None
    return logp, lse, ent


def linear_forward(h, weight, bias, ys, temperature, want_entropy):
    """See torch_backend.linear_forward (same contract)."""
    M, H = h.shape
    V = weight.shape[0]
    if M == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty.clone(), (empty.clone() if want_entropy else None)
    cfg = _config(h)
    blocks = triton.cdiv(M, cfg["BLOCK_M"])
    S = _vocab_splits(blocks, V, cfg["BLOCK_V"], h.device)
    v_per_split = triton.cdiv(triton.cdiv(V, S), cfg["BLOCK_V"]) * cfg["BLOCK_V"]   # whole tiles
    S = triton.cdiv(V, v_per_split)
    part = torch.zeros((4, S, M), dtype=torch.float32, device=h.device)            # m, l, s, z_y
    _linear_fwd_kernel[(blocks, S)](h, weight, bias if bias is not None else part, ys, part, M, V, H,
                                    h.stride(0), weight.stride(0), v_per_split, temperature,
                                    HAS_BIAS=bias is not None, WANT_ENT=want_entropy, **cfg)
    return _combine(part, want_entropy)


def linear_backward(h, weight, bias, ys, lse, g, temperature, ent=None, g_ent=None):
    """dz per token chunk on chip (Triton), then dh = dz W and dW += dzᵀ h as GEMMs."""
    M, H = h.shape
    V = weight.shape[0]
    dh = torch.empty_like(h)                                                     # (M, H)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)        # (V, H) fp32
    cfg = _config(h)
    rows = max(cfg["BLOCK_M"], DZ_BUFFER_BYTES // (V * h.element_size()))
    rows = min(M, rows // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    dzt = dz_dtype(h.dtype)                                                   # bf16 for fp16 inputs
    dz = torch.empty((max(rows, 1), V), dtype=dzt, device=h.device)           # (C, V) reused buffer
    w_g = weight.to(dzt)                                                       # (V, H) GEMM operand
    ent_grad = g_ent is not None
    for s in range(0, M, max(rows, 1)):
        C = min(rows, M - s)
        grid = (triton.cdiv(C, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _linear_dz_kernel[grid](h[s:], weight, bias if bias is not None else lse, ys[s:], lse[s:], g[s:],
                                ent[s:] if ent_grad else lse, g_ent[s:] if ent_grad else g, dz,
                                C, V, H, h.stride(0), weight.stride(0), temperature,
                                HAS_BIAS=bias is not None, ENT_GRAD=ent_grad, **cfg)
        dzc = dz[:C]                                                             # (C, V)
        matmul_into(dh[s:s + C], dzc, w_g)                                       # (C, H)
        add_matmul_(dw, dzc.t(), h[s:s + C].to(dzt))                   # (V, H) fp32 += fp32 product
    return dh, dw.to(weight.dtype)
