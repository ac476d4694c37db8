"""Triton kernels: per-token log-prob of (N, T, V) logits, forward and backward.

One program per *valid* token (1-D grid over the compacted tokens: padding costs nothing and the
grid is not bound by CUDA's 65,535 limit on the y/z axes). Each program walks its logits row in
BLOCK_V tiles with an online softmax in fp32:

    m' = max(m, max_j z_j)          l' = l·e^(m−m') + Σ_j e^(z_j−m')          lse = m + log l
    s' = s·e^(m−m') + Σ_j e^(z_j−m')·z_j      (entropy: H = lse − s/l, only when asked)

with z = logits / T. The running max starts at −1e38 (finite), so a tile that is entirely −inf
gives e^(−inf) = 0 instead of e^(−inf − −inf) = NaN. Backward recomputes softmax from the saved
lse and writes  d logits_j = (g · (1[j = y] − p_j) − g_H · p_j (log p_j + H)) / T,  p_j = e^(z_j − lse);
the entropy term only in the ENT_GRAD variant (the loss uses the entropy), so a loss without it
pays nothing.

Row starts come from a loaded offset, so the compiler cannot know their alignment and would issue
one scalar load per logit. The launcher passes ROW_ALIGN, the largest power of two (≤ 16 bytes
worth of elements) dividing every row offset, and the kernels assert it with ``tl.multiple_of``:
with V a multiple of 16 (Triton specialises on that) the loads become 16-byte ``ld.global.v4``
(the compile check, bench/compile_check.py, shows the vector widths in the PTX).

Cost model per valid token (V vocab, e = bytes per logit, 2 for bf16):
    forward : read V·e, write 12 bytes (logp, lse, entropy)          ≈ 2·V bytes  (bf16)
    backward: read V·e + 12 bytes (+ 8 with ENT_GRAD), write V·e       ≈ 4·V bytes  (bf16)
    total   : 6 bytes per logit in bf16 — the ideal for a fwd+bwd that never stores fp32 logits.
Memory-bound (a handful of FLOPs per byte), so BLOCK_V only needs to be wide enough to keep
enough loads in flight.

Interpreter notes (TRITON_INTERPRET=1, how CI runs this on CPU): every load is cast to fp32
before arithmetic (the interpreter handles bf16 arithmetic wrongly); stores cast back.
"""

import torch
import triton
import triton.language as tl

from grpo_core.kernels import triton_interpreter

triton_interpreter.fix()         # Triton 3.6's CPU interpreter under numpy ≥ 2.5 (no-op on a GPU)

_NEG_BIG = tl.constexpr(-1e38)  # finite "−inf" for the running max; see module docstring


@triton.jit
def _logprobs_fwd_kernel(x_ptr, row_off_ptr, ys_ptr, logp_ptr, lse_ptr, ent_ptr, V, temperature,
                         WANT_ENT: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    row = x_ptr + tl.multiple_of(tl.load(row_off_ptr + pid), ROW_ALIGN)   # this token's logits row
    y = tl.load(ys_ptr + pid)
    m = tl.full((), _NEG_BIG, tl.float32)                       # running max
    l = tl.zeros((), tl.float32)                                # running Σ e^(z − m)
    s = tl.zeros((), tl.float32)                                # running Σ e^(z − m)·z (entropy)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row + cols, mask=cols < V, other=-float("inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)                                   # 0 where z = −inf
        l = l * alpha + tl.sum(e, axis=0)
        if WANT_ENT:
            s = s * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)  # no 0·(−inf)
        m = m_new
    lse = m + tl.log(l)
    z_y = tl.load(row + y).to(tl.float32) / temperature
    tl.store(logp_ptr + pid, z_y - lse)
    tl.store(lse_ptr + pid, lse)
    if WANT_ENT:
        tl.store(ent_ptr + pid, lse - s / l)


@triton.jit
def _logprobs_bwd_kernel(x_ptr, row_off_ptr, out_ptr, out_off_ptr, ys_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr,
                         V, temperature, ENT_GRAD: tl.constexpr, ROW_ALIGN: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    row = x_ptr + tl.multiple_of(tl.load(row_off_ptr + pid), ROW_ALIGN)
    out = out_ptr + tl.multiple_of(tl.load(out_off_ptr + pid), ROW_ALIGN)
    y = tl.load(ys_ptr + pid)
    lse = tl.load(lse_ptr + pid)
    scale = tl.load(g_ptr + pid) / temperature                  # g / T
    if ENT_GRAD:
        h = tl.load(ent_ptr + pid)                              # H
        scale_h = tl.load(gent_ptr + pid) / temperature         # g_H / T
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(row + cols, mask=ok, other=-float("inf")).to(tl.float32) / temperature
        logp = z - lse                                           # log p_j
        p = tl.exp(logp)                                         # softmax_j
        d = (tl.where(cols == y, 1.0, 0.0) - p) * scale          # g · (1[j = y] − p_j) / T
        if ENT_GRAD:                                             # − g_H p_j (log p_j + H) / T; 0 where p = 0
            d -= tl.where(p > 0, p * (logp + h), 0.0) * scale_h
        tl.store(out + cols, d.to(out_ptr.dtype.element_ty), mask=ok)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def _row_offsets(t: torch.Tensor, n_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Element offset of each valid token's row in a (N, T, V) tensor of any strides → (M,) int64."""
    return n_idx * t.stride(0) + t_idx * t.stride(1)


def row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two, at most 16 bytes of elements, that divides both row strides of every
    (N, T, V) tensor: every row offset is then a multiple of it (the base pointers are 16-byte
    aligned or Triton specialises them as such)."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for stride in t.stride()[:2]:
            while stride % align:
                align //= 2
    return max(align, 1)


def logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy):
    """See torch_backend.logprobs_forward (same contract)."""
    M = len(ys)
    logp = torch.empty(M, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if want_entropy else logp       # dummy pointer when unused
    if M:
        _logprobs_fwd_kernel[(M,)](logits, _row_offsets(logits, n_idx, t_idx), ys, logp, lse, ent,
                                   logits.shape[-1], temperature, WANT_ENT=want_entropy,
                                   ROW_ALIGN=row_align(logits), BLOCK_V=_block_v(logits.shape[-1]),
                                   num_warps=8)
    return logp, lse, (ent if want_entropy else None)


def logprobs_backward(logits, n_idx, t_idx, ys, lse, g, temperature, out, ent=None, g_ent=None):
    """See torch_backend.logprobs_backward; ``out`` may alias ``logits`` (each program reads a
    tile of its own row before writing the same tile, so in-place is safe)."""
    M = len(ys)
    if M:
        ent_grad = g_ent is not None
        _logprobs_bwd_kernel[(M,)](logits, _row_offsets(logits, n_idx, t_idx), out,
                                   _row_offsets(out, n_idx, t_idx), ys, lse, g,
                                   ent if ent_grad else lse, g_ent if ent_grad else g,
                                   logits.shape[-1], temperature, ENT_GRAD=ent_grad,
                                   ROW_ALIGN=row_align(logits, out), BLOCK_V=_block_v(logits.shape[-1]),
                                   num_warps=8)
