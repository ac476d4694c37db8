"""CPU tier for the CUDA backend: the library builds, exports its C ABI, fails soft without a GPU,
and its kernels' per-thread arithmetic matches the PyTorch reference.

- Build: csrc/ is compiled for sm_80 only (CI speed; the default build is "80;90;90a") into
  build/cuda-ci/, reused while up to date (build_cuda's stamp + mtimes). Needs nvcc; skipped with
  the reason otherwise. A broken .cu therefore fails CI.
- No GPU here: loading the library and ``available()`` must give clean reason strings; a launch
  returns a CUDA error code instead of crashing.
- The kernels' math runs on CPU through the host emulator (csrc/emulate/emulate.cu): the same
  __host__ __device__ code (alignment split, 16-byte vectors, online softmax, −inf handling,
  backward) for every thread of a block in turn, checked against grpo_core.logprobs /
  grpo_core.advantages. Only the block-level merge and the launch itself need tests_cuda_gpu.py.
"""

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from grpo_core.advantages import group_advantages
from grpo_core.kernels import cuda, dispatch
from grpo_core.logprobs import token_entropy, token_logprobs

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "csrc"))
import build_cuda  # noqa: E402  (csrc/build_cuda.py: plain Python, no torch)
from kernel_helpers import assert_close, logit_grad_bound, logp_tol, tol  # noqa: E402

BUILD_DIR = os.path.join(REPO, "build", "cuda-ci")
NO_NVCC = build_cuda.find_nvcc() is None
needs_nvcc = pytest.mark.skipif(NO_NVCC, reason="nvcc not found (set NVCC or CUDA_HOME): cannot build csrc/")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@pytest.fixture(scope="module")
def lib_path():
    if NO_NVCC:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME): cannot build csrc/")
    return build_cuda.build(BUILD_DIR, quiet=True, archs="80")


@pytest.fixture(scope="module")
def emu():
    if NO_NVCC:
        pytest.skip("nvcc not found (set NVCC or CUDA_HOME): cannot build the host emulator")
    lib = ctypes.CDLL(build_cuda.build_emulator(BUILD_DIR))
    P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.grpo_emulate_token_logprobs_fwd.argtypes = [P, I, I64, I64, I64, I64, P, P, I64, F, P, P, P, I]
    lib.grpo_emulate_token_logprobs_bwd.argtypes = [P, I, I64, I64, I64, I64, P, P, P, P, P, P, I64, F,
                                                    P, I64, I64, I]
    lib.grpo_emulate_group_advantages.argtypes = [P, P, I64, I64, I, F]
    return lib


@pytest.fixture
def loaded(lib_path):
    """The CI build loaded as *the* library; the default search is restored afterwards."""
    assert cuda.load_library(lib_path) is not None, cuda.library_error()
    yield cuda
    cuda.load_library(reload=True)


# ---- build and ABI -------------------------------------------------------------------------

@needs_nvcc
def test_build_exports_every_launcher_and_hides_the_runtime(lib_path):
    lib = ctypes.CDLL(lib_path)
    for name in cuda.SIGNATURES:
        assert hasattr(lib, name), f"{lib_path} lacks {name}"
    if shutil.which("nm"):
        out = subprocess.run(["nm", "-D", "--defined-only", lib_path], capture_output=True, text=True).stdout
        defined = {line.split()[-1] for line in out.splitlines() if " T " in line}
        assert set(cuda.SIGNATURES) <= defined, f"missing from nm -D: {set(cuda.SIGNATURES) - defined}"
        leaked = sorted(s for s in defined if s.startswith("cuda"))
        assert not leaked, f"static cudart symbols exported (visibility flags lost?): {leaked[:5]}"


@needs_nvcc
def test_build_is_cached_and_rebuilt_when_flags_change(lib_path, tmp_path):
    mtime = os.path.getmtime(lib_path)
    assert build_cuda.build(BUILD_DIR, quiet=True, archs="80") == lib_path
    assert os.path.getmtime(lib_path) == mtime, "an up-to-date library was rebuilt"
    key = {"nvcc": build_cuda.find_nvcc(), "flags": build_cuda.nvcc_flags(["80", "90a"]),
           "sources": [os.path.relpath(s, build_cuda.HERE) for s in build_cuda.sources()]}
    assert not build_cuda.is_up_to_date(lib_path, key), "different archs must not reuse the build"


def test_arch_parsing_and_gencode_flags():
    assert build_cuda.parse_archs("80;90;90a") == ["80", "90", "90a"]
    assert build_cuda.parse_archs("sm_80, 9.0 ,80") == ["80", "90"]
    flags = " ".join(build_cuda.gencode_flags(["80", "90", "90a"]))
    assert "arch=compute_90a,code=sm_90a" in flags and "arch=compute_80,code=sm_80" in flags
    assert "arch=compute_90,code=compute_90" in flags, "highest plain arch must embed PTX"
    with pytest.raises(ValueError, match="cannot read architecture"):
        build_cuda.parse_archs("ampere")


def test_missing_nvcc_returns_none_with_a_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NVCC", str(tmp_path / "no-such-nvcc"))
    assert build_cuda.build(str(tmp_path), quiet=True) is None
    err = capsys.readouterr().err
    assert "nvcc not found" in err and err.count("\n") == 1


@needs_nvcc
def test_library_facts_need_no_gpu(loaded):
    lib = cuda.load_library()
    assert lib.grpo_core_cuda_abi_version() == cuda.ABI_VERSION
    assert lib.grpo_core_cuda_runtime_version() >= 12000
    assert cuda.cuda_error_string(1) == "invalid argument"   # cudaErrorInvalidValue
    assert lib.grpo_group_advantages_workspace_size(7) == 15


@needs_nvcc
def test_launchers_reject_bad_arguments_before_any_launch(loaded):
    lib = cuda.load_library()
    assert lib.grpo_group_advantages(None, None, None, 4, 0, 0, 1e-4, None) == 1       # group_size 0
    assert lib.grpo_group_advantages(None, None, None, 4, 2, 7, 1e-4, None) == 1       # bad scale
    assert lib.grpo_group_advantages(None, None, None, 4, 2, 1, 1e-4, None) == 1       # batch, no workspace
    assert lib.grpo_group_advantages(None, None, None, 0, 2, 0, 1e-4, None) == 0       # nothing to do
    fwd = lib.grpo_token_logprobs_fwd
    assert fwd(None, 1, 3, 10, 30, 10, None, None, 1, 0.0, None, None, None, None) == 1  # temperature 0
    assert fwd(None, 9, 3, 10, 30, 10, None, None, 1, 1.0, None, None, None, None) == 1  # bad dtype
    assert fwd(None, 1, 3, 10, 30, 10, None, None, 0, 1.0, None, None, None, None) == 0  # K = 0


@needs_nvcc
@no_gpu
@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is installed")
def test_launch_without_driver_is_an_error_code_not_a_crash(loaded):
    code = cuda.load_library().grpo_group_advantages(None, None, None, 1, 2, 0, 1e-4, None)
    assert code != 0
    assert "driver" in cuda.cuda_error_string(code).lower() or "device" in cuda.cuda_error_string(code).lower()


# ---- availability and Python-side checks ---------------------------------------------------

@needs_nvcc
@no_gpu
def test_available_says_no_cuda_device(loaded):
    reason = cuda.available(torch.device("cuda"))
    assert reason is not None and "no CUDA device" in reason
    assert "not on a CUDA device" in cuda.available("cpu")
    assert dispatch.why_unavailable("cuda", torch.device("cuda")) == reason
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"


def test_missing_library_is_a_reason_not_an_error(tmp_path):
    try:
        assert cuda.load_library(str(tmp_path / "libnothing.so")) is None
        reason = cuda.available(torch.device("cuda"))
        assert "not built/found" in reason and "make cuda" in reason
        with pytest.raises(RuntimeError, match="not built/found"):
            dispatch.resolve("cuda", torch.device("cuda"))
    finally:
        cuda.load_library(reload=True)


def test_python_checks_before_any_launch():
    """The shared checks of grpo_core.kernels run before the CUDA backend is even resolved."""
    from grpo_core.kernels import linear_token_logprobs, token_logprobs

    x, y = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    with pytest.raises(RuntimeError, match="not on a CUDA device|not built/found"):
        token_logprobs(x, y, backend="cuda")
    with pytest.raises(RuntimeError, match="not on a CUDA device|not built/found"):
        linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(11, 4), y, backend="cuda")
    with pytest.raises(RuntimeError, match="not on a CUDA device|not built/found"):
        cuda.group_advantages_cuda(torch.randn(8), 4)
    with pytest.raises(TypeError, match="integer token ids"):
        token_logprobs(x, y.float(), backend="torch")
    with pytest.raises(ValueError, match=r"labels \(3, 2\)|expected logits"):
        token_logprobs(x, y.T, backend="cuda")
    with pytest.raises(ValueError, match="mask"):
        token_logprobs(x, y, mask=torch.ones(2, 4), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, y, temperature=0.0, backend="cuda")
    with pytest.raises(ValueError, match="multiple of group_size"):
        cuda.group_advantages_cuda(torch.randn(7), 4)
    with pytest.raises(ValueError, match="scale"):
        cuda.group_advantages_cuda(torch.randn(8), 4, scale="std")


@needs_nvcc
@no_gpu
def test_float64_is_refused_by_the_cuda_backend_by_name(loaded, monkeypatch):
    """fp64 is a dtype the CUDA kernels lack: a TypeError naming the backend module, not a crash
    (the probe is faked to pass, so the check after resolution is what runs)."""
    from grpo_core.kernels import token_logprobs

    monkeypatch.setitem(dispatch._PROBES, "cuda", lambda device: None)
    with pytest.raises(TypeError, match="float64 is not supported by grpo_core.kernels.cuda"):
        token_logprobs(torch.randn(2, 3, 11, dtype=torch.float64), torch.randint(0, 11, (2, 3)), backend="cuda")


def test_driver_too_old_message_names_both_versions(monkeypatch):
    monkeypatch.setattr(cuda.torch.cuda, "get_device_name", lambda i: "NVIDIA A100")
    monkeypatch.setattr(cuda, "driver_cuda_version", lambda: "12.2")
    msg = cuda._probe_failure(0, 35, 13000)
    assert "CUDA up to 12.2" in msg and "CUDA 13.0" in msg and ">= 580" in msg and ">= 535" in msg


# ---- kernel arithmetic through the host emulator --------------------------------------------

def _emulate(emu, logits, labels, mask, temperature, g, g_ent=None, nthreads=256, inplace=False):
    """Run the kernels' per-thread code on CPU: → logp, lse, entropy (N, T) and d logits."""
    N, T, V = logits.shape
    rows = mask.reshape(-1).nonzero().squeeze(1)                           # (K,)
    ys = labels.reshape(-1)[rows].contiguous()                             # (K,)
    K = rows.numel()
    logp, lse, ent = (torch.zeros(K) for _ in range(3))
    assert emu.grpo_emulate_token_logprobs_fwd(
        logits.data_ptr(), DT[logits.dtype], T, V, logits.stride(0), logits.stride(1), rows.data_ptr(),
        ys.data_ptr(), K, temperature, logp.data_ptr(), lse.data_ptr(), ent.data_ptr(), nthreads) == 0
    gk = g.reshape(-1)[rows].contiguous()
    gek = None if g_ent is None else g_ent.reshape(-1)[rows].contiguous()
    grad = logits if inplace else torch.zeros(N, T, V, dtype=logits.dtype)
    assert emu.grpo_emulate_token_logprobs_bwd(
        logits.data_ptr(), DT[logits.dtype], T, V, logits.stride(0), logits.stride(1), rows.data_ptr(),
        ys.data_ptr(), lse.data_ptr(), gk.data_ptr(), ent.data_ptr(), None if gek is None else gek.data_ptr(),
        K, temperature, grad.data_ptr(), grad.stride(0), grad.stride(1), nthreads) == 0

    def full(v):
        out = torch.zeros(N * T)
        out[rows] = v
        return out.view(N, T)
    return full(logp), full(lse), full(ent), grad


def _truth(logits, labels, mask, temperature, g, g_ent=None):
    """fp64 reference on the same (already rounded) logits: logp, entropy, d(Σ g·logp + gH·H)/dx."""
    x = logits.detach().double().requires_grad_(True)
    logp = token_logprobs(x, labels, temperature, mask)                                 # (N, T)
    ent = torch.where(mask, token_entropy(x, temperature), torch.zeros((), dtype=x.dtype))  # (N, T)
    loss = (logp * g).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    lse = torch.logsumexp(x.detach() / temperature, -1)
    return logp.detach(), ent.detach(), torch.where(mask, lse, 0.0), x.grad


def _torch_lowp_grad_error(logits, labels, mask, temperature, g, want_grad):
    """Max error of the same backward done by torch in the logits' own dtype (flash-attn rule)."""
    x = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(x / temperature, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    (torch.where(mask, lp.float(), 0.0) * g).sum().backward()
    return (x.grad.double() - want_grad).abs().max().item()


def _logits(shape, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,temperature,nthreads", [(1000, 1.0, 256), (4231, 0.7, 256), (37, 1.3, 32),
                                                    (4231, 1.0, 32)])
def test_emulated_kernels_match_reference(emu, dtype, V, temperature, nthreads):
    N, T = 3, 5
    logits = _logits((N, T + 1, V), dtype, seed=V)[:, 1:]    # non-contiguous view, rows misaligned
    labels = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(N, T, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0] = False                                          # a fully masked row
    labels[~mask] = -100                                     # padding ids are never read
    g, g_ent = torch.randn(N, T), torch.randn(N, T)
    logp, lse, ent, grad = _emulate(emu, logits, labels, mask, temperature, g)
    t_logp, t_ent, t_lse, t_grad = _truth(logits, labels, mask, temperature, g)
    fwd = logp_tol(logits, temperature)                                   # fp32 outputs from rounded inputs
    assert_close(logp, t_logp, "logp", atol=fwd)
    assert_close(lse, t_lse, "lse", atol=fwd)
    assert_close(ent, t_ent, "entropy", atol=fwd)
    assert (grad[~mask] == 0).all(), "masked rows must keep a zero gradient"
    assert_close(grad, t_grad, "d logits", atol=logit_grad_bound(t_grad, logits, labels, mask, g, temperature, dtype))
    if dtype != torch.float32:  # error at most 2x torch's own low-precision backward
        err = (grad.double() - t_grad).abs().max().item()
        assert err <= 2 * _torch_lowp_grad_error(logits, labels, mask, temperature, g, t_grad) + 1e-7
    # with the entropy term in the loss
    *_, grad_h = _emulate(emu, logits, labels, mask, temperature, g, g_ent, nthreads)
    *_, t_grad_h = _truth(logits, labels, mask, temperature, g, g_ent)
    assert_close(grad_h, t_grad_h, "d logits (logp + entropy)",
                 atol=logit_grad_bound(t_grad_h, logits, labels, mask, g, temperature, dtype, g_ent))


@needs_nvcc
def test_emulated_qwen_vocab_bf16_one_token(emu):
    V = 151936
    logits = _logits((1, 1, V), torch.bfloat16, seed=3, scale=4.0)
    labels, mask, g = torch.tensor([[12345]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[0.5]])
    logp, lse, ent, grad = _emulate(emu, logits, labels, mask, 1.0, g)
    t_logp, t_ent, t_lse, t_grad = _truth(logits, labels, mask, 1.0, g)
    fwd = logp_tol(logits)
    assert_close(logp, t_logp, "logp", atol=fwd)
    assert_close(ent, t_ent, "entropy", atol=fwd)
    assert_close(grad, t_grad, "d logits", atol=logit_grad_bound(t_grad, logits, labels, mask, g, 1.0, torch.bfloat16))


@needs_nvcc
def test_emulated_minus_inf_logits_and_inplace_backward(emu):
    """Suppressed vocab entries (−inf) add nothing: finite logp/entropy, zero gradient there."""
    N, T, V = 2, 3, 523
    logits = _logits((N, T, V), torch.float32, seed=5)
    logits[..., :300] = float("-inf")                        # whole vectors and a partial one
    logits[1, 2, 301:] = float("-inf")                       # a row with 1 finite entry
    labels = torch.randint(300, 301 + 1, (N, T))
    labels[1, 2] = 300                                       # its only finite entry
    mask = torch.ones(N, T, dtype=torch.bool)
    g = torch.randn(N, T)
    logp, lse, ent, grad = _emulate(emu, logits.clone(), labels, mask, 1.0, g)
    t_logp, t_ent, t_lse, t_grad = _truth(logits, labels, mask, 1.0, g)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    fwd = logp_tol(logits)
    assert_close(logp, t_logp, "logp", atol=fwd)
    assert_close(ent, t_ent.nan_to_num(0.0), "entropy", atol=fwd)
    t_grad = t_grad.nan_to_num(0.0)
    assert_close(grad, t_grad, "d logits", atol=logit_grad_bound(t_grad, logits, labels, mask, g, 1.0, torch.float32))
    inplace = logits.clone()
    *_, grad_inplace = _emulate(emu, inplace, labels, mask, 1.0, g, inplace=True)
    assert grad_inplace.data_ptr() == inplace.data_ptr()
    assert torch.equal(grad_inplace, grad), "in-place d logits differ from the out-of-place ones"


@needs_nvcc
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("B,G", [(5, 1), (7, 4), (3, 33), (2, 1500)])
def test_emulated_group_advantages_match_reference(emu, scale, B, G):
    gen = torch.Generator().manual_seed(B * G)
    r = torch.where(torch.rand(B * G, generator=gen) > 0.5, 1.0, 0.0) + 0.1 * torch.randn(B * G, generator=gen)
    r[:G] = 0.7                    # a group of equal rewards: exactly 0 here (fp64 sums), while
    # torch's fp32 mean of 33 × 0.7 is off by an ulp, which /(0 + eps) turns into ~6e-4 there
    adv = torch.empty_like(r)
    kind = ["group", "batch", "none"].index(scale)
    assert emu.grpo_emulate_group_advantages(r.data_ptr(), adv.data_ptr(), B, G, kind, 1e-4) == 0
    want = group_advantages(r, G, scale)[G:]
    assert_close(adv[G:], want, f"advantages ({scale})", atol=tol(torch.float32, 1 + want.abs().max(), k=16))
    assert (adv[:G] == 0).all(), "a group of equal rewards must get exactly 0"
