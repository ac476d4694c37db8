"""The two autograd.Functions behind the public API, shared by every backend (torch, triton, cuda).

A backend path is a module with two plain functions over the M valid (mask = 1) tokens:

  logits path (torch_backend, triton_logprobs, cuda):
    logprobs_forward(logits, n_idx, t_idx, ys, T, want_entropy)               → logp, lse, ent  (M,)
    logprobs_backward(logits, n_idx, t_idx, ys, lse, g, T, out, ent, g_ent)   → writes d logits rows into out
  fused-linear path (torch_backend, triton_linear, cuda_linear):
    linear_forward(h, W, bias, ys, T, want_entropy)                           → logp, lse, ent  (M,)
    linear_backward(h, W, bias, ys, lse, g, T, ent, g_ent)                    → dh (M, H), dW (V, H)

g = dLoss/dlogp and g_ent = dLoss/dH are (M,) per token; ``g_ent`` (and ``ent``) is None when
the caller's loss does not use the entropy, and then the backward does exactly the work it did
before entropy had a gradient. The gradient, defined once for every backend:

    d z_j = g (1[j = y] − p_j) − g_H p_j (log p_j + H),      d logits_j = d z_j / T

(dH/dz_j = −p_j (log p_j + H) follows from H = −Σ p log p and dp_i/dz_j = p_i (1[i = j] − p_j).)

These Functions do the bookkeeping around the backends: scatter results back to (N, T) (0 where
masked), gather the upstream gradients of the valid tokens, zero the gradient of masked positions.
"""

import torch


def scatter(like: torch.Tensor, N: int, T: int, n_idx, t_idx, values):
    """Per-valid-token results (M,) → (N, T) tensor, 0 where masked (None stays None)."""
    if values is None:
        return None
    out = like.new_zeros((N, T), dtype=values.dtype)                         # (N, T) fp32 (fp64 for fp64 inputs)
    out[n_idx, t_idx] = values
    return out


def gather(grad, n_idx, t_idx, dtype):
    """Upstream (N, T) gradient → (M,) of the valid tokens, or None when there is none."""
    return None if grad is None else grad[n_idx, t_idx].to(dtype).contiguous()


class TokenLogprobsFn(torch.autograd.Function):
    """logits (N, T, V) → logp (N, T) fp32, entropy (N, T) fp32 or None; both differentiable."""

    @staticmethod
    def forward(ctx, logits, n_idx, t_idx, ys, temperature, want_entropy, inplace_backward, impl):
        N, T, _ = logits.shape
        logp_v, lse, ent_v = impl.logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy)
        ctx.save_for_backward(logits, n_idx, t_idx, ys, lse, ent_v)
        ctx.temperature, ctx.inplace, ctx.impl = temperature, inplace_backward, impl
        ctx.set_materialize_grads(False)                                     # unused entropy → g_ent None
        return scatter(logits, N, T, n_idx, t_idx, logp_v), scatter(logits, N, T, n_idx, t_idx, ent_v)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, n_idx, t_idx, ys, lse, ent = ctx.saved_tensors
        g = gather(g_logp, n_idx, t_idx, lse.dtype)
        if g is None:
            g = torch.zeros_like(lse)                                        # only the entropy is used
        g_ent = gather(g_ent, n_idx, t_idx, lse.dtype)                       # None: no extra work below
        out = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # masked positions get exactly zero gradient; only their rows are touched (no work if none)
        if len(ys) < logits.shape[0] * logits.shape[1]:
            keep = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
            keep[n_idx, t_idx] = True
            out[~keep] = 0
        ctx.impl.logprobs_backward(logits, n_idx, t_idx, ys, lse, g, ctx.temperature, out,
                                   ent if g_ent is not None else None, g_ent)
        return out, None, None, None, None, None, None, None


class LinearLogprobsFn(torch.autograd.Function):
    """hidden (N, T, H), weight (V, H) → logp (N, T) fp32, entropy (N, T) or None; both differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, n_idx, t_idx, ys, temperature, want_entropy, impl):
        N, T, _ = hidden.shape
        h = hidden[n_idx, t_idx]                                            # (M, H) compacted copy
        logp_v, lse, ent_v = impl.linear_forward(h, weight, bias, ys, temperature, want_entropy)
        ctx.save_for_backward(h, weight, bias, n_idx, t_idx, ys, lse, ent_v)
        ctx.temperature, ctx.impl, ctx.hidden_shape = temperature, impl, hidden.shape
        ctx.set_materialize_grads(False)
        return scatter(hidden, N, T, n_idx, t_idx, logp_v), scatter(hidden, N, T, n_idx, t_idx, ent_v)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, n_idx, t_idx, ys, lse, ent = ctx.saved_tensors
        g = gather(g_logp, n_idx, t_idx, lse.dtype)
        if g is None:
            g = torch.zeros_like(lse)
        g_ent = gather(g_ent, n_idx, t_idx, lse.dtype)
        dh, dw = ctx.impl.linear_backward(h, weight, bias, ys, lse, g, ctx.temperature,
                                          ent if g_ent is not None else None, g_ent)
        dhidden = None
        if ctx.needs_input_grad[0]:
            dhidden = h.new_zeros(ctx.hidden_shape)                          # (N, T, H), 0 where masked
            dhidden[n_idx, t_idx] = dh
        dw = dw if ctx.needs_input_grad[1] else None
        return dhidden, dw, None, None, None, None, None, None, None
