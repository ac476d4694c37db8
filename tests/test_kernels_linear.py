"""Fused linear log-probs (hidden × Wᵀ never materialised) vs matmul-then-reference.

Value, d hidden and d weight; with and without a bias holding −inf (masked vocab ids); fp32 and
bf16 (≤ 2× torch's own bf16 error); odd shapes and masks; the GRPO loss on top; and the memory
promise of the torch backend, checked against the naive path (which must fail the same check).
"""


import pytest
import torch
from kernel_helpers import (  # noqa: E402,F401  (sets TRITON_INTERPRET on CPU first)
    BACKENDS,
    assert_close,
    linear_grad_bounds,
    logp_tol,
    max_err,
    rounding,
    tol,
)

from bench.common import LargestTensor  # noqa: E402
from grpo_core.kernels import fused_linear_grpo_loss, linear_token_logprobs, torch_backend  # noqa: E402
from grpo_core.logprobs import token_entropy  # noqa: E402
from grpo_core.logprobs import token_logprobs as ref_logprobs  # noqa: E402
from grpo_core.loss import grpo_loss  # noqa: E402

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def make_case(N, T, H, V, seed=0, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g)                              # (N, T, H)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 2                   # (V, H)
    labels = torch.randint(0, V, (N, T), generator=g)                       # (N, T)
    mask = torch.rand(N, T, generator=g) > 0.3
    if N >= 2:
        mask[0] = False                                                     # fully masked row
        mask[1] = False
        mask[1, 0] = True                                                   # one valid token
    bias = None
    if with_bias:
        bias = torch.zeros(V)
        banned = torch.tensor([0, 7, V // 2, V - 1])                         # e.g. vision special ids
        bias[banned] = -float("inf")
        labels[torch.isin(labels, banned)] = 3
    labels[~mask] = -100
    upstream = torch.randn(N, T, generator=g)
    return hidden, weight, labels, mask, bias, upstream


def ref_linear(hidden, weight, labels, temperature, mask, bias=None):
    """The naive path: full logits, then the reference log-probs."""
    logits = hidden @ weight.t()                                            # (N, T, V) materialised
    if bias is not None:
        logits = logits + bias
    return ref_logprobs(logits, labels, temperature, mask), logits


def check_fp32(lp, dh, dw, hidden, weight, labels, temperature, mask, bias, up, ent=None):
    """Fused fp32 results vs the naive path run in fp64 on the same inputs, within derived bounds."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.t() + (bias.double() if bias is not None else 0.0)       # (N, T, V) fp64, kept for dz
    logits.retain_grad()
    want = ref_logprobs(logits, labels, temperature, mask)
    (want * up.double()).sum().backward()
    z = logits.detach()
    assert_close(lp, want, "logp", atol=logp_tol(z, temperature))
    bdh, bdw = linear_grad_bounds(logits.grad, hidden, weight, labels, mask, up, temperature, z)
    assert_close(dh, h.grad, "d hidden", atol=bdh)
    assert_close(dw, w.grad, "d weight", atol=bdw)
    if ent is not None:
        assert_close(ent, token_entropy(z, temperature).nan_to_num(0.0) * mask, "entropy",
                     atol=logp_tol(z, temperature))


def grads(fn, hidden, weight, up, *args, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, *args, **kw)
    lp = out[0] if isinstance(out, tuple) else out
    (lp * up).sum().backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,T,H,V,with_bias,temperature", [
    (3, 5, 32, 1000, False, 1.0),
    (3, 5, 40, 1000, True, 0.7),      # H not a multiple of BLOCK_K, −inf bias
    (2, 1, 16, 4231, True, 1.0),      # T = 1, V not a tile multiple
])
def test_fp32_value_and_grads(backend, N, T, H, V, with_bias, temperature):
    hidden, weight, labels, mask, bias, up = make_case(N, T, H, V, with_bias=with_bias)
    (lp, ent), dh, dw = grads(linear_token_logprobs, hidden, weight, up, labels, temperature, mask,
                              bias=bias, return_entropy=True, backend=backend)
    check_fp32(lp, dh, dw, hidden, weight, labels, temperature, mask, bias, up, ent)
    assert (dh[~mask] == 0).all() and (lp[~mask] == 0).all()
    assert torch.isfinite(ent).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_error_at_most_twice_torch_bf16(backend):
    hidden, weight, labels, mask, bias, up = make_case(3, 5, 32, 1000, seed=1, with_bias=True)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    lp, dh, dw = grads(linear_token_logprobs, hb, wb, up, labels, 0.7, mask, bias=bias, backend=backend)
    (want, _), rdh, rdw = grads(ref_linear, hb.double(), wb.double(), up.double(), labels, 0.7, mask, bias.double())

    def torch_bf16(h, w):                                                   # the same computation in bf16
        lsm = torch.log_softmax((h @ w.t() + bias.bfloat16()) / 0.7, dim=-1)
        lp = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float()
        return torch.where(mask, lp, 0.0)
    lpt, tdh, tdw = grads(torch_bf16, hb, wb, up)
    assert dh.dtype == dw.dtype == torch.bfloat16
    assert max_err(lp, want) <= 2 * max_err(lpt, want) + 1e-6
    assert max_err(dh, rdh) <= 2 * max_err(tdh, rdh) + 1e-6
    assert max_err(dw, rdw) <= 2 * max_err(tdw, rdw) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g_size", [1e-4, 1e-6])
def test_fp16_realistic_gradient_does_not_underflow(backend, g_size):
    """fp16 model, upstream g = advantage / tokens (1e-4 … 1e-6), V = 8,192: p_j·g ≈ 1e-8 … 1e-10 is
    below fp16's smallest subnormal, so an fp16 dz loses dh's −g·Σ p_j W_j term. The bound: dz and
    the GEMM operands rounded to bf16 (``dz_dtype``) on terms of size Σ|dz|·max|W| ≤ 2|g|·max|W|
    (dh) and Σ_i |g_i|·max|h| (dW), plus storing the result in fp16 (subnormals included)."""
    hidden, weight, labels, mask, _, up = make_case(2, 4, 32, 8192, seed=3)
    mask[:] = True
    labels = torch.randint(0, 8192, labels.shape, generator=torch.Generator().manual_seed(4))
    up = torch.where(torch.arange(8) % 2 == 0, g_size, -g_size).view(2, 4)        # ±g per token
    h16, w16 = hidden.half(), weight.half()
    _, dh, dw = grads(linear_token_logprobs, h16, w16, up, labels, 1.0, mask, backend=backend)
    _, rdh, rdw = grads(ref_linear, h16.double(), w16.double(), up.double(), labels, 1.0, mask)
    assert dh.dtype == dw.dtype == torch.float16
    k = 4 * torch.finfo(torch.bfloat16).eps                           # 2^-9 per rounding, 8 of them
    bound_dh = k * 2 * g_size * w16.double().abs().max() + rounding(rdh, torch.float16)
    bound_dw = k * up.abs().sum() * h16.double().abs().max() + rounding(rdw, torch.float16)
    assert ((dh.double() - rdh).abs() <= bound_dh).all(), max_err(dh, rdh) / rdh.abs().max().item()
    assert ((dw.double() - rdw).abs() <= bound_dw).all(), max_err(dw, rdw) / rdw.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_grpo_loss_matches_reference(backend):
    hidden, weight, labels, mask, bias, _ = make_case(4, 4, 32, 1000, seed=2, with_bias=True)
    g = torch.Generator().manual_seed(5)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    with torch.no_grad():
        base, _ = ref_linear(hidden, weight, labels, 1.0, mask, bias)
    old = base + 0.4 * torch.randn(4, 4, generator=g)                       # ratios on both clip sides
    ref = base + 0.2 * torch.randn(4, 4, generator=g)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, beta=0.04, kl="k3", agg="seq_mean")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(h1, w1, labels, old, ref, adv, mask, bias=bias, backend=backend, **kw)
    loss.backward()
    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp, logits = ref_linear(h2, w2, labels, 1.0, mask, bias.double())       # fp64 truth
    logits.retain_grad()
    lp.retain_grad()
    want, want_m = grpo_loss(lp, old.double(), ref.double(), adv.double(), mask, **kw)
    want.backward()
    z = logits.detach()
    # the loss moves by Σ_t |∂L/∂logp_t| · (error of logp_t), then one fp32 rounding of its own
    loss_tol = float((lp.grad.abs() * logp_tol(z)).sum()) + tol(torch.float32, abs(float(want.detach())), k=4)
    assert_close(loss, want, "loss", atol=loss_tol)
    bdh, bdw = linear_grad_bounds(logits.grad, hidden, weight, labels, mask, lp.grad, 1.0, z)
    assert_close(h1.grad, h2.grad, "d hidden", atol=bdh)
    assert_close(w1.grad, w2.grad, "d weight", atol=bdw)
    for k, v in want_m.items():   # metrics are fp32 sums/means of the same per-token values
        assert_close(metrics[k], v, f"metric {k}", atol=float(logp_tol(z).max()) * (1 + abs(float(v))))
    assert "entropy" in metrics and torch.isfinite(metrics["entropy"])


def test_torch_backend_many_tiles(monkeypatch):
    """Small tiles: several token chunks × vocab chunks, one vocab chunk entirely −inf."""
    monkeypatch.setattr(torch_backend, "ROW_CHUNK", 4)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 4 * 150)              # 4 tokens × 150 ids
    hidden, weight, labels, mask, bias, up = make_case(3, 5, 24, 1000, seed=6, with_bias=True)
    bias[300:450] = -float("inf")                                            # a whole tile banned
    labels[(labels >= 300) & (labels < 450)] = 3
    (lp, ent), dh, dw = grads(linear_token_logprobs, hidden, weight, up, labels, 0.7, mask,
                              bias=bias, return_entropy=True, backend="torch")
    check_fp32(lp, dh, dw, hidden, weight, labels, 0.7, mask, bias, up, ent)


def test_bias_needing_grad_is_rejected():
    hidden, weight, labels, mask, _, _ = make_case(2, 3, 16, 100)
    with pytest.raises(ValueError, match="bias"):
        linear_token_logprobs(hidden, weight, labels, mask=mask, bias=torch.zeros(100, requires_grad=True))


def test_torch_backend_never_materialises_logits(monkeypatch):
    """Largest tensor of forward + backward ≪ N·T·V·4 bytes; the naive matmul path exceeds it."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 4 * 2048)             # 4-token chunks
    N, T, H, V = 4, 16, 8, 2048
    hidden, weight, labels, mask, _, up = make_case(N, T, H, V, seed=3)
    full_logits_bytes = N * T * V * 4
    with LargestTensor() as ours:
        grads(linear_token_logprobs, hidden, weight, up, labels, 1.0, mask, backend="torch")
    with LargestTensor() as naive:
        grads(ref_linear, hidden, weight, up, labels, 1.0, mask)
    assert ours.biggest <= full_logits_bytes / 4, f"largest tensor {ours.biggest} B vs logits {full_logits_bytes} B"
    assert naive.biggest >= full_logits_bytes                                # the check can fail


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "triton" in str(b)])
def test_triton_vocab_split_forward(monkeypatch, backend):
    """Few tokens: the forward splits the vocab over programs and merges the partials (m, l, s, z_y);
    values and gradients are those of the unsplit computation."""
    from grpo_core.kernels import triton_linear

    monkeypatch.setattr(triton_linear, "MIN_PROGRAMS", 64)                  # force S > 1 on 2 token blocks
    hidden, weight, labels, mask, bias, up = make_case(3, 5, 40, 4231, with_bias=True)
    blocks = -(-int(mask.sum()) // triton_linear._config(hidden)["BLOCK_M"])
    assert triton_linear._vocab_splits(blocks, 4231, 128, hidden.device) > 1
    (lp, ent), dh, dw = grads(linear_token_logprobs, hidden, weight, up, labels, 0.7, mask,
                              bias=bias, return_entropy=True, backend=backend)
    check_fp32(lp, dh, dw, hidden, weight, labels, 0.7, mask, bias, up, ent)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "triton" in str(b)])
def test_triton_linear_rows_past_2_pow_31_elements(backend):
    """A hidden row starting past element 2^31 (tokens × H ≥ 2^31 in one call): the row offset is
    formed in int64. Three rows 2^30 + 64 elements apart in one lazily allocated 4 GiB buffer (only
    the touched pages become memory)."""
    from grpo_core.kernels import triton_linear

    H, V, stride = 64, 300, (1 << 30) + 64
    try:
        storage = torch.empty(2 * stride + H, dtype=torch.bfloat16)          # 4 GiB virtual
    except RuntimeError as exc:                                              # no overcommit here
        pytest.skip(f"cannot reserve 4 GiB of address space: {exc}")
    h = storage.as_strided((3, H), (stride, 1))                              # rows at 0, 2^30+64, 2^31+128
    gen = torch.Generator().manual_seed(0)
    h.copy_(torch.randn(3, H, generator=gen).bfloat16())
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).bfloat16()
    ys = torch.tensor([5, 17, 299])
    logp, lse, _ = triton_linear.linear_forward(h, weight, None, ys, 1.0, False)
    z = h.double() @ weight.double().t()                                     # (3, V) fp64 truth
    want = z.gather(1, ys[:, None]).squeeze(1) - torch.logsumexp(z, 1)
    assert_close(logp, want, "logp of rows past 2^31", atol=logp_tol(z[:, None, :])[:, 0])
