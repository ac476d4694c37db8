"""Triton fused linear log-probs: logp = log softmax((h Wᵀ + b) / T)[y] without full logits.

Forward (``_linear_fwd_kernel``): one program per BLOCK_M compacted valid tokens. For each vocab
tile it computes the (BLOCK_M, BLOCK_V) logits tile on chip with ``tl.dot`` over BLOCK_K slices
of H, adds the bias (may be −inf: a never-sampled id), divides by T, and folds the tile into an
online softmax (running max / sum / Σ e·z per row, as in triton_logprobs.py). The logits never
leave the chip; per token it writes logp, lse and (optionally) entropy.

Backward, in token chunks of C rows:
  1. ``_linear_dz_kernel`` (grid: token blocks × vocab tiles) recomputes each logits tile on chip
     and writes dz = g · (1[j = y] − e^(z_j − lse)) / T into a (C, V) buffer in the input dtype;
  2. dh_chunk = dz @ W and dW += dzᵀ @ h_chunk run as tensor-core GEMMs (cuBLAS via torch).
Why not everything on chip: dh needs, per token block, an accumulator over the whole H (1,536 for
Qwen2-VL-2B: far beyond registers; flash-attention's trick works because its head dim is ≤ 256),
and accumulating dh/dW with atomics would re-add each element ~V/BLOCK_V (≈1,200) times. A bounded
(C, V) buffer is the cheaper trade: it never holds the full (M, V) logits, and C is chosen so it
stays under ``DZ_BUFFER_BYTES``.

Cost model (M valid tokens, H hidden, V vocab, e bytes/element):
    forward : 2·M·V·H FLOPs; reads M·H·e + ⌈M/BLOCK_M⌉·V·H·e (W per token block, mostly L2),
              writes 12·M bytes. No M·V traffic at all.
    backward: 2·M·V·H (recompute) + 4·M·V·H (two GEMMs) FLOPs; M·V·e written and read twice
              (the dz buffer), dW accumulated in fp32 (V·H·4 per chunk).
Compute-bound at Qwen sizes (H = 1,536): ≈ 6·M·V·H FLOPs, vs the naive path that also moves
M·V·(e + 4 + 4 + e) bytes for logits, fp32 log-softmax and its gradient.

Interpreter (TRITON_INTERPRET=1): operands are cast to fp32 before ``tl.dot`` (CAST_F32), where
the dot is exact; on a GPU bf16/fp16 operands stay native (tensor cores) and fp32 uses "ieee".
"""

import os

import torch
import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-1e38)  # finite start for the running max: an all −inf tile gives 0, not NaN
DZ_BUFFER_BYTES = 1 << 29       # ≤ 512 MiB for the backward dz chunk (C, V)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, m_ok, v_ok, H, stride_h, stride_w, temperature,
                 HAS_BIAS: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 tile of (h Wᵀ + b) / T; −inf outside the vocab."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(h_ptr + offs_m[:, None] * stride_h + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)                 # (BM, BK)
        b = tl.load(w_ptr + offs_v[None, :] * stride_w + offs_k[:, None],
                    mask=v_ok[None, :] & k_ok[:, None], other=0.0)                 # (BK, BV) = Wᵀ tile
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0)[None, :]
    z = acc / temperature
    return tl.where(v_ok[None, :], z, -float("inf"))


@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, ys_ptr, logp_ptr, lse_ptr, ent_ptr, M, V, H, stride_h, stride_w,
                       temperature, HAS_BIAS: tl.constexpr, WANT_ENT: tl.constexpr, CAST_F32: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    y = tl.load(ys_ptr + offs_m, mask=m_ok, other=-1)
    m_i = tl.full((BLOCK_M,), _NEG_BIG, tl.float32)             # running max per token
    l_i = tl.zeros((BLOCK_M,), tl.float32)                      # running Σ e^(z − m)
    s_i = tl.zeros((BLOCK_M,), tl.float32)                      # running Σ e^(z − m)·z
    z_y = tl.zeros((BLOCK_M,), tl.float32)                      # the label's logit
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
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
    lse = m_i + tl.log(l_i)
    tl.store(logp_ptr + offs_m, z_y - lse, mask=m_ok)
    tl.store(lse_ptr + offs_m, lse, mask=m_ok)
    if WANT_ENT:
        tl.store(ent_ptr + offs_m, lse - s_i / l_i, mask=m_ok)


@triton.jit
def _linear_dz_kernel(h_ptr, w_ptr, b_ptr, ys_ptr, lse_ptr, g_ptr, dz_ptr, M, V, H, stride_h, stride_w,
                      temperature, HAS_BIAS: tl.constexpr, CAST_F32: tl.constexpr, DOT_PREC: tl.constexpr,
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
    p = tl.exp(z - lse[:, None])                                                     # softmax tile
    dz = (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - p) * scale[:, None]    # (BM, BV)
    tl.store(dz_ptr + offs_m[:, None] * V + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=m_ok[:, None] & v_ok[None, :])


def _config(h: torch.Tensor):
    """Tile sizes and dot flags. GPU: 64 × 128 × 64 tiles; interpreter: fewer, larger numpy ops."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    cast = interpret or h.dtype == torch.float32
    return dict(CAST_F32=cast, DOT_PREC="ieee" if cast else "tf32",
                BLOCK_M=16 if interpret else 64, BLOCK_V=128, BLOCK_K=64 if interpret else 64)


def linear_forward(h, weight, bias, ys, temperature, want_entropy):
    """See torch_backend.linear_forward (same contract)."""
    M, H = h.shape
    V = weight.shape[0]
    logp = torch.empty(M, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else logp
    if M:
        cfg = _config(h)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _linear_fwd_kernel[grid](h, weight, bias if bias is not None else lse, ys, logp, lse, ent, M, V, H,
                                 h.stride(0), weight.stride(0), temperature, HAS_BIAS=bias is not None,
                                 WANT_ENT=want_entropy, num_warps=4, **cfg)
    return logp, lse, (ent if want_entropy else None)


def linear_backward(h, weight, bias, ys, lse, g, temperature):
    """dz per token chunk on chip (Triton), then dh = dz W and dW += dzᵀ h as GEMMs."""
    M, H = h.shape
    V = weight.shape[0]
    dh = torch.empty_like(h)                                                     # (M, H)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)        # (V, H) fp32
    cfg = _config(h)
    rows = max(cfg["BLOCK_M"], DZ_BUFFER_BYTES // (V * h.element_size()))
    rows = min(M, rows // cfg["BLOCK_M"] * cfg["BLOCK_M"])
    dz = torch.empty((max(rows, 1), V), dtype=h.dtype, device=h.device)          # (C, V) reused buffer
    for s in range(0, M, max(rows, 1)):
        C = min(rows, M - s)
        grid = (triton.cdiv(C, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _linear_dz_kernel[grid](h[s:], weight, bias if bias is not None else lse, ys[s:], lse[s:], g[s:], dz,
                                C, V, H, h.stride(0), weight.stride(0), temperature,
                                HAS_BIAS=bias is not None, num_warps=4, **cfg)
        dzc = dz[:C]                                                             # (C, V)
        torch.matmul(dzc, weight, out=dh[s:s + C])                               # (C, H)
        if dzc.dtype == torch.float32:
            dw.addmm_(dzc.t(), h[s:s + C])                                       # (V, H)
        else:
            dw += (dzc.t() @ h[s:s + C]).float()
    return dh, dw.to(weight.dtype)
