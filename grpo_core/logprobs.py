"""Per-token log-probabilities: the plain-PyTorch reference every fast path is checked against.

    logp[n, t] = log softmax(logits[n, t] / T)[labels[n, t]]
               = logits[n, t, y] / T − logsumexp_j(logits[n, t, j] / T)

Shift convention: this function does NOT shift. ``logits[:, t]`` must already be the
distribution that scores ``labels[:, t]``. For a causal LM over ``input_ids`` that means
``token_logprobs(out.logits[:, :-1], input_ids[:, 1:])``; the policy's ``completion_hidden``
returns hidden states already aligned this way (row j predicts completion token j).

Memory: logits are processed in row chunks and only one chunk is upcast to fp32 at a time, so a
bf16 (N, T, V) input never gets a full fp32 copy. Output is fp32.
"""

import torch

# ~64 MiB of fp32 per chunk: small enough not to matter, big enough to keep the matmul-free
# log-softmax efficient.
_CHUNK_ELEMS = 1 << 24


def check_labels(labels: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None, where: str = "labels"):
    """Raise a clear error if any counted label is outside [0, V)."""
    valid = labels if mask is None else labels[mask.bool()]
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{where}: label ids must be in [0, {vocab_size}) where counted, got min {lo}, max {hi}; "
            "masked positions may hold any id (use mask=0 for padding)"
        )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (N, T, V) any float dtype, labels (N, T) int → log-probs (N, T) fp32.

    Positions with ``mask == 0`` may hold any label (e.g. padding −100) and return 0.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs: expected logits (N, T, V) and labels (N, T), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    N, T, V = logits.shape
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    check_labels(labels, V, keep, "token_logprobs")
    safe = torch.where(keep, labels, torch.zeros_like(labels))          # (N, T)
    flat = logits.reshape(N * T, V)
    ys = safe.reshape(N * T)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32  # fp64 only for gradcheck
    out = torch.empty(N * T, dtype=acc, device=logits.device)
    rows = max(1, _CHUNK_ELEMS // max(V, 1))
    for s in range(0, N * T, rows):
        chunk = flat[s:s + rows].to(acc) / temperature                   # (rows, V) fp32
        lse = torch.logsumexp(chunk, dim=-1)                             # (rows,)
        tgt = chunk.gather(-1, ys[s:s + rows, None]).squeeze(-1)         # (rows,)
        out[s:s + rows] = tgt - lse
    out = out.view(N, T)
    return torch.where(keep, out, torch.zeros_like(out))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: (N, T, V) → (N, T) fp32 (reference)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    return -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
