"""The GRPO-family options of grpo_loss: hand-derived values and gradients on tiny batches, then each
against an independent restatement of the peer's published formula (TRL GRPOTrainer._compute_loss).

Hand cases use old = 0 so logp is the log-ratio; gradients are d loss / d logp written out.
The fused backends (which call this same grpo_loss) are in tests/test_loss_variants_fused.py.
"""

import math

import pytest
import torch
from numerics import assert_equiv

from grpo_core.config import GRPOConfig
from grpo_core.logprobs import token_entropy
from grpo_core.loss import (
    LOSS_OPTION_KEYS,
    check_loss_options,
    grpo_loss,
    high_entropy_mask,
    kl_k1,
    kl_k2,
    kl_k3,
    loss_options,
    mask_truncated,
)

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)
F64 = torch.float64


def grad_of(logp, **kw):
    """(loss value, d loss / d logp) of grpo_loss at logp (old = 0 unless given), beta 0 unless given."""
    lp = logp.clone().double().requires_grad_()
    old = kw.pop("old", torch.zeros_like(lp))
    adv = kw.pop("adv")
    mask = kw.pop("mask", torch.ones_like(lp))
    kw.setdefault("beta", 0.0)
    loss, m = grpo_loss(lp, old, kw.pop("ref", None), adv, mask, **kw)
    loss.backward()
    return loss.item(), lp.grad, m


# ---- GSPO ----------------------------------------------------------------------------------------

def test_gspo_sequence_by_hand():
    # seq0 A=+1, log r = [0.0, 0.1]: s = 0.05, r = e^0.05 = 1.0513 (inside [0.8, 1.2]) → ℓ = −r per token
    # seq1 A=−1, log r = [−0.4, −0.2, (masked 9.0)]: s = −0.3, r = 0.7408 < 0.8 → ℓ = max(r, 0.8) = 0.8 (clipped)
    logp = torch.tensor([[0.0, 0.1, 0.0], [-0.4, -0.2, 9.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 0]], dtype=F64)
    r0 = math.exp(0.05)
    loss, g, m = grad_of(logp, adv=torch.tensor([1.0, -1.0], dtype=F64), mask=mask, ratio_level="sequence")
    assert loss == pytest.approx((-2 * r0 + 2 * 0.8) / 4, rel=1e-12)
    # token_mean: L = (1/4)(−2 r0 + 1.6), r0 = exp(mean of 2 log-ratios) → dL/dlogp_0t = −(2 r0)(1/2)/4 = −r0/4
    want = torch.tensor([[-r0 / 4, -r0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    assert_equiv(g, want, "d loss / d logp")
    assert m["clip_low_frac"].item() == pytest.approx(2 / 4) and m["ratio_mean"].item() == pytest.approx(
        (2 * r0 + 2 * math.exp(-0.3)) / 4)


def test_gspo_sequence_vs_sequence_token_with_per_token_advantages():
    # one sequence, log r = [0.1, −0.1] (s = 0, r = 1), per-token A = [2, −1], seq_mean
    logp = torch.tensor([[0.1, -0.1]], dtype=F64)
    adv = torch.tensor([[2.0, -1.0]], dtype=F64)
    seq_loss, g_seq, _ = grad_of(logp, adv=adv, agg="seq_mean", ratio_level="sequence")
    tok_loss, g_tok, _ = grad_of(logp, adv=adv, agg="seq_mean", ratio_level="sequence_token")
    # value: both −(1/2)(2·1 − 1·1) = −0.5 (every token sees r_i = 1)
    assert seq_loss == pytest.approx(-0.5) and tok_loss == pytest.approx(-0.5)
    # sequence: ℓ = −r·A_t, dr/dlogp_t = r/2 → dL/dlogp_t = −(1/2) r (ΣA)/2 = −0.25 for both tokens
    assert_equiv(g_seq, torch.tensor([[-0.25, -0.25]], dtype=F64), "sequence grad")
    # sequence_token: ℓ_t = −sg[r]·exp(logp_t − sg logp_t)·A_t → dL/dlogp_t = −(1/2) r A_t
    assert_equiv(g_tok, torch.tensor([[-1.0, 0.5]], dtype=F64), "sequence_token grad")


def test_sequence_token_on_policy_equals_token_level():
    # at old = logp the sequence weight is 1 with no gradient: the token-level gradient exactly (TRL's test)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g, dtype=F64) - 1
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(F64)
    kw = dict(adv=adv, mask=mask, old=logp.clone(), clip_low=1e-3, clip_high=1e-3)
    _, g_tok, _ = grad_of(logp, ratio_level="token", **dict(kw, old=logp.clone()))
    _, g_st, _ = grad_of(logp, ratio_level="sequence_token", **dict(kw, old=logp.clone()))
    assert_equiv(g_st, g_tok, "sequence_token = token at ratio 1")


# ---- CISPO, SAPO, delta ------------------------------------------------------------------------

def test_cispo_by_hand():
    # r = [1.5, 8.0], cispo_max = 5 → weights sg[1.5, 5]; A = 2; ℓ = −w·A·logp (token_mean over 2)
    logp = torch.tensor([[math.log(1.5), math.log(8.0)]], dtype=F64)
    loss, g, m = grad_of(logp, adv=torch.tensor([2.0], dtype=F64), policy_loss="cispo", cispo_max=5.0)
    assert loss == pytest.approx(-(1.5 * 2 * math.log(1.5) + 5 * 2 * math.log(8.0)) / 2, rel=1e-12)
    assert_equiv(g, torch.tensor([[-1.5 * 2 / 2, -5 * 2 / 2]], dtype=F64), "cispo grad: capped, never zero")
    assert m["clip_high_frac"].item() == 0.5 and m["clip_low_frac"].item() == 0.0


@pytest.mark.parametrize("A,tau", [(1.5, 1.0), (-1.5, 1.05)])
def test_sapo_by_hand(A, tau):
    # r = [1, 1.5]; ℓ = −σ(τ(r − 1))·(4/τ)·A; dℓ/dlogp = −A·4σ(1 − σ)·r (chain rule through r = e^logp)
    logp = torch.tensor([[0.0, math.log(1.5)]], dtype=F64)
    loss, g, m = grad_of(logp, adv=torch.tensor([A], dtype=F64), policy_loss="sapo", sapo_tau_pos=1.0,
                         sapo_tau_neg=1.05)
    sig = lambda x: 1 / (1 + math.exp(-x))                                   # noqa: E731
    vals = [-sig(tau * (r - 1)) * 4 / tau * A for r in (1.0, 1.5)]
    grads = [-A * 4 * sig(tau * (r - 1)) * (1 - sig(tau * (r - 1))) * r / 2 for r in (1.0, 1.5)]
    assert loss == pytest.approx(sum(vals) / 2, rel=1e-12)
    assert_equiv(g, torch.tensor([grads], dtype=F64), "sapo grad")
    assert g[0, 0].item() == pytest.approx(-A / 2)     # at r = 1 the gate's slope is 1: the plain PG term
    assert m["clip_frac"].item() == 0.0


def test_delta_by_hand():
    adv_n, adv_p = torch.tensor([-1.0], dtype=F64), torch.tensor([1.0], dtype=F64)
    r4 = torch.tensor([[math.log(4.0)]], dtype=F64)
    # A = −1, r = 4: plain ℓ = max(4, 1.2) = 4; delta 3 caps the unclipped branch: max(3, 1.2) = 3, no gradient
    plain, g_plain, _ = grad_of(r4, adv=adv_n)
    capped, g_capped, _ = grad_of(r4, adv=adv_n, delta=3.0)
    dual, g_dual, _ = grad_of(r4, adv=adv_n, dual_clip=3.0)
    assert (plain, capped, dual) == (pytest.approx(4.0), pytest.approx(3.0), pytest.approx(3.0))
    assert g_plain.item() == pytest.approx(4.0) and g_capped.item() == 0.0 and g_dual.item() == 0.0
    # A = +1, r = 1.15 with delta = 1.1 < 1 + ε_high: −min(1.1, 1.15) = −1.1 (constant: no gradient)
    val, g, _ = grad_of(torch.tensor([[math.log(1.15)]], dtype=F64), adv=adv_p, delta=1.1)
    assert val == pytest.approx(-1.1) and g.item() == 0.0
    # A = +1 and delta ≥ 1 + ε_high: no change at all
    for r in (0.5, 1.1, 3.0):
        lp = torch.tensor([[math.log(r)]], dtype=F64)
        (v1, g1, _), (v2, g2, _) = grad_of(lp, adv=adv_p, delta=1.5), grad_of(lp, adv=adv_p)
        assert v1 == v2 and torch.equal(g1, g2), r


# ---- entropy: bonus and high-entropy tokens ---------------------------------------------------

def test_entropy_bonus_value_and_gradient_through_logits():
    # loss = plain + (−c)·(1/M) Σ H_t; dH/dz_j = −p_j (log p_j + H)   (T = 1)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 7, generator=g, dtype=F64).requires_grad_()
    labels = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]], dtype=F64)
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    c = 0.3
    lsm = torch.log_softmax(z, -1)
    logp = lsm.gather(-1, labels[..., None]).squeeze(-1) * mask
    loss, m = grpo_loss(logp, None, None, adv, mask, beta=0.0, entropy=token_entropy(z), entropy_coef=c)
    loss.backward()
    with torch.no_grad():
        p = lsm.exp()
        H = -(p * lsm).sum(-1)                                               # (2, 3)
        M = mask.sum()
        onehot = torch.nn.functional.one_hot(labels, 7).to(F64)
        d_pg = (-adv[:, None] * mask / M)[..., None] * (onehot - p)          # d(−A logp)/dz, on-policy
        d_ent = (c / M) * (mask[..., None] * p * (lsm + H[..., None]))       # d(−c·H/M)/dz
        plain = -(adv[:, None] * mask).sum() / M
    assert loss.item() == pytest.approx((plain - c * (H * mask).sum() / M).item(), rel=1e-12)
    assert_equiv(z.grad, d_pg + d_ent, "d loss / d logits with the entropy bonus")
    assert m["entropy"].item() == pytest.approx(((H * mask).sum() / M).item())


def test_high_entropy_mask_by_hand_and_against_torch_quantile():
    H = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # counted [0.1, 0.3, 0.5, 0.7, 0.9]; q = 0.4 → 0.6-quantile at 0.6·4 = 2.4 → 0.5 + 0.4·0.2 = 0.58
    keep = high_entropy_mask(H, mask, 0.4)
    assert keep.tolist() == [[False, False, True], [False, True, False]]
    assert high_entropy_mask(H, mask, 1.0).tolist() == mask.bool().tolist()
    g = torch.Generator().manual_seed(3)
    for q in (0.05, 0.2, 0.3, 0.5, 0.99):
        Hr, mr = torch.rand(6, 9, generator=g), torch.rand(6, 9, generator=g) > 0.3
        trl = (Hr >= torch.quantile(Hr[mr].double(), 1 - q).float()) & mr      # TRL's get_high_entropy_mask
        assert torch.equal(high_entropy_mask(Hr, mr, q), trl), q


def test_top_entropy_quantile_loss_by_hand():
    # same H as above, A = [1, −1], on-policy: only the two kept tokens carry −A; KL and denominators see all 5
    H = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=F64)
    loss, g, m = grad_of(torch.zeros(2, 3, dtype=F64), old=torch.zeros(2, 3, dtype=F64),
                         adv=torch.tensor([1.0, -1.0], dtype=F64),
                         mask=mask, entropy=H, top_entropy_quantile=0.4)
    assert loss == pytest.approx((-1.0 + 1.0) / 5)
    assert_equiv(g, torch.tensor([[0, 0, -1 / 5], [0, 1 / 5, 0]], dtype=F64), "only high-entropy tokens")
    assert m["entropy_kept_frac"].item() == pytest.approx(2 / 5)


# ---- KL: bias correction, non-finite inputs ----------------------------------------------------

def test_kl_bias_correction_by_hand():
    # ℓ = β·r·k3(d), d = ref − logp, r = e^(logp − old): dℓ/dlogp = β r (k3 − (e^d − 1)) = −β r d
    lp, old, ref = math.log(0.5), math.log(0.4), math.log(0.25)
    r, d = 0.5 / 0.4, ref - lp
    k3 = math.exp(d) - d - 1
    loss, g, m = grad_of(torch.tensor([[lp]], dtype=F64), old=torch.tensor([[old]], dtype=F64),
                         ref=torch.tensor([[ref]], dtype=F64), adv=torch.zeros(1, dtype=F64), beta=0.1,
                         kl_bias_correction=True)
    assert loss == pytest.approx(0.1 * r * k3, rel=1e-12) and m["kl"].item() == pytest.approx(r * k3)
    assert g.item() == pytest.approx(-0.1 * r * d, rel=1e-12)


def test_kl_estimators_stay_finite_on_minus_inf_reference():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-float("inf")])
    for fn in (kl_k1, kl_k2, kl_k3):
        assert torch.isfinite(fn(logp, ref)).all(), fn.__name__
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * 20.0 ** 2)       # d clamped at ±20, as k3
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    for kl in ("k1", "k2", "k3"):
        loss, _ = grpo_loss(lp, None, torch.tensor([[-float("inf"), -2.0]]), torch.ones(1),
                            torch.ones(1, 2), beta=0.1, kl=kl)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), kl


def test_counted_minus_inf_logprob_is_a_clear_error():
    lp = torch.zeros(2, 4)
    lp[1, 2] = -float("inf")
    with pytest.raises(ValueError, match=r"row 1, position 2 has log-prob -inf \(1 such token\(s\)\).*probability 0"):
        grpo_loss(lp, None, None, torch.ones(2), torch.ones(2, 4), beta=0.0)
    lp[1, 2] = float("nan")
    with pytest.raises(ValueError, match="row 1, position 2 has log-prob nan.*non-finite"):
        grpo_loss(lp, None, None, torch.ones(2), torch.ones(2, 4), beta=0.0)
    masked = torch.ones(2, 4)
    masked[1, 2] = 0                                                          # masked: not counted, no error
    loss, _ = grpo_loss(torch.where(masked.bool(), lp, 0.0), None, None, torch.ones(2), masked, beta=0.0)
    assert torch.isfinite(loss)


# ---- the peer's formula, restated independently --------------------------------------------------

def trl_loss(logp, old, ref, adv, mask, H, *, level, loss_type, eps_lo, eps_hi, delta, beta, bias_kl, q,
             tau_pos, tau_neg, agg, max_len):
    """TRL GRPOTrainer._compute_loss (v0.2x), restated from its published formulas: coef_1 = exp(log
    importance weight) by level; KL = k3, × coef_1 when corrected; cispo caps coef_1 at ε_high
    (detached) × A × logp; sapo σ(τ(coef_1 − 1))·4/τ; clip with delta capping coef_1 after coef_2;
    entropy mask on the policy term; loss_type grpo/bnpo/dr_grpo → seq_mean/token_mean/constant."""
    lr = logp - old
    if level == "token":
        w = lr
    else:
        s = ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        w = s if level == "sequence" else logp - logp.detach() + s.detach()
    c1 = torch.exp(w)
    A = adv.unsqueeze(1)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    if bias_kl:
        kl = kl * c1
    if loss_type == "cispo":
        ptl = -torch.clamp(c1, max=eps_hi).detach() * A * logp
    elif loss_type == "sapo":
        t = torch.where(A > 0, torch.tensor(tau_pos, dtype=A.dtype), torch.tensor(tau_neg, dtype=A.dtype))
        ptl = -torch.sigmoid(t * (c1 - 1)) * 4 / t * A
    else:
        c2 = torch.clamp(c1, 1 - eps_lo, 1 + eps_hi)
        c1c = c1 if delta is None else torch.clamp(c1, max=delta)
        ptl = -torch.min(c1c * A, c2 * A)
    if q < 1:
        thr = torch.quantile(H[mask.bool()], 1 - q)
        ptl = ptl * ((H >= thr) & mask.bool())
    ptl = ptl + beta * kl
    if agg == "seq_mean":
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if agg == "token_mean":
        return (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    return (ptl * mask).sum() / (logp.shape[0] * max_len)


PEER_CASES = [
    dict(level="token", loss_type="clip", delta=None, bias_kl=False, q=1.0),
    dict(level="sequence", loss_type="clip", delta=None, bias_kl=False, q=1.0),
    dict(level="sequence_token", loss_type="clip", delta=None, bias_kl=True, q=1.0),
    dict(level="token", loss_type="clip", delta=1.6, bias_kl=True, q=0.3),
    dict(level="token", loss_type="cispo", delta=None, bias_kl=False, q=1.0),
    dict(level="sequence", loss_type="cispo", delta=None, bias_kl=True, q=0.5),
    dict(level="token", loss_type="sapo", delta=None, bias_kl=False, q=1.0),
    dict(level="sequence_token", loss_type="sapo", delta=None, bias_kl=True, q=0.2),
]


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean", "constant"])
@pytest.mark.parametrize("case", PEER_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_trl_restatement(case, agg):
    g = torch.Generator().manual_seed(7)
    N, T = 4, 6
    logp0 = torch.randn(N, T, generator=g, dtype=F64) * 0.5 - 1
    old = logp0 + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    ref = logp0 + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3], dtype=F64)
    mask = (torch.rand(N, T, generator=g) > 0.25).to(F64)
    mask[0, :2] = 1
    H = torch.rand(N, T, generator=g, dtype=F64) * 2
    eps_hi = 2.0 if case["loss_type"] == "cispo" else 0.28                  # TRL's cispo cap is ε_high
    ours_kw = dict(ratio_level=case["level"], policy_loss=case["loss_type"], delta=case["delta"],
                   kl_bias_correction=case["bias_kl"], top_entropy_quantile=case["q"], clip_low=0.2, clip_high=0.28,
                   cispo_max=eps_hi, sapo_tau_pos=1.0, sapo_tau_neg=1.05, beta=0.04, agg=agg, max_len=8)
    lp_a, lp_b = logp0.clone().requires_grad_(), logp0.clone().requires_grad_()
    ours, _ = grpo_loss(lp_a, old, ref, adv, mask, entropy=H, **ours_kw)
    theirs = trl_loss(lp_b, old, ref, adv, mask, H, level=case["level"], loss_type=case["loss_type"], eps_lo=0.2,
                      eps_hi=eps_hi, delta=case["delta"], beta=0.04, bias_kl=case["bias_kl"], q=case["q"],
                      tau_pos=1.0, tau_neg=1.05, agg=agg, max_len=8)
    ours.backward()
    theirs.backward()
    assert_equiv(ours.detach(), theirs.detach(), "loss")
    assert_equiv(lp_a.grad, lp_b.grad, "d loss / d logp")


# gradcheck compares with finite differences of the loss VALUE, so it applies to the variants whose
# gradient is that of their value; cispo and sequence_token stop gradients on purpose (hand tests above)
@pytest.mark.parametrize("opts", [dict(ratio_level="sequence"), dict(policy_loss="sapo"),
                                  dict(delta=1.5, dual_clip=2.0),
                                  dict(kl_bias_correction=True), dict(kl_bias_correction=True, ratio_level="sequence")])
@pytest.mark.parametrize("agg", ["seq_mean", "token_mean", "constant"])
def test_gradcheck_variants(opts, agg):
    g = torch.Generator().manual_seed(11)
    logp = (torch.randn(3, 4, generator=g, dtype=F64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g, dtype=F64) * 0.3
    ref = logp.detach() + torch.randn(3, 4, generator=g, dtype=F64) * 0.3
    adv = torch.randn(3, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=F64)
    torch.autograd.gradcheck(lambda lp: grpo_loss(lp, old, ref, adv, mask, beta=0.1, agg=agg, max_len=6, **opts)[0],
                             (logp,), eps=1e-6, atol=1e-6)


# ---- options and config --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(policy_loss="cispo", delta=2.0), "delta=2.0 bounds the PPO clip.*policy_loss='cispo'"),
    (dict(policy_loss="sapo", dual_clip=3.0), "dual_clip=3.0 bounds the PPO clip"),
    (dict(kl_bias_correction=True, beta=0.0), "kl_bias_correction=True multiplies the KL term.*beta=0"),
    # ranges: the declarations on LossOptions (grpo_core.options.check_value's wording)
    (dict(ratio_level="seq"),
     r"grpo_loss: ratio_level='seq' is not one of \('token', 'sequence', 'sequence_token'\)"),
    (dict(policy_loss="ppo"), "grpo_loss: policy_loss='ppo' is not one of"),
    (dict(top_entropy_quantile=0.0), r"grpo_loss: top_entropy_quantile must be > 0 and ≤ 1, got 0.0"),
    (dict(delta=1.0), "grpo_loss: delta must be > 1, got 1.0"),
    (dict(cispo_max=0.0), "grpo_loss: cispo_max must be > 0, got 0.0"),
    (dict(entropy_coef=-0.1), "grpo_loss: entropy_coef must be ≥ 0, got -0.1"),
    (dict(clip_low=1.0), "grpo_loss: clip_low must be ≥ 0 and < 1, got 1.0"),   # as the config says
])
def test_bad_options(kw, match):
    kw.setdefault("beta", 0.04)
    with pytest.raises(ValueError, match=match):
        grpo_loss(torch.zeros(1, 2), None, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2),
                  entropy=torch.ones(1, 2), **kw)


def test_entropy_options_need_the_entropy():
    for kw in (dict(entropy_coef=0.01), dict(top_entropy_quantile=0.2)):
        with pytest.raises(ValueError, match="need the per-token entropy"):
            grpo_loss(torch.zeros(1, 2), None, None, torch.ones(1), torch.ones(1, 2), beta=0.0, **kw)
    lp = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="entropy carries no gradient, so the bonus would change the loss value only"):
        grpo_loss(lp, None, None, torch.ones(1), torch.ones(1, 2), beta=0.0,
                  entropy=torch.ones(1, 2), entropy_coef=0.01)
    grpo_loss(lp, None, None, torch.ones(1), torch.ones(1, 2), beta=0.0, entropy=torch.ones(1, 2),
              top_entropy_quantile=0.5)


def test_loss_options_are_declared_once_and_are_the_config_keys():
    import dataclasses

    from grpo_core.loss import LossOptions

    g = GRPOConfig()
    assert isinstance(g, LossOptions)                       # the config extends the declaration
    assert LOSS_OPTION_KEYS == tuple(f.name for f in dataclasses.fields(LossOptions))
    assert loss_options(g) == dataclasses.asdict(LossOptions())        # same defaults: one place
    assert LossOptions.of(g, beta=0.0).beta == 0.0 and LossOptions.of(g).agg == g.agg
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['clip'\]"):
        LossOptions.of(g, clip=0.2)
    for f in dataclasses.fields(LossOptions):               # the resume class on every field
        assert f.metadata["resume"] == ("fixed", "the objective"), f.name
    check_loss_options(g, where="config", prefix="grpo.")
    with pytest.raises(ValueError, match=r"config: grpo.delta=2.0 bounds the PPO clip.*grpo.policy_loss='sapo'"):
        check_loss_options(g, policy_loss="sapo", delta=2.0, where="config", prefix="grpo.")
    with pytest.raises(ValueError, match=r"config: grpo.clip_low must be ≥ 0 and < 1, got -0.5"):
        check_loss_options(g, clip_low=-0.5, where="config", prefix="grpo.")
    with pytest.raises(ValueError, match=r"grpo.kl_bias_correction=True multiplies the KL term of the loss; with "
                                         r"grpo.kl_placement='reward'"):
        check_loss_options(g, kl_bias_correction=True, kl_placement="reward", where="config", prefix="grpo.")


def test_an_options_object_and_keywords_give_the_same_loss():
    from grpo_core.loss import LossOptions

    torch.manual_seed(0)
    lp, ref = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    adv, mask = torch.randn(3, dtype=F64), torch.ones(3, 5, dtype=F64)
    kw = dict(agg="seq_mean", clip_high=0.28, beta=0.1, kl="k2", policy_loss="cispo", cispo_max=2.0)
    by_kw, _ = grpo_loss(lp, lp - 0.1, ref, adv, mask, **kw)
    by_obj, _ = grpo_loss(lp, lp - 0.1, ref, adv, mask, LossOptions(**kw))
    mixed, _ = grpo_loss(lp, lp - 0.1, ref, adv, mask, LossOptions(**dict(kw, beta=0.0)), beta=0.1)
    assert by_kw.item() == by_obj.item() == mixed.item()
    default, _ = grpo_loss(lp, lp - 0.1, ref, adv, mask, LossOptions(**dict(kw, beta=0.0)))
    assert default.item() != by_kw.item()                   # the object is read (the test can fail)


def test_mask_truncated():
    mask = torch.ones(3, 4)
    mask[2, 3] = 0
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match=r"truncated must be \(N,\) = \(3,\)"):
        mask_truncated(mask, torch.tensor([True]))
