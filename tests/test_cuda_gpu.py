"""GPU tier for the CUDA library (csrc/ via grpo_core/kernels/cuda.py); skipped without a GPU.

Checks values and gradients against the fp64 truth computed by the references
(grpo_core.logprobs.token_logprobs / token_entropy, grpo_core.advantages.group_advantages) on the
same, already-rounded inputs, within bounds derived from the dtype and the size of the values
(tests/numerics.py, tests/kernel_helpers.py: fp32 arithmetic, then the store in the logits'
dtype); bf16/fp16 also at most 2× the error of the same computation done by torch in that dtype
(flash-attention's rule). Everything goes through the public API with backend="cuda". Odd vocab sizes (1000, 4231,
151936: rows not 16-byte aligned), non-contiguous logits views, masked and fully masked rows,
one valid token, T = 1, several streams, in-place backward, entropy.

If no library is found it is built for this GPU's architecture into build/cuda-gpu/ (nvcc
needed). Memory check (compute-sanitizer ships with the CUDA toolkit):

    make memcheck
    # = GRPO_CORE_CUDA_LIB=build/cuda/libgrpo_core_cuda.so PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\
    #   compute-sanitizer --tool memcheck --error-exitcode 1 \\
    #   .venv/bin/python -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_gpu.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an out-of-bounds
access cannot hide inside a block of torch's caching allocator.
"""

import os
import sys

import pytest
import torch
from kernel_helpers import assert_close, logit_grad_bound, logp_tol, tol  # noqa: E402

from grpo_core.advantages import group_advantages
from grpo_core.kernels import cuda, dispatch
from grpo_core.kernels import token_logprobs as fused_token_logprobs
from grpo_core.logprobs import token_entropy, token_logprobs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def library():
    """The installed/built library, else one built now for this GPU; skip only if that can't be."""
    reason = cuda.available(DEV)
    if reason is not None and "driver version is insufficient" not in reason:  # missing, stale, other arch
        sys.path.insert(0, os.path.join(REPO, "csrc"))
        import build_cuda

        major, minor = torch.cuda.get_device_capability()
        path = build_cuda.build(os.path.join(REPO, "build", "cuda-gpu"), archs=f"{major}{minor}")
        if path is None:
            pytest.skip("no CUDA library and no nvcc to build one")
        cuda.load_library(path)
        reason = cuda.available(DEV)
    if reason is not None and "driver version is insufficient" in reason:
        pytest.skip(f"driver older than the library's CUDA runtime: {reason}")
    assert reason is None, reason
    yield
    cuda.load_library(reload=True)


def ours(logits, labels, temperature=1.0, mask=None, **kw):
    return fused_token_logprobs(logits, labels, temperature, mask, backend="cuda", **kw)


def _maxerr(got, want, mask=None):
    err = (got.double() - want.double()).abs()
    err = err[mask] if mask is not None else err
    return err.max().item() if err.numel() else 0.0


def _case(N, T, V, dtype, seed, strided, p_mask=0.3):
    """A leaf and the (N, T, V) logits the kernel reads: the leaf itself, or if strided the view
    leaf[:, 1:] of an (N, T + 1, V) leaf (non-contiguous, like out.logits[:, :-1])."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    leaf = (torch.randn(N, T + int(strided), V, device=DEV, generator=gen) * 3.0).to(dtype).requires_grad_(True)
    logits = leaf[:, 1:] if strided else leaf
    labels = torch.randint(0, V, (N, T), device=DEV, generator=gen)
    mask = torch.rand(N, T, device=DEV, generator=gen) > p_mask
    return leaf, logits, labels, mask


def _truth(logits, labels, mask, temperature, g, g_ent=None):
    """fp64 reference on the same logits: logp, entropy, d(Σ g·logp + g_H·H)/d logits."""
    x = logits.detach().double().requires_grad_(True)
    mask = torch.ones(labels.shape, dtype=torch.bool, device=DEV) if mask is None else mask
    logp = token_logprobs(x, labels, temperature, mask)                                       # (N, T)
    ent = torch.where(mask, token_entropy(x, temperature), torch.zeros((), dtype=x.dtype, device=DEV))
    loss = (logp * g).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), x.grad


def _torch_lowp(logits, labels, mask, temperature, g):
    """The same forward + backward done by torch in the logits' dtype (the error baseline)."""
    x = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(x / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    lp = torch.where(mask, lp.float(), torch.zeros((), device=DEV))
    (lp * g).sum().backward()
    return lp.detach(), x.grad


SHAPES = [(2, 7, 1000), (3, 5, 4231), (2, 3, 151936)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,T,V", SHAPES)
@pytest.mark.parametrize("temperature,strided", [(1.0, True), (0.7, False)])
def test_token_logprobs_values_and_grads(dtype, N, T, V, temperature, strided):
    leaf, logits, labels, mask = _case(N, T, V, dtype, seed=V + N, strided=strided)
    mask[0] = False                                            # a fully masked row
    labels = torch.where(mask, labels, torch.full_like(labels, -100))  # padding ids never read
    g = torch.randn(N, T, device=DEV)
    logp = ours(logits, labels, temperature, mask)
    (logp * g).sum().backward()
    grad = leaf.grad[:, 1:] if strided else leaf.grad
    t_logp, _, t_grad = _truth(logits, labels, mask, temperature, g)
    assert logp.dtype == torch.float32 and logp.shape == (N, T)
    assert (logp[~mask] == 0).all() and (grad[~mask] == 0).all(), "masked positions: 0 and no gradient"
    if strided:
        assert (leaf.grad[:, 0] == 0).all(), "a row outside the view got a gradient"
    assert_close(logp, t_logp, "logp", atol=logp_tol(logits.detach(), temperature))
    safe = torch.where(mask, labels, 0)
    lp_lowp, grad_lowp = _torch_lowp(logits, safe, mask, temperature, g)
    assert_close(grad, t_grad, "d logits",
                 atol=logit_grad_bound(t_grad, logits.detach(), safe, mask, g, temperature, dtype))
    if dtype != torch.float32:
        err, base = _maxerr(grad, t_grad), _maxerr(grad_lowp, t_grad)
        assert err <= 2 * base + 1e-7, f"{dtype} grad error {err:.3g} > 2 × torch's {base:.3g}"
        err, base = _maxerr(logp, t_logp, mask), _maxerr(lp_lowp, t_logp, mask)
        assert err <= 2 * base + 1e-6, f"{dtype} logp error {err:.3g} > 2 × torch's {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 151936])
def test_entropy_values_and_grads(dtype, V):
    N, T = 2, 4
    leaf, logits, labels, mask = _case(N, T, V, dtype, seed=7, strided=True)
    g, g_ent = torch.randn(N, T, device=DEV), torch.randn(N, T, device=DEV)
    logp, ent = ours(logits, labels, 1.0, mask, return_entropy=True)
    ((logp * g).sum() + (ent * g_ent).sum()).backward()
    t_logp, t_ent, t_grad = _truth(logits, labels, mask, 1.0, g, g_ent)
    x = logits.detach()
    assert_close(logp, t_logp, "logp", atol=logp_tol(x))
    assert_close(ent, t_ent, "entropy", atol=logp_tol(x))
    assert_close(leaf.grad[:, 1:], t_grad, "d logits (logp + entropy)",
                 atol=logit_grad_bound(t_grad, x, labels, mask, g, 1.0, dtype, g_ent=g_ent))


@pytest.mark.parametrize("N,T,V,valid", [(3, 4, 4231, "one"), (5, 1, 4231, "all"), (2, 3, 1000, "none")])
def test_one_token_t1_and_nothing_valid(N, T, V, valid):
    leaf, logits, labels, _ = _case(N, T, V, torch.bfloat16, seed=11, strided=False)
    mask = torch.zeros(N, T, dtype=torch.bool, device=DEV)
    if valid == "one":
        mask[N - 1, T - 1] = True
    elif valid == "all":
        mask[:] = True
    g = torch.randn(N, T, device=DEV)
    logp = ours(logits, labels, 1.0, mask)
    (logp * g).sum().backward()
    t_logp, _, t_grad = _truth(logits, labels, mask, 1.0, g)
    assert_close(logp, t_logp, "logp", atol=logp_tol(logits.detach()))
    assert_close(leaf.grad, t_grad, "d logits",
                 atol=logit_grad_bound(t_grad, logits.detach(), labels, mask, g, 1.0, torch.bfloat16))
    assert int((leaf.grad.abs().sum(-1) > 0).sum()) == int(mask.sum())


def test_no_mask_means_every_position_and_auto_picks_cuda():
    leaf, logits, labels, _ = _case(2, 6, 4231, torch.bfloat16, seed=13, strided=True)
    logp = ours(logits, labels, 0.9)
    assert_close(logp, token_logprobs(logits.detach().double(), labels, 0.9), "logp (no mask)",
                 atol=logp_tol(logits.detach(), 0.9))
    assert dispatch.resolve("auto", DEV, "logits") == "cuda" and cuda.available(DEV) is None


def test_inplace_backward_matches_out_of_place():
    leaf, logits, labels, mask = _case(3, 5, 4231, torch.bfloat16, seed=17, strided=True)
    g = torch.randn(3, 5, device=DEV)
    (ours(logits, labels, 1.0, mask) * g).sum().backward()
    want = leaf.grad.clone()
    leaf2 = leaf.detach().clone().requires_grad_(True)
    scratch = leaf2 * 1.0                                      # a buffer backward may overwrite
    (ours(scratch[:, 1:], labels, 1.0, mask, inplace_backward=True) * g).sum().backward()
    assert torch.equal(leaf2.grad[:, 1:], want[:, 1:])
    assert (leaf2.grad[:, 0] == 0).all()


def test_multiple_streams_give_the_default_stream_results():
    cases = [_case(2, 5, V, torch.bfloat16, seed=20 + i, strided=True) for i, V in enumerate((1000, 4231, 151936))]
    gs = [torch.randn(2, 5, device=DEV) for _ in cases]
    rewards = [torch.randn(64 * 8, device=DEV) for _ in cases]
    want = []
    for (leaf, logits, labels, mask), g, r in zip(cases, gs, rewards):
        lp = ours(logits, labels, 1.0, mask)
        (lp * g).sum().backward()
        want.append((lp.detach(), leaf.grad.clone(), cuda.group_advantages_cuda(r, 8, "batch")))
        leaf.grad = None
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in cases]
    got = []
    for s, (leaf, logits, labels, mask), g, r in zip(streams, cases, gs, rewards):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            lp = ours(logits, labels, 1.0, mask)
            (lp * g).sum().backward()
            got.append((lp.detach(), leaf.grad, cuda.group_advantages_cuda(r, 8, "batch")))
    torch.cuda.synchronize()
    for (lp, grad, adv), (w_lp, w_grad, w_adv) in zip(got, want):
        assert torch.equal(lp, w_lp) and torch.equal(grad, w_grad) and torch.equal(adv, w_adv)


def test_mixed_devices_and_bad_labels_are_clear_errors():
    _, logits, labels, mask = _case(2, 3, 1000, torch.float32, seed=23, strided=False)
    with pytest.raises(ValueError, match="one device"):
        ours(logits, labels.cpu())
    bad = labels.clone()
    bad[0, 0] = 1000
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ours(logits, bad, 1.0, torch.ones_like(mask))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("B,G", [(5, 1), (1, 2), (64, 4), (1000, 8), (3, 33), (2, 1500), (4096, 16)])
def test_group_advantages(scale, B, G):
    gen = torch.Generator(device=DEV).manual_seed(B * G)
    r = torch.where(torch.rand(B * G, device=DEV, generator=gen) > 0.5, 1.0, 0.0)
    r = r + 0.1 * torch.randn(B * G, device=DEV, generator=gen)
    r[:G] = 0.7                     # equal rewards: exactly 0 here (fp64 sums); torch's fp32 mean
    adv = cuda.group_advantages_cuda(r, G, scale)   # can be an ulp off, which /(0 + eps) magnifies
    assert adv.dtype == torch.float32 and adv.shape == r.shape
    assert (adv[:G] == 0).all()
    want = group_advantages(r.double(), G, scale)[G:]           # fp64 truth; fp32 in and out
    assert_close(adv[G:], want, f"advantages ({scale})", atol=tol(torch.float32, 1 + float(want.abs().max()), k=16))
    ints = torch.randint(0, 3, (B * G,), device=DEV, generator=gen).float()   # small-integer rewards
    want = group_advantages(ints.double(), G, scale)
    assert_close(cuda.group_advantages_cuda(ints, G, scale), want, f"advantages ({scale}, ints)",
                 atol=tol(torch.float32, 1 + float(want.abs().max()), k=16))
