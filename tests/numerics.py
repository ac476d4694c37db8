"""Tolerances that hold on every CPU: derived from the dtype and the size of the values.

Two computations that are equal in exact arithmetic differ in floating point by rounding, and
the rounding depends on the reduction order: SIMD width (``ATEN_CPU_CAPABILITY`` = default /
avx2 / avx512 picks different kernels), thread count, BLAS blocking, batch composition, the order
of a collective. A fixed ``atol=1e-6`` that passes on one machine can fail on the next.

The rules this suite follows:
  - An *equivalence* (two paths that must agree: 2 ranks vs 1, shared-prefix vs plain forward,
    resume vs uninterrupted) runs in float64, where reordering moves results by ~1e-16 of their
    size, and is checked with ``assert_equiv`` against a tolerance of ``EQUIV_REL`` times the
    largest magnitude of the reference tensor. 1e-9 leaves ~10⁶ of headroom over fp64 rounding
    through a whole training step, and is still ~10³ tighter than fp32 rounding, so a real
    divergence (a wrong mask, a missing term) cannot hide under it.
  - A *low-precision result* (fp32 / bf16 output against an fp64 reference) gets
    ``tol(dtype, scale, k)`` = k · eps(dtype) · scale: k counts the roundings that can pile up,
    plus ``rounding(want, dtype)`` (half an ulp, elementwise) when the result is *stored* in that
    dtype. ``lse_scale`` is the size of the numbers inside a log-softmax (max |z| + log V).
Errors are scaled by the tensor's largest value, not element by element: a gradient entry that
is a near-cancelling sum of large terms carries the absolute error of those terms, not its own.
"""

from __future__ import annotations

import math

import torch

EQUIV_REL = 1e-9          # fp64 equivalences: max |got − want| ≤ EQUIV_REL · max |want|


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tol(dtype: torch.dtype, scale: float = 1.0, k: float = 8.0) -> float:
    """k roundings of size eps(dtype) on values of magnitude ``scale``."""
    return k * eps(dtype) * max(float(scale), 1e-30)


def rounding(want, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise: the largest error of storing ``want`` in ``dtype`` (half its ulp there)."""
    w = torch.as_tensor(want).double().abs()
    tiny = torch.finfo(dtype).tiny
    exp = torch.floor(torch.log2(w.clamp(min=tiny)))
    return 0.5 * torch.finfo(dtype).eps * torch.exp2(exp)                # eps = ulp(1); ulp(x) = eps·2^⌊log2 x⌋


def lse_scale(logits, temperature: float = 1.0, per_row: bool = False):
    """Size of the numbers inside a log-softmax: |z| ≤ max|logits|/T, and lse ≤ max z + log V.
    A float over the whole tensor, or (per_row) a tensor of logits.shape[:-1]."""
    z = torch.as_tensor(logits).double()
    a = torch.where(torch.isfinite(z), z.abs(), torch.zeros((), dtype=z.dtype))
    zmax = a.amax(-1) / temperature if per_row else float(a.max()) / temperature
    return 1.0 + zmax + math.log(max(z.shape[-1], 2))


def _report(what, got, want, bound):
    diff = (got - want).abs().nan_to_num(float("inf"))
    over = diff / bound.clamp(min=1e-300)
    i = int(over.flatten().argmax()) if diff.numel() else 0
    return (f"{what}: |diff| {diff.flatten()[i]:.3e} > bound {bound.flatten()[i]:.3e} at flat index {i} "
            f"(got {got.flatten()[i]:.10g}, want {want.flatten()[i]:.10g}); max diff {diff.max():.3e}, "
            f"mean diff {diff.mean():.3e}, max |want| {want.abs().max():.3e}")


def assert_close(got, want, what: str = "", *, atol):
    """|got − want| ≤ atol (a number, or a tensor of elementwise bounds), compared in float64, with a
    report that says where and by how much."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(want)
    diff = (got - want).abs().nan_to_num(float("inf"))
    assert (diff <= bound).all(), _report(what, got, want, bound)


def assert_equiv(got, want, what: str = "", rel: float = EQUIV_REL):
    """Equivalence of two fp64 computations: max |got − want| ≤ rel · max |want| (see module doc)."""
    want_t = torch.as_tensor(want)
    if want_t.is_floating_point() and want_t.dtype != torch.float64:
        raise AssertionError(f"{what}: assert_equiv compares float64 results, got {want_t.dtype}; "
                             "run the equivalence in float64 or use assert_close with tol(dtype, ...)")
    scale = float(want_t.double().abs().max()) if want_t.numel() else 0.0
    assert_close(got, want, what, atol=rel * max(scale, 1e-300))


# ---- float64 through HF's Qwen models ---------------------------------------------------------

def full_precision_hf() -> None:
    """Make HF's Qwen2 / Qwen2-VL / Qwen2.5-VL compute in the model's dtype where it is wider than fp32.

    transformers casts to fp32 inside RMSNorm, the vision rotary embedding and the eager attention
    softmax whatever the model dtype, so an fp64 model still rounds to fp32 there (and the eager
    softmax turns fp64's −1.8e308 mask into −inf: NaN on padded rows), and two paths whose inputs differ by 1e-16
    can round to neighbouring fp32 values (a 1e-7 difference that is not a bug). This replaces
    those two pieces with the same math in max(input dtype, fp32): bit-for-bit unchanged for fp32,
    bf16 and fp16 models, full fp64 for fp64 models. Tests only (conftest and the torchrun worker);
    idempotent.
    """
    import importlib

    for name in ("qwen2", "qwen2_vl", "qwen2_5_vl"):
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        if getattr(mod, "_grpo_full_precision", False):
            continue
        for cls in [v for k, v in vars(mod).items() if k.endswith("RMSNorm") and isinstance(v, type)]:
            cls.forward = _rms_norm_forward
        if hasattr(mod, "apply_rotary_pos_emb_vision"):
            mod.apply_rotary_pos_emb_vision = _rotary_vision
        mod.eager_attention_forward = _eager_attention(mod.repeat_kv)
        mod._grpo_full_precision = True


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(_wide(input_dtype))                 # HF: .to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotary_vision(q, k, cos, sin):
    acc = _wide(q.dtype)                                                 # HF: q.float(), k.float()
    qf, kf = q.to(acc), k.to(acc)
    cos, sin = cos.unsqueeze(-2).to(acc), sin.unsqueeze(-2).to(acc)
    q_embed = (qf * cos) + (_rotate_half(qf) * sin)
    k_embed = (kf * cos) + (_rotate_half(kf) * sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def _eager_attention(repeat_kv):
    def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = repeat_kv(key, module.num_key_value_groups)
        value_states = repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = torch.softmax(attn_weights, dim=-1, dtype=_wide(query.dtype)).to(query.dtype)  # HF: fp32
        attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
        attn_output = torch.matmul(attn_weights, value_states)
        return attn_output.transpose(1, 2).contiguous(), attn_weights
    return eager_attention_forward
