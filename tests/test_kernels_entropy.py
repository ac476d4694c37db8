"""The per-token entropy carries a gradient on every backend, on both paths (issue #16).

    H = −Σ_j p_j log p_j,   dH/dz_j = −p_j (log p_j + H),   d logits_j gets −g_H p_j (log p_j + H) / T

Checked against torch autograd of the reference (grpo_core.logprobs) run in float64 on the same
inputs, within the bounds fp32 arithmetic allows (kernel_helpers): the logits path (d logits) and
the fused-linear path (d hidden, d weight), with −inf logits/bias entries (p = 0, log p = −inf)
and a loss that uses only the entropy. A loss that does not use the entropy hands the backends
g_H = None: no entropy work in backward.
"""

import pytest
import torch
from kernel_helpers import (  # noqa: E402,F401  (sets TRITON_INTERPRET on CPU first)
    BACKENDS,
    assert_close,
    entropy_truth,
    linear_grad_bounds,
    logit_grad_bound,
    logp_tol,
)

import grpo_core.kernels as K  # noqa: E402
from grpo_core.logprobs import token_logprobs as ref_logprobs  # noqa: E402

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def make_case(N=3, T=4, V=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=gen) * 3                         # (N, T, V)
    logits[0, 1, ::3] = -float("inf")                                         # p = 0 entries
    labels = torch.randint(1, V, (N, T), generator=gen)
    labels[0, 1] = 1                                                           # a finite entry
    mask = torch.rand(N, T, generator=gen) > 0.2
    mask[0, 1] = True
    mask[2] = False                                                            # a fully masked row
    labels[~mask] = -100
    g, g_ent = torch.randn(N, T, generator=gen), torch.randn(N, T, generator=gen)
    return logits, labels, mask, g, g_ent


def truth_logits(x, labels, mask, temperature, g, g_ent):
    """fp64 reference: logp, H and d(Σ g·logp + Σ g_H·H)/d x by torch autograd."""
    x = x.detach().double().requires_grad_()
    lp = ref_logprobs(x, labels, temperature, mask)
    ent = torch.where(mask, entropy_truth(x, temperature), 0.0)
    loss = (lp * g.double()).sum() + ((ent * g_ent.double()).sum() if g_ent is not None else 0.0)
    loss.backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("uses", ["both", "entropy only"])
def test_logits_path_entropy_gradient(backend, temperature, uses):
    logits, labels, mask, g, g_ent = make_case()
    g = g if uses == "both" else torch.zeros_like(g)
    x = logits.clone().requires_grad_()
    lp, ent = K.token_logprobs(x, labels, temperature, mask, return_entropy=True, backend=backend)
    assert ent.requires_grad, "entropy must carry a gradient"
    loss = (ent * g_ent).sum() if uses == "entropy only" else (lp * g).sum() + (ent * g_ent).sum()
    loss.backward()
    want_lp, want_ent, want_grad = truth_logits(logits, labels, mask, temperature, g, g_ent)
    assert_close(lp, want_lp, "logp", atol=logp_tol(logits, temperature))
    assert_close(ent, want_ent, "entropy", atol=logp_tol(logits, temperature))
    bound = logit_grad_bound(want_grad, logits, labels, mask, g, temperature, g_ent=g_ent)
    assert_close(x.grad, want_grad, "d logits (g·logp + g_H·H)", atol=bound)
    assert torch.isfinite(want_grad).all() and torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_path_entropy_gradient(backend):
    N, T, H, V = 3, 4, 24, 1000
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H ** 0.5 * 2
    _, labels, mask, g, g_ent = make_case(N, T, V, seed=1)
    bias = torch.zeros(V)
    bias[::7] = -float("inf")                                                   # never-sampled ids
    labels = torch.where(mask & (labels % 7 == 0), 1, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = K.linear_token_logprobs(h, w, labels, 0.7, mask, bias=bias, return_entropy=True, backend=backend)
    ((lp * g).sum() + (ent * g_ent).sum()).backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = hd @ wd.t() + bias.double()                                        # (N, T, V) fp64
    logits.retain_grad()
    want_lp = ref_logprobs(logits, labels, 0.7, mask)
    want_ent = torch.where(mask, entropy_truth(logits, 0.7), 0.0)
    ((want_lp * g.double()).sum() + (want_ent * g_ent.double()).sum()).backward()
    z = logits.detach()
    assert_close(lp, want_lp, "logp", atol=logp_tol(z, 0.7))
    assert_close(ent, want_ent, "entropy", atol=logp_tol(z, 0.7))
    dz = logits.grad
    bdh, bdw = linear_grad_bounds(dz, hidden, weight, labels, mask, g, 0.7, z, g_ent=g_ent)
    assert_close(h.grad, hd.grad, "d hidden", atol=bdh)
    assert_close(w.grad, wd.grad, "d weight", atol=bdw)


class _Spy:
    """Wraps a backend module and records the g_ent its backward receives."""

    def __init__(self, impl):
        self.impl, self.seen = impl, []
        self.DTYPES = impl.DTYPES

    def __getattr__(self, name):
        fn = getattr(self.impl, name)
        if not name.endswith("_backward"):
            return fn

        def spy(*args):
            self.seen.append(args[-1])                                          # g_ent
            return fn(*args)
        return spy


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_unused_entropy_costs_nothing_in_backward(monkeypatch, path):
    """The entropy is returned but the loss ignores it: the backend gets g_ent = None."""
    impls = {}
    real = K._impl

    def spying(name, p):
        impls[p] = _Spy(real(name, p))
        return impls[p]
    monkeypatch.setattr(K, "_impl", spying)
    logits, labels, mask, g, _ = make_case(V=64)
    if path == "logits":
        x = logits.clone().requires_grad_()
        lp, _ent = K.token_logprobs(x, labels, 1.0, mask, return_entropy=True, backend="torch")
    else:
        x = torch.randn(3, 4, 8, requires_grad=True)
        lp, _ent = K.linear_token_logprobs(x, torch.randn(64, 8), labels, 1.0, mask, return_entropy=True,
                                           backend="torch")
    (lp * g).sum().backward()
    assert impls[path].seen == [None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_bonus_through_the_fused_loss(backend):
    """grpo_loss(entropy_coef > 0) on the fused log-probs: the bonus's gradient reaches the logits
    through the kernels' entropy, as autograd of the fp64 reference gives it."""
    from grpo_core.loss import grpo_loss

    logits, labels, mask, _, _ = make_case(4, 5, 1000, seed=3)
    logits[0, 1, ::3] = 0.0                                                   # finite here: plain reference
    with torch.no_grad():
        base = ref_logprobs(logits, labels, 1.0, mask)
    gen = torch.Generator().manual_seed(4)
    old, ref = base + 0.3 * torch.randn(4, 5, generator=gen), base + 0.2 * torch.randn(4, 5, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    kw = dict(beta=0.04, entropy_coef=0.05)
    x = logits.clone().requires_grad_()
    loss, metrics = K.fused_grpo_loss(x, labels, old, ref, adv, mask, backend=backend, **kw)
    loss.backward()
    xr = logits.double().requires_grad_()
    lp = ref_logprobs(xr, labels, 1.0, mask)
    ent = torch.where(mask, entropy_truth(xr, 1.0), 0.0)
    lp.retain_grad()
    ent.retain_grad()
    want, _ = grpo_loss(lp, old.double(), ref.double(), adv.double(), mask, entropy=ent, **kw)
    want.backward()
    assert ent.grad.abs().max() > 0, "the bonus must put a gradient on the entropy"
    z = logits
    loss_tol = (float(((lp.grad.abs() + ent.grad.abs()) * logp_tol(z)).sum())
                + 4 * torch.finfo(torch.float32).eps * abs(float(want.detach())))
    assert_close(loss, want, "loss with entropy bonus", atol=loss_tol)
    bound = logit_grad_bound(xr.grad, z, labels, mask, lp.grad, 1.0, g_ent=ent.grad)
    assert_close(x.grad, xr.grad, "d logits with entropy bonus", atol=bound)
