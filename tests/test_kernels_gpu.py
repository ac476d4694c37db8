"""GPU tier for the fused kernels: every variant the trainer launches, on Triton and CUDA (and
torch on the GPU as the baseline); skipped without a GPU. ``make device-check`` runs it.

What the CPU tier cannot check (the interpreter is not the compiler):
  - the logits path at Qwen's vocabulary (151,936: 16-byte aligned rows, the vectorised loads)
    and an odd one (4,231: scalar loads), bf16 / fp16 / fp32, T = 0.7, the entropy gradient,
    in-place backward;
  - the fused-linear path as the trainer calls it: with and without the −inf bias, the
    no-entropy forward under no_grad (old / ref log-probs), the entropy gradient, H = 1,536,
    a few tokens (the vocab split) and many (several backward chunks);
  - more than 2^31 elements in one call (tokens × H for the linear path, tokens × V for logits).

Bounds: fp32 against the fp64 truth within the derived bounds of kernel_helpers, plus, on the
fused-linear path, the dot product's own rounding (fp32 accumulation of H products:
H · eps32 · Σ_k |h_k w_jk|, a worst case); bf16 / fp16 at most 2× the error of torch doing the
same computation in that dtype (flash-attention's rule).
"""

import pytest
import torch
from kernel_helpers import (  # noqa: E402
    assert_close,
    entropy_truth,
    linear_grad_bounds,
    logit_grad_bound,
    logp_tol,
    max_err,
)

from grpo_core.kernels import dispatch, linear_token_logprobs, token_logprobs
from grpo_core.logprobs import token_logprobs as ref_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda")
EPS32 = torch.finfo(torch.float32).eps


def backends():
    out = []
    for name in ("triton", "cuda"):
        reason = dispatch.why_unavailable(name, DEV) if torch.cuda.is_available() else "no GPU"
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _logits_case(N, T, V, dtype, seed=0):
    gen = _gen(seed)
    leaf = (torch.randn(N, T + 1, V, device=DEV, generator=gen) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N, T), device=DEV, generator=gen)
    mask = torch.rand(N, T, device=DEV, generator=gen) > 0.25
    mask[0] = False
    labels[~mask] = -100
    g, g_ent = torch.randn(N, T, device=DEV, generator=gen), torch.randn(N, T, device=DEV, generator=gen)
    return leaf, labels, mask, g, g_ent


def _truth(x, labels, mask, T, g, g_ent):
    x = x.detach().double().requires_grad_()
    lp = ref_logprobs(x, labels, T, mask)
    ent = torch.where(mask, entropy_truth(x, T), 0.0)
    ((lp * g.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _torch_lowp_errors(x, labels, mask, T, g, g_ent, want_lp, want_grad):
    """Max errors of the same forward/backward done by torch in x's dtype."""
    x = x.detach().clone().requires_grad_()
    lsm = torch.log_softmax(x / T, -1)
    lp = torch.where(mask, lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float(), 0.0)
    ent = torch.where(mask, -(lsm.exp() * lsm.clamp(min=torch.finfo(lsm.dtype).min * 2.0 ** -32)).sum(-1).float(), 0.0)
    ((lp * g).sum() + (ent * g_ent).sum()).backward()
    return max_err(lp, want_lp), max_err(x.grad, want_grad)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("V", [151936, 4231])
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_path(backend, dtype, V, inplace):
    N, T, temp = 3, 17, 0.7
    leaf, labels, mask, g, g_ent = _logits_case(N, T, V, dtype, seed=V)
    x = leaf * 1.0 if inplace else leaf                                        # a buffer backward may reuse
    view = x[:, 1:]                                                            # like out.logits[:, :-1]
    lp, ent = token_logprobs(view, labels, temp, mask, return_entropy=True, inplace_backward=inplace,
                             backend=backend)
    ((lp * g).sum() + (ent * g_ent).sum()).backward()
    grad = leaf.grad[:, 1:]
    want_lp, want_ent, want_grad = _truth(leaf[:, 1:], labels, mask, temp, g, g_ent)
    z = leaf[:, 1:].detach()
    assert_close(lp, want_lp, "logp", atol=logp_tol(z, temp))
    assert_close(ent, want_ent, "entropy", atol=logp_tol(z, temp))
    assert (grad[~mask] == 0).all() and (leaf.grad[:, 0] == 0).all()
    if dtype == torch.float32:
        bound = logit_grad_bound(want_grad, z, labels, mask, g, temp, dtype, g_ent=g_ent)
        assert_close(grad, want_grad, "d logits", atol=bound)
    else:
        t_lp, t_grad = _torch_lowp_errors(z, labels, mask, temp, g, g_ent, want_lp, want_grad)
        assert max_err(grad, want_grad) <= 2 * t_grad, (max_err(grad, want_grad), t_grad)


def _linear_case(M, H, V, dtype, seed=0, bias=True):
    gen = _gen(seed)
    hidden = torch.randn(1, M, H, device=DEV, generator=gen).to(dtype)
    weight = (torch.randn(V, H, device=DEV, generator=gen) / H ** 0.5 * 3).to(dtype)
    labels = torch.randint(0, V, (1, M), device=DEV, generator=gen)
    mask = torch.rand(1, M, device=DEV, generator=gen) > 0.1
    b = None
    if bias:
        b = torch.zeros(V, device=DEV)
        b[torch.randint(0, V, (64,), device=DEV, generator=gen)] = -float("inf")  # never-sampled ids
        labels = torch.where(torch.isinf(b)[labels], 0, labels)
    labels[~mask] = -100
    g, g_ent = torch.randn(1, M, device=DEV, generator=gen), torch.randn(1, M, device=DEV, generator=gen)
    return hidden, weight, labels, mask, b, g, g_ent


def _linear_run(fn, hidden, weight, g, g_ent):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fn(h, w)
    ((lp * g).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,bias", [(40, True), (700, False)])
def test_linear_path(backend, dtype, M, bias):
    """Few tokens (the forward splits the vocab) and more, bias on/off, the entropy gradient."""
    H, V, temp = 1536, 151936 if dtype != torch.float32 else 32000, 0.7
    hidden, weight, labels, mask, b, g, g_ent = _linear_case(M, H, V, dtype, seed=M, bias=bias)
    lp, ent, dh, dw = _linear_run(lambda h, w: linear_token_logprobs(
        h, w, labels, temp, mask, bias=b, return_entropy=True, backend=backend), hidden, weight, g, g_ent)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = hd @ wd.t() + (b.double() if b is not None else 0.0)
    logits.retain_grad()
    want_lp = ref_logprobs(logits, labels, temp, mask)
    want_ent = torch.where(mask, entropy_truth(logits, temp), 0.0)
    ((want_lp * g.double()).sum() + (want_ent * g_ent.double()).sum()).backward()
    z = logits.detach()
    if dtype == torch.float32:
        dot = H * EPS32 * (hidden.double().abs() @ weight.double().abs().t()).amax(-1) / temp   # (1, M)
        assert_close(lp, want_lp, "logp", atol=logp_tol(z, temp) + 2 * dot)
        assert_close(ent, want_ent, "entropy", atol=logp_tol(z, temp) + 2 * dot)
        bdh, bdw = linear_grad_bounds(logits.grad, hidden, weight, labels, mask, g, temp, z,
                                      g_ent=g_ent)
        assert_close(dh, hd.grad, "d hidden", atol=bdh)
        assert_close(dw, wd.grad, "d weight", atol=bdw)
        return
    t_lp, t_ent, t_dh, t_dw = _linear_run(lambda h, w: _torch_linear_lowp(h, w, b, labels, mask, temp),
                                          hidden, weight, g, g_ent)
    for name, ours, theirs, want in [("logp", lp, t_lp, want_lp), ("entropy", ent, t_ent, want_ent),
                                     ("d hidden", dh, t_dh, hd.grad), ("d weight", dw, t_dw, wd.grad)]:
        assert max_err(ours, want) <= 2 * max_err(theirs, want), (name, max_err(ours, want), max_err(theirs, want))


def _torch_linear_lowp(h, w, b, labels, mask, temp):
    z = h @ w.t()
    if b is not None:
        z = z + b.to(z.dtype)
    lsm = torch.log_softmax(z / temp, -1)
    lp = torch.where(mask, lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float(), 0.0)
    ent = torch.where(mask, -(lsm.exp() * lsm.clamp(min=torch.finfo(lsm.dtype).min * 2.0 ** -32)).sum(-1).float(), 0.0)
    return lp, ent


@pytest.mark.parametrize("backend", backends())
def test_linear_no_entropy_forward_for_old_and_ref(backend):
    """What the trainer runs for old / ref log-probs: no_grad, no entropy, bias on."""
    hidden, weight, labels, mask, b, _, _ = _linear_case(300, 1536, 151936, torch.bfloat16, seed=3)
    with torch.no_grad():
        lp = linear_token_logprobs(hidden, weight, labels, 1.0, mask, bias=b, backend=backend)
        lp_ent, _ = linear_token_logprobs(hidden, weight, labels, 1.0, mask, bias=b, return_entropy=True,
                                          backend=backend)
    assert torch.equal(lp, lp_ent), "the entropy flag must not change the log-probs"
    want = ref_logprobs(hidden.double() @ weight.double().t() + b.double(), labels, 1.0, mask)
    t_lp, *_ = _torch_linear_lowp(hidden, weight, b, labels, mask, 1.0)
    assert max_err(lp, want) <= 2 * max_err(t_lp, want)


@pytest.mark.parametrize("backend", backends())
def test_linear_backward_in_several_chunks(backend, monkeypatch):
    """A small chunk budget: the backward (and the CUDA forward) walk the tokens in four chunks,
    accumulating dW in fp32 across them. Every output stays within 2× torch's own bf16 error of
    the fp64 truth (the GEMMs' summation order may change with the chunk shape: no bitwise check)."""
    from grpo_core.kernels import cuda_linear, triton_linear

    hidden, weight, labels, mask, b, g, g_ent = _linear_case(1000, 1536, 151936, torch.bfloat16, seed=4)
    run = lambda: _linear_run(lambda h, w: linear_token_logprobs(  # noqa: E731
        h, w, labels, 1.0, mask, bias=b, return_entropy=True, backend=backend), hidden, weight, g, g_ent)
    monkeypatch.setattr(triton_linear, "DZ_BUFFER_BYTES", 256 * 151936 * 2)   # 256-token chunks
    monkeypatch.setattr(cuda_linear, "CHUNK_BYTES", 256 * 151936 * 4)
    ours = run()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = hd @ wd.t() + b.double()
    want_lp = ref_logprobs(logits, labels, 1.0, mask)
    want_ent = torch.where(mask, entropy_truth(logits, 1.0), 0.0)
    ((want_lp * g.double()).sum() + (want_ent * g_ent.double()).sum()).backward()
    theirs = _linear_run(lambda h, w: _torch_linear_lowp(h, w, b, labels, mask, 1.0), hidden, weight, g, g_ent)
    for name, o, t, want in zip(["logp", "entropy", "d hidden", "d weight"], ours, theirs,
                                [want_lp, want_ent, hd.grad, wd.grad]):
        assert max_err(o, want) <= 2 * max_err(t, want), (name, max_err(o, want), max_err(t, want))


@pytest.mark.parametrize("backend", backends())
def test_linear_more_than_2_pow_31_elements(backend):
    """tokens × H > 2^31 in one call (1.4 M tokens at H = 1,536, as when the trainer sends a whole
    rollout): forward only, V small; the last tokens, whose rows start past element 2^31, are
    checked against the fp64 truth."""
    H, V = 1536, 128
    M = (1 << 31) // H + 1024
    gen = _gen(5)
    hidden = torch.randn(1, M, H, device=DEV, dtype=torch.bfloat16, generator=gen)     # 4.3 GB
    weight = (torch.randn(V, H, device=DEV, generator=gen) / H ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, V, (1, M), device=DEV, generator=gen)
    with torch.no_grad():
        lp = linear_token_logprobs(hidden, weight, labels, 1.0, backend=backend)
    tail = slice(M - 2048, M)
    z = hidden[0, tail].double() @ weight.double().t()                                  # (2048, V)
    want = z.gather(1, labels[0, tail, None]).squeeze(1) - torch.logsumexp(z, 1)
    dot = H * EPS32 * (hidden[0, tail].double().abs() @ weight.double().abs().t()).amax(-1)
    assert_close(lp[0, tail], want, "logp past 2^31", atol=logp_tol(z[:, None, :])[:, 0] + 2 * dot)


@pytest.mark.parametrize("backend", backends())
def test_logits_more_than_2_pow_31_elements(backend):
    """tokens × V > 2^31 (14.2 k tokens at V = 151,936): forward and backward; the last rows."""
    V = 151936
    M = (1 << 31) // V + 64
    gen = _gen(6)
    x = (torch.randn(1, M, V, device=DEV, generator=gen) * 2).to(torch.bfloat16).requires_grad_()  # 4.3 GB
    labels = torch.randint(0, V, (1, M), device=DEV, generator=gen)
    g = torch.randn(1, M, device=DEV, generator=gen)
    lp = token_logprobs(x, labels, 1.0, backend=backend)
    (lp * g).sum().backward()
    tail = slice(M - 8, M)
    xt = x[:, tail].detach()
    want_lp, _, want_grad = _truth(xt, labels[:, tail], torch.ones(1, 8, dtype=torch.bool, device=DEV), 1.0,
                                   g[:, tail], torch.zeros(1, 8, device=DEV))
    assert_close(lp[:, tail], want_lp, "logp past 2^31", atol=logp_tol(xt))
    bound = logit_grad_bound(want_grad, xt, labels[:, tail], torch.ones(1, 8, dtype=torch.bool, device=DEV),
                             g[:, tail], 1.0, torch.bfloat16)
    assert_close(x.grad[:, tail], want_grad, "d logits past 2^31", atol=bound)
