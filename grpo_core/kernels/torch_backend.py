"""Chunked pure-PyTorch backend: the same algorithm as the Triton kernels, in bounded blocks.

This is the path the trainer takes on CPU (and the GPU fallback). It works on the *compacted*
valid tokens only (the caller gathers them). The logits path walks them in chunks of
``CHUNK_ELEMS / V`` tokens; the fused-linear path tiles tokens × vocab (see below). Either way
one fp32 block of ≤ CHUNK_ELEMS elements is alive at a time — never the full (M, V) logits.

Per token, with z = logits / T (fp32) and y the label:
    lse   = logsumexp_j z_j                     saved for backward (one fp32 per token)
    logp  = z_y − lse
    H     = −Σ_j p_j log p_j,  p = softmax(z)   (only when asked)
backward, with g = dLoss/dlogp and g_H = dLoss/dH (one scalar each per token; g_H None when the
loss does not use the entropy, and then none of its work is done):
    dz_j      = g · (1[j = y] − p_j) − g_H · p_j (log p_j + H)     p recomputed from the saved lse
    dlogits_j = dz_j / T
    fused-linear: z = (h Wᵀ + b) / T, so dh = (dz/T) W and dW = Σ_tokens (dz/T)ᵀ h.

Cost model (bytes, M valid tokens, V vocab, e = bytes per input element):
    logits fwd: read M·V·e            bwd: read M·V·e, write M·V·e (+ the zeroing of masked rows)
    linear fwd: 2·M·V·H FLOPs, W read once per token chunk (once in total for M ≤ ROW_CHUNK)
    linear bwd: 6·M·V·H FLOPs (recompute + 2 GEMMs), W read twice per token chunk, dW written once
Every pass allocates O(CHUNK_ELEMS) temporaries (in-place ops keep it to ~2 blocks).
Measured on CPU (1 thread, CPU time, fwd+bwd, 8×32 tokens, H = 64, V = 151,936): 0.9 s vs 1.6 s for
matmul + reference log-softmax; equal at V = 1.2k (the tiny demo model).

Module-level ``CHUNK_ELEMS`` sets the block size; tests shrink it to check the memory promise.
"""

import math

import torch

# fp32 elements per (chunk, V) block: 4M floats = 16 MiB. Large enough that the chunk GEMM
# (chunk × H) @ (H × V) runs at full speed on CPU, small enough to stay in the last-level cache
# neighbourhood and far below the full logits of a real batch.
CHUNK_ELEMS = 1 << 22
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the equivalence tests run in fp64, where
    a different reduction order moves results by ~1e-16 instead of fp32's ~1e-7)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype d logits are stored in for the dh / dW GEMMs: the input dtype, but bf16 for fp16.

    dz_j = g·(1[j = y] − p_j)/T with a realistic upstream g (advantage / tokens ≈ 1e-4 … 1e-6)
    and p_j ≈ 1/V is ≈ 1e-9 … 1e-11: below fp16's smallest subnormal (6e-8), so an fp16 dz is 0 for
    nearly the whole vocabulary and dh loses its −g·Σ p_j W_j term (and the label's own term is a
    coarse subnormal). Chosen by accuracy at such g: bf16 keeps fp32's exponent range with an 8-bit
    significand (each dz within 2^-9 of exact: the precision of every bf16 run), and the GEMMs stay
    on tensor cores; an fp32 dz would need fp32 GEMMs (no tensor cores, ~15× slower on an H100) for
    bits that the fp16 W operand and the fp16 dh cannot keep anyway
    (tests/test_kernels_linear.py::test_fp16_realistic_gradient_does_not_underflow).
    """
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _softmax_stats(z: torch.Tensor, ys: torch.Tensor, want_entropy: bool):
    """z (C, V) fp32 (clobbered) → (logp, lse, entropy or None), each (C,)."""
    z_y = z.gather(-1, ys[:, None]).squeeze(-1)                         # (C,)
    if not want_entropy:
        lse = torch.logsumexp(z, dim=-1)                                # (C,)
        return z_y - lse, lse, None
    # one set of passes for both: m = max z, e = e^(z − m), lse = m + log Σe, H = lse − Σ e·z / Σ e
    m = z.amax(-1).clamp_(min=-1e38)                                    # (C,) finite even if all −inf
    e = (z - m[:, None]).exp_()                                         # (C, V), 0 where z = −inf
    l = e.sum(-1)                                                       # (C,)
    lse = m + l.log()
    s = torch.linalg.vecdot(e, z.clamp_(min=-1e38))                     # Σ e·z; clamp: no 0·(−inf)
    return z_y - lse, lse, lse - s / l


def _minus_p_terms_(z, lse, g_t, ent=None, gent_t=None):
    """In place: z (C, V) → −p_j · (g/T + g_H/T · (log p_j + H)), the gradient without its
    one-hot term. g_t = g/T, gent_t = g_H/T (C,); ent = H (C,) or None."""
    logp = z.sub_(lse[:, None])                                         # (C, V) log p, in place
    if gent_t is None:
        return logp.exp_().mul_(-g_t[:, None])                          # −p · g/T
    p = logp.exp()                                                      # (C, V) one more block
    # log p = −inf where p = 0: clamp so that 0 · (finite) = 0 instead of 0 · (−inf) = NaN; below
    # log(tiny) p is 0 or subnormal, so the clamp moves the result by < tiny · 16.
    logp.clamp_(min=math.log(torch.finfo(z.dtype).tiny))
    return logp.add_(ent[:, None]).mul_(gent_t[:, None]).add_(g_t[:, None]).mul_(p).neg_()


def _dz_(z, ys, lse, g_t, ent=None, gent_t=None):
    """In place: z (C, V) fp32 → the gradient of (g·logp + g_H·H) wrt z, times 1/T."""
    d = _minus_p_terms_(z, lse, g_t, ent, gent_t)
    d[torch.arange(len(ys), device=z.device), ys] += g_t                # + onehot · g/T
    return d


def _over_t(g, temperature):
    return None if g is None else g / temperature


# ---------------------------------------------------------------- logits (N, T, V) path


def logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy):
    """logits (N, T, V) any strides; (n_idx, t_idx, ys) (M,) the valid tokens → logp, lse, ent (M,)."""
    M, acc = len(ys), acc_dtype(logits.dtype)
    logp = torch.empty(M, dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    step = _chunk_rows(logits.shape[-1])
    for s in range(0, M, step):
        c = slice(s, s + step)
        z = logits[n_idx[c], t_idx[c]].to(acc).div_(temperature)        # (C, V) fp32, gathered copy
        logp[c], lse[c], e = _softmax_stats(z, ys[c], want_entropy)
        if want_entropy:
            ent[c] = e
    return logp, lse, ent


def logprobs_backward(logits, n_idx, t_idx, ys, lse, g, temperature, out, ent=None, g_ent=None):
    """Write dlogits of the valid tokens into ``out`` (N, T, V); ``out`` may be ``logits`` itself.
    ent, g_ent (M,): the entropy and dLoss/dH, or None when the loss does not use the entropy."""
    step, acc = _chunk_rows(logits.shape[-1]), acc_dtype(logits.dtype)
    g_t, gent_t = g / temperature, _over_t(g_ent, temperature)
    for s in range(0, len(ys), step):
        c = slice(s, s + step)
        z = logits[n_idx[c], t_idx[c]].to(acc).div_(temperature)        # (C, V) read before any write
        d = _dz_(z, ys[c], lse[c], g_t[c], None if gent_t is None else ent[c],
                 None if gent_t is None else gent_t[c])                 # (C, V) dlogits
        out[n_idx[c], t_idx[c]] = d.to(out.dtype)


# ---------------------------------------------------------------- fused linear path
#
# Tiled two ways: an outer loop over token chunks of up to ROW_CHUNK tokens and an inner loop
# over vocab chunks of CHUNK_ELEMS / rows columns, with an online softmax across vocab chunks
# (the same recurrence as the Triton kernel). With the few hundred tokens of a CPU micro-batch
# there is one token chunk, so W is streamed once per pass and each dW row block is written once,
# instead of re-reading W and re-accumulating all of dW for every token chunk.

ROW_CHUNK = 4096
_NEG_BIG = -1e38  # finite start for the running max: an all −inf vocab chunk adds 0, never NaN


def _tiles(M: int, V: int):
    """Yield (token slice, vocab slice) tiles, vocab innermost."""
    rows = max(1, min(M, ROW_CHUNK))
    cols = max(1, min(V, CHUNK_ELEMS // rows))
    for r0 in range(0, M, rows):
        yield slice(r0, r0 + rows), [slice(v0, min(v0 + cols, V)) for v0 in range(0, V, cols)]


def _tile_logits(h, weight, bias, vs, temperature):
    """(R, H) @ W[vs]ᵀ in the input dtype (fp32 accumulate), + bias, / T in fp32 → (R, Vc)."""
    z = (h @ weight[vs].t()).to(acc_dtype(h.dtype))                     # (R, Vc)
    if bias is not None:
        z += bias[vs]
    return z.div_(temperature)


def _label_in_tile(ys, vs):
    """(R,) bool: label falls in vocab slice vs; (R,) its column inside the tile (clamped)."""
    inside = (ys >= vs.start) & (ys < vs.stop)
    return inside, (ys - vs.start).clamp(0, vs.stop - vs.start - 1)


def linear_forward(h, weight, bias, ys, temperature, want_entropy):
    """h (M, H) compacted valid hidden rows, weight (V, H), bias (V,) fp32 or None → logp, lse, ent (M,)."""
    M, V, acc = h.shape[0], weight.shape[0], acc_dtype(h.dtype)
    logp = torch.empty(M, dtype=acc, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    for rs, vslices in _tiles(M, V):
        y = ys[rs]
        m = torch.full(y.shape, _NEG_BIG, dtype=acc, device=h.device)    # running max   (R,)
        l = torch.zeros_like(m)                                          # running Σ e^(z−m)
        s = torch.zeros_like(m)                                          # running Σ e^(z−m)·z
        z_y = torch.zeros_like(m)                                        # label logit
        for vs in vslices:
            z = _tile_logits(h[rs], weight, bias, vs, temperature)      # (R, Vc), never (M, V)
            inside, col = _label_in_tile(y, vs)
            z_y = torch.where(inside, z.gather(-1, col[:, None]).squeeze(-1), z_y)
            m_new = torch.maximum(m, z.amax(-1))
            alpha = torch.exp(m - m_new)
            e = (z - m_new[:, None]).exp_()                              # (R, Vc), 0 where z = −inf
            l = l * alpha + e.sum(-1)
            if want_entropy:
                s = s * alpha + torch.linalg.vecdot(e, z.clamp_(min=_NEG_BIG))  # clamp: no 0·(−inf)
            m = m_new
        lse[rs] = m + torch.log(l)
        logp[rs] = z_y - lse[rs]
        if want_entropy:
            ent[rs] = lse[rs] - s / l
    return logp, lse, ent


def add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with the product accumulated and added in acc's dtype (fp32/fp64), never
    rounded to a's bf16/fp16 first. On a GPU cuBLAS takes bf16/fp16 operands with an fp32
    output (``out_dtype``); elsewhere the operands are up-cast."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # torch without addmm(out_dtype): up-cast below
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 (fp64 for fp64) tensor whose entries were never rounded to a's bf16/fp16:
    on a GPU cuBLAS writes fp32 directly (``out_dtype``); elsewhere the operands are up-cast."""
    acc = acc_dtype(a.dtype)
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and acc == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without mm(out_dtype): up-cast below
            pass
    return a.to(acc) @ b.to(acc)


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b: in place when the dtypes agree, else computed in a's dtype and cast (an fp16
    dh from a bf16 dz: ``dz_dtype``)."""
    if out.dtype == a.dtype:
        torch.matmul(a, b, out=out)
    else:
        out.copy_(a @ b)


def linear_backward(h, weight, bias, ys, lse, g, temperature, ent=None, g_ent=None):
    """Recompute each tile's logits, then dh (M, H) in h's dtype and dW (V, H) in W's dtype."""
    M, V, acc, dzt = h.shape[0], weight.shape[0], acc_dtype(h.dtype), dz_dtype(h.dtype)
    dh = torch.zeros(h.shape, dtype=acc, device=h.device)              # (M, H) fp32 accumulator
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device)         # (V, H) fp32 accumulator
    g_t, gent_t = g / temperature, _over_t(g_ent, temperature)
    for rs, vslices in _tiles(M, V):
        y, hc = ys[rs], h[rs]
        for vs in vslices:
            z = _tile_logits(hc, weight, bias, vs, temperature)         # (R, Vc) recomputed
            d = _minus_p_terms_(z, lse[rs], g_t[rs], None if gent_t is None else ent[rs],
                                None if gent_t is None else gent_t[rs])  # in place
            inside, col = _label_in_tile(y, vs)
            d.scatter_add_(-1, col[:, None], (g_t[rs] * inside)[:, None])  # + onehot(y) · g/T
            d = d.to(dzt)                                                # bf16 for fp16: dz_dtype
            add_matmul_(dh[rs], d, weight[vs].to(dzt))                 # (R, H) += (R, Vc) @ (Vc, H)
            add_matmul_(dw[vs], d.t(), hc.to(dzt))                     # (Vc, H) += (Vc, R) @ (R, H)
    return dh.to(h.dtype), dw.to(weight.dtype)
