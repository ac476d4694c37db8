"""Fused log-prob kernels and the GRPO loss on top of them.

What is fused, and why there (design decision):
  The kernels fuse the *log-prob*: log-softmax + gather over the vocabulary, online softmax over
  vocab tiles in fp32 (running max m, running sum l, lse = m + log l), one fp32 lse saved per
  token. Backward is a custom kernel:

      d logits_j = g · (1[j = y] − softmax_j(logits / T)) / T,     g = dLoss/dlogp (per token)

  The GRPO math (ratio, clip, dual clip, KL k1/k2/k3, aggregation) then runs in plain PyTorch on
  the small (N, T) tensors, by calling ``grpo_core.loss.grpo_loss``. This is mathematically the
  same as putting the loss inside the kernel: autograd on the (N, T) tensors produces exactly the
  per-token scalar g that an in-kernel loss would compute. It costs O(N·T) extra memory traffic,
  negligible next to the N·T·V logits, and keeps each loss variant a small named function in
  loss.py instead of a branch in a kernel (Liger's GRPO op is the cautionary tale: eight loss
  modes in one ~1,000-line kernel).

Public API (all return fp32 (N, T) log-probs; mask = 1 marks tokens that count):
  token_logprobs(logits, labels, T, mask)            logits (N, T, V) → logp (N, T)
  linear_token_logprobs(hidden, weight, labels, ...)  hidden (N, T, H), W (V, H) → logp, never
                                                      materialising the (N·T, V) logits
  fused_grpo_loss(logits, ...) / fused_linear_grpo_loss(hidden, weight, ...) → (loss, metrics)

Behaviour shared by every backend:
  - Masked positions (mask = 0) cost no work: the valid tokens are compacted first (one
    ``nonzero``, a host sync) and the kernels run a 1-D grid over them (no 65,535 grid limit).
    They return logp = 0 and get exactly zero gradient. Their labels may hold anything (−100).
  - Counted labels outside [0, V) raise ValueError (``grpo_core.logprobs.check_labels``).
  - Non-contiguous logits views (e.g. ``out.logits[:, :-1]``) are read in place, not copied.
  - ``inplace_backward=True`` writes d logits into the logits buffer itself (saves one N·T·V
    tensor). Caveat: the logits are destroyed by backward; do not read them afterwards, and do
    not use it when anything else saved those logits for its own backward.
  - Entropy (``return_entropy=True``) comes from the same pass and is detached (a metric).
  - The fused-linear ``bias`` (V,) fp32 is a constant additive mask (−inf on never-sampled ids,
    e.g. vision special tokens); it gets no gradient.

Backends (``backend=`` "auto" | "torch" | "triton" | "cuda", see dispatch.py): "torch" is the
chunked PyTorch version of the same algorithm (torch_backend.py, the CPU path), "triton" the
kernels in triton_logprobs.py / triton_linear.py (on CPU only under TRITON_INTERPRET=1, for
tests), "cuda" the plain-CUDA log-prob kernel of cuda.py (logits path only; the fused-linear
path falls back to "triton" since there is no CUDA fused-linear kernel).
"""

import importlib
import importlib.util
import os

import torch

from grpo_core.kernels import dispatch, torch_backend
from grpo_core.kernels.autograd import LinearLogprobsFn, TokenLogprobsFn
from grpo_core.logprobs import check_labels
from grpo_core.loss import grpo_loss

try:  # the CUDA backend is optional and registers its own probe on import
    from grpo_core.kernels import cuda as _cuda
except ImportError:  # not built / not written yet: the other backends still work
    _cuda = None

__all__ = ["token_logprobs", "linear_token_logprobs", "fused_grpo_loss", "fused_linear_grpo_loss"]


def _triton_probe(device: torch.device) -> str | None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return None
    return f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


dispatch.register("triton", _triton_probe)


def _impl(name: str):
    """Backend module by name; Triton modules are imported on first use (the interpreter flag
    is read when their kernels are decorated, so late import honours TRITON_INTERPRET)."""
    if name == "torch":
        return torch_backend
    if name == "triton":
        return importlib.import_module("grpo_core.kernels.triton_logprobs")
    if name == "triton_linear":
        return importlib.import_module("grpo_core.kernels.triton_linear")
    raise ValueError(f"no backend module {name!r}")


def _valid_tokens(labels: torch.Tensor, mask: torch.Tensor | None, V: int, where: str):
    """Compact the counted positions: (n_idx, t_idx, ys), each (M,) int64."""
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    check_labels(labels, V, None if mask is None else mask.bool(), where)
    if mask is None:
        N, T = labels.shape
        n_idx = torch.arange(N, device=labels.device).repeat_interleave(T)   # (N·T,)
        t_idx = torch.arange(T, device=labels.device).repeat(N)              # (N·T,)
    else:
        n_idx, t_idx = mask.bool().nonzero(as_tuple=True)                    # (M,) each
    return n_idx, t_idx, labels[n_idx, t_idx].long()


def token_logprobs(logits, labels, temperature=1.0, mask=None, *, return_entropy=False,
                   inplace_backward=False, backend="auto"):
    """logits (N, T, V) bf16/fp16/fp32, labels (N, T) → logp (N, T) fp32 [, entropy (N, T) fp32]."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token_logprobs: expected logits (N, T, V) and labels (N, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # kernels read rows as contiguous vocab vectors
    name = dispatch.resolve(backend, logits.device)
    if name == "cuda":  # the plain-CUDA kernel (csrc/), same contract; it compacts and checks itself
        return _cuda.token_logprobs_cuda(logits, labels, temperature, mask, return_entropy=return_entropy,
                                         inplace_backward=inplace_backward)
    n_idx, t_idx, ys = _valid_tokens(labels, mask, logits.shape[-1], "token_logprobs")
    logp, ent = TokenLogprobsFn.apply(logits, n_idx, t_idx, ys, float(temperature),
                                      return_entropy, inplace_backward, _impl(name))
    return (logp, ent) if return_entropy else logp


def linear_token_logprobs(hidden, weight, labels, temperature=1.0, mask=None, *, bias=None,
                          return_entropy=False, backend="auto"):
    """hidden (N, T, H), weight (V, H), labels (N, T) → logp (N, T) fp32 [, entropy], never
    materialising the (N·T, V) logits. Differentiable in hidden and weight."""
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_token_logprobs: expected hidden (N, T, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"linear_token_logprobs: labels {tuple(labels.shape)} != hidden[:2] {tuple(hidden.shape[:2])}")
    if temperature <= 0:
        raise ValueError(f"linear_token_logprobs: temperature must be > 0, got {temperature}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_token_logprobs: hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    V = weight.shape[0]
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"linear_token_logprobs: bias must be (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("linear_token_logprobs: bias is a constant mask and gets no gradient; pass bias.detach()")
        bias = bias.float().contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_idx, t_idx, ys = _valid_tokens(labels, mask, V, "linear_token_logprobs")
    name = dispatch.resolve("triton" if backend == "cuda" else backend, hidden.device)
    if name == "cuda":  # "auto" picked the CUDA library: it has no fused-linear kernel
        name = "triton" if dispatch.why_unavailable("triton", hidden.device) is None else "torch"
    impl = _impl("triton_linear" if name == "triton" else "torch")
    logp, ent = LinearLogprobsFn.apply(hidden, weight, bias, n_idx, t_idx, ys, float(temperature),
                                       return_entropy, impl)
    return (logp, ent) if return_entropy else logp


def _loss_kwargs(kw):
    allowed = ("clip_low", "clip_high", "dual_clip", "beta", "kl", "agg", "max_len", "total_tokens", "total_seqs")
    unknown = set(kw) - set(allowed)
    if unknown:
        raise TypeError(f"fused GRPO loss: unexpected keyword(s) {sorted(unknown)}; allowed {allowed}")
    return kw


def fused_grpo_loss(logits, labels, old_logprobs, ref_logprobs, advantages, mask, *, temperature=1.0,
                    backend="auto", **loss_kw):
    """= grpo_loss(token_logprobs(logits, labels, T, mask), ...) → (loss, metrics).

    loss_kw: clip_low, clip_high, dual_clip, beta, kl, agg, max_len, total_tokens, total_seqs
    (see grpo_core.loss.grpo_loss). metrics gains "entropy" (masked mean, from the same pass).
    """
    loss_kw = _loss_kwargs(loss_kw)
    logp, ent = token_logprobs(logits, labels, temperature, mask, return_entropy=True, backend=backend)
    return grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mask, entropy=ent, **loss_kw)


def fused_linear_grpo_loss(hidden, weight, labels, old_logprobs, ref_logprobs, advantages, mask, *,
                           bias=None, temperature=1.0, backend="auto", **loss_kw):
    """= grpo_loss(linear_token_logprobs(hidden, weight, labels, ...), ...) → (loss, metrics),
    differentiable in hidden (N, T, H) and weight (V, H); metrics include "entropy"."""
    loss_kw = _loss_kwargs(loss_kw)
    logp, ent = linear_token_logprobs(hidden, weight, labels, temperature, mask, bias=bias,
                                      return_entropy=True, backend=backend)
    return grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mask, entropy=ent, **loss_kw)
