"""grpo_loss reference: hand-computed cases (numbers from the formulas), gradients, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_core.loss import grpo_loss, kl_k1, kl_k2, kl_k3, kl_penalized_rewards

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

# Two sequences, ratios r = exp(logp − old) with old = 0; A = +1 and −1; ε = 0.2.
#   seq0 (A=+1), r = [1.0, 1.5, 0.5]: ℓ = −min(r, clip r)  = [−1.0, −1.2, −0.5]   (token 1 clipped high)
#   seq1 (A=−1), r = [1.0, 1.5, 0.5]: ℓ = max(r, clip r)   = [ 1.0,  1.5,  0.8]   (token 2 clipped low)
# mask seq1 = [1, 1, 0] → counted: seq0 all three, seq1 [1.0, 1.5]
R = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]])
LOGP = torch.log(R)
OLD = torch.zeros(2, 3)
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _loss(agg, **kw):
    kw.setdefault("beta", 0.0)
    return grpo_loss(LOGP, OLD, None, ADV, MASK, agg=agg, **kw)


def test_token_mean_by_hand():
    loss, m = _loss("token_mean")
    assert loss.item() == pytest.approx((-1.0 - 1.2 - 0.5 + 1.0 + 1.5) / 5)
    assert m["tokens"].item() == 5
    assert m["clip_high_frac"].item() == pytest.approx(1 / 5)
    assert m["clip_low_frac"].item() == 0.0  # the low-clipped token of seq1 is masked out
    assert m["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1 + 1.5) / 5)


def test_seq_mean_by_hand():
    loss, _ = _loss("seq_mean")
    assert loss.item() == pytest.approx(((-2.7 / 3) + (2.5 / 2)) / 2)


def test_constant_by_hand():
    loss, _ = _loss("constant", max_len=4)
    assert loss.item() == pytest.approx((-2.7 + 2.5) / (2 * 4))
    loss_t, _ = _loss("constant")  # max_len defaults to T
    assert loss_t.item() == pytest.approx((-2.7 + 2.5) / (2 * 3))


def test_low_clip_counted_when_unmasked():
    _, m = grpo_loss(LOGP, OLD, None, ADV, torch.ones(2, 3), beta=0.0)
    assert m["clip_low_frac"].item() == pytest.approx(1 / 6)
    assert m["clip_high_frac"].item() == pytest.approx(1 / 6)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)


def test_asymmetric_clip_higher():
    # DAPO clip-higher: ε_high = 0.6 lets r = 1.5 through for A > 0 → ℓ = −1.5
    loss, m = grpo_loss(LOGP[:1], OLD[:1], None, ADV[:1], MASK[:1], beta=0.0, clip_high=0.6)
    assert loss.item() == pytest.approx((-1.0 - 1.5 - 0.5) / 3)
    assert m["clip_high_frac"].item() == 0.0


def test_dual_clip_by_hand():
    # A = −1, r = [4, 1]: plain ℓ = max(r, clip r) = [4, 1]; dual clip c = 3 caps it at −c·A = 3
    logp = torch.log(torch.tensor([[4.0, 1.0]]))
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 2)
    plain, _ = grpo_loss(logp, torch.zeros(1, 2), None, adv, mask, beta=0.0)
    dual, _ = grpo_loss(logp, torch.zeros(1, 2), None, adv, mask, beta=0.0, dual_clip=3.0)
    assert plain.item() == pytest.approx((4 + 1) / 2)
    assert dual.item() == pytest.approx((3 + 1) / 2)
    # dual clip never touches positive advantages
    pos, _ = grpo_loss(logp, torch.zeros(1, 2), None, -adv, mask, beta=0.0, dual_clip=3.0)
    assert pos.item() == pytest.approx((-1.2 - 1.0) / 2)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.5)  # ref − logp
    assert kl_k1(logp, ref).item() == pytest.approx(-d)
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * d * d)
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(d) - d - 1)
    # k3 of identical distributions is exactly 0; tiny differences keep full relative precision
    assert kl_k3(torch.zeros(1), torch.zeros(1)).item() == 0.0
    tiny = torch.tensor([1e-6], dtype=torch.float64)
    assert kl_k3(torch.zeros(1, dtype=torch.float64), tiny).item() == pytest.approx(0.5e-12, rel=1e-5)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_beta_kl_added_per_token(kl):
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    adv = torch.zeros(1)  # isolates the KL term
    loss, m = grpo_loss(logp, None, ref, adv, torch.ones(1, 2), beta=0.1, kl=kl)
    d = math.log(0.5)
    per = {"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kl]
    assert loss.item() == pytest.approx(0.1 * per)
    assert m["kl"].item() == pytest.approx(per)


def test_on_policy_gradient_is_policy_gradient():
    # old = None → r = 1 in value, ∂ℓ/∂logp = −A (token_mean: divided by the token count)
    logp = torch.randn(2, 3, requires_grad=True)
    loss, _ = grpo_loss(logp, None, None, ADV, MASK, beta=0.0)
    loss.backward()
    want = -ADV[:, None] * MASK / MASK.sum()
    torch.testing.assert_close(logp.grad, want)
    assert loss.item() == pytest.approx(-(ADV[:, None] * MASK).sum().item() / 5)


def test_kl_in_reward_placement():
    rewards = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[0.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = kl_penalized_rewards(rewards, logp, ref, mask, beta=0.5, kl="k1")
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.5 * 1.0, 0.0 - 0.5 * 0.0]))


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual", [None, 2.5])
def test_gradcheck(agg, kl, dual):
    torch.manual_seed(0)
    N, T = 3, 4
    logp = (torch.randn(N, T, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(N, T, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(N, T, dtype=torch.float64) * 0.3
    adv = torch.randn(N, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)

    def f(lp):
        return grpo_loss(lp, old, ref, adv, mask, beta=0.1, kl=kl, agg=agg, dual_clip=dual, max_len=6)[0]

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.sampled_from(["token_mean", "seq_mean", "constant"]),
       st.integers(0, 2**31 - 1))
def test_padding_invariance_and_masked_grads(N, T, pad, agg, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(N, T, generator=g) - 1).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(N, T, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    kw = dict(beta=0.05, agg=agg, max_len=T + pad)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    loss.backward()
    # masked tokens get exactly zero gradient
    assert torch.all(logp.grad[mask == 0] == 0)
    # appending padding columns (any values, mask 0) changes nothing
    junk = 50 * torch.randn(N, pad, generator=g)
    lp2 = torch.cat([logp.detach(), junk], 1).requires_grad_()
    loss2, _ = grpo_loss(lp2, torch.cat([old, junk], 1), torch.cat([ref, -junk], 1), adv,
                         torch.cat([mask, torch.zeros(N, pad)], 1), **kw)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    loss2.backward()
    torch.testing.assert_close(lp2.grad[:, :T], logp.grad)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
def test_fully_masked_rows(agg):
    logp = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4)
    loss, m = grpo_loss(logp, None, logp.detach() - 0.1, torch.ones(3), mask, agg=agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.all(logp.grad == 0)
    assert m["tokens"].item() == 0 and torch.isfinite(m["kl"])
    # an empty row beside a full one adds nothing to the numerator
    mask2 = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])
    full, _ = grpo_loss(logp[:2], None, None, torch.tensor([1.0, 5.0]), mask2, beta=0.0, agg="token_mean")
    alone, _ = grpo_loss(logp[:1], None, None, torch.tensor([1.0]), mask2[:1], beta=0.0, agg="token_mean")
    assert full.item() == pytest.approx(alone.item())


def test_global_denominators():
    # splitting a batch in two micro-batches with the global counts reproduces the full loss
    torch.manual_seed(1)
    logp, old, ref = torch.randn(4, 5) - 1, torch.randn(4, 5) - 1, torch.randn(4, 5) - 1
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.4).float()
    for agg in ("token_mean", "seq_mean", "constant"):
        full, _ = grpo_loss(logp, old, ref, adv, mask, agg=agg, max_len=5)
        kw = dict(agg=agg, max_len=5, total_tokens=mask.sum(), total_seqs=4)
        a, _ = grpo_loss(logp[:1], old[:1], ref[:1], adv[:1], mask[:1], **kw)
        b, _ = grpo_loss(logp[1:], old[1:], ref[1:], adv[1:], mask[1:], **kw)
        assert (a + b).item() == pytest.approx(full.item(), rel=1e-5), agg


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(beta=0.1), "ref_logprobs"),
        (dict(kl="k4", beta=0.0), "kl=.k4. is not one of"),
        (dict(agg="mean", beta=0.0), "agg=.mean. is not one of"),
        (dict(dual_clip=0.5, beta=0.0), "dual_clip"),
        (dict(agg="constant", max_len=2, beta=0.0), "max_len"),
    ],
)
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        grpo_loss(LOGP, OLD, None, ADV, MASK, **kw)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="old_logprobs shape"):
        grpo_loss(LOGP, OLD[:, :2], None, ADV, MASK, beta=0.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(LOGP, OLD, None, torch.ones(3), MASK, beta=0.0)
