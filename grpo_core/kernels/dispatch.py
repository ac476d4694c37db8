"""Backend choice for the fused kernels: one function, one log line per fallback.

    backend="auto"  → "cuda" (library built and tensors on a GPU) → "triton" (GPU) → "torch"
    GRPO_CORE_BACKEND=torch|triton|cuda forces one everywhere (tests force "triton" under
    TRITON_INTERPRET=1 on CPU). Asking explicitly for a backend that cannot run raises.

Each backend module registers an ``available(device) -> str | None`` probe: None when it can run
on that device, else the reason it cannot (shown in the error or the fallback log line).
"""

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("grpo_core.kernels")

BACKENDS = ("torch", "triton", "cuda")
_PROBES: dict[str, Callable[[torch.device], str | None]] = {"torch": lambda device: None}
_warned: set[str] = set()


def register(name: str, probe: Callable[[torch.device], str | None]) -> None:
    """Make backend ``name`` selectable; ``probe(device)`` returns None or why it can't run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    _PROBES[name] = probe


PATHS = {"torch": ("logits", "linear"), "triton": ("logits", "linear"), "cuda": ("logits",)}   # what each serves


def check_backend(name: str, paths=("logits", "linear")) -> None:
    """Raise ValueError when backend ``name`` cannot serve one of ``paths`` in principle (whatever the
    device): "logits" = token_logprobs / fused_grpo_loss, "linear" = the fused-linear path the
    trainer uses. Called when a config loads, so a wrong choice fails before any model loads."""
    if name == "auto":
        return
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    missing = [p for p in paths if p not in PATHS[name]]
    if missing:
        raise ValueError(f"grpo.backend={name!r} has no kernel for the {'/'.join(missing)} path "
                         f"(it serves {', '.join(PATHS[name])}); the trainer's loss is the fused-linear path: "
                         "use 'auto', 'triton' or 'torch'")


def why_unavailable(name: str, device: torch.device) -> str | None:
    probe = _PROBES.get(name)
    if probe is None:
        return f"the {name} backend is not registered (its module failed to import)"
    return probe(device)


def resolve(backend: str, device: torch.device) -> str:
    """Return the backend to run on ``device`` for a requested ``backend`` ("auto" or a name)."""
    forced = os.environ.get("GRPO_CORE_BACKEND")
    if backend == "auto" and forced:
        backend = forced
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        reason = why_unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} was asked for but cannot run on {device}: {reason}")
        return backend
    if device.type != "cuda":
        return "torch"  # the Triton interpreter is for tests (explicit backend="triton"), not speed
    for name in ("cuda", "triton"):
        reason = why_unavailable(name, device)
        if reason is None:
            return name
        key = f"{name}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            log.warning("grpo_core: %s backend unavailable (%s); falling back", name, reason)
    return "torch"
