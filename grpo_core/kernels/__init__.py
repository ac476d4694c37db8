"""Fused log-prob kernels and the GRPO loss on top of them.

What is fused, and why there (design decision):
  The kernels fuse the *log-prob*: log-softmax + gather over the vocabulary, online softmax over
  vocab tiles in fp32 (running max m, running sum l, lse = m + log l), one fp32 lse saved per
  token. Backward is a custom kernel:

      d logits_j = (g (1[j = y] − p_j) − g_H p_j (log p_j + H)) / T,   p = softmax(logits / T)

  with g = dLoss/dlogp and g_H = dLoss/dH per token (the g_H term only when the loss uses H).

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

Behaviour shared by every backend (one set of checks, one compaction, one scatter):
  - Masked positions (mask = 0) cost no work: the valid tokens are compacted first (one
    ``nonzero``, a host sync) and the kernels run a 1-D grid over them (no 65,535 grid limit).
    They return logp = 0 and get exactly zero gradient. Their labels may hold anything (−100).
  - Counted labels outside [0, V) raise ValueError (``grpo_core.logprobs.check_labels``); tensors
    on different devices, or a dtype the backend lacks (cuda: fp32/bf16/fp16), raise too.
  - Non-contiguous logits views (e.g. ``out.logits[:, :-1]``) are read in place, not copied.
  - ``inplace_backward=True`` writes d logits into the logits buffer itself (saves one N·T·V
    tensor). Caveat: the logits are destroyed by backward; do not read them afterwards, and do
    not use it when anything else saved those logits for its own backward.
  - Entropy (``return_entropy=True``) comes from the same pass and is differentiable on every
    backend: dH/dz_j = −p_j (log p_j + H). A loss that does not use it pays nothing in backward.
  - The fused-linear ``bias`` (V,) fp32 is a constant additive mask (−inf on never-sampled ids,
    e.g. vision special tokens); it gets no gradient.

Backends (``backend=`` "auto" | "torch" | "triton" | "cuda"; dispatch.py says which runs where):
each is one module per path behind the same two autograd Functions (autograd.py):
    torch   torch_backend.py       chunked PyTorch, the CPU path and the reference algorithm
    triton  triton_logprobs.py     logits path        (on CPU only under TRITON_INTERPRET=1, tests)
            triton_linear.py       fused-linear path
    cuda    cuda.py                logits path: the plain-CUDA kernels of csrc/
            cuda_linear.py         fused-linear path: cuBLAS GEMM tiles + the csrc/ log-softmax
A named backend runs on both paths or raises; ``dispatch.check_backend`` says so before any model
loads.
"""

import importlib
import importlib.util
import os

import torch

from grpo_core.kernels import dispatch
from grpo_core.kernels.autograd import LinearLogprobsFn, TokenLogprobsFn
from grpo_core.logprobs import check_labels
from grpo_core.loss import LOSS_OPTION_KEYS, grpo_loss

check_backend = dispatch.check_backend

try:  # the CUDA backend is optional and registers its own probe on import
    from grpo_core.kernels import cuda as _cuda
except ImportError:  # not built / not written yet: the other backends still work
    _cuda = None

__all__ = ["token_logprobs", "linear_token_logprobs", "fused_grpo_loss", "fused_linear_grpo_loss",
           "check_backend", "LOSS_OPTIONS"]


def _triton_probe(device: torch.device) -> str | None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return None
    return f"triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device}"


dispatch.register("triton", _triton_probe)


def _impl(name: str, path: str):
    """The module serving ``path`` for backend ``name``; imported on first use (Triton reads the
    interpreter flag when its kernels are decorated, so a late import honours TRITON_INTERPRET)."""
    return importlib.import_module(f"grpo_core.kernels.{dispatch.module_name(name, path)}")


def _backend(backend: str, path: str, where: str, *tensors):
    """Resolve the backend for these tensors and check what every backend needs of them."""
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"{where}: all tensors must be on one device, got {device} and {t.device}")
    impl = _impl(dispatch.resolve(backend, device, path), path)
    if tensors[0].dtype not in impl.DTYPES:
        raise TypeError(f"{where}: {tensors[0].dtype} is not supported by {impl.__name__}; "
                        f"use one of {[str(d) for d in impl.DTYPES]} (or backend='torch')")
    return impl


def _valid_tokens(labels: torch.Tensor, mask: torch.Tensor | None, V: int, where: str):
    """Compact the counted positions: (n_idx, t_idx, ys), each (M,) int64."""
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{where}: labels must hold integer token ids, got {labels.dtype}")
    check_labels(labels, V, None if mask is None else mask.bool(), where)
    if mask is None:
        N, T = labels.shape
        n_idx = torch.arange(N, device=labels.device).repeat_interleave(T)   # (N·T,)
        t_idx = torch.arange(T, device=labels.device).repeat(N)              # (N·T,)
    else:
        n_idx, t_idx = mask.bool().nonzero(as_tuple=True)                    # (M,) each
    return n_idx, t_idx, labels[n_idx, t_idx].long().contiguous()


def _check_temperature(temperature, where):
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"{where}: temperature must be a finite number > 0, got {temperature}")


def token_logprobs(logits, labels, temperature=1.0, mask=None, *, return_entropy=False,
                   inplace_backward=False, backend="auto"):
    """logits (N, T, V) bf16/fp16/fp32, labels (N, T) → logp (N, T) fp32 [, entropy (N, T) fp32]."""
    where = "token_logprobs"
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{where}: expected logits (N, T, V) and labels (N, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    _check_temperature(temperature, where)
    impl = _backend(backend, "logits", where, logits, labels, mask)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # kernels read rows as contiguous vocab vectors
    n_idx, t_idx, ys = _valid_tokens(labels, mask, logits.shape[-1], where)
    logp, ent = TokenLogprobsFn.apply(logits, n_idx, t_idx, ys, float(temperature),
                                      return_entropy, inplace_backward, impl)
    return (logp, ent) if return_entropy else logp


def linear_token_logprobs(hidden, weight, labels, temperature=1.0, mask=None, *, bias=None,
                          return_entropy=False, backend="auto"):
    """hidden (N, T, H), weight (V, H), labels (N, T) → logp (N, T) fp32 [, entropy], never
    materialising the (N·T, V) logits. Differentiable in hidden and weight."""
    where = "linear_token_logprobs"
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"{where}: expected hidden (N, T, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"{where}: labels {tuple(labels.shape)} != hidden[:2] {tuple(hidden.shape[:2])}")
    _check_temperature(temperature, where)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{where}: hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    V = weight.shape[0]
    if bias is not None:
        if bias.shape != (V,):
            raise ValueError(f"{where}: bias must be (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{where}: bias is a constant mask and gets no gradient; pass bias.detach()")
        bias = bias.float().contiguous()
    impl = _backend(backend, "linear", where, hidden, weight, labels, mask, bias)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_idx, t_idx, ys = _valid_tokens(labels, mask, V, where)
    logp, ent = LinearLogprobsFn.apply(hidden, weight, bias, n_idx, t_idx, ys, float(temperature),
                                       return_entropy, impl)
    return (logp, ent) if return_entropy else logp


# ---- the GRPO loss on top ------------------------------------------------------------------------

# what the fused losses forward to grpo_loss besides the log-probs: a LossOptions object, the
# option keywords (its fields) and the denominators. "entropy" is not one: they pass their own.
LOSS_OPTIONS = LOSS_OPTION_KEYS + ("max_len", "total_tokens", "total_seqs")


def _loss_kwargs(kw):
    unknown = set(kw) - set(LOSS_OPTIONS)
    if unknown:
        raise TypeError(f"fused GRPO loss: unexpected keyword(s) {sorted(unknown)}; "
                        f"grpo_core.loss.grpo_loss takes {LOSS_OPTIONS}")
    return kw


def _loss(logp, ent, old_logprobs, ref_logprobs, advantages, mask, options, loss_kw):
    """grpo_loss on the fused log-probs, with the (differentiable) entropy of the same pass."""
    return grpo_loss(logp, old_logprobs, ref_logprobs, advantages, mask, options, entropy=ent,
                     **loss_kw)


def fused_grpo_loss(logits, labels, old_logprobs, ref_logprobs, advantages, mask, options=None, *,
                    temperature=1.0, backend="auto", **loss_kw):
    """= grpo_loss(token_logprobs(logits, labels, T, mask), ..., entropy=H) → (loss, metrics).

    options / loss_kw: as for grpo_core.loss.grpo_loss (``LOSS_OPTIONS``). The per-token
    entropy H (N, T) comes from the same pass and carries a gradient.
    """
    loss_kw = _loss_kwargs(loss_kw)
    logp, ent = token_logprobs(logits, labels, temperature, mask, return_entropy=True, backend=backend)
    return _loss(logp, ent, old_logprobs, ref_logprobs, advantages, mask, options, loss_kw)


def fused_linear_grpo_loss(hidden, weight, labels, old_logprobs, ref_logprobs, advantages, mask,
                           options=None, *, bias=None, temperature=1.0, backend="auto", **loss_kw):
    """= grpo_loss(linear_token_logprobs(hidden, weight, labels, ...), ..., entropy=H) → (loss,
    metrics), differentiable in hidden (N, T, H) and weight (V, H)."""
    loss_kw = _loss_kwargs(loss_kw)
    logp, ent = linear_token_logprobs(hidden, weight, labels, temperature, mask, bias=bias,
                                      return_entropy=True, backend=backend)
    return _loss(logp, ent, old_logprobs, ref_logprobs, advantages, mask, options, loss_kw)
