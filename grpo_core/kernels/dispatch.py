"""Backend choice for the fused kernels: what each backend serves, and which one runs.

Two paths, served by every backend (see grpo_core/kernels/__init__.py for the modules):
    "logits"  token_logprobs / fused_grpo_loss               logits (N, T, V) → log-probs
    "linear"  linear_token_logprobs / fused_linear_grpo_loss  hidden (N, T, H) × W (V, H) → log-probs
A backend name means exactly that backend on both paths: asking for one that cannot run on the
tensors' device raises (no silent substitution).

    backend="auto"  → logits: "cuda" → "triton" → "torch";  linear: "triton" → "cuda" → "torch"
                      (on a GPU, the first that can run; on CPU always "torch"). The linear order
                      puts Triton first because it never writes logits to memory (cuda_linear.py
                      writes an fp32 tile per chunk); bench/bench_loss.py measures both.
    GRPO_CORE_BACKEND=torch|triton|cuda forces one everywhere (tests force "triton" under
    TRITON_INTERPRET=1 on CPU).

Each backend registers an ``available(device) -> str | None`` probe: None when it can run on that
device, else the reason it cannot (shown in the error or the one fallback log line).
``check_backend`` answers the device-independent question (can this name serve these paths at
all?) for config validation, before any model or GPU is touched.
"""

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("grpo_core.kernels")

BACKENDS = ("torch", "triton", "cuda")
PATHS = ("logits", "linear")
# What each backend can serve, independent of the machine: path → the module that implements it.
SERVES = {
    "torch": {"logits": "torch_backend", "linear": "torch_backend"},
    "triton": {"logits": "triton_logprobs", "linear": "triton_linear"},
    "cuda": {"logits": "cuda", "linear": "cuda_linear"},
}
AUTO_ORDER = {"logits": ("cuda", "triton"), "linear": ("triton", "cuda")}
_PROBES: dict[str, Callable[[torch.device], str | None]] = {"torch": lambda device: None}
_warned: set[str] = set()


def check_backend(name: str, paths=PATHS) -> None:
    """Raise ValueError unless backend ``name`` ("auto" or one of BACKENDS) can serve every path in
    ``paths`` in principle, whatever device this machine has. For config validation at load time."""
    if isinstance(paths, str):
        paths = (paths,)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"check_backend: unknown path(s) {unknown}; known: {PATHS}")
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"grpo.backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    missing = [p for p in paths if p not in SERVES[name]]
    if missing:
        raise ValueError(f"grpo.backend {name!r} has no {' or '.join(missing)} path; "
                         f"use one of {[b for b in BACKENDS if all(p in SERVES[b] for p in paths)]} or 'auto'")


def module_name(name: str, path: str) -> str:
    """The module (under grpo_core.kernels) that serves ``path`` for backend ``name``."""
    check_backend(name, (path,))
    return SERVES[name][path]


def register(name: str, probe: Callable[[torch.device], str | None]) -> None:
    """Make backend ``name`` selectable; ``probe(device)`` returns None or why it can't run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    _PROBES[name] = probe


def why_unavailable(name: str, device: torch.device) -> str | None:
    probe = _PROBES.get(name)
    if probe is None:
        return f"the {name} backend is not registered (its module failed to import)"
    return probe(device)


def resolve(backend: str, device: torch.device, path: str = "logits") -> str:
    """Return the backend to run ``path`` on ``device`` for a requested ``backend`` ("auto" or a name)."""
    forced = os.environ.get("GRPO_CORE_BACKEND")
    if backend == "auto" and forced:
        backend = forced
    if backend != "auto":
        check_backend(backend, (path,))
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} was asked for but cannot run on {device}: {reason}")
        return backend
    if device.type != "cuda":
        return "torch"  # the Triton interpreter is for tests (explicit backend="triton"), not speed
    for name in AUTO_ORDER[path]:
        reason = why_unavailable(name, device)
        if reason is None:
            return name
        key = f"{name}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            log.warning("grpo_core: %s backend unavailable (%s); falling back", name, reason)
    return "torch"
