"""Chunked pure-PyTorch backend: the same algorithm as the Triton kernels, in token chunks.

This is the path the trainer takes on CPU (and the GPU fallback). It works on the *compacted*
valid tokens only (the caller gathers them), walks over them in chunks of ``CHUNK_ELEMS / V``
tokens, and keeps one fp32 (chunk, V) block alive at a time — never the full (M, V) logits.

Per token, with z = logits / T (fp32) and y the label:
    lse   = logsumexp_j z_j                     saved for backward (one fp32 per token)
    logp  = z_y − lse
    H     = −Σ_j p_j log p_j,  p = softmax(z)   (only when asked; a metric, no gradient)
backward, with g = dLoss/dlogp (one scalar per token):
    dz_j      = g · (1[j = y] − p_j)            p recomputed from the saved lse
    dlogits_j = dz_j / T
    fused-linear: z = (h Wᵀ + b) / T, so dh = (dz/T) W and dW = Σ_tokens (dz/T)ᵀ h.

Cost model (bytes, M valid tokens, V vocab, e = bytes per input element):
    logits fwd: read M·V·e            bwd: read M·V·e, write M·V·e (+ the zeroing of masked rows)
    linear fwd: 2·M·V·H FLOPs, read W once per chunk; bwd: 6·M·V·H FLOPs (recompute + 2 GEMMs)
Every pass allocates O(chunk·V) temporaries (in-place ops keep it to ~2 blocks).

Module-level ``CHUNK_ELEMS`` sets the block size; tests shrink it to check the memory promise.
"""

import torch

# fp32 elements per (chunk, V) block: 4M floats = 16 MiB. Large enough that the chunk GEMM
# (chunk × H) @ (H × V) runs at full speed on CPU, small enough to stay in the last-level cache
# neighbourhood and far below the full logits of a real batch.
CHUNK_ELEMS = 1 << 22


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _softmax_stats(z: torch.Tensor, ys: torch.Tensor, want_entropy: bool):
    """z (C, V) fp32 → (logp, lse, entropy or None), each (C,)."""
    lse = torch.logsumexp(z, dim=-1)                                    # (C,)
    logp = z.gather(-1, ys[:, None]).squeeze(-1) - lse                  # (C,)
    ent = None
    if want_entropy:
        logq = z - lse[:, None]                                         # (C, V) log p
        # −Σ p log p; p = 0 (z = −inf) contributes 0, xlogy-style, never 0 · −inf = NaN
        ent = -torch.where(logq > -float("inf"), logq.exp() * logq, 0.0).sum(-1)
    return logp, lse, ent


def _dz_(z: torch.Tensor, ys: torch.Tensor, lse: torch.Tensor, g_over_t: torch.Tensor) -> torch.Tensor:
    """In place: z (C, V) fp32 → (onehot(y) − softmax(z)) · g/T, the gradient of logp wrt logits."""
    p = z.sub_(lse[:, None]).exp_()                                     # (C, V) softmax, in place
    d = p.mul_(-g_over_t[:, None])                                      # −p · g/T
    d[torch.arange(len(ys), device=z.device), ys] += g_over_t           # + onehot · g/T
    return d


# ---------------------------------------------------------------- logits (N, T, V) path


def logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy):
    """logits (N, T, V) any strides; (n_idx, t_idx, ys) (M,) the valid tokens → logp, lse, ent (M,)."""
    M = len(ys)
    logp = torch.empty(M, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    step = _chunk_rows(logits.shape[-1])
    for s in range(0, M, step):
        c = slice(s, s + step)
        z = logits[n_idx[c], t_idx[c]].float().div_(temperature)        # (C, V) fp32, gathered copy
        logp[c], lse[c], e = _softmax_stats(z, ys[c], want_entropy)
        if want_entropy:
            ent[c] = e
    return logp, lse, ent


def logprobs_backward(logits, n_idx, t_idx, ys, lse, g, temperature, out):
    """Write dlogits of the valid tokens into ``out`` (N, T, V); ``out`` may be ``logits`` itself."""
    step = _chunk_rows(logits.shape[-1])
    for s in range(0, len(ys), step):
        c = slice(s, s + step)
        z = logits[n_idx[c], t_idx[c]].float().div_(temperature)        # (C, V) read before any write
        d = _dz_(z, ys[c], lse[c], g[c] / temperature)                   # (C, V) dlogits
        out[n_idx[c], t_idx[c]] = d.to(out.dtype)


# ---------------------------------------------------------------- fused linear path


def _chunk_logits(h, weight, bias, temperature):
    """h (C, H) @ Wᵀ in the input dtype (fp32 accumulate), then + bias and / T in fp32 → (C, V)."""
    z = (h @ weight.t()).float()                                        # (C, V)
    if bias is not None:
        z += bias
    return z.div_(temperature)


def linear_forward(h, weight, bias, ys, temperature, want_entropy):
    """h (M, H) compacted valid hidden rows, weight (V, H), bias (V,) fp32 or None → logp, lse, ent (M,)."""
    M = h.shape[0]
    logp = torch.empty(M, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else None
    step = _chunk_rows(weight.shape[0])
    for s in range(0, M, step):
        c = slice(s, s + step)
        z = _chunk_logits(h[c], weight, bias, temperature)              # (C, V) never (M, V)
        logp[c], lse[c], e = _softmax_stats(z, ys[c], want_entropy)
        if want_entropy:
            ent[c] = e
    return logp, lse, ent


def linear_backward(h, weight, bias, ys, lse, g, temperature):
    """Recompute each chunk's logits, then dh (M, H) in h's dtype and dW (V, H) in W's dtype."""
    dh = torch.empty_like(h)                                            # (M, H)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)  # (V, H) fp32 accumulator
    step = _chunk_rows(weight.shape[0])
    for s in range(0, h.shape[0], step):
        c = slice(s, s + step)
        z = _chunk_logits(h[c], weight, bias, temperature)              # (C, V) recomputed
        dz = _dz_(z, ys[c], lse[c], g[c] / temperature)                  # (C, V) dlogits (÷T folded in)
        dz = dz.to(h.dtype)
        dh[c] = dz @ weight                                              # (C, H)
        if dz.dtype == torch.float32:
            dw.addmm_(dz.t(), h[c])                                      # (V, H) += (V, C) @ (C, H)
        else:
            dw += (dz.t() @ h[c]).float()
    return dh, dw.to(weight.dtype)
