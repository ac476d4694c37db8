"""The "cuda" backend: ctypes bindings to libgrpo_core_cuda.so (built from csrc/ by nvcc).

The library is plain CUDA C++ with a C ABI (csrc/grpo_core_cuda.h): no torch headers, so it
builds next to a CPU-only torch and one build serves every torch version. Python passes
``tensor.data_ptr()`` and ``torch.cuda.current_stream().cuda_stream``; each launcher returns a
cudaError_t, turned into a RuntimeError with the CUDA error text.

    token_logprobs_cuda(logits (N, T, V), labels (N, T), temperature, mask, return_entropy)
        logp = z_y − logsumexp(z),  z = logits / T        (fp32; 0 where mask = 0)
        d logits_j = g (1[j = y] − p_j) / T  (− g_H p_j (log p_j + H) / T with entropy)
    group_advantages_cuda(rewards (N,), group_size, scale, eps)   = grpo_core.advantages

Where the library is looked for (first hit wins; ``GRPO_CORE_CUDA_LIB`` alone if set):
    $GRPO_CORE_CUDA_LIB → grpo_core/kernels/_lib/ (pip install) → build/cuda/ (``make cuda``)
Loading is lazy (first ``available()``/kernel call) and never touches CUDA; ``available(device)``
returns None or the reason this backend cannot run (no library, tensors not on CUDA, no CUDA
device, driver too old or no kernel image for this GPU).

Differences from the reference / the Triton backend, stated once:
  - Entropy (``return_entropy=True``) is differentiable here (dH/dz_j = −p_j (log p_j + H)).
  - The CUDA runtime is linked statically into the library; it shares torch's CUDA context and
    streams through the driver, and needs a driver at least as new as the nvcc that built it.
"""

import ctypes
import os
import threading

import torch

from grpo_core.advantages import SCALES, check_rewards
from grpo_core.kernels import dispatch
from grpo_core.logprobs import check_labels

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
        _probed[index] = None if code == 0 else (
            f"cannot run on cuda:{index} ({torch.cuda.get_device_name(index)}): "
            f"{cuda_error_string(code)}; the library was built with CUDA {rt // 1000}.{rt % 1000 // 10} "
            "(rebuild for this GPU: GRPO_CORE_CUDA_ARCHS=<major><minor> make cuda)")
    return _probed[index]


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


# ---- token log-probs -------------------------------------------------------------------------

def _launch_fwd(logits, rows, ys, temperature, want_entropy):
    """(K,) rows/ys → logp, lse, entropy-or-None, each (K,) fp32."""
    K = rows.numel()
    _, T, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.empty(K, **f32), torch.empty(K, **f32)
    ent = torch.empty(K, **f32) if want_entropy else None
    with torch.cuda.device(logits.device):
        code = _lib.grpo_token_logprobs_fwd(
            logits.data_ptr(), _DTYPES[logits.dtype], T, V, logits.stride(0), logits.stride(1),
            rows.data_ptr(), ys.data_ptr(), K, temperature, logp.data_ptr(), lse.data_ptr(),
            _ptr(ent), _stream(logits.device))
    _check(code, "token_logprobs_cuda forward")
    return logp, lse, ent


def _launch_bwd(logits, rows, ys, lse, g, ent, g_ent, temperature, grad):
    _, T, V = logits.shape
    with torch.cuda.device(logits.device):
        code = _lib.grpo_token_logprobs_bwd(
            logits.data_ptr(), _DTYPES[logits.dtype], T, V, logits.stride(0), logits.stride(1),
            rows.data_ptr(), ys.data_ptr(), lse.data_ptr(), g.data_ptr(), _ptr(ent), _ptr(g_ent),
            rows.numel(), temperature, grad.data_ptr(), grad.stride(0), grad.stride(1),
            _stream(logits.device))
    _check(code, "token_logprobs_cuda backward")


def _scatter(values_k: torch.Tensor, rows: torch.Tensor, N: int, T: int) -> torch.Tensor:
    out = values_k.new_zeros(N * T)                                   # (N·T,)
    out[rows] = values_k
    return out.view(N, T)


class _TokenLogprobsCuda(torch.autograd.Function):
    """logits (N, T, V) → logp (N, T) [, entropy (N, T)]; rows (K,) = counted flat positions."""

    @staticmethod
    def forward(ctx, logits, labels, rows, temperature, want_entropy, inplace_backward):
        N, T, _ = logits.shape
        ys = labels.reshape(-1)[rows].to(torch.int64).contiguous()    # (K,)
        logp_k, lse_k, ent_k = _launch_fwd(logits, rows, ys, temperature, want_entropy)
        ctx.save_for_backward(logits, rows, ys, lse_k, ent_k)
        ctx.temperature, ctx.inplace = temperature, inplace_backward
        ctx.set_materialize_grads(False)
        logp = _scatter(logp_k, rows, N, T)                           # (N, T), 0 where masked
        if not want_entropy:
            return logp
        return logp, _scatter(ent_k, rows, N, T)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        logits, rows, ys, lse_k, ent_k = ctx.saved_tensors
        N, T, _ = logits.shape
        K = rows.numel()
        g_k = (grad_logp.reshape(-1)[rows].float().contiguous() if grad_logp is not None
               else lse_k.new_zeros(K))                               # (K,) dLoss/dlogp
        g_ent_k = grad_ent.reshape(-1)[rows].float().contiguous() if grad_ent is not None else None
        # (N, T, V): the logits buffer itself, or a new one; the kernel writes the K counted rows,
        # the others are zeroed here (only they: no full memset under the kernel's writes).
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if K < N * T:
            skip = torch.ones(N * T, dtype=torch.bool, device=logits.device)
            skip[rows] = False
            grad[skip.view(N, T)] = 0
        _launch_bwd(logits, rows, ys, lse_k, g_k, ent_k if g_ent_k is not None else None, g_ent_k,
                    ctx.temperature, grad)
        return grad, None, None, None, None, None


def _check_logprob_args(logits, labels, mask, temperature, where):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{where}: logits must be a (N, T, V) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"{where}: labels {tuple(labels.shape)} must be logits[:2] = {tuple(logits.shape[:2])}")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"{where}: mask {tuple(mask.shape)} must match labels {tuple(labels.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"{where}: logits dtype {logits.dtype} not supported; use float32, bfloat16 or float16")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{where}: labels must hold integer token ids, got {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")
    _require(where, *(t for t in (logits, labels, mask) if t is not None))


def token_logprobs_cuda(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        mask: torch.Tensor | None = None, return_entropy: bool = False,
                        inplace_backward: bool = False):
    """logits (N, T, V) fp32/bf16/fp16 on a GPU, labels (N, T) → logp (N, T) fp32 [, entropy].

    Same values as grpo_core.logprobs.token_logprobs; masked positions give 0 and zero gradient.
    ``inplace_backward`` writes d logits into the logits buffer (destroys them; see kernels/__init__).
    """
    where = "token_logprobs_cuda"
    _check_logprob_args(logits, labels, mask, temperature, where)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernel reads vocab rows as contiguous vectors
    N, T, V = logits.shape
    keep = None if mask is None else mask.bool()
    check_labels(labels, V, keep, where)
    if keep is None:
        rows = torch.arange(N * T, device=logits.device)                   # (K = N·T,)
    else:
        rows = keep.reshape(-1).nonzero().squeeze(1)                        # (K,) int64, host sync
    return _TokenLogprobsCuda.apply(logits, labels, rows, float(temperature), return_entropy,
                                    inplace_backward)


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
