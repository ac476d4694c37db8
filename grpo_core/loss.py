"""The GRPO objective in plain PyTorch: the reference every fused path is held to.

Per completion token t of sequence i (mask m_it = 1), with π = current policy, π_old the
sampling policy and π_ref the frozen reference:

    r_it   = exp(logp_it − old_it)                                   importance ratio
    pg_it  = −min(r_it·A_i, clip(r_it, 1 − ε_low, 1 + ε_high)·A_i)   clipped surrogate
    pg_it  = min(pg_it, −c·A_i)        if dual_clip = c and A_i < 0  (dual clip, Ye et al. 2020)
    ℓ_it   = pg_it + β·KL_it                                          KL in the loss (GRPO)

and the loss aggregates ℓ over tokens by ``agg``:
    "seq_mean"   (1/N) Σ_i (1/|o_i|) Σ_t ℓ_it          original GRPO: each sequence weighs the same
    "token_mean" (1/Σ|o_i|) Σ_i Σ_t ℓ_it               DAPO / BNPO: each token weighs the same
    "constant"   (1/(N·L_max)) Σ_i Σ_t ℓ_it            Dr. GRPO: no length normalisation bias

Deviations and choices:
  - KL estimators (Schulman, "Approximating KL divergence"), with d = ref − logp:
      k1 = −d,  k2 = d²/2,  k3 = exp(d) − d − 1 = expm1(d) − d  (≥ 0, unbiased, low variance).
    d is clamped to [−20, 20] in k3 and log r to ≤ 20, so exp cannot overflow into inf·0 = NaN
    gradients; inside that range the math is exact.
  - ``old_logprobs=None`` is the on-policy case (μ = 1): old = logp.detach(), so r = 1 in value but
    its gradient is ∇logp — exactly the policy-gradient term.
  - An all-masked sequence adds 0 to every numerator; "seq_mean" still divides by N (as TRL does),
    so the loss of a batch does not depend on how many sequences came back empty.
  - ``total_tokens`` / ``total_seqs`` override the local denominators. The trainer passes the counts
    of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data
    parallelism give the gradient of the full-batch loss for every ``agg`` mode.
  - KL can instead be put in the reward (PPO/RLHF style): see ``kl_penalized_rewards``.
"""

import torch

KLS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean", "constant")
KL_PLACEMENTS = ("loss", "reward")     # β·KL in the loss (GRPO), or −β·Σ KL in the reward (kl_penalized_rewards)
_MAX_LOG = 20.0


def kl_k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k1 = logp − ref: unbiased, high variance, can be negative."""
    return logp - ref


def kl_k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k2 = (logp − ref)² / 2: biased, low variance, ≥ 0."""
    return 0.5 * (logp - ref) ** 2


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) − d − 1 with d = ref − logp: unbiased, ≥ 0 (GRPO's choice); expm1 for accuracy."""
    d = (ref - logp).clamp(-_MAX_LOG, _MAX_LOG)
    return torch.expm1(d) - d


KL_FNS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def policy_loss_per_token(logp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Clipped surrogate per token. logp/old (N, T), adv (N, 1) or (N, T) → (loss, ratio, low, high)."""
    ratio = torch.exp((logp - old).clamp(max=_MAX_LOG))                # (N, T)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)                           # (N, T)
    if dual_clip is not None:
        # for A < 0 the surrogate is additionally bounded: loss ≤ −c·A (c > 1)
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    low = (ratio < 1.0 - clip_low) & (adv < 0)     # clipped from below: a bad token already pushed down
    high = (ratio > 1.0 + clip_high) & (adv > 0)   # clipped from above: a good token already pushed up
    return loss, ratio, low, high


def aggregate(per_token, mask, agg="token_mean", max_len=None, total_tokens=None, total_seqs=None):
    """Reduce a per-token loss (N, T) under ``mask`` to a scalar by ``agg`` (see module docstring)."""
    m = mask.to(per_token.dtype)
    if agg == "token_mean":
        denom = m.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=m.dtype)
        return (per_token * m).sum() / denom.clamp(min=1.0)
    if agg == "seq_mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)   # (N,)
        n = per_token.shape[0] if total_seqs is None else total_seqs
        return per_seq.sum() / max(n, 1)
    if agg == "constant":
        n = per_token.shape[0] if total_seqs is None else total_seqs
        L = per_token.shape[1] if max_len is None else max_len
        return (per_token * m).sum() / max(n * L, 1)
    raise ValueError(f"aggregate: agg must be one of {AGGS}, got {agg!r}")


def _check(logprobs, old, ref, adv, mask, beta, kl, agg, clip_low, clip_high, dual_clip, max_len):
    if logprobs.dim() != 2:
        raise ValueError(f"grpo_loss: logprobs must be (N, T), got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref), ("mask", mask)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"grpo_loss: {name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if adv.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"grpo_loss: advantages must be (N,) or (N, T), got {tuple(adv.shape)} for logprobs {tuple(logprobs.shape)}")
    if kl not in KLS:
        raise ValueError(f"grpo_loss: kl must be one of {KLS}, got {kl!r}")
    if agg not in AGGS:
        raise ValueError(f"grpo_loss: agg must be one of {AGGS}, got {agg!r}")
    if beta != 0 and ref is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs (pass them, or set beta=0)")
    if beta < 0 or clip_low < 0 or clip_high < 0:
        raise ValueError(f"grpo_loss: beta, clip_low, clip_high must be >= 0, got {beta}, {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"grpo_loss: dual_clip must be > 1 (e.g. 3.0) or None, got {dual_clip}")
    if max_len is not None and max_len < logprobs.shape[1] and agg == "constant":
        raise ValueError(f"grpo_loss: max_len={max_len} is shorter than the completions (T={logprobs.shape[1]})")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    beta: float = 0.04,
    kl: str = "k3",
    agg: str = "token_mean",
    max_len: int | None = None,
    total_tokens: float | None = None,
    total_seqs: int | None = None,
    entropy: torch.Tensor | None = None,
):
    """logprobs/old/ref/mask (N, T), advantages (N,) or (N, T) → (loss scalar, metrics dict).

    ``entropy`` (N, T): the per-token entropy of the policy (the fused kernels compute it in the
    same pass); reported as the "entropy" metric (masked token mean).
    metrics (detached scalars): policy_loss, kl, clip_low_frac, clip_high_frac, clip_frac,
    ratio_mean, adv_mean, adv_std, tokens [, entropy].
    """
    _check(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta, kl, agg, clip_low, clip_high, dual_clip, max_len)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = advantages[:, None] if advantages.dim() == 1 else advantages    # (N, 1) or (N, T)
    adv = adv.to(logprobs.dtype)
    agg_kw = dict(agg=agg, max_len=max_len, total_tokens=total_tokens, total_seqs=total_seqs)

    pg, ratio, low, high = policy_loss_per_token(logprobs, old, adv, clip_low, clip_high, dual_clip)
    per_token = pg
    kl_tok = None
    if ref_logprobs is not None:
        kl_tok = KL_FNS[kl](logprobs, ref_logprobs)                        # (N, T)
        if beta != 0:
            per_token = pg + beta * kl_tok
    loss = aggregate(per_token, mask, **agg_kw)

    with torch.no_grad():
        m = mask.bool()
        n_tok = m.sum()
        denom = n_tok.clamp(min=1).float()
        adv_seq = advantages.float() if advantages.dim() == 1 else advantages.float()[m]
        metrics = {
            "policy_loss": aggregate(pg.detach(), mask, **agg_kw),
            "kl": (kl_tok.detach() * m).sum() / denom if kl_tok is not None else torch.zeros((), device=logprobs.device),
            "clip_low_frac": (low & m).sum() / denom,
            "clip_high_frac": (high & m).sum() / denom,
            "clip_frac": ((low | high) & m).sum() / denom,
            "ratio_mean": (ratio.detach() * m).sum() / denom,
            "adv_mean": adv_seq.mean() if adv_seq.numel() else torch.zeros(()),
            "adv_std": adv_seq.std() if adv_seq.numel() > 1 else torch.zeros(()),
            "tokens": n_tok.float(),
        }
        if entropy is not None:
            if entropy.shape != logprobs.shape:
                raise ValueError(f"grpo_loss: entropy shape {tuple(entropy.shape)} != logprobs shape {tuple(logprobs.shape)}")
            metrics["entropy"] = (entropy.detach().float() * m).sum() / denom
    return loss, metrics


def kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, beta, kl="k1"):
    """KL in the reward instead of the loss: r_i − β·Σ_t KL_it  ((N,) rewards → (N,)), no grad.

    Use with ``beta=0`` in ``grpo_loss``; the penalty then enters through the advantages.
    """
    if kl not in KLS:
        raise ValueError(f"kl_penalized_rewards: kl must be one of {KLS}, got {kl!r}")
    with torch.no_grad():
        per_tok = KL_FNS[kl](logprobs.float(), ref_logprobs.float()) * mask.float()   # (N, T)
        return rewards.float() - beta * per_tok.sum(-1)
