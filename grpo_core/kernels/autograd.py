"""The two autograd.Functions behind the public API, shared by the torch and Triton backends.

A backend is a module with four plain functions (see torch_backend.py for the contract):
    logprobs_forward(logits, n_idx, t_idx, ys, T, want_entropy)       → logp, lse, ent  (M,)
    logprobs_backward(logits, n_idx, t_idx, ys, lse, g, T, out)       → writes dlogits rows into out
    linear_forward(h, W, bias, ys, T, want_entropy)                   → logp, lse, ent  (M,)
    linear_backward(h, W, bias, ys, lse, g, T)                        → dh (M, H), dW (V, H)
where M is the number of valid (mask = 1) tokens. These Functions do the bookkeeping around
them: compact the valid tokens, scatter results back to (N, T), zero the gradient of masked
positions. Entropy is returned as a detached metric (no gradient flows through it).
"""

import torch


def _scatter(ctx, like, N, T, n_idx, t_idx, logp_v, ent_v):
    """Per-valid-token results (M,) → (N, T) fp32 tensors, 0 where masked; entropy marked detached."""
    logp = like.new_zeros((N, T), dtype=logp_v.dtype)                       # (N, T) fp32 (fp64 for fp64 inputs)
    logp[n_idx, t_idx] = logp_v
    ent = None
    if ent_v is not None:
        ent = torch.zeros_like(logp)
        ent[n_idx, t_idx] = ent_v
        ctx.mark_non_differentiable(ent)
    return logp, ent


class TokenLogprobsFn(torch.autograd.Function):
    """logits (N, T, V) → logp (N, T) fp32 (+ entropy (N, T), detached)."""

    @staticmethod
    def forward(ctx, logits, n_idx, t_idx, ys, temperature, want_entropy, inplace_backward, impl):
        N, T, _ = logits.shape
        logp_v, lse, ent_v = impl.logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy)
        logp, ent = _scatter(ctx, logits, N, T, n_idx, t_idx, logp_v, ent_v if want_entropy else None)
        ctx.save_for_backward(logits, n_idx, t_idx, ys, lse)
        ctx.temperature, ctx.inplace, ctx.impl = temperature, inplace_backward, impl
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        logits, n_idx, t_idx, ys, lse = ctx.saved_tensors
        g = g_logp[n_idx, t_idx].to(lse.dtype).contiguous()                 # (M,) dLoss/dlogp
        if ctx.inplace:
            out = logits                                                    # caller's buffer reused
        else:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # masked positions get exactly zero gradient; only their rows are touched (no work if none)
        if len(ys) < logits.shape[0] * logits.shape[1]:
            keep = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
            keep[n_idx, t_idx] = True
            out[~keep] = 0
        ctx.impl.logprobs_backward(logits, n_idx, t_idx, ys, lse, g, ctx.temperature, out)
        return out, None, None, None, None, None, None, None


class LinearLogprobsFn(torch.autograd.Function):
    """hidden (N, T, H), weight (V, H) → logp (N, T) fp32 (+ entropy (N, T), detached)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, n_idx, t_idx, ys, temperature, want_entropy, impl):
        N, T, _ = hidden.shape
        h = hidden[n_idx, t_idx]                                            # (M, H) compacted copy
        logp_v, lse, ent_v = impl.linear_forward(h, weight, bias, ys, temperature, want_entropy)
        logp, ent = _scatter(ctx, hidden, N, T, n_idx, t_idx, logp_v, ent_v if want_entropy else None)
        ctx.save_for_backward(h, weight, bias, n_idx, t_idx, ys, lse)
        ctx.temperature, ctx.impl, ctx.hidden_shape = temperature, impl, hidden.shape
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        h, weight, bias, n_idx, t_idx, ys, lse = ctx.saved_tensors
        g = g_logp[n_idx, t_idx].to(lse.dtype).contiguous()                 # (M,)
        dh, dw = ctx.impl.linear_backward(h, weight, bias, ys, lse, g, ctx.temperature)
        dhidden = h.new_zeros(ctx.hidden_shape)                              # (N, T, H), 0 where masked
        dhidden[n_idx, t_idx] = dh
        dhidden = dhidden if ctx.needs_input_grad[0] else None
        dw = dw if ctx.needs_input_grad[1] else None
        return dhidden, dw, None, None, None, None, None, None, None
