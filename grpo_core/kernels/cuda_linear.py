"""The "cuda" backend's fused-linear path: cuBLAS GEMM tiles through torch, the CUDA log-softmax.

    logp = log softmax((h Wᵀ + b) / T)[y],  h (M, H) valid tokens, W (V, H), b (V,) fp32 or None

Tokens are taken in chunks of C rows, C·V·4 bytes ≤ ``CHUNK_BYTES``, so the full (M, V) logits
never exist. Per chunk:
  forward : z = h_c Wᵀ as an fp32 (C, V) tile straight out of cuBLAS (bf16/fp16 operands, fp32
            output: ``torch_backend.matmul_fp32``), + b; then the CUDA forward kernel
            (csrc/logprobs.cu) reads it as C tokens of one position each → logp, lse, H.
  backward: recompute z; the CUDA backward kernel overwrites it in place with
            d z_j = (g (1[j = y] − p_j) − g_H p_j (log p_j + H)) / T; then, in the input dtype,
            dh_c = dz W and dW += dzᵀ h_c with an fp32 accumulator (``torch_backend.add_matmul_``);
            dz is bf16 for fp16 inputs (fp16 flushes p_j·g to 0 at realistic g: ``dz_dtype``).

Against triton_linear.py (logits never leave the chip): this path writes and reads the fp32 (C, V)
tile once per pass, 8·M·V extra bytes forward and 16·M·V backward, and needs no Triton. Which is
faster on a given GPU is measured by bench/bench_loss.py ("linear" rows, ours-cuda vs ours-triton).
"""

import torch

from grpo_core.kernels import cuda
from grpo_core.kernels.torch_backend import add_matmul_, dz_dtype, matmul_fp32, matmul_into

CHUNK_BYTES = 1 << 29          # ≤ 512 MiB for the fp32 (C, V) logits tile
DTYPES = cuda.DTYPES


def _chunks(M: int, V: int):
    rows = max(1, min(M, CHUNK_BYTES // (4 * V)))
    return [slice(s, min(s + rows, M)) for s in range(0, M, rows)]


def _logits(h, weight, bias):
    """(C, 1, V) fp32 logits tile of one chunk (one position per token: T = 1 for the kernels)."""
    z = matmul_fp32(h, weight.t())                                     # (C, V) fp32
    if bias is not None:
        z += bias
    return z[:, None, :]


def _positions(C: int, device):
    n_idx = torch.arange(C, device=device)
    return n_idx, torch.zeros_like(n_idx)


def linear_forward(h, weight, bias, ys, temperature, want_entropy):
    """See torch_backend.linear_forward (same contract)."""
    M = h.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    logp, lse = torch.empty(M, **f32), torch.empty(M, **f32)
    ent = torch.empty(M, **f32) if want_entropy else None
    for c in _chunks(M, weight.shape[0]):
        z = _logits(h[c], weight, bias)                                # (C, 1, V)
        lp, ls, e = cuda.logprobs_forward(z, *_positions(z.shape[0], h.device), ys[c], temperature, want_entropy)
        logp[c], lse[c] = lp, ls
        if want_entropy:
            ent[c] = e
    return logp, lse, ent


def linear_backward(h, weight, bias, ys, lse, g, temperature, ent=None, g_ent=None):
    """See torch_backend.linear_backward (same contract)."""
    dh = torch.empty_like(h)                                           # (M, H)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    dzt = dz_dtype(h.dtype)                                            # bf16 for fp16 inputs
    w_g = weight.to(dzt)                                               # (V, H) GEMM operand
    for c in _chunks(h.shape[0], weight.shape[0]):
        z = _logits(h[c], weight, bias)                                # (C, 1, V) recomputed
        cuda.logprobs_backward(z, *_positions(z.shape[0], h.device), ys[c], lse[c], g[c], temperature,
                               z, None if g_ent is None else ent[c], None if g_ent is None else g_ent[c])
        dz = z[:, 0].to(dzt)                                       # (C, V) d logits, in place above
        matmul_into(dh[c], dz, w_g)                                    # (C, H)
        add_matmul_(dw, dz.t(), h[c].to(dzt))                          # (V, H) fp32
    return dh, dw.to(weight.dtype)
