"""The "cuda" backend: ctypes bindings to libgrpo_core_cuda.so (built from csrc/ by nvcc).

The library is plain CUDA C++ with a C ABI (csrc/grpo_core_cuda.h): no torch headers, so it
builds next to a CPU-only torch and one build serves every torch version. Python passes
``tensor.data_ptr()`` and ``torch.cuda.current_stream().cuda_stream``; each launcher returns a
cudaError_t, turned into a RuntimeError with the CUDA error text.

    logprobs_forward / logprobs_backward      the logits path of the backend contract
                                              (grpo_core/kernels/autograd.py): per valid token
        logp = z_y − logsumexp(z),  z = logits / T,  H = −Σ p log p       (fp32)
        d logits_j = (g (1[j = y] − p_j) − g_H p_j (log p_j + H)) / T
    group_advantages_cuda(rewards (N,), group_size, scale, eps)   = grpo_core.advantages
The fused-linear path of the "cuda" backend is cuda_linear.py (cuBLAS GEMM tiles through torch,
these kernels for the log-softmax and its backward).

Where the library is looked for (first hit wins; ``GRPO_CORE_CUDA_LIB`` alone if set):
    $GRPO_CORE_CUDA_LIB → grpo_core/kernels/_lib/ (pip install) → build/cuda/ (``make cuda``)
Loading is lazy (first ``available()``/kernel call) and never touches CUDA; ``available(device)``
returns None or the reason this backend cannot run (no library, tensors not on CUDA, no CUDA
device, driver too old or no kernel image for this GPU).

The CUDA runtime is linked statically into the library; it shares torch's CUDA context and
streams through the driver, and needs a driver at least as new as the nvcc that built it: a
CUDA 13 build needs driver ≥ 580, a CUDA 12.2 build ≥ 535. ``available()`` names both versions
when the driver is older (build with an older toolkit: ``NVCC=/usr/local/cuda-12.2/bin/nvcc make cuda``).
"""

import ctypes
import os
import threading

import torch

from grpo_core.advantages import SCALES, check_rewards
from grpo_core.kernels import dispatch

ABI_VERSION = 1  # = GRPO_CORE_CUDA_ABI_VERSION in csrc/grpo_core_cuda.h
LIB_NAME = "libgrpo_core_cuda.so"
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# name → (restype, argtypes); the C declarations are in csrc/grpo_core_cuda.h.
SIGNATURES = {
    "grpo_core_cuda_abi_version": (_I, []),
    "grpo_core_cuda_runtime_version": (_I, []),
    "grpo_core_cuda_error_string": (ctypes.c_char_p, [_I]),
    "grpo_core_cuda_probe": (_I, [_I]),
    "grpo_group_advantages_workspace_size": (_I64, [_I64]),
    "grpo_group_advantages": (_I, [_P, _P, _P, _I64, _I64, _I, _F, _P]),
    "grpo_token_logprobs_fwd": (_I, [_P, _I, _I64, _I64, _I64, _I64, _P, _P, _I64, _F, _P, _P, _P, _P]),
    "grpo_token_logprobs_bwd": (_I, [_P, _I, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64,
                                     _F, _P, _I64, _I64, _P]),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_tried = False
_probed: dict[int, str | None] = {}  # device index → reason (None = can run)


# ---- finding and loading the library ---------------------------------------------------------

def library_candidates() -> list[str]:
    env = os.environ.get("GRPO_CORE_CUDA_LIB")
    if env:
        return [env]
    return [os.path.join(_HERE, "_lib", LIB_NAME), os.path.join(_REPO, "build", "cuda", LIB_NAME)]


def _open(path: str) -> ctypes.CDLL:
    """dlopen + bind every signature + check the ABI; raises OSError with what is wrong."""
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise OSError(f"{path} lacks symbol {name}: a stale build; rebuild with `make cuda`") from None
        fn.restype, fn.argtypes = restype, argtypes
    abi = lib.grpo_core_cuda_abi_version()
    if abi != ABI_VERSION:
        raise OSError(f"{path} has ABI {abi}, this grpo_core needs {ABI_VERSION}; rebuild with `make cuda`")
    return lib


def load_library(path: str | None = None, reload: bool = False) -> ctypes.CDLL | None:
    """The loaded library, or None (then ``library_error()`` says why). ``path`` forces a file;
    ``reload`` searches the default places again (tests)."""
    global _lib, _lib_error, _tried
    with _lock:
        if _tried and path is None and not reload:
            return _lib
        candidates = [path] if path else library_candidates()
        found = [p for p in candidates if os.path.isfile(p)]
        _lib, _lib_error = None, None
        if not found:
            _lib_error = (f"CUDA library {LIB_NAME} not built/found (looked in {', '.join(candidates)}); "
                          "build it with `make cuda` (needs nvcc) or set GRPO_CORE_CUDA_LIB")
        else:
            try:
                _lib = _open(found[0])
            except OSError as exc:
                _lib_error = f"CUDA library {found[0]} could not be loaded: {exc}"
        _tried = True
        _probed.clear()
        return _lib


def library_error() -> str | None:
    load_library()
    return _lib_error


def cuda_error_string(code: int) -> str:
    """cudaGetErrorString(code) from the library's runtime (no GPU needed)."""
    lib = load_library()
    if lib is None:
        return f"cudaError {code} (library not loaded: {_lib_error})"
    return lib.grpo_core_cuda_error_string(int(code)).decode(errors="replace")


def _check(code: int, where: str) -> None:
    if code != 0:
        raise RuntimeError(f"{where}: CUDA error {code}: {cuda_error_string(code)}")


# ---- availability probe (registered with the dispatcher) ------------------------------------

def available(device) -> str | None:
    """None if the CUDA kernels can run on ``device``, else the reason. No CUDA call happens
    unless torch reports a GPU (then the library's probe runs once per device)."""
    device = torch.device(device)
    if load_library() is None:
        return _lib_error
    if device.type != "cuda":
        return f"tensors are on {device}, not on a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        code = _lib.grpo_core_cuda_probe(index)
        rt = _lib.grpo_core_cuda_runtime_version()
        _probed[index] = None if code == 0 else _probe_failure(index, code, rt)
    return _probed[index]


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


# Oldest Linux driver for each CUDA runtime (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {13000: "580", 12080: "570", 12060: "560", 12040: "550", 12020: "535", 12000: "525"}


def _probe_failure(index: int, code: int, rt: int) -> str:
    where = f"cannot run on cuda:{index} ({torch.cuda.get_device_name(index)})"
    if code == 35:  # cudaErrorInsufficientDriver
        need = next((d for v, d in sorted(MIN_DRIVER.items(), reverse=True) if rt >= v), "?")
        return (f"{where}: the NVIDIA driver supports CUDA up to {driver_cuda_version()}, but the "
                f"library was built with CUDA {_cuda_version(rt)}, which needs driver >= {need}. Update "
                "the driver, or rebuild with the toolkit your driver supports, e.g. CUDA 12.2 for driver "
                ">= 535: NVCC=/usr/local/cuda-12.2/bin/nvcc make cuda")
    return (f"{where}: {cuda_error_string(code)}; the library was built with CUDA {_cuda_version(rt)} "
            "(rebuild for this GPU: GRPO_CORE_CUDA_ARCHS=<major><minor> make cuda)")


def driver_cuda_version() -> str:
    """The CUDA version the installed driver supports, as torch's CUDA sees it ('?' if unknown)."""
    try:
        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return _cuda_version(v.value)
    except (OSError, AttributeError):
        return "?"


dispatch.register("cuda", available)


def _require(where: str, *tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise RuntimeError(f"{where}: all tensors must be on one device, got {device} and {t.device}")
    reason = available(device)
    if reason is not None:
        raise RuntimeError(f"{where}: the CUDA backend cannot run: {reason}. "
                           "Use backend='torch' (or 'triton'), or move the tensors to a GPU")
    return device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---- token log-probs: the backend contract of autograd.py ------------------------------------
#
# The C launchers take rows = the flat positions n·T + t of the valid tokens and the (N, T, V)
# strides, read each row in place, and write fp32 results per valid token; the compaction, the
# checks and the scatter back to (N, T) are the shared ones in grpo_core/kernels/__init__.py and
# autograd.py.

DTYPES = tuple(_DTYPES)


def _rows(logits, n_idx, t_idx):
    return (n_idx * logits.shape[1] + t_idx).contiguous()                  # (M,) int64 flat positions


def logprobs_forward(logits, n_idx, t_idx, ys, temperature, want_entropy):
    """See torch_backend.logprobs_forward (same contract)."""
    M = len(ys)
    _, T, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(M, **f32), torch.empty(M, **f32)
    ent = torch.empty(M, **f32) if want_entropy else None
    with torch.cuda.device(logits.device):
        code = _lib.grpo_token_logprobs_fwd(
            logits.data_ptr(), _DTYPES[logits.dtype], T, V, logits.stride(0), logits.stride(1),
            _rows(logits, n_idx, t_idx).data_ptr(), ys.contiguous().data_ptr(), M, temperature,
            logp.data_ptr(), lse.data_ptr(), _ptr(ent), _stream(logits.device))
    _check(code, "cuda logprobs_forward")
    return logp, lse, ent


def logprobs_backward(logits, n_idx, t_idx, ys, lse, g, temperature, out, ent=None, g_ent=None):
    """See torch_backend.logprobs_backward; ``out`` may alias ``logits`` (each thread reads an
    element before writing it)."""
    _, T, V = logits.shape
    g_ent = None if g_ent is None else g_ent.float().contiguous()
    ent = None if g_ent is None else ent.float().contiguous()
    with torch.cuda.device(logits.device):
        code = _lib.grpo_token_logprobs_bwd(
            logits.data_ptr(), _DTYPES[logits.dtype], T, V, logits.stride(0), logits.stride(1),
            _rows(logits, n_idx, t_idx).data_ptr(), ys.contiguous().data_ptr(), lse.data_ptr(),
            g.float().contiguous().data_ptr(), _ptr(ent), _ptr(g_ent), len(ys), temperature,
            out.data_ptr(), out.stride(0), out.stride(1), _stream(logits.device))
    _check(code, "cuda logprobs_backward")


# ---- group advantages ------------------------------------------------------------------------

def group_advantages_cuda(rewards: torch.Tensor, group_size: int, scale: str = "group",
                          eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) on a GPU, N = B·G consecutive groups → advantages (N,) fp32.
    Same contract and errors as grpo_core.advantages.group_advantages."""
    where = "group_advantages_cuda"
    check_rewards(rewards, group_size)
    if scale not in SCALES:
        raise ValueError(f"{where}: scale must be one of {SCALES}, got {scale!r}")
    device = _require(where, rewards)
    r = rewards.float().contiguous()                                        # (N,)
    B = r.numel() // group_size
    adv = torch.empty_like(r)                                               # (N,)
    ws = None
    if scale == "batch":
        ws = torch.empty(_lib.grpo_group_advantages_workspace_size(B), dtype=torch.float64, device=device)
    with torch.cuda.device(device):
        code = _lib.grpo_group_advantages(r.data_ptr(), adv.data_ptr(), _ptr(ws), B, group_size,
                                          SCALES.index(scale), float(eps), _stream(device))
    _check(code, where)
    return adv
