"""Every GRPO-family option through the fused backends (torch, and Triton under TRITON_INTERPRET=1),
logits path and fused-linear path, against grpo_loss on the fp64 reference log-probs and entropy.

The fused losses are ``grpo_loss(kernel log-probs, ..., entropy=kernel entropy, **options)``. The
loss value is held to the fp64 loss within Σ_t |dL/dlogp_t|·(error of logp_t); the gradient to the
reference's Jacobian applied to the loss gradient taken AT the kernel's log-probs, so the bound is
the kernel's error alone (the loss can be ill-conditioned: with every ratio clipped, β·(1 − e^d) of
a tiny d amplifies a 1e-7 change of logp into a large relative change of dL/dlogp). Two
ways are checked: that composition itself (runs today on every backend), and the public
``fused_grpo_loss`` / ``fused_linear_grpo_loss`` with the options as keywords (skipped, saying why,
while grpo_core.kernels does not yet forward grpo_loss's new keywords). ``entropy_coef`` needs a
kernel entropy that carries a gradient; a backend that returns it detached is skipped, saying so.
"""

import pytest
import torch
from kernel_helpers import (  # noqa: E402,F401  (sets TRITON_INTERPRET on CPU first)
    BACKENDS,
    K_BWD,
    assert_close,
    dz_size,
    logit_grad_bound,
    logp_tol,
    tol,
)
from numerics import lse_scale
from test_kernels_loss import make_case

from grpo_core import kernels  # noqa: E402
from grpo_core.logprobs import token_entropy  # noqa: E402
from grpo_core.logprobs import token_logprobs as ref_logprobs  # noqa: E402
from grpo_core.loss import grpo_loss  # noqa: E402

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

# every option at least once, every agg, both temperatures; cispo_max 1.5 caps the 1.82 ratios of make_case
CASES = [
    dict(ratio_level="sequence", agg="seq_mean", beta=0.04, clip_low=1e-3, clip_high=1e-3),     # GSPO's ranges
    dict(ratio_level="sequence_token", agg="token_mean", beta=0.04, kl="k2", temperature=0.7),
    dict(policy_loss="cispo", cispo_max=1.5, agg="token_mean", beta=0.0),
    dict(policy_loss="sapo", agg="constant", max_len=8, beta=0.04, kl="k1"),
    dict(delta=1.5, agg="seq_mean", beta=0.04, clip_high=0.28),
    dict(entropy_coef=0.01, agg="token_mean", beta=0.04, temperature=0.7),
    dict(top_entropy_quantile=0.2, agg="seq_mean", beta=0.04),
    dict(kl_bias_correction=True, ratio_level="sequence", agg="constant", max_len=8, beta=0.1),
    dict(policy_loss="sapo", ratio_level="sequence", entropy_coef=0.02, top_entropy_quantile=0.5, agg="seq_mean",
         beta=0.04, kl_bias_correction=True),
]
IDS = ["-".join(f"{k}={v}" for k, v in c.items()) for c in CASES]


def _fused_or_skip(call):
    try:
        return call()
    except TypeError as e:
        if "unexpected keyword" in str(e):
            pytest.skip(f"grpo_core.kernels does not forward these grpo_loss keywords yet ({e})")
        raise


def _needs_entropy_grad(opts, ent):
    if opts.get("entropy_coef", 0) and not ent.requires_grad:
        pytest.skip("this backend's kernel entropy is detached (no gradient yet); entropy_coef needs it")


def _loss_grads(lp, H, old, ref, adv, mask, opts):
    """fp64 loss at log-probs lp and entropy H, and its gradients g = dL/dlogp, g_H = dL/dH."""
    lp = lp.detach().double().requires_grad_()
    H = H.detach().double().requires_grad_()
    f64 = lambda t: None if t is None else t.double()                       # noqa: E731
    loss, _ = grpo_loss(lp, f64(old), f64(ref), adv.double(), mask, entropy=H, **opts)
    g, g_H = torch.autograd.grad(loss, (lp, H), allow_unused=True)
    return loss.detach(), g, (g_H if g_H is not None else torch.zeros_like(H))


def _reference(logits64, labels, mask, old, ref, adv, temperature, opts, lp_f, ent_f):
    """fp64 truth on the same logits: the loss, and the backward of the reference log-probs and
    entropy with the upstream gradients (g, g_H) of the loss at the kernel's (lp_f, ent_f)."""
    lp = ref_logprobs(logits64, labels, temperature, mask)
    H = token_entropy(logits64, temperature)
    want, g, g_H = _loss_grads(lp, H, old, ref, adv, mask, opts)
    _, g_f, gH_f = _loss_grads(lp_f, ent_f, old, ref, adv, mask, opts)
    ((lp * g_f).sum() + (H * mask * gH_f).sum()).backward()
    loss_tol = float(((g.abs() + g_H.abs()) * logp_tol(logits64.detach(), temperature)).sum())
    return want, loss_tol + tol(torch.float32, abs(float(want)), k=4), g_f, gH_f


@pytest.mark.parametrize("path", ["compose", "fused"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", CASES, ids=IDS)
def test_logits_path(opts, backend, path):
    opts = dict(opts)
    T = opts.pop("temperature", 1.0)
    logits, labels, mask, old, ref, adv = make_case(temperature=T)
    x = logits.clone().requires_grad_()
    lp_f, ent_f = kernels.token_logprobs(x, labels, T, mask, return_entropy=True, backend=backend)
    _needs_entropy_grad(opts, ent_f)
    if path == "compose":
        loss, metrics = grpo_loss(lp_f, old, ref, adv, mask, entropy=ent_f, **opts)
    else:
        loss, metrics = _fused_or_skip(lambda: kernels.fused_grpo_loss(x, labels, old, ref, adv, mask, temperature=T,
                                                                       backend=backend, **opts))
    loss.backward()
    xr = logits.double().requires_grad_()
    want, loss_tol, g, g_ent = _reference(xr, labels, mask, old, ref, adv, T, opts, lp_f, ent_f)
    assert_close(loss, want, "loss", atol=loss_tol)
    bound = logit_grad_bound(xr.grad, xr.detach(), labels, mask, g, T, torch.float32,
                             g_ent=g_ent if opts.get("entropy_coef") else None)
    assert_close(x.grad, xr.grad, "d logits", atol=bound)
    assert torch.isfinite(metrics["entropy"])


def _linear_bounds(dz_want, hidden, weight, labels, mask, g, g_ent, T, logits):
    """d hidden / d weight bounds as kernel_helpers.linear_grad_bounds, with the entropy term's dz too."""
    p = torch.softmax(logits / T, -1)
    rows = K_BWD * torch.finfo(torch.float32).eps * (lse_scale(logits, T, per_row=True) + hidden.shape[-1])
    size = dz_size(dz_want, labels, mask, g, T, p, g_ent) * rows[..., None]           # (N, T, V)
    return size @ weight.double().abs(), torch.einsum("ntv,nth->vh", size, hidden.double().abs())


@pytest.mark.parametrize("path", ["compose", "fused"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [CASES[0], CASES[2], CASES[5], CASES[8]], ids=[IDS[0], IDS[2], IDS[5], IDS[8]])
def test_linear_path(opts, backend, path):
    opts = dict(opts)
    T = opts.pop("temperature", 1.0)
    gen = torch.Generator().manual_seed(4)
    N, L, Hd, V = 4, 5, 32, 600
    hidden = torch.randn(N, L, Hd, generator=gen)
    weight = torch.randn(V, Hd, generator=gen) / Hd ** 0.5 * 2
    labels = torch.randint(0, V, (N, L), generator=gen)
    mask = torch.rand(N, L, generator=gen) > 0.25
    mask[0] = False
    labels[~mask] = -100
    with torch.no_grad():
        base = ref_logprobs(hidden @ weight.t(), labels, T, mask)
    old = base - torch.tensor([-0.6, -0.1, 0.0, 0.1, 0.6])                  # ratios on both clip sides
    ref = base + 0.3 * torch.randn(N, L, generator=gen)
    adv = torch.tensor([0.5, -1.0, 1.0, -1.5])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_f, ent_f = kernels.linear_token_logprobs(h, w, labels, T, mask, return_entropy=True, backend=backend)
    _needs_entropy_grad(opts, ent_f)
    if path == "compose":
        loss, _ = grpo_loss(lp_f, old, ref, adv, mask, entropy=ent_f, **opts)
    else:
        loss, _ = _fused_or_skip(lambda: kernels.fused_linear_grpo_loss(h, w, labels, old, ref, adv,
                                                                         mask, temperature=T,
                                                                         backend=backend, **opts))
    loss.backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = h2 @ w2.t()
    logits.retain_grad()
    want, loss_tol, g, g_ent = _reference(logits, labels, mask, old, ref, adv, T, opts, lp_f, ent_f)
    assert_close(loss, want, "loss", atol=loss_tol)
    bdh, bdw = _linear_bounds(logits.grad, hidden, weight, labels, mask, g, g_ent, T, logits.detach())
    assert_close(h.grad, h2.grad, "d hidden", atol=bdh)
    assert_close(w.grad, w2.grad, "d weight", atol=bdw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counted_label_on_minus_inf_logit_is_a_clear_error(backend):
    # issue #15: a counted token whose logit is −inf (a suppressed id the sampler emitted) gave a NaN loss
    logits, labels, mask, old, ref, adv = make_case()
    n, t = mask.nonzero()[-1].tolist()                                      # a counted position
    logits[n, t, labels[n, t]] = -float("inf")
    with pytest.raises(ValueError, match=rf"row {n}, position {t} has log-prob -inf .*probability 0"):
        kernels.fused_grpo_loss(logits.requires_grad_(), labels, old, ref, adv, mask, backend=backend)
    hidden, weight = torch.randn(4, 5, 16), torch.randn(50, 16)
    lab = torch.randint(1, 50, (4, 5))
    bias = torch.zeros(50)
    bias[0] = -float("inf")                                                  # id 0 never to be sampled …
    lab[2, 3] = 0                                                            # … and yet it was
    with pytest.raises(ValueError, match=r"row 2, position 3 has log-prob -inf"):
        kernels.fused_linear_grpo_loss(hidden.requires_grad_(), weight, lab, None, None,
                                       torch.ones(4), torch.ones(4, 5),
                                       bias=bias, beta=0.0, backend=backend)
