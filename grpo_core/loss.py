"""The GRPO objective in plain PyTorch: the reference every fused path is held to.

Per completion token t of sequence i (mask m_it = 1), with π = current policy, π_old the
sampling policy, π_ref the frozen reference and A the advantage:

  1. importance ratio, by ``ratio_level``:
       "token"          r_it = exp(logp_it − old_it)                                    (GRPO / PPO)
       "sequence"       r_i  = exp(s_i),  s_i = Σ_t m_it (logp_it − old_it) / Σ_t m_it   (GSPO)
       "sequence_token" r_it = sg[r_i] · exp(logp_it − sg[logp_it])                     (GSPO-token)
     (sg = stop-gradient. sequence_token has the value of r_i and the gradient r_i·∇logp_it, so a
      per-token advantage still acts per token.)
  2. policy term pg_it, by ``policy_loss``:
       "clip"  pg = −min(r̃·A, clip(r, 1 − ε_low, 1 + ε_high)·A),  r̃ = min(r, δ) if ``delta`` else r
               pg = min(pg, −c·A) where A < 0            if ``dual_clip`` = c  (Ye et al. 2020)
       "cispo" pg = −sg[min(r, cispo_max)] · A · logp    (MiniMax-M1: every token keeps a gradient)
       "sapo"  pg = −σ(τ(r − 1)) · (4/τ) · A,  τ = sapo_tau_pos if A > 0 else sapo_tau_neg  (SAPO)
  3. high-entropy tokens only (``top_entropy_quantile`` q < 1, Wang et al. 2025 "80/20"):
       pg_it ← pg_it · 1[H_it ≥ h_q],  h_q = quantile_{1−q}(H over the counted tokens, linear)
  4. ℓ_it = pg_it + β·KL_it·(r_it if ``kl_bias_correction``) − entropy_coef·H_it

and the loss aggregates ℓ over tokens by ``agg``:
    "seq_mean"   (1/N) Σ_i (1/|o_i|) Σ_t ℓ_it          original GRPO: each sequence weighs the same
    "token_mean" (1/Σ|o_i|) Σ_i Σ_t ℓ_it               DAPO / BNPO: each token weighs the same
    "constant"   (1/(N·L_max)) Σ_i Σ_t ℓ_it            Dr. GRPO: no length normalisation bias

Deviations and choices:
  - KL estimators (Schulman, "Approximating KL divergence"), with d = ref − logp:
      k1 = −d,  k2 = d²/2,  k3 = exp(d) − d − 1 = expm1(d) − d  (≥ 0, unbiased, low variance).
    d is clamped to [−20, 20] in all three and log r to ≤ 20, so a −inf reference log-prob (a
    token the reference never samples) gives a large finite KL, not inf or inf·0 = NaN; inside
    that range the math is exact.
  - A counted token whose log-prob is −inf or NaN is an error (ValueError naming row and
    position): the policy gives the sampled token probability 0 — a sampler/mask mismatch.
  - ``old_logprobs=None`` is the on-policy case (μ = 1): old = logp.detach(), so r = 1 in value but
    its gradient is ∇logp — exactly the policy-gradient term.
  - An all-masked sequence adds 0 to every numerator; "seq_mean" still divides by N (as TRL does),
    so the loss of a batch does not depend on how many sequences came back empty.
  - ``total_tokens`` / ``total_seqs`` override the local denominators. The trainer passes the counts
    of the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data
    parallelism give the gradient of the full-batch loss for every ``agg`` mode. The top-entropy
    threshold h_q is the one exception: it is taken over the tokens of this call (one micro-batch).
  - ``delta`` equals ``dual_clip`` = δ for A < 0 and, when δ ≥ 1 + ε_high, changes nothing for
    A > 0; it is offered under TRL's name. Both only mean something for policy_loss="clip".
  - The entropy bonus and the KL term count every token; only pg is restricted to high-entropy
    tokens (as TRL does); the denominators stay those of the mask.
  - With ``kl_bias_correction`` the "kl" metric is the corrected estimate r·KL (as TRL logs it).
  - KL can instead be put in the reward (PPO/RLHF style): see ``kl_penalized_rewards``.
"""

import dataclasses
from dataclasses import dataclass

import torch

from .options import check_options, fixed, option

KLS = ("k1", "k2", "k3")
AGGS = ("token_mean", "seq_mean", "constant")
KL_PLACEMENTS = ("loss", "reward")     # β·KL in the loss (GRPO), or −β·Σ KL in the reward
RATIO_LEVELS = ("token", "sequence", "sequence_token")   # GRPO | GSPO | GSPO-token
POLICY_LOSSES = ("clip", "cispo", "sapo")                # PPO-clip | MiniMax-M1 CISPO | SAPO soft gate
OBJECTIVE = fixed("the objective")


@dataclass
class LossOptions:
    """The options of grpo_loss, declared once: default, range, one line, resume class.
    ``GRPOConfig`` extends it, so each is also the ``grpo.<name>`` config key."""

    #: "token_mean" | "seq_mean" | "constant" (Dr. GRPO)
    agg: str = option("token_mean", choices=AGGS, resume=OBJECTIVE)
    clip_low: float = option(0.2, ge=0, lt=1, resume=OBJECTIVE)      # ε_low
    #: ε_high (DAPO clip-higher: e.g. 0.28)
    clip_high: float = option(0.2, ge=0, resume=OBJECTIVE)
    #: c > 1 bounds the loss for A < 0; None = off
    dual_clip: float | None = option(None, gt=1, resume=OBJECTIVE)
    #: KL coefficient; 0 = no reference model at all
    beta: float = option(0.04, ge=0, resume=OBJECTIVE)
    kl: str = option("k3", choices=KLS, resume=OBJECTIVE)            # "k1" | "k2" | "k3"
    # variants (docs/VARIANTS.md; the math: the module docstring)
    #: "token" (GRPO) | "sequence" (GSPO) | "sequence_token" (GSPO-token)
    ratio_level: str = option("token", choices=RATIO_LEVELS, resume=OBJECTIVE)
    #: "clip" (PPO/GRPO) | "cispo" (MiniMax-M1) | "sapo" (soft gate)
    policy_loss: str = option("clip", choices=POLICY_LOSSES, resume=OBJECTIVE)
    #: clip only: cap the unclipped ratio at δ (TRL's two-sided delta); None = off
    delta: float | None = option(None, gt=1, resume=OBJECTIVE)
    #: cispo only: cap on the detached ratio weight
    cispo_max: float = option(5.0, gt=0, resume=OBJECTIVE)
    #: sapo only: gate temperature τ for A > 0
    sapo_tau_pos: float = option(1.0, gt=0, resume=OBJECTIVE)
    #: sapo only: gate temperature τ for A ≤ 0
    sapo_tau_neg: float = option(1.05, gt=0, resume=OBJECTIVE)
    #: entropy bonus: loss −= coef · mean entropy (0 = off)
    entropy_coef: float = option(0.0, ge=0, resume=OBJECTIVE)
    #: policy loss on the top-q highest-entropy tokens only (1 = all; 0.2 = "80/20")
    top_entropy_quantile: float = option(1.0, gt=0, le=1, resume=OBJECTIVE)
    #: KL term × importance ratio (DeepSeek-V3.2; TRL use_bias_correction_kl)
    kl_bias_correction: bool = option(False, resume=OBJECTIVE)

    @classmethod
    def of(cls, options=None, **overrides) -> "LossOptions":
        """LossOptions from ``options`` (a LossOptions, e.g. a GRPOConfig, or None = the defaults)
        with keyword ``overrides``; TypeError naming an unknown keyword."""
        unknown = sorted(set(overrides) - set(LOSS_OPTION_KEYS))
        if unknown:
            raise TypeError(f"grpo_loss: unexpected keyword(s) {unknown}; the loss options are "
                            f"{LOSS_OPTION_KEYS} (grpo_core.loss.LossOptions)")
        base = {k: getattr(options, k) for k in LOSS_OPTION_KEYS} if options is not None else {}
        return cls(**{**base, **overrides})


LOSS_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(LossOptions))   # = grpo.* config keys
_MAX_LOG = 20.0


# ---- KL estimators ------------------------------------------------------------------------------

def _d(logp, ref):
    return (ref - logp).clamp(-_MAX_LOG, _MAX_LOG)


def kl_k1(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k1 = logp − ref = −d: unbiased, high variance, can be negative."""
    return -_d(logp, ref)


def kl_k2(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k2 = d² / 2: biased, low variance, ≥ 0."""
    return 0.5 * _d(logp, ref) ** 2


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) − d − 1 with d = ref − logp: unbiased, ≥ 0 (GRPO's choice); expm1 for accuracy."""
    d = _d(logp, ref)
    return torch.expm1(d) - d


KL_FNS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---- the pieces: ratio, policy term, token selection, aggregation ---------------------------------

def log_ratio(logp, old, mask, level="token"):
    """log r by ``ratio_level`` (module docstring, step 1): (N, T), or (N, 1) for "sequence"."""
    lr = torch.where(mask.bool(), logp - old, torch.zeros((), dtype=logp.dtype))    # (N, T), 0 off-mask
    if level == "token":
        return lr
    m = mask.to(logp.dtype)
    s = lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)           # (N, 1) mean log-ratio
    if level == "sequence":
        return s
    return logp - logp.detach() + s.detach()      # value s_i, gradient ∇logp_it (sequence_token)


def policy_loss_per_token(logp, old, adv, o: LossOptions, mask=None):
    """Policy term per token (module docstring, step 2) under options ``o``.
    logp/old (N, T), adv (N, 1) or (N, T) → (pg (N, T), ratio, low, high).

    ratio is (N, T), or (N, 1) for ratio_level="sequence"; low/high flag the tokens whose gradient
    a clip removed (clip: PPO's two sides; cispo: r > cispo_max, whatever the sign of A; sapo: none).
    """
    mask = torch.ones_like(logp) if mask is None else mask
    ratio = torch.exp(log_ratio(logp, old, mask, o.ratio_level).clamp(max=_MAX_LOG))
    none = torch.zeros_like(ratio, dtype=torch.bool)
    if o.policy_loss == "cispo":
        weight = ratio.clamp(max=o.cispo_max).detach()
        return -weight * adv * logp, ratio, none, ratio > o.cispo_max
    if o.policy_loss == "sapo":
        pos, neg = (torch.tensor(x, dtype=logp.dtype, device=logp.device)
                    for x in (o.sapo_tau_pos, o.sapo_tau_neg))
        tau = torch.where(adv > 0, pos, neg)                                     # (N, 1) or (N, T)
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)                  # soft clip, = 2/τ at r = 1
        return torch.broadcast_to(-gate * adv, logp.shape), ratio, none, none
    unclipped = (ratio if o.delta is None else ratio.clamp(max=o.delta)) * adv
    clipped = ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if o.dual_clip is not None:
        # for A < 0 the surrogate is additionally bounded: loss ≤ −c·A (c > 1)
        loss = torch.where(adv < 0, torch.minimum(loss, -o.dual_clip * adv), loss)
    low = (ratio < 1.0 - o.clip_low) & (adv < 0)     # clipped below: a bad token was pushed down
    high = (ratio > 1.0 + o.clip_high) & (adv > 0)   # clipped above: a good token was pushed up
    return torch.broadcast_to(loss, logp.shape), ratio, low, high    # (N, T) even when the ratio is (N, 1)


def high_entropy_mask(entropy, mask, quantile):
    """Bool (N, T): counted tokens whose entropy is in the top ``quantile`` of the counted tokens.

    Threshold h = the (1 − q)-quantile of the counted entropies with linear interpolation (what
    ``torch.quantile`` computes, without its size limit); a token is kept when H ≥ h. q = 1 keeps all.
    """
    m = mask.bool()
    vals = entropy.detach()[m].double()                                      # (M,)
    if vals.numel() == 0 or quantile >= 1.0:
        return m
    s = vals.sort().values
    pos = (1.0 - quantile) * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    h = s[lo] + (pos - lo) * (s[hi] - s[lo])
    return m & (entropy.detach().double() >= h)


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


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: zero the loss mask (N, T) of completions that hit max_new_tokens.

    ``truncated`` (N,) bool (the rollout's ``truncated``). Their rewards still count in their
    group's advantages; they just leave the loss and its token counts.
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"mask_truncated: truncated must be (N,) = ({mask.shape[0]},), got {tuple(truncated.shape)}")
    return mask * (~truncated.bool().to(mask.device))[:, None].to(mask.dtype)


# ---- options: declared once (LossOptions), checked here for grpo_loss and for the config -------

def loss_options(cfg) -> dict:
    """{key: cfg.key} for the loss options of ``cfg`` (a GRPOConfig or any LossOptions)."""
    return {k: getattr(cfg, k) for k in LOSS_OPTION_KEYS}


def check_loss_options(options: LossOptions | None = None, *, kl_placement="loss",
                       where="grpo_loss", prefix="", **kw):
    """Each option against its declaration on ``LossOptions`` (choices, ranges), then the rules
    between options; ValueError "<where>: <prefix><key> ...". ``kl_placement`` is the config's
    (grpo_loss itself always has the KL in the loss). Keywords override fields of ``options``."""
    o = LossOptions.of(options, **kw)
    check_options(o, prefix.rstrip("."), fields=LOSS_OPTION_KEYS, origin=where)

    def bad(key, value, what):
        raise ValueError(f"{where}: {prefix}{key}={value!r} {what}")

    for key, value in (("delta", o.delta), ("dual_clip", o.dual_clip)):
        if value is not None and o.policy_loss != "clip":
            bad(key, value, f"bounds the PPO clip; it has no meaning with {prefix}policy_loss="
                            f"{o.policy_loss!r} (unset it, or use policy_loss='clip')")
    if o.kl_bias_correction and o.beta == 0:
        bad("kl_bias_correction", True, f"multiplies the KL term, which is off ({prefix}beta=0)")
    if o.kl_bias_correction and kl_placement != "loss":
        bad("kl_bias_correction", True,
            f"multiplies the KL term of the loss; with {prefix}kl_placement={kl_placement!r} the "
            "KL is in the reward (set one or the other)")


def _check(logprobs, old, ref, adv, mask, entropy, o: LossOptions, max_len):
    if logprobs.dim() != 2:
        raise ValueError(f"grpo_loss: logprobs must be (N, T), got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref), ("mask", mask), ("entropy", entropy)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"grpo_loss: {name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if adv.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"grpo_loss: advantages must be (N,) or (N, T), got {tuple(adv.shape)} "
                         f"for logprobs {tuple(logprobs.shape)}")
    check_loss_options(o)
    if o.beta != 0 and ref is None:
        raise ValueError("grpo_loss: beta != 0 needs ref_logprobs (pass them, or set beta=0)")
    if entropy is None and (o.entropy_coef != 0 or o.top_entropy_quantile < 1):
        raise ValueError("grpo_loss: entropy_coef > 0 and top_entropy_quantile < 1 need the per-token entropy: "
                         "pass entropy= (the fused losses do; by hand: grpo_core.logprobs.token_entropy(logits))")
    if o.entropy_coef != 0 and logprobs.requires_grad and not entropy.requires_grad:
        raise ValueError("grpo_loss: entropy_coef > 0 but the entropy carries no gradient, so the bonus would change "
                         "the loss value only; pass an entropy computed with autograd (this kernel backend returns "
                         "it detached: use one whose entropy is differentiable, or entropy_coef=0)")
    if max_len is not None and max_len < logprobs.shape[1] and o.agg == "constant":
        raise ValueError(f"grpo_loss: max_len={max_len} is shorter than the completions (T={logprobs.shape[1]})")
    bad = ~torch.isfinite(logprobs.detach()) & mask.bool()                  # (N, T): one check, one sync
    if bad.any():
        n, t = (int(i) for i in bad.nonzero()[0])
        v = float(logprobs[n, t])
        what = ("probability 0 under the policy: its logit is -inf (e.g. a suppressed vision/special token "
                "that the sampler should never have emitted); fix the sampler's mask, or set mask=0 there"
                if v == float("-inf")
                else "a non-finite log-prob: the forward pass overflowed (check dtype and logits)")
        raise ValueError(f"grpo_loss: counted token at row {n}, position {t} has log-prob {v} "
                         f"({int(bad.sum())} such token(s)); it has {what}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions | None = None,
    *,
    max_len: int | None = None,
    total_tokens: float | None = None,
    total_seqs: int | None = None,
    entropy: torch.Tensor | None = None,
    **option_kw,
):
    """logprobs/old/ref/mask (N, T), advantages (N,) or (N, T) → (loss scalar, metrics dict).

    ``options``: a ``LossOptions`` (a ``GRPOConfig`` is one; None = the defaults); keywords named
    like its fields (``beta=0.0``, ``agg="seq_mean"``, ...) override single options.
    ``entropy`` (N, T): the per-token entropy of the policy (the fused kernels compute it in the
    same pass). Needed by ``entropy_coef`` (where it must carry a gradient) and
    ``top_entropy_quantile``; always reported as the "entropy" metric (masked token mean).
    metrics (detached scalars): policy_loss, kl, clip_low_frac, clip_high_frac, clip_frac,
    ratio_mean, adv_mean, adv_std, tokens [, entropy] [, entropy_kept_frac].
    """
    o = LossOptions.of(options, **option_kw)
    _check(logprobs, old_logprobs, ref_logprobs, advantages, mask, entropy, o, max_len)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = advantages[:, None] if advantages.dim() == 1 else advantages    # (N, 1) or (N, T)
    adv = adv.to(logprobs.dtype)
    agg_kw = dict(agg=o.agg, max_len=max_len, total_tokens=total_tokens, total_seqs=total_seqs)

    pg, ratio, low, high = policy_loss_per_token(logprobs, old, adv, o, mask)
    keep = None
    if o.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(entropy, mask, o.top_entropy_quantile)     # (N, T) bool
        pg = torch.where(keep, pg, torch.zeros((), dtype=pg.dtype))
    per_token = pg
    kl_tok = None
    if ref_logprobs is not None:
        kl_tok = KL_FNS[o.kl](logprobs, ref_logprobs)                      # (N, T)
        if o.kl_bias_correction:
            kl_tok = kl_tok * ratio                                        # r·KL (DeepSeek-V3.2)
        if o.beta != 0:
            per_token = per_token + o.beta * kl_tok
    if o.entropy_coef != 0:
        per_token = per_token - o.entropy_coef * entropy.to(per_token.dtype)
    loss = aggregate(per_token, mask, **agg_kw)

    with torch.no_grad():
        m = mask.bool()
        n_tok = m.sum()
        denom = n_tok.clamp(min=1).float()
        adv_seq = advantages.float() if advantages.dim() == 1 else advantages.float()[m]
        ratio_t = ratio.detach().expand_as(logprobs)
        metrics = {
            "policy_loss": aggregate(pg.detach(), mask, **agg_kw),
            "kl": ((kl_tok.detach() * m).sum() / denom if kl_tok is not None
                   else torch.zeros((), device=logprobs.device)),
            "clip_low_frac": (low.expand_as(m) & m).sum() / denom,
            "clip_high_frac": (high.expand_as(m) & m).sum() / denom,
            "clip_frac": ((low | high).expand_as(m) & m).sum() / denom,
            "ratio_mean": (ratio_t * m).sum() / denom,
            "adv_mean": adv_seq.mean() if adv_seq.numel() else torch.zeros(()),
            "adv_std": adv_seq.std() if adv_seq.numel() > 1 else torch.zeros(()),
            "tokens": n_tok.float(),
        }
        if entropy is not None:
            metrics["entropy"] = (entropy.detach().float() * m).sum() / denom
        if keep is not None:
            metrics["entropy_kept_frac"] = keep.sum() / denom
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
