"""fused_grpo_loss vs grpo_loss(reference log-probs): loss, d logits and every metric.

Every aggregation, every KL estimator, β = 0 and > 0, dual clip on/off, temperature ≠ 1, ratios
clipped on both sides (checked), on-policy (old = None), total_tokens/total_seqs overrides, and
bf16 held to ≤ 2× torch's own bf16 error.
"""

import itertools

import pytest
import torch
from kernel_helpers import (  # noqa: E402,F401  (sets TRITON_INTERPRET on CPU first)
    BACKENDS,
    assert_close,
    logit_grad_bound,
    logp_tol,
    max_err,
    tol,
)

from grpo_core.kernels import dispatch, fused_grpo_loss  # noqa: E402
from grpo_core.logprobs import token_entropy  # noqa: E402
from grpo_core.logprobs import token_logprobs as ref_logprobs  # noqa: E402
from grpo_core.loss import grpo_loss  # noqa: E402

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

TRITON_OK = dispatch.why_unavailable("triton", torch.device("cpu")) is None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton on CPU needs TRITON_INTERPRET=1")


def make_case(N=4, T=5, V=1000, temperature=1.0, seed=0):
    """Logits plus old/ref log-probs placed around the current ones so that, with A = ±1, some
    ratios are clipped from above (A > 0, r > 1 + ε) and some from below (A < 0, r < 1 − ε)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g) * 2                          # (N, T, V)
    labels = torch.randint(0, V, (N, T), generator=g)
    mask = torch.rand(N, T, generator=g) > 0.25
    mask[0] = False                                                         # an empty completion
    mask[1] = False
    mask[1, 2] = True                                                       # a one-token completion
    labels[~mask] = -100
    with torch.no_grad():
        logp = ref_logprobs(logits, labels, temperature, mask)              # (N, T)
    shift = torch.tensor([-0.6, -0.1, 0.0, 0.1, 0.6])[torch.arange(T) % 5]  # log r per position
    old = logp - shift                                                      # r = e^shift: 0.55 … 1.82
    ref = logp + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.tensor([0.5, -1.0, 1.0, -1.5])[:N]                          # (N,) both signs
    return logits, labels, mask, old, ref, adv


def check(backend, dtype=torch.float32, temperature=1.0, old_none=False, **kw):
    logits, labels, mask, old, ref, adv = make_case(temperature=temperature)
    old = None if old_none else old
    x = logits.to(dtype).clone().requires_grad_()
    loss, metrics = fused_grpo_loss(x, labels, old, ref, adv, mask, temperature=temperature, backend=backend, **kw)
    loss.backward()
    # the truth: the same math in fp64 on the same (rounded) inputs
    xr = logits.to(dtype).double().clone().requires_grad_()
    lp = ref_logprobs(xr, labels, temperature, mask)
    lp.retain_grad()
    f64 = lambda t: None if t is None else t.double()                       # noqa: E731
    want, want_m = grpo_loss(lp, f64(old), f64(ref), adv.double(), mask, **kw)
    want.backward()
    z = xr.detach()
    # the loss moves by Σ_t |∂L/∂logp_t| · (error of logp_t), plus its own fp32 rounding
    loss_tol = (float((lp.grad.abs() * logp_tol(z, temperature)).sum())
                + tol(torch.float32, abs(float(want.detach())), k=4))
    assert_close(loss, want, "loss", atol=loss_tol)
    assert_close(x.grad, xr.grad, "d logits",
                 atol=logit_grad_bound(xr.grad, z, labels, mask, lp.grad, temperature, dtype))
    for k, v in want_m.items():   # fp32 means of per-token values each within logp_tol of the truth
        assert_close(metrics[k], v, f"metric {k}", atol=float(logp_tol(z, temperature).max()) * (1 + abs(float(v))))
    ent = (token_entropy(z, temperature) * mask).sum() / mask.sum()
    assert_close(metrics["entropy"], ent, "metric entropy", atol=float(logp_tol(z, temperature).max()))
    return want_m


ALL = [dict(agg=a, kl=k, beta=b, dual_clip=d, temperature=t)
       for a, k, b, d, t in itertools.product(["token_mean", "seq_mean", "constant"], ["k1", "k2", "k3"],
                                              [0.0, 0.04], [None, 3.0], [1.0, 0.7])]
# a small set for the interpreter that still uses every option value at least once
TRITON_SET = [
    dict(agg="token_mean", kl="k3", beta=0.04, dual_clip=None, temperature=1.0),
    dict(agg="seq_mean", kl="k1", beta=0.04, dual_clip=3.0, temperature=0.7),
    dict(agg="constant", kl="k2", beta=0.1, dual_clip=None, temperature=0.7, max_len=8),
    dict(agg="token_mean", kl="k3", beta=0.0, dual_clip=3.0, temperature=1.0, clip_high=0.28),
]


def test_case_clips_on_both_sides():
    m = check("torch", beta=0.0)
    assert m["clip_low_frac"] > 0 and m["clip_high_frac"] > 0


@pytest.mark.parametrize("opts", ALL, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_torch_backend_all_options(opts):
    check("torch", **opts)


@needs_triton
@pytest.mark.parametrize("opts", TRITON_SET, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_triton_backend(opts):
    check("triton", **opts)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_on_policy_and_global_denominators(backend):
    check(backend, old_none=True, beta=0.04, agg="token_mean")
    check(backend, beta=0.04, agg="token_mean", total_tokens=40.0)
    check(backend, beta=0.04, agg="seq_mean", total_seqs=8)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_error_at_most_twice_torch_bf16(backend):
    logits, labels, mask, old, ref, adv = make_case(temperature=0.7, seed=1)
    kw = dict(beta=0.04, kl="k3", agg="seq_mean", dual_clip=3.0)
    xb = logits.bfloat16()

    def loss_and_grad(fn, x):
        x = x.detach().clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        return loss.detach(), x.grad

    def torch_bf16(x):                                                      # reference math, logits in bf16
        lp = torch.log_softmax(x / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float()
        return grpo_loss(torch.where(mask, lp, 0.0), old, ref, adv, mask, **kw)[0]

    ours = loss_and_grad(lambda x: fused_grpo_loss(x, labels, old, ref, adv, mask, temperature=0.7,
                                                   backend=backend, **kw)[0], xb)
    want = loss_and_grad(lambda x: grpo_loss(ref_logprobs(x, labels, 0.7, mask), old, ref, adv, mask, **kw)[0],
                         xb.float())
    theirs = loss_and_grad(torch_bf16, xb)
    for i, name in enumerate(["loss", "d logits"]):
        err = (ours[i].double() - want[i].double()).abs().max().item()
        torch_err = (theirs[i].double() - want[i].double()).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"{name}: bf16 error {err:.3e} > 2 × torch bf16 error {torch_err:.3e}"


def test_unknown_option_is_rejected():
    logits, labels, mask, old, ref, adv = make_case()
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused_grpo_loss(logits, labels, old, ref, adv, mask, clip=0.2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_qwen_vocab_bf16(backend):
    """Real vocabulary (151,936), bf16 on the GPU: logits and fused-linear paths vs fp32 reference,
    held to the 2× torch-bf16 rule (loss and gradients)."""
    dev = torch.device("cuda")
    if dispatch.why_unavailable(backend, dev) is not None:
        pytest.skip(f"{backend}: {dispatch.why_unavailable(backend, dev)}")
    g = torch.Generator().manual_seed(0)
    N, T, V, H = 4, 33, 151936, 256
    labels = torch.randint(0, V, (N, T), generator=g).to(dev)
    mask = (torch.rand(N, T, generator=g) > 0.2).to(dev)
    old = (torch.randn(N, T, generator=g) * 0.3 - 11).to(dev)
    ref = (torch.randn(N, T, generator=g) * 0.3 - 11).to(dev)
    adv = torch.randn(N, generator=g).to(dev)
    kw = dict(beta=0.04, kl="k3", agg="token_mean")
    hb = torch.randn(N, T, H, generator=g).to(dev, torch.bfloat16)
    wb = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dev, torch.bfloat16)

    def errs(fn, *leaves):
        """(loss error, grad errors) of fn on bf16 leaves vs fp32 reference math on the same values."""
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        loss = fn(*xs)
        loss.backward()
        xr = [t.detach().float().requires_grad_() for t in leaves]
        want = grpo_loss(ref_logprobs(xr[0] if len(xr) == 1 else xr[0] @ xr[1].t(), labels, 1.0, mask),
                         old, ref, adv, mask, **kw)[0]
        want.backward()
        return ([(loss.float() - want).abs().item()]
                + [(x.grad.float() - r.grad).abs().max().item() for x, r in zip(xs, xr)])

    def torch_bf16(x):
        lp = torch.log_softmax(x, -1).gather(-1, labels[..., None]).squeeze(-1).float()
        return grpo_loss(torch.where(mask, lp, 0.0), old, ref, adv, mask, **kw)[0]

    logits = (hb @ wb.t())                                                   # (N, T, V) bf16
    ours = errs(lambda x: fused_grpo_loss(x, labels, old, ref, adv, mask, backend=backend, **kw)[0], logits)
    theirs = errs(torch_bf16, logits)
    assert all(o <= 2 * t + 1e-6 for o, t in zip(ours, theirs)), (ours, theirs)
    if backend == "triton":
        from grpo_core.kernels import fused_linear_grpo_loss
        ours = errs(lambda h, w: fused_linear_grpo_loss(h, w, labels, old, ref, adv, mask,
                                                        backend="triton", **kw)[0], hb, wb)
        theirs = errs(lambda h, w: torch_bf16(h @ w.t()), hb, wb)
        assert all(o <= 2 * t + 1e-6 for o, t in zip(ours, theirs)), (ours, theirs)
