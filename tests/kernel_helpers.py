"""Shared by the kernel tests: backends to parametrise over, and error bounds derived from the inputs.

The fast paths compute in fp32 (bf16/fp16 inputs are read exactly and upcast); the tests compare
them with the reference run in float64 on the same (already rounded) inputs, the exact answer up
to fp64 rounding, and bound the difference by what fp32 arithmetic can produce there
(tests/numerics.py): a handful of eps32 times the size of the numbers involved. That holds on any
CPU, where a fixed atol tuned on one machine does not.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run the Triton kernels in the interpreter

from numerics import assert_close, lse_scale, rounding, tol  # noqa: E402,F401

from grpo_core.kernels import dispatch  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    dispatch.why_unavailable("triton", torch.device("cpu")) is not None,
    reason="Triton on CPU needs TRITON_INTERPRET=1 set before grpo_core.kernels' Triton modules load"))]

K_FWD, K_BWD = 16, 8       # fp32 roundings allowed: log-softmax forward, its backward
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def entropy_truth(z, temperature=1.0):
    """H = −Σ p log p per position, with a gradient that stays finite at −inf logits (p = 0): log p
    is clamped to a finite floor there, where the reference's nan_to_num would give NaN in backward.
    The floor keeps 2^32 of headroom below the dtype's max, so floor × upstream gradient stays finite."""
    lp = torch.log_softmax(z / temperature, -1)
    return -(lp.exp() * lp.clamp(min=torch.finfo(lp.dtype).min * 2.0 ** -32)).sum(-1)


def store_rounding(want, dtype, backend="torch"):
    """Elementwise error of storing fp32 results as ``dtype``: half an ulp (round to nearest, as
    torch and the GPU do), but a whole ulp for Triton under the interpreter, whose fp32 → bf16/fp16
    stores truncate (tests/test_kernels_logprobs.py checks that this is still so)."""
    r = rounding(want, dtype)
    return 2 * r if backend == "triton" and INTERPRETED and dtype != torch.float32 else r


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def logp_tol(logits, temperature=1.0):
    """log p / entropy / lse in fp32, per (n, t): absolute error a few eps32 · (max |z| + log V)."""
    return K_FWD * torch.finfo(torch.float32).eps * lse_scale(logits, temperature, per_row=True)


def dz_size(want_grad, labels, mask, g, temperature=1.0, p=None, g_ent=None):
    """Elementwise size of the terms of d z_j = g (1[j = y] − p_j)/T (− g_H p_j (log p_j + H)/T).

    p_j carries an absolute error of a few eps32 · lse_scale from exp(z − lse), so each term's error
    is that times its size: |d_j| for j ≠ y, plus |g|/T on the label (1 − p_y may cancel).
    """
    size = want_grad.detach().double().abs().clone()
    onehot = torch.zeros_like(size).scatter_(-1, labels.clamp(min=0)[..., None], 1.0)
    size += onehot * (g.double().abs() / temperature)[..., None]
    if g_ent is not None:
        size += p * (g_ent.double().abs() / temperature)[..., None]
    return size * mask[..., None]


def logit_grad_bound(want_grad, logits, labels, mask, g, temperature=1.0, dtype=torch.float32, g_ent=None,
                     backend="torch"):
    """Bound on |d logits − fp64 truth|: the fp32 arithmetic, then the store in ``dtype`` by ``backend``."""
    p = torch.softmax(logits.double() / temperature, -1).nan_to_num(0.0) if g_ent is not None else None
    size = dz_size(want_grad, labels, mask, g, temperature, p, g_ent)
    per_row = K_BWD * torch.finfo(torch.float32).eps * lse_scale(logits, temperature, per_row=True)
    return store_rounding(want_grad, dtype, backend) + per_row[..., None] * size


def linear_grad_bounds(dz_want, hidden, weight, labels, mask, g, temperature, logits, g_ent=None):
    """Bounds on d hidden = dz W and d weight = dzᵀ h (dz = d logits) when dz carries the errors
    above and the products add fp32 rounding: k·eps32·lse_scale · (|dz| @ |W|) and (|dz|ᵀ @ |h|)."""
    eps = torch.finfo(torch.float32).eps
    rows = K_BWD * eps * (lse_scale(logits, temperature, per_row=True) + hidden.shape[-1])   # (N, T)
    p = torch.softmax(logits.double() / temperature, -1).nan_to_num(0.0) if g_ent is not None else None
    size = dz_size(dz_want, labels, mask, g, temperature, p, g_ent) * rows[..., None]  # (N, T, V)
    dh = size @ weight.double().abs()                                       # (N, T, H)
    dw = torch.einsum("ntv,nth->vh", size, hidden.double().abs())           # (V, H)
    return dh, dw
