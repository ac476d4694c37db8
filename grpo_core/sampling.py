"""Next-token sampling: logits processors as small pure functions, composed in ``sample_next``.

One decode step turns the policy's next-token logits z (N, V) fp32 into tokens (N,) and the
log-probability the trainer will later recompute for them:

    s       = (z + b) / T                       b: the policy's additive mask (−inf on vision ids)
    logp(y) = log_softmax(s)[y]                 ← recorded, BEFORE any filtering
    s'      = min_p(top_p(top_k(s)))            filters only set entries to −inf
    y       ~ softmax(s')                       (greedy: y = argmax s)

Why record the unfiltered log-prob: the trainer scores completions with
``log_softmax((hidden @ W.T + lm_head_bias) / T)`` (the fused kernels know nothing about top-k /
top-p / min-p), so old/new/ref log-probs and the rollout's log-probs all live on the same
distribution. With every filter off (the GRPO default: T = 1, top_k = 0, top_p = 1, min_p = 0)
it is exactly the sampling distribution.

Deviations / choices, stated once:
  - Filters run in the order temperature → top-k → top-p → min-p, as in HF ``generate``; ties at
    the top-k threshold are all kept (same as HF).
  - Greedy ignores the filters (argmax is inside every one of them) but still records the
    log-prob at temperature T.
  - Draws use the inverse CDF: one uniform u per row, y = first id whose cumulative probability
    exceeds u·total. That needs N random numbers per step, where ``torch.multinomial`` (an
    exponential race) draws N·V of them: ~13× cheaper at V = 1k and ~20× at V = 152k on CPU,
    the largest per-step cost of the sampler. Consequence: the same seed does not reproduce HF
    ``generate``'s sample stream (greedy still matches token for token). The fp32 cumulative sum
    gives a token a zero-width interval only when its probability is below ~1e-7 of the row's
    mass; tokens of probability 0 (−inf scores) are never drawn.
  - The rollout passes each row's u from ``counter_uniforms``: a hash of (key, prompt, sample,
    position), so a completion does not depend on which rows share its batch (chunking, bucket,
    compaction). Without ``uniforms``, u comes from ``generator`` (``seed=None``: torch's global
    RNG, so ``torch.manual_seed`` makes a run reproducible).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .options import check_options, fixed, may_change, option

# resume classes (grpo_core.options)
_SAMPLING = fixed("the sampling distribution and the shape of a step")
_BATCHING = may_change("how rollouts are batched, not what is drawn: samples agree up to rounding "
                       "(each row's draws are keyed by seed, prompt, sample, position)")

SWITCHES = ("auto", "on", "off")


@dataclass
class SamplingOptions:
    """How completions are drawn; shared by SamplingConfig and the trainer's RolloutConfig."""

    #: completion budget; rows still open at the end are "truncated"
    max_new_tokens: int = option(256, ge=1, le=2**17, resume=_SAMPLING)
    #: T: logits are divided by T before softmax (and for log-probs)
    temperature: float = option(1.0, gt=0, resume=_SAMPLING)
    #: nucleus: keep the smallest set with mass ≥ top_p (1.0 = off)
    top_p: float = option(1.0, gt=0, le=1, resume=_SAMPLING)
    top_k: int = option(0, ge=0, resume=_SAMPLING)          # keep the k highest logits (0 = off)
    #: drop tokens with p < min_p · p_max (0.0 = off)
    min_p: float = option(0.0, ge=0, lt=1, resume=_SAMPLING)
    #: cap on sequences decoded together; chunks are whole groups
    max_batch_sequences: int = option(256, ge=1, resume=_BATCHING)
    #: drop ended rows once the live share is ≤ this (0 = never): finished rows leave the batch
    compact_below: float = option(0.75, ge=0, le=1, resume=_BATCHING)
    #: CUDA-graph the decode step (auto: off until measured on a GPU; models/step_runner.py)
    graphs: str = option("auto", choices=SWITCHES, resume=_BATCHING)
    compile: str = option("auto", choices=SWITCHES, resume=_BATCHING)  # torch.compile it (auto: off)

    def sampling_options(self) -> dict:
        """These options as keyword arguments (e.g. for SamplingConfig from a RolloutConfig)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingOptions)}


@dataclass
class SamplingConfig(SamplingOptions):
    greedy: bool = False                            # argmax instead of sampling (evaluation, tests)
    seed: int | None = None                         # private torch.Generator seed; None = global RNG

    def __post_init__(self):
        try:
            check_options(self, "SamplingConfig")
        except ValueError as e:
            raise ValueError(str(e).replace("config: ", "", 1)) from None

    @property
    def filters_on(self) -> bool:
        """True when top-k, top-p or min-p changes the sampling distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


# ── counter-based uniforms: u = f(key, prompt, sample, position), no generator state ─────────────

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²) without int64 overflow (c split in 16-bit halves)."""
    lo = x * (c & 0xFFFF)                                                 # < 2⁴⁸
    hi = ((x * (c >> 16)) & 0xFFFF) << 16                                 # < 2³²
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash (C. Wellons): a bijection of [0, 2³²) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(key: int, prompt: torch.Tensor, sample: torch.Tensor, steps: int
                     ) -> torch.Tensor:
    """(n,) prompt ids, (n,) sample ids → u (n, steps) fp64 in [0, 1),
    u[i, t] = U(key, prompt[i], sample[i], t).

    A pure function of its arguments (Philox-style counter stream, with a hash in place of the
    cipher): row i's draws are the same whatever batch, chunk or bucket it is decoded in.
        h = mix(mix(mix(mix(mix(key_lo) ^ key_hi) ^ prompt) ^ sample) ^ t)
        u = (⌊h / 2⁵⌋ · 2²⁶ + ⌊mix(h ^ φ) / 2⁶⌋) / 2⁵³          53 random bits
    """
    dev = prompt.device
    h = _mix32(torch.tensor([key & _M32], dtype=torch.long, device=dev))
    h = _mix32(h ^ ((key >> 32) & _M32))                                  # (1,)
    h = _mix32(h ^ (prompt.long() & _M32))                                # (n,)
    h = _mix32(h ^ (sample.long() & _M32))                                # (n,)
    h = _mix32(h[:, None] ^ torch.arange(steps, device=dev))              # (n, steps)
    h2 = _mix32(h ^ 0x9E3779B9)
    return ((h >> 5) * (1 << 26) + (h2 >> 6)).double() * 2.0**-53


def draw_key(cfg: SamplingConfig) -> int:
    """The stream key of one rollout: cfg.seed, or one draw from torch's global RNG (seed=None)."""
    if cfg.seed is not None:
        return int(cfg.seed) & ((1 << 64) - 1)
    return int(torch.randint(0, 2**62, (1,)))


def make_generator(cfg: SamplingConfig, device) -> torch.Generator | None:
    """A seeded generator on ``device`` when cfg.seed is set, else None (global RNG)."""
    if cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(cfg.seed))


# ── processors: scores (N, V) fp32 in, scores out; filters write −inf, never renormalise ──────────

def apply_bias(scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """z + b: b (V,) is 0 or −inf (never-sampled ids). Returns a new tensor."""
    return scores.clone() if bias is None else scores + bias               # (N, V)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """s / T (in place; T = 1 is a no-op)."""
    return scores if temperature == 1.0 else scores.div_(temperature)


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep entries ≥ the k-th largest per row (ties kept), −inf elsewhere (in place)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]                    # (N, 1)
    return scores.masked_fill_(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the highest-probability tokens until their mass reaches p (in place).

    A token is dropped when the mass of tokens strictly more likely than it already reaches p,
    so the most likely token is always kept.
    """
    if p >= 1.0:
        return scores
    sorted_s, order = torch.sort(scores, dim=-1, descending=True)          # (N, V)
    probs = torch.softmax(sorted_s, dim=-1)                               # (N, V)
    mass_before = probs.cumsum(-1) - probs                                # (N, V) mass of better tokens
    drop_sorted = mass_before >= p                                        # (N, V)
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill_(drop, float("-inf"))


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens with p < min_p · max p, i.e. s < s_max + log(min_p) (in place)."""
    if min_p <= 0.0:
        return scores
    thresh = scores.amax(-1, keepdim=True) + math.log(min_p)  # (N, 1)
    return scores.masked_fill_(scores < thresh, float("-inf"))


# ── one decode step ───────────────────────────────────────────────────────────────────────────────

def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    bias: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) (any float dtype; sampled in fp32) → (tokens (N,) int64, logprobs (N,) fp32).

    ``uniforms`` (N,) in [0, 1): each row's draw (``counter_uniforms``); None: from ``generator``.
    Runs with autocast off (bf16 logits under autocast are sampled in fp32, never re-cast).

    ``logprobs`` = log_softmax((logits + bias) / T)[token], taken before top-k/top-p/min-p
    (see module docstring). ``logits`` is not modified. Tokens where ``bias`` is −inf are never
    returned (they have probability 0 under every processor here).

    A row whose scores hold NaN or +inf, or are all −inf, has no distribution: its log-prob is
    NaN and its token an arbitrary in-range id, so the caller can report the row (the rollout
    raises NonFiniteLogitsError) instead of indexing out of range. Checking costs (N,), no sync.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next: logits must be (N, V), got shape {tuple(logits.shape)}")
    if not torch.is_autocast_enabled(logits.device.type):                # the common case: no
        return _sample_next(logits, cfg, generator, bias, uniforms)       # context per token
    with torch.autocast(logits.device.type, enabled=False):
        return _sample_next(logits, cfg, generator, bias, uniforms)


def _sample_next(logits, cfg, generator, bias, uniforms):
    scores = apply_temperature(apply_bias(logits.float(), bias), cfg.temperature)  # (N, V)
    if not cfg.greedy and not cfg.filters_on:
        return _sample_unfiltered(scores, generator, uniforms)
    lse = torch.logsumexp(scores, dim=-1)                                 # (N,)
    ok = torch.isfinite(lse)                                              # (N,) False: no distribution
    if cfg.greedy:
        tokens = scores.argmax(dim=-1)                                    # (N,)
    else:
        # Filters work in place; run them on a copy so the gather below still reads the
        # unfiltered scores (the recorded log-prob is taken before filtering).
        filtered = top_p_filter(top_k_filter(scores.clone(), cfg.top_k), cfg.top_p)
        filtered = min_p_filter(filtered, cfg.min_p)
        tokens = draw_inverse_cdf(torch.softmax(filtered, dim=-1), generator, uniforms)  # (N,)
    tokens = tokens.clamp_(max=scores.shape[-1] - 1)                      # a NaN row's draw can be V
    picked = scores.gather(-1, tokens[:, None]).squeeze(-1)               # (N,)
    return tokens, torch.where(ok, picked - lse, torch.nan)


def _sample_unfiltered(scores: torch.Tensor, generator, uniforms
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """No filter (the GRPO default): y ~ p = softmax(s), log p(y) = log(p[y]).

    One fused softmax instead of logsumexp + exp (half the sampler's cost on CPU). log(p[y]) is as
    exact as s[y] − lse (p has fp32 relative error); p[y] never underflows for a drawn y (the
    inverse CDF cannot pick an id of mass < 2⁻²⁴). NaN/inf rows give a NaN p, hence a NaN log-prob.
    """
    probs = torch.softmax(scores, dim=-1)                                 # (N, V)
    tokens = draw_inverse_cdf(probs, generator, uniforms)                 # (N,)
    tokens = tokens.clamp_(max=scores.shape[-1] - 1)                      # a NaN row's draw: V

    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log_()


def draw_inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None = None,
                     uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One id per row with P(j) ∝ weights[:, j] ≥ 0 (need not sum to 1; left unchanged).

    cdf_j = Σ_{i≤j} w_i,  u ~ U[0, cdf_V),  y = min{j : cdf_j > u}.  A zero-weight id j has
    cdf_j = cdf_{j−1}, so it is never the first to exceed u. ``uniforms`` (N,) gives u / cdf_V
    per row; None draws it from ``generator``.
    """
    cdf = weights.cumsum(-1)          # (N, V): a new tensor, so callers keep p without a copy
    total = cdf[:, -1:]                                                   # (N, 1)
    if uniforms is None:
        u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype)
    else:
        u = uniforms.view(-1, 1).to(cdf.dtype)                            # (N, 1)
    u = u * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding: keep u < total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)             # (N,)
