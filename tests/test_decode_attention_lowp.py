"""The decode attention's GPU path for a bf16 cache, run on CPU with its GEMM emulated.

On a GPU (``prefix_decode._direct``) the attention reads a bf16 / fp16 K/V cache as stored:
GEMMs with fp32 results (``torch.bmm(..., out_dtype=float32)``, CUDA only), the probabilities
cast to bf16 for p·V. Here ``_direct`` is forced and ``_bmm_f32`` emulated (bf16 operands
asserted, products in fp64, fp32 result), so the path's numerics and its one promise are
checked without a GPU: logits as close to an fp64 model as the fp32-cast path's, and no op that
converts the cache (a whole-budget K/V buffer converted to fp32 every layer and step would
double the bytes a 2B decode step moves).
"""

import pytest
import torch
from helpers import img
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from grpo_core.policy import Prompt

pytestmark = pytest.mark.numerics

LOW = (torch.bfloat16, torch.float16)


def _emulated_bmm_f32(a, b):
    assert a.dtype in LOW and b.dtype == a.dtype, f"GEMM operands {a.dtype} / {b.dtype}"
    with _disable_current_modes():                      # the GPU does this inside one kernel
        return torch.bmm(a.double(), b.double()).float()


def _force_direct(monkeypatch):
    from grpo_models import prefix_decode

    monkeypatch.setattr(prefix_decode, "_direct",
                        lambda q, pk, ok: q.dtype in LOW and pk.dtype == ok.dtype == q.dtype)
    monkeypatch.setattr(prefix_decode, "_bmm_f32", _emulated_bmm_f32)


def _logits(pol, monkeypatch, steps=4, static=True):
    from grpo_models import step_runner

    mode = "static" if static else None
    monkeypatch.setattr(step_runner, "resolve", lambda graphs, compile, device: mode)
    enc = pol.encode([Prompt("What is shown in this scan? A. CT B. MRI", [img(56, 56, 1)]),
                      Prompt("Where is the lesion?", [img(84, 112, 2)])])
    ids = torch.randint(10, 400, (len(enc) * 2, steps), generator=torch.Generator().manual_seed(5))
    out = []
    with torch.no_grad():
        _, state = pol.prefill(enc)
        state = pol.plan_decode(pol.expand(state, 2), steps + 1, "off", "off")
        for j in range(steps):
            logits, state = pol.decode_step(state, ids[:, j])
            out.append(logits.float().clone())
    return torch.stack(out, 1), state


@pytest.mark.parametrize("static", [True, False])
def test_direct_bf16_path_is_as_close_to_fp64_as_the_cast_path(tiny_vlm_path, monkeypatch, static):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    want, _ = _logits(Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.float64,
                                                    device="cpu"), monkeypatch, static=static)
    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.bfloat16, device="cpu")
    cast, _ = _logits(pol, monkeypatch, static=static)          # K/V converted to fp32
    _force_direct(monkeypatch)
    got, _ = _logits(pol, monkeypatch, static=static)
    cast_err, err = (cast - want).abs().max(), (got - want).abs().max()
    floor = 2.0 ** -7 * want.abs().max()                 # a few bf16 roundings of the logits
    assert 0 < cast_err and err <= 2 * cast_err + floor, f"direct {err:.3g} vs cast {cast_err:.3g}"


class _Casts(TorchDispatchMode):
    """Storages of the tensors every dtype conversion reads."""

    def __init__(self):
        super().__init__()
        self.read = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and isinstance(out, torch.Tensor) and out.dtype != src.dtype:
            self.read.append(src.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("direct", [True, False])
def test_direct_path_never_converts_the_cache(tiny_vlm_path, monkeypatch, direct):
    from grpo_models.qwen2_vl import Qwen2VLPolicy

    pol = Qwen2VLPolicy.from_pretrained(tiny_vlm_path, dtype=torch.bfloat16, device="cpu")
    if direct:
        _force_direct(monkeypatch)
    _, state = _logits(pol, monkeypatch, steps=2)
    cache = {t.untyped_storage().data_ptr()
             for t in state.prefix_k + state.prefix_v + state.own_k + state.own_v}
    with _Casts() as casts:
        pol.decode_step(state, torch.full((len(state),), 7))
    converted = [ptr for ptr in casts.read if ptr in cache]
    assert (converted == []) == direct, f"{len(converted)} conversions of a K/V cache buffer"


def _reference(q, pk, pv, pmask, ok, ov, g, scale, t_valid):
    """Row by row in fp64: softmax over [its prompt's unpadded keys ; its first t_valid own]."""
    n, h, _, d = q.shape
    kvh = pk.shape[1]
    out = torch.empty(n, h, d, dtype=torch.float64)
    for i in range(n):
        b, keep = i // g, pmask[i // g]
        for j in range(h):
            kh = j // (h // kvh)
            k = torch.cat([pk[b, kh][keep], ok[i, kh, :t_valid]]).double()
            v = torch.cat([pv[b, kh][keep], ov[i, kh, :t_valid]]).double()
            p = torch.softmax(q[i, j, 0].double() @ k.T * scale, -1)
            out[i, j] = p @ v
    return out.view(n, h * d)


@pytest.mark.parametrize("dtype", LOW)
def test_direct_attention_matches_fp64_within_its_dtype(monkeypatch, dtype):
    """The attention alone at odd shapes (3 prompts × G 2, GQA 3:1, left padding, 5 of 7 own
    columns written): within a few roundings of ``dtype`` of the fp64 reference."""
    from grpo_models import prefix_decode

    _force_direct(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    b, g, kvh, r, d, p, cap, t = 3, 2, 2, 3, 16, 11, 7, 5
    n, h = b * g, kvh * r
    x = lambda *s: (2 * torch.randn(*s, generator=gen)).to(dtype)  # noqa: E731
    q, pk, pv = x(n, h, 1, d), x(b, kvh, p, d), x(b, kvh, p, d)
    ok, ov = x(n, kvh, cap, d), x(n, kvh, cap, d)
    pmask = torch.ones(b, p, dtype=torch.bool)
    pmask[0, :4], pmask[2, :1] = False, False
    own_mask = (torch.arange(cap) < t).view(1, 1, 1, cap)
    bias = prefix_decode.prefix_bias(pmask[:, None, None, :], kvh)
    got = prefix_decode.shared_prefix_attention(q, pk, pv, bias, ok, ov, g, d ** -0.5, own_mask)
    want = _reference(q, pk, pv, pmask, ok, ov, g, d ** -0.5, t)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    err = (got.double() - want).abs().max()
    assert err <= 4 * eps * want.abs().max(), f"{err:.3g} vs max |out| {want.abs().max():.3g}"


@pytest.mark.parametrize("behaviour", ["right", "raises", "wrong"])
def test_probe_takes_the_direct_path_only_where_it_works(monkeypatch, behaviour):
    """The once-per-GPU probe, run on CPU with its GEMM replaced: a working fp32-result GEMM is
    used; one that raises (an older torch) or computes wrongly is not."""
    from grpo_models import prefix_decode

    def gemm(a, b):
        if behaviour == "raises":
            raise RuntimeError("bmm.dtype: not available")
        out = _emulated_bmm_f32(a, b)
        return out if behaviour == "right" else out + 1e-2

    monkeypatch.setattr(prefix_decode, "_bmm_f32", gemm)
    probe = prefix_decode._out_dtype_gemms.__wrapped__                 # uncached
    assert probe(torch.device("cpu"), torch.bfloat16) == (behaviour == "right")
